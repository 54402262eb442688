#include "tokenizer/tokenizer_json.h"

#include "core/error.h"

namespace fathom {
namespace {

using json = nlohmann::json;

class Sax {
 public:
  Sax(TokenizerJson& out, const std::string& what) : out_(out), what_(what) {}

  bool null() { return value(json()); }
  bool boolean(bool v) { return value(json(v)); }
  bool number_integer(json::number_integer_t v) {
    if (mode_ == Mode::Vocab) return vocab_id(v);
    return value(json(v));
  }
  bool number_unsigned(json::number_unsigned_t v) {
    if (mode_ == Mode::Vocab) return vocab_id(static_cast<int64_t>(std::min<json::number_unsigned_t>(v, INT64_MAX)));
    return value(json(v));
  }
  bool number_float(json::number_float_t v, const std::string&) { return value(json(v)); }
  bool binary(json::binary_t&) { return value(json()); }
  bool string(std::string& s) {
    if (mode_ == Mode::Merges) {
      // "left right": split at the single space.
      const size_t sp = s.find(' ');
      FATHOM_CHECK(sp != std::string::npos && sp > 0 && sp + 1 < s.size() && s.find(' ', sp + 1) == std::string::npos,
                   what_, ": model.merges[", out_.merges.size(), "] = \"", s, "\" is not two tokens separated by one space");
      out_.merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
      return true;
    }
    if (mode_ == Mode::MergePair) {
      FATHOM_CHECK(pair_.size() < 2, what_, ": model.merges[", out_.merges.size(), "] has more than two tokens");
      pair_.push_back(std::move(s));
      return true;
    }
    if (mode_ == Mode::Vocab) bad_vocab();
    return value(json(std::move(s)));
  }
  bool key(std::string& k) {
    key_ = std::move(k);
    return true;
  }
  bool start_object(std::size_t) {
    if (mode_ == Mode::Vocab) bad_vocab();
    FATHOM_CHECK(mode_ != Mode::Merges && mode_ != Mode::MergePair, what_, ": model.merges[", out_.merges.size(),
                 "] must be \"a b\" or [\"a\", \"b\"]");
    if (at_model_field("vocab")) {
      mode_ = Mode::Vocab;
      out_.has_vocab = true;
      out_.vocab.reserve(1 << 17);
      return true;
    }
    return open(json::object());
  }
  bool end_object() {
    if (mode_ == Mode::Vocab) {
      mode_ = Mode::Dom;
      return true;
    }
    stack_.pop_back();
    keys_.pop_back();
    return true;
  }
  bool start_array(std::size_t) {
    if (mode_ == Mode::Vocab) bad_vocab();
    if (mode_ == Mode::Merges) {
      mode_ = Mode::MergePair;
      pair_.clear();
      return true;
    }
    FATHOM_CHECK(mode_ != Mode::MergePair, what_, ": model.merges[", out_.merges.size(), "] must be \"a b\" or [\"a\", \"b\"]");
    if (at_model_field("merges")) {
      mode_ = Mode::Merges;
      out_.has_merges = true;
      out_.merges.reserve(1 << 17);
      return true;
    }
    return open(json::array());
  }
  bool end_array() {
    if (mode_ == Mode::MergePair) {
      FATHOM_CHECK(pair_.size() == 2, what_, ": model.merges[", out_.merges.size(), "] must be [\"a\", \"b\"]");
      out_.merges.emplace_back(std::move(pair_[0]), std::move(pair_[1]));
      mode_ = Mode::Merges;
      return true;
    }
    if (mode_ == Mode::Merges) {
      mode_ = Mode::Dom;
      return true;
    }
    stack_.pop_back();
    keys_.pop_back();
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) {
    throw Error(cat(what_, " is not valid JSON: ", e.what()));
  }

 private:
  enum class Mode { Dom, Vocab, Merges, MergePair };

  // The container about to open sits at root.model.<name>.
  bool at_model_field(const char* name) const {
    return stack_.size() == 2 && keys_[1] == "model" && stack_.back()->is_object() && key_ == name;
  }
  [[noreturn]] void bad_vocab() const {
    throw Error(cat(what_, ": model.vocab[\"", key_, "\"] must be an integer id"));
  }
  bool vocab_id(int64_t v) {
    out_.vocab.emplace_back(std::move(key_), v);
    return true;
  }
  json* place(json v) {
    if (stack_.empty()) {
      out_.rest = std::move(v);
      return &out_.rest;
    }
    json* top = stack_.back();
    if (top->is_object()) {
      json& slot = (*top)[key_];
      slot = std::move(v);
      return &slot;
    }
    top->push_back(std::move(v));
    return &top->back();
  }
  bool value(json v) {
    FATHOM_CHECK(mode_ == Mode::Dom, what_, ": model.merges[", out_.merges.size(), "] must be \"a b\" or [\"a\", \"b\"]");
    place(std::move(v));
    return true;
  }
  bool open(json v) {
    std::string k = stack_.empty() ? std::string() : key_;
    stack_.push_back(place(std::move(v)));
    keys_.push_back(std::move(k));
    return true;
  }

  TokenizerJson& out_;
  const std::string& what_;
  std::vector<json*> stack_;
  std::vector<std::string> keys_;  // the key each open container sits under
  std::string key_;
  Mode mode_ = Mode::Dom;
  std::vector<std::string> pair_;
};

}  // namespace

TokenizerJson parse_tokenizer_json(std::string_view text, const std::string& what) {
  TokenizerJson out;
  Sax sax(out, what);
  json::sax_parse(text.begin(), text.end(), &sax);
  return out;
}

}  // namespace fathom
