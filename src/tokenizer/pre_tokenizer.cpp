#include "tokenizer/pre_tokenizer.h"

#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/json_fields.h"
#include "tokenizer/regex.h"

namespace fathom {
namespace {

enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

Behavior parse_behavior(const std::string& s, const std::string& where) {
  if (s == "Removed") return Behavior::Removed;
  if (s == "Isolated") return Behavior::Isolated;
  if (s == "MergedWithPrevious") return Behavior::MergedWithPrevious;
  if (s == "MergedWithNext") return Behavior::MergedWithNext;
  if (s == "Contiguous") return Behavior::Contiguous;
  throw Error(cat(where, ".behavior: unknown split behaviour \"", s,
                  "\" (expected Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous)"));
}

// Cuts every piece at the matches of a pattern (a regex, or a literal string), then keeps or
// merges the matches according to the behaviour — HF's Split pre-tokenizer.
class Split final : public PreTokenizer {
 public:
  Split(std::unique_ptr<Regex> regex, std::string literal, Behavior behavior, bool invert)
      : regex_(std::move(regex)), literal_(std::move(literal)), behavior_(behavior), invert_(invert) {}

  void apply(PreTokenizeState& st) const override {
    st.next.clear();
    for (const Piece& p : st.pieces) split_piece(st, p);
    st.pieces.swap(st.next);
  }

 private:
  void find(PreTokenizeState& st, std::string_view s) const {
    st.matches.clear();
    if (regex_) {
      regex_->find_all(s, st.matches);
      return;
    }
    if (literal_.empty()) return;
    size_t pos = 0;
    while ((pos = s.find(literal_, pos)) != std::string_view::npos) {
      st.matches.emplace_back(pos, pos + literal_.size());
      pos += literal_.size();
    }
  }

  void split_piece(PreTokenizeState& st, const Piece& p) const {
    std::string_view s(st.text.data() + p.off, p.len);
    find(st, s);
    auto emit = [&](size_t a, size_t b) {
      if (b > a) st.next.push_back({p.off + static_cast<uint32_t>(a), static_cast<uint32_t>(b - a)});
    };
    if (behavior_ == Behavior::Isolated && !invert_) {  // the common case, without the segment list
      size_t prev = 0;
      for (auto [a, b] : st.matches) {
        emit(prev, a);
        emit(a, b);
        prev = b;
      }
      emit(prev, s.size());
      return;
    }
    // General case: the piece as alternating (gap, match) segments, matches flipped by invert.
    auto& segs = st.segs;
    segs.clear();
    size_t prev = 0;
    for (auto [a, b] : st.matches) {
      if (a != prev) segs.push_back({prev, a, invert_});
      segs.push_back({a, b, !invert_});
      prev = b;
    }
    if (prev != s.size()) segs.push_back({prev, s.size(), invert_});
    std::vector<std::pair<size_t, size_t>> out;  // merged ranges
    switch (behavior_) {
      case Behavior::Removed:
        for (auto& g : segs)
          if (!g.match) out.emplace_back(g.start, g.end);
        break;
      case Behavior::Isolated:
        for (auto& g : segs) out.emplace_back(g.start, g.end);
        break;
      case Behavior::MergedWithPrevious: {
        bool prev_match = false;
        for (auto& g : segs) {
          if (g.match && !prev_match && !out.empty()) out.back().second = g.end;
          else out.emplace_back(g.start, g.end);
          prev_match = g.match;
        }
        break;
      }
      case Behavior::MergedWithNext: {
        bool prev_match = false;
        for (size_t k = segs.size(); k-- > 0;) {
          auto& g = segs[k];
          if (g.match && !prev_match && !out.empty()) out.back().first = g.start;
          else out.emplace_back(g.start, g.end);
          prev_match = g.match;
        }
        std::reverse(out.begin(), out.end());
        break;
      }
      case Behavior::Contiguous: {
        bool prev_match = false;
        for (auto& g : segs) {
          if (g.match == prev_match && !out.empty()) out.back().second = g.end;
          else out.emplace_back(g.start, g.end);
          prev_match = g.match;
        }
        break;
      }
    }
    for (auto [a, b] : out) emit(a, b);
  }

