// libFuzzer target for the DeepSeek-V3 tokenizer (byte-level BPE, split regexes, added and
// special tokens) and the streaming detokenizer. The tokenizer is loaded once, from
// $FATHOM_FUZZ_TOKENIZER or <source>/../shared/data/deepseek-v3-tokenizer. Each input is used
// twice:
//  1. as text. Valid UTF-8: encode (with and without special tokens) must round-trip exactly,
//     decode(encode(s)) == s, and StreamDecoder fed the ids one by one must produce decode's
//     text. Invalid UTF-8: encode must throw fathom::Error.
//  2. as little-endian uint32 ids (modulo the vocabulary size): decode must give valid UTF-8,
//     StreamDecoder must agree with it, and that text must round-trip through encode.
// Any failed check prints what it saw and aborts, so libFuzzer saves the input.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <sanitizer/common_interface_defs.h>

#include "core/error.h"
#include "fathom/tokenizer.h"

#ifndef FATHOM_SOURCE_DIR
#define FATHOM_SOURCE_DIR "."
#endif

namespace {

const fathom::Tokenizer& tokenizer() {
  static const std::unique_ptr<fathom::Tokenizer> tok = [] {
    const char* env = std::getenv("FATHOM_FUZZ_TOKENIZER");
    const std::string path = env && *env ? env : FATHOM_SOURCE_DIR "/../shared/data/deepseek-v3-tokenizer";
    try {
      return fathom::Tokenizer::load(path);
    } catch (const fathom::Error& e) {
      std::fprintf(stderr, "fuzz_tokenizer: cannot load the tokenizer (set FATHOM_FUZZ_TOKENIZER): %s\n", e.what());
      std::exit(1);
    }
  }();
  return *tok;
}

void print_escaped(const char* label, std::string_view s) {
  std::fprintf(stderr, "%s (%zu bytes): \"", label, s.size());
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7F && c != '"' && c != '\\') std::fputc(c, stderr);
    else std::fprintf(stderr, "\\x%02X", c);
  }
  std::fprintf(stderr, "\"\n");
}

void print_ids(const char* label, const std::vector<int32_t>& ids) {
  std::fprintf(stderr, "%s (%zu):", label, ids.size());
  for (int32_t id : ids) std::fprintf(stderr, " %d", id);
  std::fprintf(stderr, "\n");
}

[[noreturn]] void fail(const char* what, std::string_view text, const std::vector<int32_t>& ids, std::string_view got,
                       std::string_view want) {
  std::fprintf(stderr, "fuzz_tokenizer: %s\n", what);
  print_escaped("text", text);
  print_ids("ids", ids);
  print_escaped("got ", got);
  print_escaped("want", want);
  __sanitizer_print_stack_trace();
  std::abort();
}

std::string stream_decode(const fathom::Tokenizer& tok, const std::vector<int32_t>& ids, bool skip_special) {
  fathom::StreamDecoder sd(tok, skip_special);
  std::string out;
  for (int32_t id : ids) {
    std::string piece = sd.push(id);
    if (fathom::utf8_invalid_offset(piece) != std::string::npos)
      fail("StreamDecoder::push returned invalid UTF-8", "", ids, piece, "");
    out += piece;
  }
  out += sd.flush();
  return out;
}

// decode and stream-decode agree and give valid UTF-8; returns decode's text.
std::string check_decode(const fathom::Tokenizer& tok, std::string_view text, const std::vector<int32_t>& ids,
                         bool skip_special) {
  const std::string dec = tok.decode(ids, skip_special);
  if (fathom::utf8_invalid_offset(dec) != std::string::npos) fail("decode returned invalid UTF-8", text, ids, dec, "");
  const std::string streamed = stream_decode(tok, ids, skip_special);
  if (streamed != dec)
    fail(skip_special ? "StreamDecoder (skip_special) != decode (skip_special)" : "StreamDecoder != decode", text, ids,
         streamed, dec);
  return dec;
}

void check_text(const fathom::Tokenizer& tok, std::string_view text) {
  const std::vector<int32_t> ids = tok.encode(text, false);
  const std::string dec = check_decode(tok, text, ids, false);
  if (dec != text) fail("decode(encode(text)) != text", text, ids, dec, text);
  check_decode(tok, text, ids, true);

  // With special tokens: the same ids, surrounded only by special tokens.
  const std::vector<int32_t> with = tok.encode(text, true);
  bool found = false;
  for (size_t k = 0; !found && k + ids.size() <= with.size(); ++k) {
    if (!std::equal(ids.begin(), ids.end(), with.begin() + static_cast<std::ptrdiff_t>(k))) continue;
    found = true;
    for (size_t i = 0; i < with.size(); ++i)
      if ((i < k || i >= k + ids.size()) && !tok.is_special(with[i])) found = false;
  }
  if (!found) {
    print_ids("encode(text, true)", with);
    fail("encode(text, true) is not encode(text) surrounded by special tokens", text, ids, "", "");
  }
  check_decode(tok, text, with, false);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  tokenizer();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fathom::Tokenizer& tok = tokenizer();
  const std::string_view text(reinterpret_cast<const char*>(data), size);

  // 1. The input as text.
  if (fathom::utf8_invalid_offset(text) == std::string_view::npos) {
    check_text(tok, text);
  } else {
    for (bool add_special : {false, true}) {
      bool threw = false;
      try {
        tok.encode(text, add_special);
      } catch (const fathom::Error&) {
        threw = true;
      }
      if (!threw) fail("encode accepted invalid UTF-8", text, {}, "", "");
    }
  }

  // 2. The input as ids.
  const uint32_t vocab = static_cast<uint32_t>(tok.vocab_size());
  std::vector<int32_t> ids;
  ids.reserve(size / 4);
  for (size_t i = 0; i + 4 <= size; i += 4) {
    uint32_t v;
    std::memcpy(&v, data + i, 4);
    ids.push_back(static_cast<int32_t>(v % vocab));
  }
  const std::string dec = check_decode(tok, "", ids, false);
  check_decode(tok, "", ids, true);
  // decode's text is valid UTF-8 (U+FFFD for broken bytes), so it must round-trip too.
  check_text(tok, dec);
  return 0;
}
