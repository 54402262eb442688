// Tokenizer: loads tokenizer.json (+ tokenizer_config.json) and runs HF `tokenizers`'
// pipeline: added tokens are cut out first (on the raw text, then — for the tokens marked
// `normalized` — on the normalized text), the rest is normalized, pre-tokenized into pieces,
// and each piece is BPE-encoded; the post-processor (or add_bos_token) adds special tokens.
#include "fathom/tokenizer.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/files.h"
#include "core/thread_pool.h"
#include "tokenizer/added_vocab.h"
#include "tokenizer/bpe.h"
#include "tokenizer/decoder.h"
#include "tokenizer/json_fields.h"
#include "tokenizer/normalizer.h"
#include "tokenizer/pre_tokenizer.h"
#include "tokenizer/tokenizer_json.h"
#include "tokenizer/unicode.h"

namespace fathom {

struct Tokenizer::Impl {
  std::string source;
  TokenizerConfig config;
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<Decoder> decoder;
  Bpe bpe;
  std::vector<AddedTokenInfo> added;           // as listed in tokenizer.json
  std::vector<int32_t> added_index;            // id -> index into `added`, or -1
  TokenMap added_by_content;
  AddedTokenMatcher raw_matcher, normalized_matcher;
  int32_t vocab_size = 0;
  // What "add special tokens" adds around a single sequence.
  std::vector<int32_t> prefix, suffix;
  bool has_template = false;

  const AddedTokenInfo* added_token(int32_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= added_index.size() || added_index[static_cast<size_t>(id)] < 0) return nullptr;
    return &added[static_cast<size_t>(added_index[static_cast<size_t>(id)])];
  }

  void encode_pieces(std::string_view text, std::vector<int32_t>& out) const {
    thread_local PreTokenizeState st;
    st.text.assign(text);
    st.pieces.assign(1, Piece{0, static_cast<uint32_t>(text.size())});
    if (pre_tokenizer) pre_tokenizer->apply(st);
    for (const Piece& p : st.pieces) bpe.encode_piece(std::string_view(st.text.data() + p.off, p.len), out);
  }

  void encode_normalized(std::string_view text, std::vector<int32_t>& out) const {
    if (normalized_matcher.empty()) {
      encode_pieces(text, out);
      return;
    }
    std::vector<TextSegment> segs;
    normalized_matcher.split(text, segs);
    for (const auto& s : segs) {
      if (s.id >= 0) out.push_back(s.id);
      else encode_pieces(text.substr(s.start, s.end - s.start), out);
    }
  }

  void encode_text(std::string_view text, std::vector<int32_t>& out) const {
    auto run = [&](std::string_view part) {
      if (!normalizer) {
        encode_normalized(part, out);
        return;
      }
      std::string norm(part);
      normalizer->apply(norm);
      encode_normalized(norm, out);
    };
    if (raw_matcher.empty()) {
      if (!text.empty()) run(text);
      return;
    }
    std::vector<TextSegment> segs;
    raw_matcher.split(text, segs);
    for (const auto& s : segs) {
      if (s.id >= 0) out.push_back(s.id);
      else run(text.substr(s.start, s.end - s.start));
    }
  }
};

namespace {

std::string token_content(const nlohmann::json& v, const std::string& where) {
  if (v.is_null()) return "";
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object()) return json_string(v, "content", where);
  throw Error(cat(where, " must be a string or an object with \"content\""));
}

void parse_config(const nlohmann::json& c, TokenizerConfig& cfg, bool& flags_given, const std::string& where) {
  FATHOM_CHECK(c.is_object(), where, " must be a JSON object");
  if (c.contains("bos_token")) cfg.bos_token = token_content(c["bos_token"], where + ".bos_token");
  if (c.contains("eos_token")) cfg.eos_token = token_content(c["eos_token"], where + ".eos_token");
  if (c.contains("pad_token")) cfg.pad_token = token_content(c["pad_token"], where + ".pad_token");
  flags_given = c.contains("add_bos_token") || c.contains("add_eos_token");
  cfg.add_bos_token = json_bool(c, "add_bos_token", where, false);
  cfg.add_eos_token = json_bool(c, "add_eos_token", where, false);
  if (c.contains("chat_template")) {
    const auto& t = c["chat_template"];
    if (t.is_string()) {
      cfg.chat_template = t.get<std::string>();
    } else if (t.is_array()) {  // [{"name": "default", "template": "..."}, ...]
      for (const auto& e : t)
        if (e.is_object() && e.contains("name") && e["name"].is_string() && e["name"] == "default") cfg.chat_template = json_string(e, "template", where + ".chat_template");
      FATHOM_CHECK(!cfg.chat_template.empty(), where, ".chat_template has no template named \"default\"");
    } else if (!t.is_null()) {
      throw Error(cat(where, ".chat_template must be a string or a list of named templates"));
    }
  }
}

