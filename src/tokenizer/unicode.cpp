#include "tokenizer/unicode.h"

#include "fathom/tokenizer.h"

namespace fathom::unicode {

namespace {
// What a lead byte promises: the sequence length (0 if it cannot start one) and the allowed
// range of the second byte — narrower after E0/F0 (no overlong forms), ED (no surrogates)
// and F4 (nothing past U+10FFFF).
struct Lead {
  size_t len = 0;
  unsigned lo = 0x80, hi = 0xBF;
};
Lead lead(unsigned b0) {
  Lead l;
  if (b0 < 0x80) l.len = 1;
  else if (b0 >= 0xC2 && b0 <= 0xDF) l.len = 2;
  else if (b0 >= 0xE0 && b0 <= 0xEF) l.len = 3;
  else if (b0 >= 0xF0 && b0 <= 0xF4) l.len = 4;
  if (b0 == 0xE0) l.lo = 0xA0;
  if (b0 == 0xED) l.hi = 0x9F;
  if (b0 == 0xF0) l.lo = 0x90;
  if (b0 == 0xF4) l.hi = 0x8F;
  return l;
}
}  // namespace

size_t valid_seq_len(std::string_view s, size_t i) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const Lead l = lead(p[i]);
  if (l.len <= 1) return l.len;
  if (i + l.len > s.size()) return 0;
  if (p[i + 1] < l.lo || p[i + 1] > l.hi) return 0;
  for (size_t k = 2; k < l.len; ++k)
    if ((p[i + k] & 0xC0) != 0x80) return 0;
  return l.len;
}

uint32_t decode(std::string_view s, size_t i, size_t* len) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + i;
  if (p[0] < 0x80) { *len = 1; return p[0]; }
  if (p[0] < 0xE0) { *len = 2; return ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu); }
  if (p[0] < 0xF0) { *len = 3; return ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu); }
  *len = 4;
  return ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool is_whitespace(uint32_t cp) {
  if (cp >= 0x09 && cp <= 0x0D) return true;
  switch (cp) {
    case 0x20: case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029:
    case 0x202F: case 0x205F: case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

size_t incomplete_tail(std::string_view s) {
  // Look back at most 3 bytes for a lead byte whose sequence runs past the end.
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const unsigned b0 = p[n - back];
    if ((b0 & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    const Lead l = lead(b0);
    if (l.len <= back) return 0;  // complete, ASCII, or not a lead byte at all (len 0)
    // The bytes so far must be a valid prefix.
    if (back >= 2 && (p[n - back + 1] < l.lo || p[n - back + 1] > l.hi)) return 0;
    return back;
  }
  return 0;
}

ByteLevelTable::ByteLevelTable() {
  int next = 0;
  for (uint32_t b = 0; b < 256; ++b) {
    if (cp_is_self(b)) {
      byte_to_cp[b] = b;
    } else {
      byte_to_cp[b] = 256 + static_cast<uint32_t>(next);
      extra_[static_cast<size_t>(next)] = static_cast<int>(b);
      ++next;
    }
  }
}

const ByteLevelTable& byte_level_table() {
  static const ByteLevelTable table;
  return table;
}

bool byte_level_decode(std::string_view token, std::string& out) {
  const auto& t = byte_level_table();
  out.clear();
  size_t i = 0;
  while (i < token.size()) {
    size_t len = valid_seq_len(token, i);
    if (len == 0) return false;
    int b = t.cp_to_byte(decode(token, i, &len));
    if (b < 0) return false;
    out.push_back(static_cast<char>(b));
    i += len;
  }
  return true;
}

}  // namespace fathom::unicode

namespace fathom {

size_t utf8_invalid_offset(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    // Fast path over ASCII, 8 bytes at a time.
    while (i + 8 <= s.size()) {
      uint64_t w;
      __builtin_memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= s.size()) break;
    size_t len = unicode::valid_seq_len(s, i);
    if (len == 0) return i;
    i += len;
  }
  return std::string_view::npos;
}

std::string utf8_sanitize(std::string_view s) {
  // Each maximal ill-formed subsequence becomes one U+FFFD (the "substitution of maximal
  // subparts" rule that Rust's from_utf8_lossy and Python's errors="replace" follow).
  std::string out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    size_t len = unicode::valid_seq_len(s, i);
    if (len > 0) {
      out.append(s.substr(i, len));
      i += len;
      continue;
    }
    // How many bytes form a valid prefix of some sequence? Skip all of them (at least one).
    const unsigned b0 = p[i];
    const unicode::Lead l = unicode::lead(b0);
    size_t skip = 1;
    if (l.len > 1 && i + 1 < s.size() && p[i + 1] >= l.lo && p[i + 1] <= l.hi) {
      skip = 2;
      while (skip < l.len && i + skip < s.size() && (p[i + skip] & 0xC0) == 0x80) ++skip;
    }
    out.append("\xEF\xBF\xBD");
    i += skip;
  }
  return out;
}

}  // namespace fathom
