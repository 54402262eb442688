// The byte-level BPE trainer (see bpe_trainer.h).
#include "tokenizer/bpe_trainer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <queue>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/files.h"
#include "core/progress.h"
#include "core/thread_pool.h"
#include "fathom/tokenizer.h"
#include "tokenizer/pre_tokenizer.h"
#include "tokenizer/unicode.h"

namespace fathom {

namespace {

using ojson = nlohmann::ordered_json;

// DeepSeek-V3's pre-tokenizer, as its tokenizer.json writes it.
ojson pre_tokenizer_json() {
  auto split = [](const std::string& re) {
    return ojson{{"type", "Split"}, {"pattern", {{"Regex", re}}}, {"behavior", "Isolated"}, {"invert", false}};
  };
  return ojson{{"type", "Sequence"},
               {"pretokenizers",
                {split("\\p{N}{1,3}"), split("[一-龥぀-ゟ゠-ヿ]+"),
                 split("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
                       " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
                 ojson{{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}};
}

// A token's raw bytes written in the byte-level alphabet (how tokenizer.json spells it).
std::string byte_level_string(const std::string& raw) {
  const auto& table = unicode::byte_level_table();
  std::string out;
  for (unsigned char b : raw) unicode::append_utf8(out, table.byte_to_cp[b]);
  return out;
}

// Large texts are counted in pieces of about this many bytes, cut where a line ends and the
// next one starts with a character that is not whitespace (so no pre-tokenizer match spans a cut).
constexpr size_t kChunk = size_t(1) << 20;

std::vector<std::string_view> cut_chunks(std::string_view text) {
  std::vector<std::string_view> out;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = std::min(text.size(), start + kChunk);
    while (end < text.size() &&
           !(text[end - 1] == '\n' && text[end] != '\n' && text[end] != '\r' && text[end] != ' ' && text[end] != '\t'))
      ++end;
    out.push_back(text.substr(start, end - start));
    start = end;
  }
  return out;
}

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

}  // namespace

std::vector<BpeSpecialToken> BpeTrainOptions::default_specials() {
  return {{"<｜begin▁of▁sentence｜>", true}, {"<｜end▁of▁sentence｜>", true}, {"<｜▁pad▁｜>", true},
          {"<｜User｜>", true},            {"<｜Assistant｜>", true},      {"<think>", false},
          {"</think>", false}};
}

std::string BpeTrainOptions::default_chat_template() {
  return "{{ bos_token }}"
         "{%- for message in messages %}"
         "{%- if message['role'] == 'system' %}{{ message['content'] }}"
         "{%- elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
         "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' }}"
         "{%- if message['reasoning_content'] is defined and message['reasoning_content'] %}"
         "{{ '<think>' + message['reasoning_content'] + '</think>' }}{%- endif %}"
         "{{ message['content'] + '<｜end▁of▁sentence｜>' }}"
         "{%- endif %}"
         "{%- endfor %}"
         "{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{%- endif %}";
}

BpeTrainer::BpeTrainer(BpeTrainOptions options) : opt_(std::move(options)) { check_options(); }
BpeTrainer::~BpeTrainer() = default;

void BpeTrainer::check_options() const {
  FATHOM_CHECK(opt_.min_frequency >= 1, "tokenizer training: min_frequency must be at least 1, not ",
               opt_.min_frequency);
  std::set<std::string> seen;
  for (const auto& s : opt_.specials) {
    FATHOM_CHECK(!s.content.empty(), "tokenizer training: a special token is empty");
    FATHOM_CHECK(utf8_invalid_offset(s.content) == std::string::npos, "tokenizer training: the special token \"",
                 utf8_sanitize(s.content), "\" is not valid UTF-8");
    FATHOM_CHECK(seen.insert(s.content).second, "tokenizer training: the special token \"", s.content,
                 "\" is listed twice");
  }
  const int64_t least = 256 + int64_t(opt_.specials.size());
  FATHOM_CHECK(opt_.vocab_size > least && opt_.vocab_size <= (int64_t(1) << 24), "tokenizer training: vocab_size ",
               opt_.vocab_size, " must be more than the 256 byte tokens and ", opt_.specials.size(),
               " special tokens (", least, ") and at most 16,777,216");
  for (const std::string* role : {&opt_.bos_token, &opt_.eos_token, &opt_.pad_token}) {
    if (role->empty()) continue;
    FATHOM_CHECK(seen.count(*role), "tokenizer training: \"", *role,
                 "\" is named as BOS, EOS or pad token but is not one of the special tokens");
  }
}

void BpeTrainer::count_chunk(std::string_view text, std::unordered_map<std::string, int64_t>& counts) const {
  static thread_local std::unique_ptr<PreTokenizer> pre;
  if (!pre) pre = parse_pre_tokenizer(nlohmann::json::parse(pre_tokenizer_json().dump()), "the trainer's pre-tokenizer");
  thread_local PreTokenizeState st;
  // the special tokens' text is not learnt: cut it out first
  size_t pos = 0;
  while (pos < text.size()) {
    size_t next = text.size(), len = 0;
    for (const auto& s : opt_.specials) {
      const size_t at = text.find(s.content, pos);
      if (at < next) next = at, len = s.content.size();
    }
    const std::string_view part = text.substr(pos, next - pos);
    if (!part.empty()) {
      st.text.assign(part.data(), part.size());
      st.pieces.assign(1, Piece{0, uint32_t(part.size())});
      pre->apply(st);
      for (const Piece& p : st.pieces) ++counts[std::string(st.text.data() + p.off, p.len)];
    }
    pos = next + len;
  }
}

void BpeTrainer::add_text(std::string_view text, const std::string& what) {
  FATHOM_CHECK(!trained_, "tokenizer training: text added after train()");
  const size_t bad = utf8_invalid_offset(text);
  FATHOM_CHECK(bad == std::string::npos, what, " is not valid UTF-8 (byte ", bad, "); the tokenizer trains on text");
  const std::vector<std::string_view> chunks = cut_chunks(text);
  if (!pool_) pool_ = std::make_unique<ThreadPool>(opt_.threads);
  std::vector<std::unordered_map<std::string, int64_t>> local(size_t(pool_->size()));
  pool_->parallel_for(int64_t(chunks.size()), [&](int64_t b, int64_t e, int t) {
    for (int64_t i = b; i < e; ++i) count_chunk(chunks[size_t(i)], local[size_t(t)]);
  });
  for (auto& m : local)
    for (auto& [piece, n] : m) {
      counts_[piece] += n;
      stats_.pieces += n;
    }
  stats_.bytes += int64_t(text.size());
}

void BpeTrainer::add_files(const std::vector<std::string>& inputs) {
  namespace fs = std::filesystem;
  const std::vector<std::string> paths = expand_inputs(inputs, "tokenizer training");
  int64_t total = 0;
  for (const auto& p : paths) {
    std::error_code ec;
    total += int64_t(fs::file_size(p, ec));
  }
  Progress bar("counting pieces", total, true, opt_.progress);
  for (const auto& p : paths) {
    const std::string text = read_file(p);
    add_text(text, p);
    bar.add(int64_t(text.size()));
  }
  bar.finish();
}

void BpeTrainer::train() {
  FATHOM_CHECK(!trained_, "tokenizer training: train() was already called");
  FATHOM_CHECK(!counts_.empty(), "tokenizer training: the corpus has no text to learn from");
  trained_ = true;
  // the distinct pieces in byte order (the result must not depend on hash order)
  std::vector<std::pair<std::string, int64_t>> pieces(counts_.begin(), counts_.end());
  counts_.clear();
  std::sort(pieces.begin(), pieces.end());
  stats_.distinct_pieces = int64_t(pieces.size());
  struct Word {
    std::vector<int32_t> syms;
    int64_t count;
  };
  std::vector<Word> words(pieces.size());
  for (size_t i = 0; i < pieces.size(); ++i) {
    words[i].count = pieces[i].second;
    for (unsigned char b : pieces[i].first) words[i].syms.push_back(int32_t(b));
  }
  pieces.clear();
  pieces.shrink_to_fit();
  tokens_.clear();
  for (int b = 0; b < 256; ++b) tokens_.emplace_back(1, char(b));

  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>> where;  // pair -> words holding it (may repeat)
  for (size_t w = 0; w < words.size(); ++w) {
    const auto& s = words[w].syms;
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      const uint64_t k = pair_key(s[i], s[i + 1]);
      pair_count[k] += words[w].count;
      auto& v = where[k];
      if (v.empty() || v.back() != int32_t(w)) v.push_back(int32_t(w));
    }
  }
  // max-heap of (count, pair); equal counts: the lower pair first. Entries go stale when a
  // count changes and are re-checked when they reach the top.
  struct Entry {
    int64_t count;
    uint64_t pair;
    bool operator<(const Entry& o) const { return count != o.count ? count < o.count : pair > o.pair; }
  };
  std::priority_queue<Entry> heap;
  for (const auto& [k, n] : pair_count) heap.push({n, k});

  const int32_t target_merges = opt_.vocab_size - 256 - int32_t(opt_.specials.size());
  Progress bar("learning merges", target_merges, false, opt_.progress);
  std::vector<uint32_t> stamp(words.size(), 0);  // last merge that visited each word
  std::vector<int32_t> out;
  std::unordered_map<uint64_t, int64_t> delta;
  while (int32_t(merges_.size()) < target_merges && !heap.empty()) {
    const Entry top = heap.top();
    heap.pop();
    const auto it = pair_count.find(top.pair);
    const int64_t now = it == pair_count.end() ? 0 : it->second;
    if (now != top.count) {  // stale: back in at its current count
      if (now > 0) heap.push({now, top.pair});
      continue;
    }
    if (now < opt_.min_frequency) break;
    const int32_t a = int32_t(top.pair >> 32), b = int32_t(top.pair & 0xffffffffu);
    const int32_t id = int32_t(tokens_.size());
    tokens_.push_back(tokens_[size_t(a)] + tokens_[size_t(b)]);
    merges_.emplace_back(a, b);
    const uint32_t mark = uint32_t(merges_.size());
    std::vector<int32_t> list = std::move(where[top.pair]);
    where.erase(top.pair);
    delta.clear();
    for (int32_t w : list) {
      if (stamp[size_t(w)] == mark) continue;
      stamp[size_t(w)] = mark;
      Word& word = words[size_t(w)];
      auto& s = word.syms;
      bool found = false;
      for (size_t i = 0; i + 1 < s.size(); ++i) found = found || (s[i] == a && s[i + 1] == b);
      if (!found) continue;
      // the word's pairs before and after the merge: their difference, times its count
      for (size_t i = 0; i + 1 < s.size(); ++i) delta[pair_key(s[i], s[i + 1])] -= word.count;
      out.clear();
      for (size_t i = 0; i < s.size(); ++i) {
        if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
          out.push_back(id);
          ++i;
        } else {
          out.push_back(s[i]);
        }
      }
      s.assign(out.begin(), out.end());
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        const uint64_t k = pair_key(s[i], s[i + 1]);
        delta[k] += word.count;
        if (s[i] == id || s[i + 1] == id) {  // a pair that may be new: this word holds it
          auto& v = where[k];
          if (v.empty() || v.back() != w) v.push_back(w);
        }
      }
    }
    for (const auto& [k, d] : delta) {
      if (d == 0) continue;
      int64_t& c = pair_count[k];
      c += d;
      if (c <= 0) {
        pair_count.erase(k);
      } else if (d > 0) {
        heap.push({c, k});
      }
    }
    bar.add(1);
  }
  bar.finish();
  stats_.merges = int32_t(merges_.size());
  stats_.stopped_early = stats_.merges < target_merges;
  stats_.vocab_size = int32_t(tokens_.size() + opt_.specials.size());
}

std::string BpeTrainer::tokenizer_json() const {
  FATHOM_CHECK(trained_, "tokenizer training: tokenizer_json() before train()");
  const int32_t n = int32_t(tokens_.size());
  ojson added = ojson::array();
  for (size_t i = 0; i < opt_.specials.size(); ++i) {
    const auto& s = opt_.specials[i];
    added.push_back({{"id", n + int32_t(i)},
                     {"content", s.content},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", s.special}});
  }
  ojson vocab = ojson::object();
  for (int32_t i = 0; i < n; ++i) vocab[byte_level_string(tokens_[size_t(i)])] = i;
  ojson merges = ojson::array();
  for (const auto& [a, b] : merges_)
    merges.push_back(ojson::array({byte_level_string(tokens_[size_t(a)]), byte_level_string(tokens_[size_t(b)])}));
  ojson post;
  if (!opt_.bos_token.empty()) {
    int32_t bos = -1;
    for (size_t i = 0; i < opt_.specials.size(); ++i)
      if (opt_.specials[i].content == opt_.bos_token) bos = n + int32_t(i);
    post = {{"type", "TemplateProcessing"},
            {"single", {{{"SpecialToken", {{"id", opt_.bos_token}, {"type_id", 0}}}},
                        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
            {"pair", {{{"SpecialToken", {{"id", opt_.bos_token}, {"type_id", 0}}}},
                      {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                      {{"SpecialToken", {{"id", opt_.bos_token}, {"type_id", 1}}}},
                      {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
            {"special_tokens", {{opt_.bos_token, {{"id", opt_.bos_token}, {"ids", {bos}}, {"tokens", {opt_.bos_token}}}}}}};
  } else {
    post = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}};
  }
  ojson j = {{"version", "1.0"},
             {"truncation", nullptr},
             {"padding", nullptr},
             {"added_tokens", added},
             {"normalizer", nullptr},
             {"pre_tokenizer", pre_tokenizer_json()},
             {"post_processor", post},
             {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
             {"model",
              {{"type", "BPE"},
               {"dropout", nullptr},
               {"unk_token", nullptr},
               {"continuing_subword_prefix", nullptr},
               {"end_of_word_suffix", nullptr},
               {"fuse_unk", false},
               {"byte_fallback", false},
               {"ignore_merges", false},
               {"vocab", vocab},
               {"merges", merges}}}};
  return j.dump(1, ' ', false) + "\n";
}

std::string BpeTrainer::tokenizer_config_json() const {
  FATHOM_CHECK(trained_, "tokenizer training: tokenizer_config_json() before train()");
  const int32_t n = int32_t(tokens_.size());
  ojson decoder = ojson::object();
  for (size_t i = 0; i < opt_.specials.size(); ++i) {
    const auto& s = opt_.specials[i];
    decoder[std::to_string(n + int32_t(i))] = {{"content", s.content}, {"lstrip", false},  {"normalized", false},
                                               {"rstrip", false},      {"single_word", false}, {"special", s.special}};
  }
  auto role = [](const std::string& t) { return t.empty() ? ojson(nullptr) : ojson(t); };
  // no add_bos_token / add_eos_token: with them, Llama-style loaders ignore the post-processor,
  // which is what adds BOS here
  ojson j = {{"added_tokens_decoder", decoder},
             {"bos_token", role(opt_.bos_token)},
             {"eos_token", role(opt_.eos_token)},
             {"pad_token", role(opt_.pad_token)},
             {"chat_template", opt_.chat_template},
             {"clean_up_tokenization_spaces", false},
             {"model_max_length", opt_.model_max_length},
             {"tokenizer_class", "PreTrainedTokenizerFast"}};
  return j.dump(1, ' ', false) + "\n";
}

void BpeTrainer::save(const std::string& dir) const {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  FATHOM_CHECK(!ec && std::filesystem::is_directory(dir), "tokenizer training: cannot create the directory ", dir,
               ec ? ": " + ec.message() : "");
  write_file_atomic((std::filesystem::path(dir) / "tokenizer.json").string(), tokenizer_json());
  write_file_atomic((std::filesystem::path(dir) / "tokenizer_config.json").string(), tokenizer_config_json());
}

}  // namespace fathom
