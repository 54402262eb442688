// The training loop: `fathom train --config FILE [--resume]` (the CPU reference path, or the GPU with
// "device": "cuda").
//
// Each step takes `batch` windows of seq_len + 1 tokens from the training shards (row b of the
// batch reads from its own lane, the b-th 1/batch of the tokens, one window further each step —
// or, with "lanes": false, the step's windows one after the other — wrapping around; the
// position is part of the checkpoint), runs them
// through the model `micro_batch` at a time (each group one pass, its rows stacked), averages the
// gradients of their next-token losses (GradModel), clips them by the global norm,
// steps AdamW with the schedule's learning rate and moves each MoE layer's expert bias by γ toward
// even load (auxiliary-loss-free balancing); the objective includes the small sequence-wise
// balance loss (α) and, for a model with MTP modules, the multi-token prediction loss (weight λ,
// optionally switching to a second value at a given step, as DeepSeek-V3 went from 0.3 to 0.1).
// Every step appends a JSON line to <out>/log.jsonl (step, loss — the next-token cross-entropy —,
// the balance and MTP losses, the whole objective, learning rate, gradient norm, tokens/s, the
// max/mean expert load per MoE layer, and with a capacity factor the tokens dropped);
// every eval_every steps the validation loss is logged too; every checkpoint_every steps and at
// the end a checkpoint is written under <out>/checkpoints, and at the end the log's curves are drawn
// as <out>/loss.png and <out>/expert-load.png. A loss or gradient norm that is not
// finite stops the run with an error naming the step, leaving the last good checkpoint as it was.
//
// The config file (JSON):
//   {"model": DIR, "data": DIR, "out": DIR, "seq_len": 128, "batch": 4, "micro_batch": 0, "steps": 100,
//    "lr": {"schedule": "cosine"|"wsd"|"constant", "peak": 3e-4, "min": 3e-5, "warmup": 10, "decay": 0},
//    "adamw": {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1},
//    "clip": 1.0, "checkpoint_every": 0, "eval_every": 0, "eval_batches": 2, "bias_update": 0.001,
//    "balance_alpha": 1e-4, "mtp_lambda": 0.3, "mtp_lambda_later": 0.1, "mtp_lambda_switch": 0,
//    "recompute": false, "capacity_factor": 0, "device": "cpu", "precision": "fp32", "lanes": true}
// Relative paths are taken from the config file's directory.
#pragma once

#include <cstdint>
#include <string>

#include "train/optimizer.h"

namespace fathom::train {

struct TrainConfig {
  std::string model_dir, data_dir, out_dir;
  int64_t seq_len = 128, batch = 4, steps = 100;
  // Windows per forward/backward pass (0: the whole batch in one pass); must divide batch. Fewer
  // use less memory, more use the GPU better (every matmul and expert sees all their rows).
  int64_t micro_batch = 0;
  // Each batch row reads its own lane of the data (window_start); false: a step's windows are
  // consecutive (the order the PyTorch parity reference was made with).
  bool lanes = true;
  LrSchedule lr;
  AdamWConfig adamw;
  double clip = 1.0;
  int64_t checkpoint_every = 0;  // 0: only at the end
  int64_t eval_every = 0, eval_batches = 2;
  float bias_update = 0.001f;    // γ of the auxiliary-loss-free balancing (0: off)
  float balance_alpha = 1e-4f;   // α of the sequence-wise balance loss (0: off)
  // λ of the MTP loss (-1: 0.3 when the model has MTP modules, else 0); from step
  // mtp_lambda_switch on (0: never) it is mtp_lambda_later.
  float mtp_lambda = -1.0f, mtp_lambda_later = 0.1f;
  int64_t mtp_lambda_switch = 0;
  // Where the passes run: "cpu" (the reference, the default), "cuda", or "auto" (CUDA when a GPU
  // is present). On CUDA the whole step stays there, AdamW included (AdamW::use_backend), and the
  // gradients' scatter-adds use atomics: runs are not bit-reproducible there yet.
  std::string device = "cpu";
  // "fp32" (the default) or "bf16": on CUDA, bf16 mixed precision — the matrix products on
  // tensor cores from bf16-rounded inputs with F32 accumulation, everything in memory (weights,
  // activations, gradients, AdamW's state) F32 (Ops::set_bf16_matmuls). The CPU trains in fp32.
  std::string precision = "fp32";
  bool recompute = false;        // activation recomputation (GradModel::set_recompute)
  float capacity_factor = 0.0f;  // expert capacity (0: no dropping; GradModel::set_capacity_factor)
  int64_t stop_at = 0;           // end this run after that step, checkpointed (0: run to `steps`)
  // End this run, checkpointed, after the first step that finishes this many seconds after the
  // run started (0: no limit; `fathom train --max-minutes`): a run on a lent machine stops
  // cleanly before the machine goes back, and `--resume` goes on from there.
  double time_limit_s = 0;
  bool progress = true;
  bool plots = true;  // loss.png and expert-load.png in `out` at the end (train/plot.h)
};

// Where row `row` of a batch of `batch` windows starts in a split of `tokens` ids when the data
// position is data_offset: the rows are a lane, tokens / batch, apart (wrapping around), and the
// position moves one window per step, so each row streams through its own 1/batch of the
// (shuffled) documents and a step's windows come from far-apart text even where one document is
// long; an epoch is still tokens / (batch · seq_len) steps.
int64_t window_start(int64_t data_offset, int64_t row, int64_t batch, int64_t tokens);

// Reads and checks a config file (errors name the file and the field).
TrainConfig load_train_config(const std::string& path);

struct TrainResult {
  int64_t steps_done = 0;
  bool stopped_by_time = false;  // time_limit_s ended the run before `steps`
  double last_loss = 0;
  std::string last_checkpoint;
};

// Runs the loop (from the newest valid checkpoint under <out>/checkpoints with resume).
TrainResult train(const TrainConfig& config, bool resume);

}  // namespace fathom::train
