// fathom train --config FILE [--resume]: the training loop (src/train/trainer.h).
#include <cstdio>
#include <memory>
#include <string>

#include "commands.h"
#include "train/trainer.h"

namespace fathom::cli {

Command add_train(CLI::App& app) {
  auto config = std::make_shared<std::string>();
  auto resume = std::make_shared<bool>(false);
  auto quiet = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("train", "train a model on prepared token shards (CPU reference path; \"device\": \"cuda\" in the config for the GPU)");
  cmd->add_option("--config", *config, "training config (JSON: model, data, out, steps, batch, lr, ...)")->required();
  cmd->add_flag("--resume", *resume, "continue from the newest valid checkpoint under <out>/checkpoints");
  cmd->add_flag("-q,--quiet", *quiet, "no progress bar");
  auto minutes = std::make_shared<double>(0);
  cmd->add_option("--max-minutes", *minutes, "stop (checkpointed; --resume goes on) after the step that ends past this "
                                             "many minutes")
      ->check(CLI::Range(0.0, 1e7));
  return [=] {
    train::TrainConfig c = train::load_train_config(*config);
    c.progress = !*quiet;
    c.time_limit_s = *minutes * 60;
    const train::TrainResult r = train::train(c, *resume);
    std::printf("trained to step %lld%s, last loss %.4f, checkpoint %s, log %s/log.jsonl\n", (long long)r.steps_done,
                r.stopped_by_time ? " (stopped at --max-minutes; --resume goes on)" : "", r.last_loss,
                r.last_checkpoint.c_str(), c.out_dir.c_str());
  };
}

}  // namespace fathom::cli
