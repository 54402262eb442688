#include "tokenizer/decoder.h"

#include <vector>
#include <nlohmann/json.hpp>

#include "tokenizer/json_fields.h"
#include "tokenizer/unicode.h"

namespace fathom {
namespace {

class Sequence final : public Decoder {
 public:
  explicit Sequence(std::vector<std::unique_ptr<Decoder>> items) : items_(std::move(items)) {}
  void apply(std::string& token, bool first) const override {
    for (auto& d : items_) d->apply(token, first);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> items_;
};

// A token whose characters are all in the byte-level alphabet becomes those bytes; any other
// token (an added token such as <｜User｜>) is kept as its UTF-8 text, as HF does.
class ByteLevel final : public Decoder {
 public:
  void apply(std::string& token, bool) const override {
    std::string raw;
    if (unicode::byte_level_decode(token, raw)) token.swap(raw);
  }
};

class Replace final : public Decoder {
 public:
  Replace(std::string from, std::string to) : from_(std::move(from)), to_(std::move(to)) {}
  void apply(std::string& token, bool) const override {
    if (from_.empty()) return;
    for (size_t p = token.find(from_); p != std::string::npos; p = token.find(from_, p + to_.size()))
      token.replace(p, from_.size(), to_);
  }

 private:
  std::string from_, to_;
};

class ByteFallback final : public Decoder {
 public:
  void apply(std::string& token, bool) const override {
    if (token.size() == 6 && token.compare(0, 3, "<0x") == 0 && token[5] == '>') {
      auto hex = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1; };
      int hi = hex(token[3]), lo = hex(token[4]);
      if (hi >= 0 && lo >= 0) token.assign(1, static_cast<char>(hi * 16 + lo));
    }
  }
};

// Strips `content` from the start/end of each token — or, after a Fuse (HF joins all tokens
// into one string there), from the start of the whole text only; a trailing strip after Fuse
// would need the end of the text, which a stream never sees, so it is not applied.
class Strip final : public Decoder {
 public:
  Strip(std::string content, size_t start, size_t stop, bool fused)
      : content_(std::move(content)), start_(start), stop_(fused ? 0 : stop), fused_(fused) {}
  void apply(std::string& token, bool first) const override {
    if (content_.empty() || (fused_ && !first)) return;
    for (size_t k = 0; k < start_ && token.compare(0, content_.size(), content_) == 0; ++k) token.erase(0, content_.size());
    for (size_t k = 0; k < stop_ && token.size() >= content_.size() &&
                       token.compare(token.size() - content_.size(), content_.size(), content_) == 0;
         ++k)
      token.resize(token.size() - content_.size());
  }

 private:
  std::string content_;
  size_t start_, stop_;
  bool fused_;
};

class Metaspace final : public Decoder {
 public:
  Metaspace(std::string replacement, bool strip_first) : rep_(std::move(replacement)), strip_first_(strip_first) {}
  void apply(std::string& token, bool first) const override {
    if (!rep_.empty() && token.find(rep_) != std::string::npos) {
      std::string out;
      for (size_t i = 0; i < token.size();) {
        if (token.compare(i, rep_.size(), rep_) == 0) {
          out.push_back(' ');
          i += rep_.size();
        } else {
          out.push_back(token[i++]);
        }
      }
      token.swap(out);
    }
    if (first && strip_first_ && !token.empty() && token[0] == ' ') token.erase(0, 1);
  }

 private:
  std::string rep_;
  bool strip_first_;
};

class Noop final : public Decoder {
 public:
  void apply(std::string&, bool) const override {}
};

}  // namespace

std::unique_ptr<Decoder> parse_decoder(const nlohmann::json& j, const std::string& where, bool fused);

std::unique_ptr<Decoder> parse_decoder(const nlohmann::json& j, const std::string& where) {
  return parse_decoder(j, where, false);
}

std::unique_ptr<Decoder> parse_decoder(const nlohmann::json& j, const std::string& where, bool fused) {
  if (j.is_null()) return nullptr;
  FATHOM_CHECK(j.is_object(), where, " must be an object or null");
  const std::string type = json_string(j, "type", where);
  if (type == "Sequence") {
    const auto& arr = json_array(j, "decoders", where);
    std::vector<std::unique_ptr<Decoder>> items;
    for (size_t i = 0; i < arr.size(); ++i) {
      // (a "type" that is not a string is reported by the recursive call, not thrown by value())
      if (arr[i].is_object() && arr[i].contains("type") && arr[i]["type"].is_string() && arr[i]["type"] == "Fuse")
        fused = true;
      if (auto d = parse_decoder(arr[i], cat(where, ".decoders[", i, "]"), fused)) items.push_back(std::move(d));
    }
    return std::make_unique<Sequence>(std::move(items));
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevel>();
  if (type == "Replace") {
    const auto& pat = json_object(j, "pattern", where);
    FATHOM_CHECK(pat.contains("String"), where, ".pattern: only String patterns are implemented for the Replace decoder");
    return std::make_unique<Replace>(json_string(pat, "String", where + ".pattern"), json_string(j, "content", where));
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallback>();
  if (type == "Fuse") return std::make_unique<Noop>();  // tokens are concatenated anyway
  if (type == "Strip") {
    auto num = [&](const char* k) {
      const auto& v = json_field(j, k, where);
      FATHOM_CHECK(v.is_number_unsigned(), where, ".", k, " must be a non-negative integer");
      return v.get<size_t>();
    };
    return std::make_unique<Strip>(json_string(j, "content", where), num("start"), num("stop"), fused);
  }
  if (type == "Metaspace") {
    std::string rep = j.contains("replacement") ? json_string(j, "replacement", where) : "\xE2\x96\x81";
    bool strip = json_bool(j, "add_prefix_space", where, true);
    if (j.contains("prepend_scheme") && j["prepend_scheme"].is_string()) strip = j["prepend_scheme"] != "never";
    return std::make_unique<Metaspace>(rep, strip);
  }
  throw Error(cat(where, ": unknown decoder type \"", type,
                  "\" (fathom implements Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip and Metaspace)"));
}

}  // namespace fathom
