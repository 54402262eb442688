#include "tokenizer/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "core/error.h"

namespace fathom {
namespace {

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof(buf));
  return reinterpret_cast<const char*>(buf);
}

// Per-thread match state: one match data block and one JIT stack reused by every pattern, so
// matching allocates nothing.
struct ThreadMatchState {
  pcre2_match_data* data = nullptr;
  pcre2_jit_stack* stack = nullptr;
  pcre2_match_context* context = nullptr;
  ThreadMatchState() {
    data = pcre2_match_data_create(1, nullptr);
    stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    context = pcre2_match_context_create(nullptr);
    pcre2_jit_stack_assign(context, nullptr, stack);
    // Bound the interpreter too (used when JIT is unavailable): no pathological pattern runs forever.
    pcre2_set_match_limit(context, 50'000'000);
  }
  ~ThreadMatchState() {
    pcre2_match_context_free(context);
    pcre2_jit_stack_free(stack);
    pcre2_match_data_free(data);
  }
};

ThreadMatchState& thread_state() {
  thread_local ThreadMatchState state;
  return state;
}

}  // namespace

Regex::Regex(const std::string& pattern, const std::string& what) : pattern_(pattern), what_(what) {
  int err = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP, &err, &offset, nullptr);
  FATHOM_CHECK(code != nullptr, what, ": regex ", pattern, " does not compile at offset ", offset, ": ",
               pcre2_message(err));
  code_ = code;
  jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

void Regex::find_all(std::string_view subject, std::vector<std::pair<size_t, size_t>>& out) const {
  auto& st = thread_state();
  auto* code = static_cast<pcre2_code*>(code_);
  const auto* s = reinterpret_cast<PCRE2_SPTR>(subject.data());
  const size_t n = subject.size();
  size_t pos = 0;
  while (pos < n) {
    int rc = jit_ ? pcre2_jit_match(code, s, n, pos, PCRE2_NO_UTF_CHECK, st.data, st.context)
                  : pcre2_match(code, s, n, pos, PCRE2_NO_UTF_CHECK, st.data, st.context);
    if (rc == PCRE2_ERROR_NOMATCH) return;
    FATHOM_CHECK(rc >= 0, what_, ": regex matching failed at byte ", pos, ": ", pcre2_message(rc));
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.data);
    size_t start = ov[0], end = ov[1];
    out.emplace_back(start, end);  // empty matches too: they still split (as in HF)
    if (end > start) {
      pos = end;
    } else {
      pos = start + 1;  // step over one character so the search moves on
      while (pos < n && (subject[pos] & 0xC0) == 0x80) ++pos;
    }
  }
}

}  // namespace fathom
