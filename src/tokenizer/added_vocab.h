// Added tokens (special tokens such as <｜begin▁of▁sentence｜> and extra ones such as <think>)
// are found in the text before anything else runs: the text is cut around them and only the
// stretches between them are pre-tokenized and BPE-encoded. Matching is leftmost-longest over
// all added tokens (as HF does with Aho-Corasick), here with a byte trie; lstrip/rstrip let a
// token swallow the whitespace beside it, single_word only matches it as a whole word.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fathom/tokenizer.h"

namespace fathom {

struct TextSegment {
  size_t start = 0, end = 0;  // bytes of the text given to split()
  int32_t id = -1;            // the added token's id, or -1 for ordinary text
};

class AddedTokenMatcher {
 public:
  // `tokens`: the added tokens this matcher finds (one of HF's two sets: those matched on the
  // raw text, or those matched on the normalized text).
  void build(const std::vector<AddedTokenInfo>& tokens);
  bool empty() const { return tokens_.empty(); }
  // Cuts `text` into ordinary stretches and added tokens, in order; appends to `out`.
  void split(std::string_view text, std::vector<TextSegment>& out) const;

 private:
  struct Node {
    int32_t token = -1;                            // index into tokens_ ending here
    std::vector<std::pair<uint8_t, int32_t>> kids;  // sorted by byte
  };
  int32_t child(int32_t node, uint8_t b) const;
  std::vector<AddedTokenInfo> tokens_;
  std::vector<Node> nodes_;
  bool first_byte_[256] = {};
};

}  // namespace fathom