int32_t special_id(const Tokenizer::Impl& im, const std::string& content, const std::string& where) {
  auto it = im.added_by_content.find(content);
  if (it != im.added_by_content.end()) return it->second;
  const int32_t v = im.bpe.find_token(content);
  FATHOM_CHECK(v >= 0, where, ": token \"", content, "\" is not in the vocabulary");
  return v;
}

// TemplateProcessing / RobertaProcessing / BertProcessing: what surrounds a single sequence.
void parse_post_processor(const nlohmann::json& j, Tokenizer::Impl& im, const std::string& where) {
  if (j.is_null()) return;
  const std::string type = json_string(j, "type", where);
  if (type == "ByteLevel") return;  // only adjusts offsets
  if (type == "Sequence") {
    const auto& arr = json_array(j, "processors", where);
    for (size_t i = 0; i < arr.size(); ++i) parse_post_processor(arr[i], im, cat(where, ".processors[", i, "]"));
    return;
  }
  if (type == "TemplateProcessing") {
    const auto& single = json_array(j, "single", where);
    const auto& specials = j.contains("special_tokens") ? json_object(j, "special_tokens", where) : nlohmann::json::object();
    bool seen_seq = false;
    for (size_t i = 0; i < single.size(); ++i) {
      const std::string w = cat(where, ".single[", i, "]");
      const auto& item = single[i];
      if (item.contains("Sequence")) {
        seen_seq = true;
        continue;
      }
      const std::string name = json_string(json_object(item, "SpecialToken", w), "id", w + ".SpecialToken");
      auto it = specials.find(name);
      FATHOM_CHECK(it != specials.end(), w, ": special token \"", name, "\" is not in special_tokens");
      const std::string ids_where = cat(where, ".special_tokens[\"", name, "\"]");
      const nlohmann::json& ids = json_array(*it, "ids", ids_where);
      for (const auto& id : ids) {
        FATHOM_CHECK(id.is_number_integer(), where, ".special_tokens[\"", name, "\"].ids must be integers");
        (seen_seq ? im.suffix : im.prefix).push_back(id.get<int32_t>());
      }
    }
    im.has_template = true;
    return;
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    auto pair_id = [&](const char* k) {
      const auto& v = json_array(j, k, where);
      FATHOM_CHECK(v.size() == 2 && v[1].is_number_integer(), where, ".", k, " must be [token, id]");
      return v[1].get<int32_t>();
    };
    im.prefix = {pair_id("cls")};
    im.suffix = {pair_id("sep")};
    im.has_template = true;
    return;
  }
  throw Error(cat(where, ": unknown post-processor type \"", type,
                  "\" (fathom implements ByteLevel, TemplateProcessing, RobertaProcessing, BertProcessing, Sequence)"));
}

}  // namespace

Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::load(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  FATHOM_CHECK(fs::exists(path, ec), "tokenizer path ", path, " does not exist");
  std::string json_path = path, config_path;
  if (fs::is_directory(path, ec)) {
    json_path = (fs::path(path) / "tokenizer.json").string();
    FATHOM_CHECK(fs::exists(json_path, ec), "directory ", path, " has no tokenizer.json");
  }
  config_path = (fs::path(json_path).parent_path() / "tokenizer_config.json").string();
  std::string config_text;
  if (fs::exists(config_path, ec)) config_text = read_file(config_path);
  auto tok = from_json(read_file(json_path), config_text, json_path);
  return tok;
}

