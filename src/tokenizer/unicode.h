// UTF-8 and the byte-level alphabet. Byte-level BPE (GPT-2, DeepSeek) first maps every byte
// to a printable Unicode character so that the vocabulary can be written as text: bytes that
// are already printable Latin-1 stand for themselves, the other 68 become U+0100.. in order.
// fathom keeps text as raw bytes and applies the mapping only to the vocabulary, at load.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace fathom::unicode {

// Length of the valid UTF-8 sequence starting at s[i] (1..4), or 0 if it is not valid there
// (bad lead byte, missing/bad continuation, overlong form, surrogate, beyond U+10FFFF).
size_t valid_seq_len(std::string_view s, size_t i);

// Decodes the code point at s[i] (which must be valid UTF-8); sets *len to its byte length.
uint32_t decode(std::string_view s, size_t i, size_t* len);

void append_utf8(std::string& out, uint32_t cp);

// Unicode White_Space (what Rust's char::is_whitespace says).
bool is_whitespace(uint32_t cp);

// Number of bytes at the end of `s` that are a proper prefix of a valid UTF-8 character
// still waiting for its continuation bytes (0..3).
size_t incomplete_tail(std::string_view s);

// GPT-2 byte ↔ character table.
struct ByteLevelTable {
  std::array<uint32_t, 256> byte_to_cp{};  // byte -> code point standing for it
  ByteLevelTable();
  // The code point's byte, or -1 if the code point is not in the table.
  int cp_to_byte(uint32_t cp) const {
    if (cp < 256 && cp_is_self(cp)) return static_cast<int>(cp);
    if (cp >= 256 && cp < 256 + 68) return extra_[cp - 256];
    return -1;
  }
  static bool cp_is_self(uint32_t b) { return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255); }

 private:
  std::array<int, 68> extra_{};
};
const ByteLevelTable& byte_level_table();

// `token` written in the byte-level alphabet → the raw bytes it stands for. Returns false (and
// leaves `out` unspecified) when some character is not in the alphabet.
bool byte_level_decode(std::string_view token, std::string& out);

}  // namespace fathom::unicode
