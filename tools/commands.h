// The fathom subcommands. Each `add_*` registers its options on the app and returns the
// function to run when it is chosen; failures throw fathom::Error (exit code 2).
#pragma once
#include <functional>

#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "fathom/model.h"

namespace fathom::cli {

// --model, --mla, --dequantize-fp8, --device, --precision, --gpu-memory, --fp8-gemm: how a command opens
// a checkpoint. --device defaults to $FATHOM_DEVICE when set, else auto.
struct ModelArgs {
  std::string dir;
  std::string mla = "absorbed";
  bool dequantize_fp8 = false;
  std::string device;
  std::string precision = "auto";
  std::string gpu_memory;
  std::string fp8_gemm = "auto";
};
// "24G", "512M", "1.5GiB", "1000000" (bytes) -> bytes; throws fathom::Error naming `what`.
int64_t parse_size(const std::string& text, const std::string& what);
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
Command add_data(CLI::App& app);
Command add_train(CLI::App& app);
Command add_train_plot(CLI::App& app);
Command add_tokenizer(CLI::App& app);
Command add_convert(CLI::App& app);
Command add_eval(CLI::App& app);
Command add_serve(CLI::App& app);

}  // namespace fathom::cli
