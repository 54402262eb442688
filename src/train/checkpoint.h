// Training checkpoints: a directory a run can resume from exactly and HF transformers can load.
//
//   <root>/step-00000100/config.json             the model's DeepSeek-style config
//                        model.safetensors       the F32 master weights, under the checkpoint's names
//                        optimizer.safetensors   AdamW's moments: <name>.exp_avg, <name>.exp_avg_sq
//                        tokenizer.json, tokenizer_config.json   (when the run has a tokenizer)
//                        trainer_state.json      step, optimizer steps, RNG and data position, and
//                                                the SHA-256 of every file above
//
// Never half a checkpoint: everything is written into <root>/step-….tmp-<pid>, each file synced,
// trainer_state.json last, then the directory is renamed into place (a killed writer leaves only
// a .tmp- directory, which nothing reads). Loading checks every file against its recorded hash;
// latest_checkpoint() takes the newest checkpoint that passes and names the ones that do not.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "train/optimizer.h"

namespace fathom::train {

struct TrainerState {
  int64_t step = 0;             // training steps done
  int64_t optimizer_steps = 0;  // AdamW's t (its bias corrections)
  std::string rng;              // the trainer's RNG state, as text
  int64_t data_shard = 0, data_offset = 0;  // where the data stream continues
};

struct Checkpoint {
  std::string dir;
  std::string config_json;
  std::map<std::string, Tensor> values, exp_avg, exp_avg_sq;
  TrainerState state;
};

// "step-00000100"
std::string checkpoint_name(int64_t step);

// Writes <root>/checkpoint_name(state.step) from the optimizer's parameters (values and moments)
// and returns its path; tokenizer_dir (optional) supplies tokenizer.json and tokenizer_config.json.
// An existing checkpoint of that step is an error (steps only move forward).
std::string save_checkpoint(const std::string& root, const std::string& config_json, const AdamW& optimizer,
                            const TrainerState& state, const std::string& tokenizer_dir = "");

// Reads a checkpoint directory, checking every file against trainer_state.json's hashes; a
// missing, truncated or altered file is an error naming it.
Checkpoint load_checkpoint(const std::string& dir);

// Puts a checkpoint's values and moments into the optimizer's registered parameters (by name;
// every parameter must be in the checkpoint with its shape) and sets its step count.
void restore(AdamW& optimizer, const Checkpoint& checkpoint);

// The newest checkpoint under root that loads; each newer one that does not is appended to
// *rejected (with the reason) when given. nullopt when there is none.
std::optional<std::string> latest_checkpoint(const std::string& root, std::vector<std::string>* rejected = nullptr);

}  // namespace fathom::train
