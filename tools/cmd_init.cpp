// fathom init-random: write a random-weight checkpoint for a DeepSeek-style config.json.
#include <memory>
#include <string>

#include "commands.h"
#include "core/error.h"
#include "core/files.h"
#include "model/random_init.h"

namespace fathom::cli {

Command add_init_random(CLI::App& app) {
  auto config = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto dtype = std::make_shared<std::string>("bf16");
  auto o = std::make_shared<RandomInitOptions>();
  auto shard_mb = std::make_shared<double>(0.0);
  CLI::App* cmd = app.add_subcommand("init-random", "write a random-weight checkpoint for a config.json");
  cmd->add_option("--config", *config, "a DeepSeek-style config.json")->required();
  cmd->add_option("--out", *out, "output model directory")->required();
  cmd->add_option("--dtype", *dtype, "weight dtype")->check(CLI::IsMember({"bf16", "f16", "f32", "fp8"}));
  cmd->add_option("--seed", o->seed, "random seed");
  cmd->add_option("--std", o->std, "standard deviation of the weights")->check(CLI::Range(0.0, 10.0));
  cmd->add_option("--shard-mb", *shard_mb, "split into safetensors shards of at most this many MB (0: one file)")
      ->check(CLI::Range(0.0, 1e6));
  return [=] {
    o->dtype = *dtype == "bf16" ? DType::BF16 : *dtype == "f16" ? DType::F16 : *dtype == "f32" ? DType::F32 : DType::F8_E4M3;
    o->max_shard_bytes = size_t(*shard_mb * 1e6);
    write_random_checkpoint(read_file(*config), *out, *o, *config);
  };
}

}  // namespace fathom::cli
