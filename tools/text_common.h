// Pieces shared by the text commands (tokenize, detokenize, chat-template, generate, chat).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "engine/generator.h"
#include "fathom/model.h"
#include "fathom/tokenizer.h"

namespace fathom::cli {

// Sampling and stopping options as the user types them.
struct SamplingArgs {
  double temperature = 0.0, top_p = 1.0, min_p = 0.0;
  int top_k = 0;
  double repetition_penalty = 1.0, presence_penalty = 0.0, frequency_penalty = 0.0;
  int64_t seed = -1;
  int64_t max_tokens = 256;
  std::vector<std::string> stop;
  bool ignore_eos = false;
};
void add_sampling_options(CLI::App* cmd, SamplingArgs& a);
GenerateOptions to_generate_options(const SamplingArgs& a);  // validated: fathom::Error names the option
// The sampling defaults of the model's generation_config.json (HF's file, when the model directory
// has one) for the options `cmd` was not given: repetition_penalty always; temperature (1 when
// absent), top_p, top_k and min_p when its do_sample is true. A malformed file is a fathom::Error.
// cmd null: no option counts as given (fathom serve: the defaults of every request).
void apply_generation_config(const CLI::App* cmd, const std::string& model_dir, SamplingArgs& a);

// The tokenizer of a model directory, or the one given with --tokenizer (a directory or a
// tokenizer.json path); a clear error when neither exists.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& model_dir, const std::string& tokenizer_path);

// The chat template of `tok` (from its tokenizer_config.json) applied to `messages`.
// `extra`: more template variables (tools, ...).
std::string render_chat(const Tokenizer& tok, const nlohmann::ordered_json& messages, bool add_generation_prompt,
                        const nlohmann::json& extra = nlohmann::json::object());

// Throws fathom::Error when the tokenizer has ids the model's vocabulary lacks.
void check_tokenizer_fits(const Tokenizer& tok, const Model& model);

// All of stdin as bytes.
std::string read_stdin();

}  // namespace fathom::cli
