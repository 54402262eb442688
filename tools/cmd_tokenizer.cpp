// fathom tokenizer train: a byte-level BPE tokenizer learnt from text files
// (src/tokenizer/bpe_trainer.h), written as tokenizer.json + tokenizer_config.json.
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "core/error.h"
#include "core/files.h"
#include "tokenizer/bpe_trainer.h"

namespace fathom::cli {

Command add_tokenizer(CLI::App& app) {
  struct Args {
    std::vector<std::string> inputs;
    std::string out;
    int32_t vocab_size = 12000;
    int64_t min_frequency = 2;
    int threads = 0;
    std::string chat_template_file;
    std::vector<std::string> specials;
    bool quiet = false;
  };
  auto a = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand("tokenizer", "make tokenizers");
  cmd->require_subcommand(1);
  CLI::App* tr = cmd->add_subcommand(
      "train", "learn a byte-level BPE tokenizer (DeepSeek-V3 pre-tokenizer, chat-format special tokens) from text "
               "files and write tokenizer.json and tokenizer_config.json");
  tr->add_option("inputs", a->inputs, "text files or directories (every file below, in sorted order)")->required();
  tr->add_option("-o,--out", a->out, "output directory")->required();
  tr->add_option("--vocab-size", a->vocab_size, "tokens in all: 256 bytes, the merges and the special tokens")
      ->check(CLI::Range(int32_t(257), int32_t(1) << 24));
  tr->add_option("--min-frequency", a->min_frequency, "never merge a pair seen fewer times")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 62));
  tr->add_option("--threads", a->threads, "counting threads (0: every core)")->check(CLI::Range(0, 4096));
  tr->add_option("--chat-template", a->chat_template_file,
                 "a Jinja chat template file for tokenizer_config.json (default: DeepSeek-V3's format)");
  tr->add_option("--special", a->specials,
                 "replace the special tokens (ids after the learnt vocabulary, in order; the first three are BOS, "
                 "EOS and pad)");
  tr->add_flag("-q,--quiet", a->quiet, "no progress bars");
  return [=] {
    BpeTrainOptions o;
    o.vocab_size = a->vocab_size;
    o.min_frequency = a->min_frequency;
    o.threads = a->threads;
    o.progress = !a->quiet;
    if (!a->chat_template_file.empty()) o.chat_template = read_file(a->chat_template_file);
    if (!a->specials.empty()) {
      FATHOM_CHECK(a->specials.size() >= 3, "tokenizer train: --special needs at least BOS, EOS and pad (",
                   a->specials.size(), " given)");
      o.specials.clear();
      for (const auto& s : a->specials) o.specials.push_back({s, true});
      o.bos_token = a->specials[0];
      o.eos_token = a->specials[1];
      o.pad_token = a->specials[2];
    }
    const auto t0 = std::chrono::steady_clock::now();
    BpeTrainer trainer(o);
    trainer.add_files(a->inputs);
    trainer.train();
    trainer.save(a->out);
    const BpeTrainStats& s = trainer.stats();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%lld bytes, %lld pieces (%lld distinct); %d merges, vocabulary %d%s; %s/tokenizer.json in %.1f s\n",
                (long long)s.bytes, (long long)s.pieces, (long long)s.distinct_pieces, s.merges, s.vocab_size,
                s.stopped_early ? " (stopped early: no pair left with --min-frequency occurrences)" : "",
                a->out.c_str(), secs);
  };
}

}  // namespace fathom::cli
