#include "tokenizer/added_vocab.h"

#include <algorithm>

#include "tokenizer/unicode.h"

namespace fathom {

void AddedTokenMatcher::build(const std::vector<AddedTokenInfo>& tokens) {
  tokens_ = tokens;
  nodes_.assign(1, Node{});
  std::fill(std::begin(first_byte_), std::end(first_byte_), false);
  for (size_t t = 0; t < tokens_.size(); ++t) {
    const std::string& s = tokens_[t].content;
    if (s.empty()) continue;
    first_byte_[static_cast<uint8_t>(s[0])] = true;
    int32_t node = 0;
    for (char ch : s) {
      const auto b = static_cast<uint8_t>(ch);
      int32_t next = child(node, b);
      if (next < 0) {
        next = static_cast<int32_t>(nodes_.size());
        nodes_.emplace_back();
        auto& kids = nodes_[static_cast<size_t>(node)].kids;
        kids.insert(std::lower_bound(kids.begin(), kids.end(), std::make_pair(b, int32_t{-1})), {b, next});
      }
      node = next;
    }
    // Two added tokens with the same text: the first one wins.
    if (nodes_[static_cast<size_t>(node)].token < 0) nodes_[static_cast<size_t>(node)].token = static_cast<int32_t>(t);
  }
}

int32_t AddedTokenMatcher::child(int32_t node, uint8_t b) const {
  const auto& kids = nodes_[static_cast<size_t>(node)].kids;
  auto it = std::lower_bound(kids.begin(), kids.end(), std::make_pair(b, int32_t{-1}));
  return (it != kids.end() && it->first == b) ? it->second : -1;
}

namespace {
// Last / first character of a string is a "word" character (alphanumeric or underscore).
bool word_char(uint32_t cp) {
  if (cp < 0x80) return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || cp == '_';
  return !unicode::is_whitespace(cp) && cp != 0xFFFD;  // non-ASCII letters: approximate as word characters
}
uint32_t last_cp(std::string_view s) {
  if (s.empty()) return 0;
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  size_t len;
  return unicode::decode(s, i, &len);
}
}  // namespace

void AddedTokenMatcher::split(std::string_view text, std::vector<TextSegment>& out) const {
  size_t emitted = 0;  // end of what has been output so far
  size_t i = 0;
  const size_t n = text.size();
  while (i < n) {
    if (!first_byte_[static_cast<uint8_t>(text[i])]) {
      ++i;
      continue;
    }
    // Longest added token starting at i.
    int32_t node = 0, found = -1;
    size_t found_end = 0;
    for (size_t j = i; j < n; ++j) {
      node = child(node, static_cast<uint8_t>(text[j]));
      if (node < 0) break;
      if (nodes_[static_cast<size_t>(node)].token >= 0) {
        found = nodes_[static_cast<size_t>(node)].token;
        found_end = j + 1;
      }
    }
    if (found < 0) {
      ++i;
      continue;
    }
    const AddedTokenInfo& tok = tokens_[static_cast<size_t>(found)];
    size_t start = i, stop = found_end;
    if (tok.single_word) {
      bool left_ok = start == 0 || !word_char(last_cp(text.substr(0, start)));
      size_t len = 0;
      bool right_ok = stop == n || !word_char(unicode::decode(text, stop, &len));
      if (!left_ok || !right_ok) {
        i = found_end;  // the matcher moved past this match (as Aho-Corasick's iterator does)
        continue;
      }
    }
    if (tok.lstrip) {
      size_t s = start;
      while (s > emitted) {
        size_t k = s - 1;
        while (k > emitted && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
        size_t len;
        if (!unicode::is_whitespace(unicode::decode(text, k, &len))) break;
        s = k;
      }
      start = s;
    }
    if (tok.rstrip) {
      while (stop < n) {
        size_t len;
        if (!unicode::is_whitespace(unicode::decode(text, stop, &len))) break;
        stop += len;
      }
    }
    if (start > emitted) out.push_back({emitted, start, -1});
    out.push_back({start, stop, tok.id});
    emitted = stop;
    i = stop;
  }
  if (emitted < n) out.push_back({emitted, n, -1});
}

}  // namespace fathom
