// Pre-tokenizers cut text into pieces before BPE runs on each piece on its own, so merges
// never cross a piece boundary (a word never merges with the space of the next one, digits
// come in groups of at most three, CJK runs stay apart from Latin text, ...). These follow
// HF `tokenizers` semantics: Sequence, Split (regex or string; Removed / Isolated /
// MergedWithPrevious / MergedWithNext / Contiguous; invert), ByteLevel, Digits, Whitespace,
// WhitespaceSplit.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace fathom {

class Regex;

struct Piece {
  uint32_t off = 0, len = 0;  // bytes of PreTokenizeState::text
};

// The text being cut and the current pieces. Pre-tokenizers may append to `text` (ByteLevel's
// add_prefix_space) but never change bytes that pieces point to.
struct PreTokenizeState {
  std::string text;
  std::vector<Piece> pieces, next;
  std::vector<std::pair<size_t, size_t>> matches;
  struct Seg { size_t start, end; bool match; };
  std::vector<Seg> segs;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void apply(PreTokenizeState& st) const = 0;
  // True when this is (or contains) ByteLevel: BPE then starts from single bytes.
  virtual bool byte_level() const { return false; }
};

// From the `pre_tokenizer` object of tokenizer.json; null JSON gives nullptr (no cutting).
// Throws fathom::Error naming `where` and the unknown type or bad field.
std::unique_ptr<PreTokenizer> parse_pre_tokenizer(const nlohmann::json& j, const std::string& where);

}  // namespace fathom
