// Training data: text files tokenized into shards of token ids with a manifest, the form
// `fathom train` reads (`fathom data prepare` makes it).
//
// Each input file is one document. A document's tokens start with the tokenizer's BOS (or, if
// it has none, end with its EOS), so document boundaries survive concatenation. The documents
// are shuffled with a seeded permutation of their own (the same on every machine), the first
// val_fraction of them form the held-out validation split, and each split is written in order
// into shards of at most shard_tokens ids:
//   <out>/train-00000.bin, ..., <out>/val-00000.bin, ..., <out>/manifest.json
// A shard is "FTOKSHRD", a little-endian u32 version (1) and u32 zero, a u64 id count, then the
// ids as little-endian u32. The manifest (written last, atomically: its presence means the set is
// complete) records the tokenizer's file and SHA-256, the seed, the split, every shard with its
// id count, document count and SHA-256, and every source file with its bytes and tokens.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fathom {
class Tokenizer;
}

namespace fathom::train {

struct DataPrepareOptions {
  std::vector<std::string> inputs;  // files, or directories (every regular file below, sorted)
  std::string out_dir;
  double val_fraction = 0.01;        // of the documents; at least one when > 0 and there are two
  int64_t shard_tokens = int64_t(1) << 24;
  uint64_t seed = 1234;
  bool skip_invalid_utf8 = false;    // skip (and list) files that are not UTF-8 text instead of failing
  // Chat data (supervised fine-tuning): the inputs are JSON Lines files, each line a conversation
  // ({"messages": [{"role", "content", ...}, ...]} or the bare array), rendered with the
  // tokenizer's chat template into one document each. The template writes the BOS and the
  // end-of-turn tokens itself, so no boundary token is added. Every token outside the assistant
  // turns carries kContextOnly (below): each assistant turn is the text the template adds when
  // the message is appended to the conversation rendered up to it with the generation prompt.
  bool chat = false;
  bool progress = true;
};

struct DataSummary {
  int64_t documents = 0, train_documents = 0, val_documents = 0;
  int64_t train_tokens = 0, val_tokens = 0;
  int64_t bytes = 0;
  std::vector<std::string> shards;   // paths, train then val
  std::vector<std::string> skipped;  // files skipped as not UTF-8
};

DataSummary prepare_data(const Tokenizer& tokenizer, const DataPrepareOptions& options);

// Chat data marks the tokens a model should read but not learn to write — the system and user
// turns, the template's framing up to each answer — with this bit (a negative id in memory): the
// training loss skips predicting them, while each answer and its end-of-turn token are learnt.
constexpr uint32_t kContextOnly = 0x80000000u;
inline int32_t token_id(int32_t v) { return int32_t(uint32_t(v) & ~kContextOnly); }
inline bool is_context_only(int32_t v) { return (uint32_t(v) & kContextOnly) != 0; }
// The ids with the context-only bit cleared (what a reader that predicts every token wants).
std::vector<int32_t> token_ids(std::vector<int32_t> ids);

// Every id of one split ("train" or "val") of a prepared data set, its shards concatenated in
// manifest order; a missing or malformed manifest or shard is an error naming it.
std::vector<int32_t> read_split(const std::string& data_dir, const std::string& split);

// The ids of one shard; a file that is not a complete shard is an error naming it.
std::vector<int32_t> read_shard(const std::string& path);
void write_shard(const std::string& path, const std::vector<int32_t>& ids);

}  // namespace fathom::train
