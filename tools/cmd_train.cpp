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
  return [=] {
    train::TrainConfig c = train::load_train_config(*config);
    c.progress = !*quiet;
    const train::TrainResult r = train::train(c, *resume);
    std::printf("trained to step %lld, last loss %.4f, checkpoint %s, log %s/log.jsonl\n", (long long)r.steps_done,
                r.last_loss, r.last_checkpoint.c_str(), c.out_dir.c_str());
  };
}

}  // namespace fathom::cli
