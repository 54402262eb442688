// A compiled PCRE2 pattern with Unicode properties (UTF + UCP) and JIT, as the byte-level BPE
// pre-tokenizers need: DeepSeek's split pattern uses \p{L}, \p{N}, \p{P}, \p{S}, \p{M} and a
// negative look-ahead `\s+(?!\S)`, which is why this is PCRE2 and not std::regex.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace fathom {

class Regex {
 public:
  // Throws fathom::Error naming `what`, the PCRE2 message and the offset in the pattern.
  Regex(const std::string& pattern, const std::string& what);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Non-overlapping matches (an empty one only where nothing longer matches) in `subject` (valid UTF-8) from left to right, as
  // [start, end) byte offsets appended to `out`. Throws fathom::Error if PCRE2 gives up
  // (match or JIT stack limit), never loops.
  void find_all(std::string_view subject, std::vector<std::pair<size_t, size_t>>& out) const;

  const std::string& pattern() const { return pattern_; }

 private:
  std::string pattern_;
  std::string what_;
  void* code_ = nullptr;  // pcre2_code_8*
  bool jit_ = false;
};

}  // namespace fathom