std::unique_ptr<Tokenizer> Tokenizer::from_json(std::string_view tokenizer_json, std::string_view config_json,
                                                const std::string& what) {
  std::unique_ptr<Tokenizer> tok(new Tokenizer());
  tok->impl_ = std::make_unique<Impl>();
  Impl& im = *tok->impl_;
  im.source = what;
  TokenizerJson tj = parse_tokenizer_json(tokenizer_json, what);
  const nlohmann::json& j = tj.rest;
  FATHOM_CHECK(j.is_object(), what, " must hold a JSON object");
  bool flags_given = false;
  if (!config_json.empty()) {
    const std::string cw = cat(std::filesystem::path(what).parent_path().string(), "/tokenizer_config.json");
    nlohmann::json c;
    try {
      c = nlohmann::json::parse(config_json);
    } catch (const nlohmann::json::exception& e) {
      throw Error(cat(cw, " is not valid JSON: ", e.what()));
    }
    parse_config(c, im.config, flags_given, cw);
  }

  const std::string w = what + ": ";
  im.normalizer = parse_normalizer(j.value("normalizer", nlohmann::json()), w + "normalizer");
  im.pre_tokenizer = parse_pre_tokenizer(j.value("pre_tokenizer", nlohmann::json()), w + "pre_tokenizer");
  im.decoder = parse_decoder(j.value("decoder", nlohmann::json()), w + "decoder");
  FATHOM_CHECK(tj.has_vocab, what, ": model has no field \"vocab\" (an object of token -> id)");
  FATHOM_CHECK(tj.has_merges, what, ": model has no field \"merges\" (an array)");
  im.bpe.load(json_object(j, "model", what), std::move(tj.vocab), tj.merges,
              im.pre_tokenizer && im.pre_tokenizer->byte_level(), w + "model");

  int32_t vocab_end = im.bpe.vocab_end();
  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    const auto& arr = json_array(j, "added_tokens", what);
    for (size_t i = 0; i < arr.size(); ++i) {
      const std::string aw = cat(w, "added_tokens[", i, "]");
      const auto& a = arr[i];
      AddedTokenInfo t;
      const auto& id = json_field(a, "id", aw);
      FATHOM_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() < (1 << 24), aw,
                   ".id must be an integer in [0, 2^24)");
      t.id = id.get<int32_t>();
      t.content = json_string(a, "content", aw);
      FATHOM_CHECK(!t.content.empty(), aw, ".content is empty");
      FATHOM_CHECK(utf8_invalid_offset(t.content) == std::string::npos, aw, ".content is not valid UTF-8");
      t.special = json_bool(a, "special", aw, false);
      t.lstrip = json_bool(a, "lstrip", aw, false);
      t.rstrip = json_bool(a, "rstrip", aw, false);
      t.single_word = json_bool(a, "single_word", aw, false);
      t.normalized = json_bool(a, "normalized", aw, !t.special);
      vocab_end = std::max(vocab_end, t.id + 1);
      im.added.push_back(t);
    }
  }
  FATHOM_CHECK(vocab_end <= im.bpe.vocab_end() + static_cast<int32_t>(im.added.size()) + (1 << 20), what,
               ": added token ids reach ", vocab_end - 1, ", far beyond the ", im.bpe.vocab_end(), "-entry vocabulary");
  im.vocab_size = vocab_end;
  im.added_index.assign(static_cast<size_t>(vocab_end), -1);
  std::vector<AddedTokenInfo> raw_set, norm_set;
  for (size_t i = 0; i < im.added.size(); ++i) {
    const auto& t = im.added[i];
    im.added_index[static_cast<size_t>(t.id)] = static_cast<int32_t>(i);
    im.added_by_content.emplace(t.content, t.id);
    // With no normalizer the normalized text is the raw text: one pass finds both kinds.
    (t.normalized && im.normalizer ? norm_set : raw_set).push_back(t);
  }
  im.raw_matcher.build(raw_set);
  im.normalized_matcher.build(norm_set);

  if (flags_given) {  // transformers' Llama-style tokenizers: the config's flags decide
    if (im.config.add_bos_token && !im.config.bos_token.empty())
      im.prefix = {special_id(im, im.config.bos_token, what + " (bos_token)")};
    if (im.config.add_eos_token && !im.config.eos_token.empty())
      im.suffix = {special_id(im, im.config.eos_token, what + " (eos_token)")};
  } else {
    parse_post_processor(j.value("post_processor", nlohmann::json()), im, w + "post_processor");
  }
  for (int32_t id : im.prefix) FATHOM_CHECK(id >= 0 && id < im.vocab_size, what, ": the post-processor adds id ", id, ", outside the vocabulary");
  for (int32_t id : im.suffix) FATHOM_CHECK(id >= 0 && id < im.vocab_size, what, ": the post-processor adds id ", id, ", outside the vocabulary");
  return tok;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  const size_t bad = utf8_invalid_offset(text);
  FATHOM_CHECK(bad == std::string_view::npos, "input text is not valid UTF-8 at byte ", bad);
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special) out.insert(out.end(), impl_->prefix.begin(), impl_->prefix.end());
  impl_->encode_text(text, out);
  if (add_special) out.insert(out.end(), impl_->suffix.begin(), impl_->suffix.end());
  return out;
}

