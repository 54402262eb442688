// libFuzzer target for the tokenizer loader: the input is a tokenizer.json text, optionally
// followed by a 0 byte and a tokenizer_config.json text. Tokenizer::from_json may reject it
// only with fathom::Error (anything else escaping — a JSON library exception, a crash, UB —
// is a bug). When it loads, a few fixed strings are encoded and decoded, and every id is
// decoded alone and streamed; those may throw fathom::Error only for ids the vocabulary
// leaves unassigned, and decoded text must always be valid UTF-8.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <sanitizer/common_interface_defs.h>

#include "core/error.h"
#include "fathom/tokenizer.h"

namespace {

[[noreturn]] void fail(const char* what, std::string_view got) {
  std::fprintf(stderr, "fuzz_tokenizer_json: %s (%zu bytes):", what, got.size());
  for (unsigned char c : got) std::fprintf(stderr, " %02X", c);
  std::fprintf(stderr, "\n");
  __sanitizer_print_stack_trace();
  std::abort();
}

void check_utf8(const char* what, const std::string& s) {
  if (fathom::utf8_invalid_offset(s) != std::string::npos) fail(what, s);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t split = input.find('\0');
  const std::string_view tokenizer_json = input.substr(0, split);
  const std::string_view config_json = split == std::string_view::npos ? std::string_view() : input.substr(split + 1);

  std::unique_ptr<fathom::Tokenizer> tok;
  try {
    tok = fathom::Tokenizer::from_json(tokenizer_json, config_json, "fuzz/tokenizer.json");
  } catch (const fathom::Error&) {
    return 0;
  }

  static const char* const kTexts[] = {
      "",
      "Hello, world!",
      "  two  spaces,\ttab\nnewline\r\n",
      "h\xC3\xA9llo w\xC3\xB6rld \xE4\xBD\xA0\xE5\xA5\xBD \xE3\x81\x93\xE3\x82\x93 \xF0\x9F\x99\x82 \xD9\x85\xD8\xB1",
      "12345 3.14 x1y2",
      "<s>a</s><unk> <|endoftext|>",
  };
  std::vector<std::string> texts(std::begin(kTexts), std::end(kTexts));
  for (const auto& t : tok->added_tokens()) texts.push_back("x" + t.content + " " + t.content + "y");

  for (const std::string& text : texts) {
    for (bool add_special : {false, true}) {
      std::vector<int32_t> ids;
      try {
        ids = tok->encode(text, add_special);
      } catch (const fathom::Error&) {
        continue;  // e.g. a PCRE2 match error in a normalizer/pre-tokenizer regex
      }
      try {  // throws for a post-processor id outside the vocabulary (not checked at load, as in HF)
        check_utf8("decode returned invalid UTF-8", tok->decode(ids));
        check_utf8("decode(skip_special) returned invalid UTF-8", tok->decode(ids, true));
      } catch (const fathom::Error&) {
      }
    }
  }

  // Every id (up to a bound), alone and streamed.
  const int32_t n = std::min<int32_t>(tok->vocab_size(), 512);
  fathom::StreamDecoder sd(*tok);
  for (int32_t id = 0; id < n; ++id) {
    try {
      check_utf8("decode of one id returned invalid UTF-8", tok->decode({id}));
      tok->token_bytes(id, id == 0);
      tok->id_to_token(id);
      tok->is_special(id);
      check_utf8("StreamDecoder::push returned invalid UTF-8", sd.push(id));
    } catch (const fathom::Error&) {
    }
  }
  check_utf8("StreamDecoder::flush returned invalid UTF-8", sd.flush());
  for (int32_t bad : {-1, tok->vocab_size()}) {
    bool threw = false;
    try {
      tok->decode({bad});
    } catch (const fathom::Error&) {
      threw = true;
    }
    if (!threw) fail("decode accepted an id outside the vocabulary", std::to_string(bad));
  }
  if (tok->bos_id()) tok->decode({*tok->bos_id()});
  if (tok->eos_id()) tok->decode({*tok->eos_id()});
  return 0;
}
