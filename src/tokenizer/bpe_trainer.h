// Training a byte-level BPE tokenizer (what `fathom tokenizer train` runs), the way GPT-2 and
// DeepSeek tokenizers are made:
//   1. the corpus is cut into pieces by the DeepSeek-V3 pre-tokenizer (digits in groups of up
//      to three, CJK runs, words with their leading space or punctuation, whitespace runs), in
//      parallel, and each distinct piece is counted; the special tokens' text is cut out first;
//   2. every piece starts as its bytes (the 256 byte tokens), and the most frequent adjacent
//      pair of tokens, over all pieces weighted by their counts, becomes a new token — again and
//      again until the vocabulary has the size asked for (or no pair is seen min_frequency times).
//      Only the pieces holding the chosen pair are touched, and pair counts live in a max-heap
//      that is corrected lazily, so each merge costs what it changes, not the corpus size;
//   3. the result is written as an HF-compatible `tokenizer.json` (BPE model, byte-level alphabet,
//      the same pre-tokenizer, a template that adds BOS) and `tokenizer_config.json` with the
//      special tokens' roles and a chat template.
// Ties between equally frequent pairs go to the lower (left, right) pair of ids, so a corpus
// always gives the same tokenizer, whatever the number of threads.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace fathom {

class ThreadPool;

struct BpeSpecialToken {
  std::string content;
  bool special = true;  // false: an added token that decoding keeps (<think>, </think>)
};

struct BpeTrainOptions {
  int32_t vocab_size = 12000;  // in all: 256 bytes + merges + special tokens
  int64_t min_frequency = 2;   // a pair seen fewer times (weighted) is never merged
  // The special tokens, given ids after the learnt vocabulary in this order. Default: the
  // DeepSeek chat format's (BOS, EOS, pad, user, assistant) and <think> / </think>.
  std::vector<BpeSpecialToken> specials = default_specials();
  std::string bos_token = "<｜begin▁of▁sentence｜>";
  std::string eos_token = "<｜end▁of▁sentence｜>";
  std::string pad_token = "<｜▁pad▁｜>";
  std::string chat_template = default_chat_template();  // Jinja, written to tokenizer_config.json
  int64_t model_max_length = 8192;
  int threads = 0;       // 0: every hardware thread
  bool progress = true;  // progress bars on a terminal

  static std::vector<BpeSpecialToken> default_specials();
  // DeepSeek-V3's chat format: BOS, system text, <｜User｜>…, <｜Assistant｜>…<｜end▁of▁sentence｜>;
  // an assistant turn's reasoning goes inside <think>…</think> before its answer.
  static std::string default_chat_template();
};

struct BpeTrainStats {
  int64_t bytes = 0;           // corpus bytes counted
  int64_t pieces = 0;          // pieces (with repeats)
  int64_t distinct_pieces = 0;
  int32_t merges = 0;
  int32_t vocab_size = 0;      // as written (merges may stop early at min_frequency)
  bool stopped_early = false;  // fewer merges than asked: no pair left with min_frequency occurrences
};

class BpeTrainer {
 public:
  explicit BpeTrainer(BpeTrainOptions options);
  ~BpeTrainer();

  // Counts the pieces of `text` (valid UTF-8; otherwise fathom::Error naming `what` and the
  // byte offset). Large texts are cut at line ends and counted in parallel.
  void add_text(std::string_view text, const std::string& what);
  // Reads and counts each file, or every file below a directory in sorted order (progress bar
  // over the bytes). A missing input or a file that is not UTF-8 text is an error naming it.
  void add_files(const std::vector<std::string>& inputs);

  // Learns the merges. Throws fathom::Error when the options cannot give a vocabulary (size
  // below 256 + specials, duplicate or empty special tokens) or nothing was counted.
  void train();

  // After train(): the two files, as JSON text.
  std::string tokenizer_json() const;
  std::string tokenizer_config_json() const;
  // Writes both into `dir` (created if missing), each through a temporary file and a rename.
  void save(const std::string& dir) const;

  const BpeTrainStats& stats() const { return stats_; }
  // Before train(): the distinct pieces counted so far and how often each was seen.
  const std::unordered_map<std::string, int64_t>& piece_counts() const { return counts_; }
  // After train(): the token strings as raw bytes (ids 0..255 are the bytes) and the merges.
  const std::vector<std::string>& tokens() const { return tokens_; }
  const std::vector<std::pair<int32_t, int32_t>>& merges() const { return merges_; }

 private:
  void count_chunk(std::string_view text, std::unordered_map<std::string, int64_t>& counts) const;
  void check_options() const;

  BpeTrainOptions opt_;
  std::unique_ptr<ThreadPool> pool_;
  std::unordered_map<std::string, int64_t> counts_;  // piece -> occurrences
  std::vector<std::string> tokens_;
  std::vector<std::pair<int32_t, int32_t>> merges_;
  BpeTrainStats stats_;
  bool trained_ = false;
};

}  // namespace fathom