std::vector<std::vector<int32_t>> Tokenizer::encode_batch(const std::vector<std::string>& texts, bool add_special,
                                                          ThreadPool* pool) const {
  for (size_t i = 0; i < texts.size(); ++i) {
    const size_t bad = utf8_invalid_offset(texts[i]);
    FATHOM_CHECK(bad == std::string::npos, "input text ", i, " is not valid UTF-8 at byte ", bad);
  }
  std::vector<std::vector<int32_t>> out(texts.size());
  ThreadPool& p = pool ? *pool : ThreadPool::global();
  p.parallel_for(static_cast<int64_t>(texts.size()), [&](int64_t a, int64_t b, int) {
    for (int64_t i = a; i < b; ++i) out[static_cast<size_t>(i)] = encode(texts[static_cast<size_t>(i)], add_special);
  });
  return out;
}

std::string Tokenizer::token_bytes(int32_t id, bool first) const {
  std::string s = id_to_token(id);
  if (impl_->decoder) impl_->decoder->apply(s, first);
  return s;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string bytes;
  bool first = true;
  for (int32_t id : ids) {
    if (skip_special && is_special(id)) continue;
    bytes += token_bytes(id, first);
    first = false;
  }
  return utf8_sanitize(bytes);
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end()) return it->second;
  if (const int32_t id = impl_->bpe.find_token(token); id >= 0) return id;
  return std::nullopt;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  FATHOM_CHECK(id >= 0 && id < impl_->vocab_size, "token id ", id, " is outside the vocabulary [0, ", impl_->vocab_size,
               ")");
  if (const AddedTokenInfo* t = impl_->added_token(id)) return t->content;
  const auto& v = impl_->bpe.id_to_token();
  FATHOM_CHECK(static_cast<size_t>(id) < v.size() && !v[static_cast<size_t>(id)].empty(), "token id ", id,
               " is not assigned to any token in ", impl_->source);
  return v[static_cast<size_t>(id)];
}

bool Tokenizer::is_special(int32_t id) const {
  const AddedTokenInfo* t = impl_->added_token(id);
  return t && t->special;
}

const std::vector<AddedTokenInfo>& Tokenizer::added_tokens() const { return impl_->added; }
const TokenizerConfig& Tokenizer::config() const { return impl_->config; }
const std::string& Tokenizer::source() const { return impl_->source; }

std::optional<int32_t> Tokenizer::bos_id() const {
  if (impl_->config.bos_token.empty()) return std::nullopt;
  return token_to_id(impl_->config.bos_token);
}

std::optional<int32_t> Tokenizer::eos_id() const {
  if (impl_->config.eos_token.empty()) return std::nullopt;
  return token_to_id(impl_->config.eos_token);
}

// ---- streaming detokenizer

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special)
    : tok_(tokenizer), skip_special_(skip_special) {}

std::string StreamDecoder::push(int32_t id) {
  if (skip_special_ && tok_.is_special(id)) return "";
  pending_ += tok_.token_bytes(id, first_);
  first_ = false;
  // Hold back the bytes of a character that is still incomplete; everything before it is
  // emitted now (invalid sequences there become U+FFFD).
  const size_t keep = unicode::incomplete_tail(pending_);
  std::string out = utf8_sanitize(std::string_view(pending_).substr(0, pending_.size() - keep));
  pending_.erase(0, pending_.size() - keep);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = utf8_sanitize(pending_);
  pending_.clear();
  return out;
}

void StreamDecoder::reset() {
  pending_.clear();
  first_ = true;
}

}  // namespace fathom
