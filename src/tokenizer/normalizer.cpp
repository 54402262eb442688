#include "tokenizer/normalizer.h"

#include <vector>
#include <nlohmann/json.hpp>

#include "tokenizer/json_fields.h"
#include "tokenizer/regex.h"
#include "tokenizer/unicode.h"

namespace fathom {
namespace {

class Sequence final : public Normalizer {
 public:
  explicit Sequence(std::vector<std::unique_ptr<Normalizer>> items) : items_(std::move(items)) {}
  void apply(std::string& text) const override {
    for (auto& n : items_) n->apply(text);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> items_;
};

class Replace final : public Normalizer {
 public:
  Replace(std::unique_ptr<Regex> regex, std::string literal, std::string content)
      : regex_(std::move(regex)), literal_(std::move(literal)), content_(std::move(content)) {}
  void apply(std::string& text) const override {
    std::vector<std::pair<size_t, size_t>> m;
    if (regex_) {
      regex_->find_all(text, m);
    } else if (!literal_.empty()) {
      for (size_t p = text.find(literal_); p != std::string::npos; p = text.find(literal_, p + literal_.size()))
        m.emplace_back(p, p + literal_.size());
    }
    if (m.empty()) return;
    std::string out;
    size_t prev = 0;
    for (auto [a, b] : m) {
      out.append(text, prev, a - prev);
      out += content_;
      prev = b;
    }
    out.append(text, prev, std::string::npos);
    text.swap(out);
  }

 private:
  std::unique_ptr<Regex> regex_;
  std::string literal_, content_;
};

class Prepend final : public Normalizer {
 public:
  explicit Prepend(std::string p) : p_(std::move(p)) {}
  void apply(std::string& text) const override {
    if (!text.empty()) text.insert(0, p_);
  }

 private:
  std::string p_;
};

class Strip final : public Normalizer {
 public:
  Strip(bool left, bool right) : left_(left), right_(right) {}
  void apply(std::string& text) const override {
    size_t a = 0, b = text.size(), len;
    if (left_)
      while (a < b && unicode::is_whitespace(unicode::decode(text, a, &len))) a += len;
    if (right_)
      while (b > a) {
        size_t k = b - 1;
        while (k > a && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
        if (!unicode::is_whitespace(unicode::decode(text, k, &len))) break;
        b = k;
      }
    text = text.substr(a, b - a);
  }

 private:
  bool left_, right_;
};

}  // namespace

std::unique_ptr<Normalizer> parse_normalizer(const nlohmann::json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  FATHOM_CHECK(j.is_object(), where, " must be an object or null");
  const std::string type = json_string(j, "type", where);
  if (type == "Sequence") {
    const auto& arr = json_array(j, "normalizers", where);
    std::vector<std::unique_ptr<Normalizer>> items;
    for (size_t i = 0; i < arr.size(); ++i)
      if (auto n = parse_normalizer(arr[i], cat(where, ".normalizers[", i, "]"))) items.push_back(std::move(n));
    if (items.empty()) return nullptr;
    return std::make_unique<Sequence>(std::move(items));
  }
  if (type == "Replace") {
    const auto& pat = json_object(j, "pattern", where);
    std::string content = json_string(j, "content", where);
    if (pat.contains("Regex"))
      return std::make_unique<Replace>(std::make_unique<Regex>(json_string(pat, "Regex", where + ".pattern"), where), "",
                                       content);
    return std::make_unique<Replace>(nullptr, json_string(pat, "String", where + ".pattern"), content);
  }
  if (type == "Prepend") return std::make_unique<Prepend>(json_string(j, "prepend", where));
  if (type == "Strip") return std::make_unique<Strip>(json_bool(j, "strip_left", where, true), json_bool(j, "strip_right", where, true));
  throw Error(cat(where, ": unknown normalizer type \"", type,
                  "\" (fathom implements Sequence, Replace, Prepend and Strip)"));
}

}  // namespace fathom
