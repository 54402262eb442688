// fathom eval: a model's held-out loss and perplexity, n-gram baselines of its tokenizer and its
// MTP module's greedy acceptance rate (src/train/eval.h).
#include <cstdio>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "core/error.h"
#include "train/data.h"
#include "train/eval.h"

namespace fathom::cli {

Command add_eval(CLI::App& app) {
  struct Args {
    ModelArgs model;
    std::string data, split = "val";
    int64_t seq_len = 512, max_tokens = 0;
    bool baselines = false, json = false;
    int mtp_prompts = 0;
  };
  auto a = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand("eval", "held-out loss and perplexity of a model on prepared token shards");
  add_model_options(cmd, a->model);
  cmd->add_option("--data", a->data, "a directory made by 'fathom data prepare'")->required();
  cmd->add_option("--split", a->split, "val or train")->check(CLI::IsMember({"val", "train"}));
  cmd->add_option("--seq-len", a->seq_len, "tokens of context per window")->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  cmd->add_option("--max-tokens", a->max_tokens, "predict at most this many tokens (0: the whole split)")
      ->check(CLI::Range(int64_t(0), int64_t(1) << 40));
  cmd->add_flag("--baselines", a->baselines, "also unigram and bigram models of the tokens, fitted on the train split");
  cmd->add_option("--mtp-prompts", a->mtp_prompts,
                  "also the MTP module's greedy acceptance over this many 64-token prompts continued by 64 tokens")
      ->check(CLI::Range(0, 100000));
  cmd->add_flag("--json", a->json, "one JSON object instead of text");
  return [=] {
    std::unique_ptr<Model> m = open_model(a->model);
    // every token is scored, chat prompts too (the context-only bit of chat data cleared)
    const std::vector<int32_t> ids = train::token_ids(train::read_split(a->data, a->split));
    nlohmann::ordered_json j;
    const train::LossResult r = train::model_loss(*m, ids, a->seq_len, a->max_tokens);
    j["split"] = a->split;
    j["tokens"] = r.tokens;
    j["loss"] = r.loss;
    j["perplexity"] = r.perplexity();
    if (a->baselines) {
      const train::NgramBaselines b =
          train::ngram_baselines(train::token_ids(train::read_split(a->data, "train")), ids, m->config().vocab_size, r.tokens);
      j["unigram_loss"] = b.unigram.loss;
      j["unigram_perplexity"] = b.unigram.perplexity();
      j["bigram_loss"] = b.bigram.loss;
      j["bigram_perplexity"] = b.bigram.perplexity();
      j["bigram_weight"] = b.bigram_weight;
    }
    if (a->mtp_prompts > 0) {
      const train::MtpAcceptance acc = train::mtp_acceptance(*m, ids, a->mtp_prompts, 64, 64);
      j["mtp_drafts"] = acc.drafts;
      j["mtp_acceptance"] = acc.rate();
    }
    if (a->json) {
      std::printf("%s\n", j.dump().c_str());
      return;
    }
    std::printf("%s: %lld tokens, loss %.4f nats/token, perplexity %.2f\n", a->split.c_str(), (long long)r.tokens, r.loss,
                r.perplexity());
    if (a->baselines)
      std::printf("baselines of the same tokens: unigram loss %.4f (perplexity %.1f), bigram loss %.4f (perplexity %.1f, "
                  "weight %.2f)\n",
                  j["unigram_loss"].get<double>(), j["unigram_perplexity"].get<double>(), j["bigram_loss"].get<double>(),
                  j["bigram_perplexity"].get<double>(), j["bigram_weight"].get<double>());
    if (a->mtp_prompts > 0)
      std::printf("MTP greedy acceptance: %.1f%% of %lld drafts\n", 100 * j["mtp_acceptance"].get<double>(),
                  (long long)j["mtp_drafts"].get<int64_t>());
  };
}

}  // namespace fathom::cli
