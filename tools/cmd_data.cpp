// fathom data prepare: text files -> token shards + manifest for training (src/train/data.h).
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "core/error.h"
#include "fathom/tokenizer.h"
#include "train/data.h"

namespace fathom::cli {

Command add_data(CLI::App& app) {
  auto o = std::make_shared<train::DataPrepareOptions>();
  auto tokenizer = std::make_shared<std::string>();
  auto quiet = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("data", "prepare training data");
  cmd->require_subcommand(1);
  CLI::App* prep = cmd->add_subcommand("prepare", "tokenize text files (one document each) into shuffled token shards "
                                                  "with a manifest and a held-out validation split");
  prep->add_option("inputs", o->inputs, "text files or directories (every file below, in sorted order)")->required();
  prep->add_option("--tokenizer", *tokenizer, "tokenizer directory or tokenizer.json")->required();
  prep->add_option("-o,--out", o->out_dir, "output directory (new, or without a manifest.json)")->required();
  prep->add_option("--val-fraction", o->val_fraction, "share of the documents held out for validation")
      ->check(CLI::Range(0.0, 0.999999));
  prep->add_option("--shard-tokens", o->shard_tokens, "token ids per shard at most")
      ->check(CLI::Range(int64_t(1024), int64_t(1) << 40));
  prep->add_option("--seed", o->seed, "seed of the document shuffle");
  prep->add_flag("--skip-invalid-utf8", o->skip_invalid_utf8, "skip files that are not UTF-8 text (listed in the "
                                                             "manifest) instead of stopping");
  prep->add_flag("--chat", o->chat, "the inputs are JSON Lines conversations ({\"messages\": [...]} per line), each "
                                    "rendered with the tokenizer's chat template into one document (fine-tuning data)");
  prep->add_flag("-q,--quiet", *quiet, "no progress bar");
  return [=] {
    const std::unique_ptr<Tokenizer> tok = Tokenizer::load(*tokenizer);
    train::DataPrepareOptions opts = *o;
    opts.progress = !*quiet;
    const train::DataSummary s = train::prepare_data(*tok, opts);
    std::printf("%lld documents (%lld bytes): train %lld documents, %lld tokens; validation %lld documents, %lld tokens; "
                "%zu shards in %s\n",
                (long long)s.documents, (long long)s.bytes, (long long)s.train_documents, (long long)s.train_tokens,
                (long long)s.val_documents, (long long)s.val_tokens, s.shards.size(), opts.out_dir.c_str());
    for (const std::string& f : s.skipped) std::fprintf(stderr, "fathom: skipped (not UTF-8 text): %s\n", f.c_str());
  };
}

}  // namespace fathom::cli
