#include "train/data.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <optional>
#include <random>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/files.h"
#include "core/progress.h"
#include "core/sha256.h"
#include "fathom/tokenizer.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/unicode.h"

namespace fs = std::filesystem;

namespace fathom::train {
namespace {

constexpr char kMagic[8] = {'F', 'T', 'O', 'K', 'S', 'H', 'R', 'D'};
constexpr size_t kHeader = 8 + 4 + 4 + 8;

// The offset of the first byte that is not valid UTF-8, or npos.
size_t invalid_utf8_at(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = unicode::valid_seq_len(s, i);
    if (n == 0) return i;
    i += n;
  }
  return std::string_view::npos;
}

void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(char(uint8_t(v >> (8 * i))));
}
void put_u64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(char(uint8_t(v >> (8 * i))));
}
uint64_t get_le(const std::string& s, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t(uint8_t(s[at + size_t(i)])) << (8 * i);
  return v;
}

std::string shard_bytes(const std::vector<int32_t>& ids) {
  std::string out(kMagic, sizeof(kMagic));
  put_u32(out, 1);
  put_u32(out, 0);
  put_u64(out, ids.size());
  out.reserve(kHeader + 4 * ids.size());
  for (int32_t id : ids) put_u32(out, uint32_t(id));
  return out;
}

}  // namespace

void write_shard(const std::string& path, const std::vector<int32_t>& ids) { write_file_atomic(path, shard_bytes(ids)); }

std::vector<int32_t> read_shard(const std::string& path) {
  const std::string s = read_file(path);
  FATHOM_CHECK(s.size() >= kHeader && std::memcmp(s.data(), kMagic, sizeof(kMagic)) == 0,
               "token shard '", path, "' does not start with the shard header (not a fathom token shard?).");
  const uint64_t version = get_le(s, 8, 4), count = get_le(s, 16, 8);
  FATHOM_CHECK(version == 1, "token shard '", path, "' has format version ", version, "; this build reads version 1.");
  FATHOM_CHECK(count <= (s.size() - kHeader) / 4 && s.size() == kHeader + 4 * count, "token shard '", path,
               "' says it holds ", count, " ids but has ", s.size(), " bytes (", kHeader + 4 * count,
               " expected): truncated or corrupted.");
  std::vector<int32_t> ids(static_cast<size_t>(count));
  for (uint64_t i = 0; i < count; ++i) ids[size_t(i)] = int32_t(uint32_t(get_le(s, kHeader + 4 * i, 4)));
  return ids;
}

std::vector<int32_t> token_ids(std::vector<int32_t> ids) {
  for (int32_t& v : ids) v = token_id(v);
  return ids;
}

std::vector<int32_t> read_split(const std::string& data_dir, const std::string& split) {
  const std::string mpath = (fs::path(data_dir) / "manifest.json").string();
  FATHOM_CHECK(fs::exists(mpath), "training data '", data_dir, "' has no manifest.json (run fathom data prepare).");
  const nlohmann::json m = nlohmann::json::parse(read_file(mpath), nullptr, false);
  FATHOM_CHECK(m.is_object() && m.contains("shards") && m["shards"].is_array(), mpath, ": no list of shards.");
  std::vector<int32_t> ids;
  for (const nlohmann::json& s : m["shards"]) {
    FATHOM_CHECK(s.is_object() && s.contains("file") && s.contains("split") && s["file"].is_string(), mpath,
                 ": a shard entry without file and split.");
    if (s["split"] != split) continue;
    const std::vector<int32_t> part = read_shard((fs::path(data_dir) / s["file"].get<std::string>()).string());
    ids.insert(ids.end(), part.begin(), part.end());
  }
  return ids;
}