  std::unique_ptr<Regex> regex_;
  std::string literal_;
  Behavior behavior_;
  bool invert_;
};

// GPT-2's split pattern, which ByteLevel applies when use_regex is true.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ByteLevel: optionally a space before each piece and GPT-2's split; the byte → character
// mapping itself is applied to the vocabulary at load instead of to the text (see unicode.h).
class ByteLevel final : public PreTokenizer {
 public:
  ByteLevel(bool add_prefix_space, bool use_regex) : add_prefix_space_(add_prefix_space) {
    if (use_regex)
      split_ = std::make_unique<Split>(std::make_unique<Regex>(kGpt2Pattern, "ByteLevel pre-tokenizer"), "",
                                       Behavior::Isolated, false);
  }
  void apply(PreTokenizeState& st) const override {
    if (add_prefix_space_) {
      for (Piece& p : st.pieces) {
        if (p.len > 0 && st.text[p.off] == ' ') continue;
        const uint32_t off = static_cast<uint32_t>(st.text.size());
        st.text.push_back(' ');
        st.text.append(st.text, p.off, p.len);
        p = {off, p.len + 1};
      }
    }
    if (split_) split_->apply(st);
  }
  bool byte_level() const override { return true; }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Split> split_;
};

class Sequence final : public PreTokenizer {
 public:
  explicit Sequence(std::vector<std::unique_ptr<PreTokenizer>> items) : items_(std::move(items)) {}
  void apply(PreTokenizeState& st) const override {
    for (auto& p : items_) p->apply(st);
  }
  bool byte_level() const override {
    for (auto& p : items_)
      if (p->byte_level()) return true;
    return false;
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> items_;
};

std::unique_ptr<PreTokenizer> regex_split(const std::string& pattern, Behavior b, bool invert, const std::string& where) {
  return std::make_unique<Split>(std::make_unique<Regex>(pattern, where), "", b, invert);
}

}  // namespace

std::unique_ptr<PreTokenizer> parse_pre_tokenizer(const nlohmann::json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  FATHOM_CHECK(j.is_object(), where, " must be an object or null");
  const std::string type = json_string(j, "type", where);
  if (type == "Sequence") {
    const auto& arr = json_array(j, "pretokenizers", where);
    std::vector<std::unique_ptr<PreTokenizer>> items;
    bool seen_byte_level = false;
    for (size_t i = 0; i < arr.size(); ++i) {
      auto p = parse_pre_tokenizer(arr[i], cat(where, ".pretokenizers[", i, "]"));
      if (!p) continue;
      // Pieces stay raw bytes; a cutter after ByteLevel would have to see the mapped characters.
      FATHOM_CHECK(!seen_byte_level, where, ".pretokenizers[", i,
                   "]: a pre-tokenizer after ByteLevel is not supported by fathom");
      seen_byte_level = p->byte_level();
      items.push_back(std::move(p));
    }
    return std::make_unique<Sequence>(std::move(items));
  }
  if (type == "Split") {
    const auto& pat = json_object(j, "pattern", where);
    Behavior b = parse_behavior(json_string(j, "behavior", where), where);
    bool invert = json_bool(j, "invert", where, false);
    if (pat.contains("Regex")) return regex_split(json_string(pat, "Regex", where + ".pattern"), b, invert, where);
    if (pat.contains("String")) {
      std::string lit = json_string(pat, "String", where + ".pattern");
      return std::make_unique<Split>(nullptr, lit, b, invert);
    }
    throw Error(cat(where, ".pattern must have a \"Regex\" or a \"String\""));
  }
  if (type == "ByteLevel") {
    return std::make_unique<ByteLevel>(json_bool(j, "add_prefix_space", where, true),
                                       json_bool(j, "use_regex", where, true));
  }
  if (type == "Digits") {
    bool individual = json_bool(j, "individual_digits", where, false);
    return regex_split(individual ? R"(\p{N})" : R"(\p{N}+)", Behavior::Isolated, false, where);
  }
  if (type == "Whitespace") return regex_split(R"(\w+|[^\w\s]+)", Behavior::Removed, true, where);
  if (type == "WhitespaceSplit") return regex_split(R"(\s+)", Behavior::Removed, false, where);
  if (type == "Punctuation") {
    // HF's Punctuation uses Unicode punctuation (P*); its default behaviour is Isolated.
    Behavior b = j.contains("behavior") ? parse_behavior(json_string(j, "behavior", where), where) : Behavior::Isolated;
    return regex_split(R"(\p{P})", b, false, where);
  }
  throw Error(cat(where, ": unknown pre-tokenizer type \"", type,
                  "\" (fathom implements Sequence, Split, ByteLevel, Digits, Whitespace, WhitespaceSplit, Punctuation)"));
}

}  // namespace fathom
