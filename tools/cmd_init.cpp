// fathom init-random: write a random-weight checkpoint for a DeepSeek-style config.json.
#include <filesystem>
#include <memory>
#include <string>

#include "commands.h"
#include "core/error.h"
#include "core/files.h"
#include <nlohmann/json.hpp>
#include "fathom/tokenizer.h"
#include "model/random_init.h"

namespace fathom::cli {

Command add_init_random(CLI::App& app) {
  auto config = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto dtype = std::make_shared<std::string>("bf16");
  auto o = std::make_shared<RandomInitOptions>();
  auto shard_mb = std::make_shared<double>(0.0);
  auto tokenizer = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("init-random", "write a random-weight checkpoint for a config.json");
  cmd->add_option("--config", *config, "a DeepSeek-style config.json")->required();
  cmd->add_option("--out", *out, "output model directory")->required();
  cmd->add_option("--dtype", *dtype, "weight dtype")->check(CLI::IsMember({"bf16", "f16", "f32", "fp8"}));
  cmd->add_option("--seed", o->seed, "random seed");
  cmd->add_option("--std", o->std, "standard deviation of the weights")->check(CLI::Range(0.0, 10.0));
  cmd->add_option("--shard-mb", *shard_mb, "split into safetensors shards of at most this many MB (0: one file)")
      ->check(CLI::Range(0.0, 1e6));
  cmd->add_flag("--mtp-shared-embeddings", o->mtp_shared_embeddings,
               "MTP modules use the main model's embedding and head (as the V3 paper has it) instead of copies");
  cmd->add_option("--tokenizer", *tokenizer,
                  "copy this tokenizer (directory or tokenizer.json, with its tokenizer_config.json) into the model");
  return [=] {
    namespace fs = std::filesystem;
    std::unique_ptr<Tokenizer> tok;
    if (!tokenizer->empty()) tok = Tokenizer::load(*tokenizer);  // validated before anything is written
    o->dtype = *dtype == "bf16" ? DType::BF16 : *dtype == "f16" ? DType::F16 : *dtype == "f32" ? DType::F32 : DType::F8_E4M3;
    o->max_shard_bytes = size_t(*shard_mb * 1e6);
    const std::string config_text = read_file(*config);
    if (tok) {
      const auto cfg = nlohmann::json::parse(config_text, nullptr, false);
      FATHOM_CHECK(cfg.is_object() && cfg.contains("vocab_size") && cfg["vocab_size"].is_number_integer() &&
                       cfg["vocab_size"].get<int64_t>() >= tok->vocab_size(),
                   *config,
                   ": vocab_size must be at least the tokenizer's ", tok->vocab_size(), " ids");
    }
    write_random_checkpoint(config_text, *out, *o, *config);
    if (tok) {
      const fs::path src = fs::path(tok->source()).parent_path();
      write_file_atomic((fs::path(*out) / "tokenizer.json").string(), read_file(tok->source()));
      if (fs::exists(src / "tokenizer_config.json"))
        write_file_atomic((fs::path(*out) / "tokenizer_config.json").string(), read_file((src / "tokenizer_config.json").string()));
    }
  };
}

}  // namespace fathom::cli