DataSummary prepare_data(const Tokenizer& tokenizer, const DataPrepareOptions& o) {
  FATHOM_CHECK(o.val_fraction >= 0 && o.val_fraction < 1, "data prepare: the validation fraction must lie in [0, 1) "
               "(got ", o.val_fraction, ").");
  FATHOM_CHECK(o.shard_tokens >= 1024, "data prepare: shards of ", o.shard_tokens,
               " tokens are too small (at least 1024).");
  FATHOM_CHECK(!o.out_dir.empty(), "data prepare: no output directory was given.");
  const std::optional<int32_t> bos = tokenizer.bos_id(), eos = tokenizer.eos_id();
  FATHOM_CHECK(bos || eos, "data prepare: the tokenizer has neither a BOS nor an EOS token to mark where a document "
               "starts.");
  const std::vector<std::string> files = expand_inputs(o.inputs, "data prepare");
  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  FATHOM_CHECK(!ec && fs::is_directory(o.out_dir), "data prepare: cannot create the output directory '", o.out_dir,
               "': ", ec.message());
  FATHOM_CHECK(!fs::exists(fs::path(o.out_dir) / "manifest.json"), "data prepare: '", o.out_dir,
               "' already holds a data set (manifest.json); choose another directory or remove it.");

  // read every document (each file, or with chat each line), checking it is text
  DataSummary sum;
  std::vector<std::string> texts, names;
  // chat: each conversation's text cut into pieces, every other one an answer (context, answer,
  // context, ...; the first may be empty), tokenized piece by piece
  std::vector<std::vector<std::string>> pieces;
  int64_t total_bytes = 0;
  for (const std::string& f : files) total_bytes += int64_t(fs::file_size(f, ec));
  Progress progress("tokenizing", total_bytes, /*bytes=*/true, o.progress);
  std::optional<ChatTemplate> chat;
  ChatTemplateOptions chat_opts;
  if (o.chat) {
    FATHOM_CHECK(!tokenizer.config().chat_template.empty(), "data prepare --chat: the tokenizer '", tokenizer.source(),
                 "' has no chat template (tokenizer_config.json's chat_template).");
    chat = ChatTemplate::parse(tokenizer.config().chat_template);
    chat_opts.bos_token = tokenizer.config().bos_token;
    chat_opts.eos_token = tokenizer.config().eos_token;
  }
  for (const std::string& f : files) {
    std::string text = read_file(f);
    const size_t bad = invalid_utf8_at(text);
    if (bad != std::string_view::npos) {
      FATHOM_CHECK(o.skip_invalid_utf8, "data prepare: '", f, "' is not UTF-8 text (invalid byte at offset ", bad,
                   "); pass --skip-invalid-utf8 to skip such files.");
      sum.skipped.push_back(f);
      progress.add(int64_t(text.size()));
      continue;
    }
    sum.bytes += int64_t(text.size());
    if (!chat) {
      texts.push_back(std::move(text));
      names.push_back(f);
      continue;
    }
    size_t line_no = 0;
    for (size_t at = 0; at < text.size();) {
      const size_t end = std::min(text.find('\n', at), text.size());
      const std::string_view line(text.data() + at, end - at);
      ++line_no;
      at = end + 1;
      if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
      const std::string where = cat(f, ":", line_no);
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      FATHOM_CHECK(!j.is_discarded(), "data prepare --chat: ", where, " is not a JSON value.");
      const nlohmann::json& msgs = j.is_object() && j.contains("messages") ? j["messages"] : j;
      FATHOM_CHECK(msgs.is_array() && !msgs.empty(), "data prepare --chat: ", where,
                   " is neither a non-empty array of messages nor an object with one under \"messages\".");
      for (size_t i = 0; i < msgs.size(); ++i)
        FATHOM_CHECK(msgs[i].is_object() && msgs[i].contains("role") && msgs[i]["role"].is_string() &&
                         msgs[i].contains("content") && msgs[i]["content"].is_string(),
                     "data prepare --chat: ", where, ": message ", i, " needs a string \"role\" and \"content\".");
      // the answers: what appending each assistant message adds to the conversation so far
      // rendered with the generation prompt
      std::string full = chat->render(msgs, chat_opts);
      std::vector<std::string> parts;
      size_t done = 0;
      for (size_t i = 0; i < msgs.size(); ++i) {
        if (msgs[i]["role"] != "assistant") continue;
        nlohmann::json head = nlohmann::json::array();
        for (size_t k = 0; k < i; ++k) head.push_back(msgs[k]);
        ChatTemplateOptions gen = chat_opts;
        gen.add_generation_prompt = true;
        const std::string before = i ? chat->render(head, gen) : std::string();
        head.push_back(msgs[i]);
        const std::string upto = chat->render(head, chat_opts);
        FATHOM_CHECK(before.size() >= done && upto.size() >= before.size() && upto.compare(0, before.size(), before) == 0 &&
                         full.compare(0, upto.size(), upto) == 0,
                     "data prepare --chat: ", where, ": the chat template does not render this conversation as a "
                     "growing prefix (message ", i, "), so its answers cannot be told from the prompts.");
        parts.push_back(full.substr(done, before.size() - done));
        parts.push_back(full.substr(before.size(), upto.size() - before.size()));
        done = upto.size();
      }
      parts.push_back(full.substr(done));
      pieces.push_back(std::move(parts));
      texts.push_back(std::move(full));
      names.push_back(where);
    }
  }
  FATHOM_CHECK(!texts.empty(), "data prepare: none of the ", files.size(), " input files is UTF-8 text.");

  // tokenize in batches over the thread pool, each document with its boundary token
  const size_t n = texts.size();
  std::vector<std::vector<int32_t>> docs(n);
  constexpr size_t kBatch = 256;
  for (size_t b = 0; b < n; b += kBatch) {
    const size_t e = std::min(n, b + kBatch);
    std::vector<std::string> batch(std::make_move_iterator(texts.begin() + long(b)),
                                   std::make_move_iterator(texts.begin() + long(e)));
    std::vector<std::vector<int32_t>> ids = tokenizer.encode_batch(batch);
    for (size_t i = b; i < e; ++i) {
      std::vector<int32_t>& d = docs[i];
      if (bos && !chat) d.push_back(*bos);
      d.insert(d.end(), ids[i - b].begin(), ids[i - b].end());
      if (!bos && !chat) d.push_back(*eos);
      if (!chat) progress.add(int64_t(batch[i - b].size()));
    }
  }
  if (chat) {
    // the pieces one by one, answers as they are, the rest marked context-only; they must give
    // the conversation's own ids (the template puts a special token at every cut)
    for (size_t i = 0; i < n; ++i) {
      const std::vector<std::vector<int32_t>> ids = tokenizer.encode_batch(pieces[i]);
      std::vector<int32_t> d;
      for (size_t k = 0; k < ids.size(); ++k)
        for (int32_t id : ids[k]) d.push_back(k % 2 ? id : int32_t(uint32_t(id) | kContextOnly));
      FATHOM_CHECK(token_ids(d) == docs[i], "data prepare --chat: ", names[i], ": tokenized piece by piece, the "
                   "conversation gives other ids than as a whole, so its answers cannot be marked.");
      docs[i] = std::move(d);
    }
    progress.add(total_bytes);
  }
  progress.finish();

  // a seeded permutation of the documents (Fisher-Yates on mt19937_64: the same everywhere)
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::mt19937_64 gen(o.seed);
  for (size_t i = n - 1; i > 0; --i) std::swap(order[i], order[size_t(gen() % (i + 1))]);
  size_t n_val = 0;
  if (o.val_fraction > 0 && n >= 2)
    n_val = std::clamp<size_t>(size_t(std::llround(o.val_fraction * double(n))), 1, n - 1);

  // the shards of each split, documents in permutation order
  nlohmann::json shards = nlohmann::json::array(), sources = nlohmann::json::array();
  std::vector<std::string> split_of(n);
  auto write_split = [&](const char* split, size_t from, size_t to, int64_t& tokens, int64_t& documents) {
    std::vector<int32_t> buf;
    int64_t docs_started = 0;
    int index = 0;
    auto flush = [&]() {
      if (buf.empty()) return;
      char name[64];
      std::snprintf(name, sizeof(name), "%s-%05d.bin", split, index++);
      const std::string path = (fs::path(o.out_dir) / name).string();
      const std::string bytes = shard_bytes(buf);
      write_file_atomic(path, bytes);
      shards.push_back({{"file", name}, {"split", split}, {"tokens", buf.size()}, {"documents", docs_started},
                        {"sha256", sha256_hex(bytes)}});
      sum.shards.push_back(path);
      buf.clear();
      docs_started = 0;
    };
    for (size_t k = from; k < to; ++k) {
      const std::vector<int32_t>& d = docs[order[k]];
      split_of[order[k]] = split;
      ++documents;
      ++docs_started;
      tokens += int64_t(d.size());
      for (size_t at = 0; at < d.size();) {
        const size_t take = std::min(d.size() - at, size_t(o.shard_tokens) - buf.size());
        buf.insert(buf.end(), d.begin() + long(at), d.begin() + long(at + take));
        at += take;
        if (int64_t(buf.size()) == o.shard_tokens) flush();
      }
    }
    flush();
  };
  write_split("train", n_val, n, sum.train_tokens, sum.train_documents);
  write_split("val", 0, n_val, sum.val_tokens, sum.val_documents);
  sum.documents = int64_t(n);
  for (size_t i = 0; i < n; ++i)
    sources.push_back({{"path", names[i]}, {"tokens", docs[i].size()}, {"split", split_of[i]}});

  nlohmann::json m;
  m["format"] = "fathom token shards v1";
  const bool on_disk = fs::is_regular_file(tokenizer.source(), ec);  // else made from text in memory
  m["tokenizer"] = {{"file", tokenizer.source()},
                    {"sha256", on_disk ? nlohmann::json(sha256_hex(read_file(tokenizer.source()))) : nlohmann::json()},
                    {"vocab_size", tokenizer.vocab_size()}};
  m["document_boundary"] = o.chat ? nlohmann::json{{"chat_template", true}, {"context_only_bit", kContextOnly}}
                          : bos  ? nlohmann::json{{"bos", *bos}}
                                 : nlohmann::json{{"eos", *eos}};
  m["seed"] = o.seed;
  m["val_fraction"] = o.val_fraction;
  m["shard_tokens"] = o.shard_tokens;
  m["documents"] = {{"train", sum.train_documents}, {"val", sum.val_documents}};
  m["tokens"] = {{"train", sum.train_tokens}, {"val", sum.val_tokens}};
  m["bytes"] = sum.bytes;
  m["shards"] = shards;
  m["sources"] = sources;
  m["skipped_not_utf8"] = sum.skipped;
  write_file_atomic((fs::path(o.out_dir) / "manifest.json").string(), m.dump(2) + "\n");
  return sum;
}

}  // namespace fathom::train
