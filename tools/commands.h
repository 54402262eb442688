// The fathom subcommands. Each `add_*` registers its options on the app and returns the
// function to run when it is chosen; failures throw fathom::Error (exit code 2).
#pragma once
#include <functional>

#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "fathom/model.h"

namespace fathom::cli {

// --model, --mla, --dequantize-fp8: how a command opens a checkpoint.
struct ModelArgs {
  std::string dir;
  std::string mla = "absorbed";
  bool dequantize_fp8 = false;
};
void add_model_options(CLI::App* cmd, ModelArgs& a);
std::unique_ptr<Model> open_model(const ModelArgs& a);

using Command = std::function<void()>;

Command add_info(CLI::App& app);
Command add_logits(CLI::App& app);
Command add_generate(CLI::App& app);
Command add_init_random(CLI::App& app);
Command add_tokenize(CLI::App& app);
Command add_detokenize(CLI::App& app);
Command add_chat_template(CLI::App& app);
Command add_chat(CLI::App& app);

}  // namespace fathom::cli
