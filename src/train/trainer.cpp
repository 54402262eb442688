#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/files.h"
#include "core/progress.h"
#include "train/balance.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/model_grad.h"
#include "train/plot.h"
#include "ops/ops.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace fathom::train {
namespace {

// tokens [pos, pos + n) of a split, wrapping around
std::vector<int32_t> window(const std::vector<int32_t>& ids, int64_t pos, int64_t n) {
  std::vector<int32_t> w(static_cast<size_t>(n));
  const int64_t size = int64_t(ids.size());
  for (int64_t i = 0; i < n; ++i) w[size_t(i)] = ids[size_t((pos + i) % size)];
  return w;
}

}  // namespace

int64_t window_start(int64_t data_offset, int64_t row, int64_t batch, int64_t tokens) {
  FATHOM_CHECK(tokens > 0 && batch > 0 && row >= 0 && row < batch && data_offset >= 0, "window_start: row ", row,
               " of ", batch, " over ", tokens, " tokens at ", data_offset, ".");
  const int64_t lane = std::max<int64_t>(1, tokens / batch);
  return (data_offset + row * lane) % tokens;
}

TrainConfig load_train_config(const std::string& path) {
  const json j = json::parse(read_file(path), nullptr, false);
  FATHOM_CHECK(j.is_object(), "training config '", path, "' is not a JSON object.");
  const fs::path base = fs::path(path).parent_path();
  TrainConfig c;
  auto str = [&](const char* key) {
    FATHOM_CHECK(j.contains(key) && j[key].is_string() && !j[key].get<std::string>().empty(), "training config '",
                 path, "': \"", key, "\" (a path) is missing.");
    const fs::path p = j[key].get<std::string>();
    return (p.is_absolute() ? p : base / p).string();
  };
  auto num = [&](const json& o, const char* key, auto fallback) {
    using T = decltype(fallback);
    if (!o.contains(key)) return fallback;
    FATHOM_CHECK(o[key].is_number(), "training config '", path, "': \"", key, "\" must be a number.");
    return o[key].get<T>();
  };
  c.model_dir = str("model");
  c.data_dir = str("data");
  c.out_dir = str("out");
  c.seq_len = num(j, "seq_len", c.seq_len);
  c.batch = num(j, "batch", c.batch);
  c.micro_batch = num(j, "micro_batch", c.micro_batch);
  c.steps = num(j, "steps", c.steps);
  c.clip = num(j, "clip", c.clip);
  c.checkpoint_every = num(j, "checkpoint_every", c.checkpoint_every);
  c.eval_every = num(j, "eval_every", c.eval_every);
  c.eval_batches = num(j, "eval_batches", c.eval_batches);
  c.bias_update = num(j, "bias_update", c.bias_update);
  c.balance_alpha = num(j, "balance_alpha", c.balance_alpha);
  c.capacity_factor = num(j, "capacity_factor", c.capacity_factor);
  if (j.contains("device")) {
    FATHOM_CHECK(j["device"].is_string(), "training config '", path, "': \"device\" must be \"cpu\", \"cuda\" or \"auto\".");
    c.device = j["device"].get<std::string>();
  }
  FATHOM_CHECK(c.device == "cpu" || c.device == "cuda" || c.device == "auto", "training config '", path,
               "': device must be cpu, cuda or auto, not \"", c.device, "\".");
  if (j.contains("precision")) {
    FATHOM_CHECK(j["precision"].is_string(), "training config '", path, "': \"precision\" must be \"fp32\" or \"bf16\".");
    c.precision = j["precision"].get<std::string>();
  }
  FATHOM_CHECK(c.precision == "fp32" || c.precision == "bf16", "training config '", path,
               "': precision must be fp32 or bf16, not \"", c.precision, "\".");
  if (j.contains("lanes")) {
    FATHOM_CHECK(j["lanes"].is_boolean(), "training config '", path, "': \"lanes\" must be true or false.");
    c.lanes = j["lanes"].get<bool>();
  }
  if (j.contains("recompute")) {
    FATHOM_CHECK(j["recompute"].is_boolean(), "training config '", path, "': \"recompute\" must be true or false.");
    c.recompute = j["recompute"].get<bool>();
  }
  FATHOM_CHECK(std::isfinite(c.capacity_factor) && c.capacity_factor >= 0, "training config '", path,
               "': capacity_factor must be a number >= 0 (0: no token is dropped).");
  c.mtp_lambda = num(j, "mtp_lambda", c.mtp_lambda);
  c.mtp_lambda_later = num(j, "mtp_lambda_later", c.mtp_lambda_later);
  c.mtp_lambda_switch = num(j, "mtp_lambda_switch", c.mtp_lambda_switch);
  FATHOM_CHECK((c.mtp_lambda >= 0 || j.count("mtp_lambda") == 0) && c.mtp_lambda_later > 0 &&
                   c.mtp_lambda_switch >= 0 && std::isfinite(c.mtp_lambda) && std::isfinite(c.mtp_lambda_later),
               "training config '", path, "': mtp_lambda must be a number >= 0, mtp_lambda_later > 0 and "
               "mtp_lambda_switch a step >= 0.");
  FATHOM_CHECK(c.seq_len >= 1 && c.batch >= 1 && c.steps >= 1 && c.checkpoint_every >= 0 && c.eval_every >= 0 &&
                   c.eval_batches >= 1 && c.bias_update >= 0 && c.balance_alpha >= 0 && c.clip >= 0,
               "training config '", path, "': seq_len, batch, steps and eval_batches must be positive, and "
               "checkpoint_every, eval_every, bias_update, balance_alpha and clip not negative.");
  FATHOM_CHECK(c.micro_batch >= 0 && c.micro_batch <= c.batch && (c.micro_batch == 0 || c.batch % c.micro_batch == 0),
               "training config '", path, "': micro_batch (", c.micro_batch, ") must divide batch (", c.batch,
               "); 0 runs the whole batch in one pass.");
  const json lr = j.value("lr", json::object());
  FATHOM_CHECK(lr.is_object(), "training config '", path, "': \"lr\" must be an object.");
  FATHOM_CHECK(!lr.contains("schedule") || lr["schedule"].is_string(), "training config '", path,
               "': lr.schedule must be cosine, wsd or constant (a string).");
  const std::string sched = lr.value("schedule", std::string("cosine"));
  FATHOM_CHECK(sched == "cosine" || sched == "wsd" || sched == "constant", "training config '", path,
               "': lr.schedule must be cosine, wsd or constant, not ", sched, ".");
  c.lr.kind = sched == "cosine" ? LrSchedule::Kind::Cosine : sched == "wsd" ? LrSchedule::Kind::Wsd
                                                                           : LrSchedule::Kind::Constant;
  c.lr.peak = num(lr, "peak", c.lr.peak);
  c.lr.min_lr = num(lr, "min", c.lr.min_lr);
  c.lr.warmup = num(lr, "warmup", int64_t(0));
  c.lr.decay = num(lr, "decay", int64_t(0));
  c.lr.total = c.steps;
  c.lr.at(0);  // checks the schedule's numbers
  const json ad = j.value("adamw", json::object());
  FATHOM_CHECK(ad.is_object(), "training config '", path, "': \"adamw\" must be an object.");
  c.adamw.beta1 = num(ad, "beta1", c.adamw.beta1);
  c.adamw.beta2 = num(ad, "beta2", c.adamw.beta2);
  c.adamw.eps = num(ad, "eps", c.adamw.eps);
  c.adamw.weight_decay = num(ad, "weight_decay", c.adamw.weight_decay);
  AdamW check(c.adamw);  // its constructor checks the numbers
  return c;
}

TrainResult train(const TrainConfig& cfg, bool resume) {
  auto model = GradModel::load(cfg.model_dir);
  const std::vector<int32_t> train_ids = read_split(cfg.data_dir, "train");
  const std::vector<int32_t> val_ids = read_split(cfg.data_dir, "val");
  FATHOM_CHECK(int64_t(train_ids.size()) > cfg.seq_len, "training data '", cfg.data_dir, "' holds ",
               train_ids.size(), " training tokens, fewer than one window of ", cfg.seq_len + 1, ".");
  const int64_t V = model->config().vocab_size;
  for (size_t i = 0; i < train_ids.size(); ++i)
    FATHOM_CHECK(token_id(train_ids[i]) < V, "training data '", cfg.data_dir, "': token ", token_id(train_ids[i]),
                 " at ", i, " is outside the model's vocabulary of ", V, " (another tokenizer?).");
  const bool on_gpu = cfg.device == "cuda" || (cfg.device == "auto" && cuda_available());
  if (on_gpu) model->use_backend(make_cuda_ops(0));  // throws a clear error without CUDA or a GPU
  FATHOM_CHECK(model->backend().set_bf16_matmuls(cfg.precision == "bf16"), "training config: precision bf16 needs "
               "the CUDA backend (\"device\": \"cuda\"); the CPU trains in fp32.");
  // the setting is the process's (CUDA): put it back when this run ends, however it ends
  struct Bf16Off {
    Ops& ops;
    bool on;
    ~Bf16Off() {
      if (on) ops.set_bf16_matmuls(false);
    }
  } bf16_off{model->backend(), cfg.precision == "bf16"};
  model->set_balance_alpha(cfg.balance_alpha);
  model->set_recompute(cfg.recompute);
  model->set_capacity_factor(cfg.capacity_factor);
  const float lambda0 = cfg.mtp_lambda >= 0 ? cfg.mtp_lambda : model->mtp_depth() > 0 ? 0.3f : 0.0f;
  FATHOM_CHECK(lambda0 == 0 || model->mtp_depth() > 0, "training config: mtp_lambda is ", lambda0, " but the model '",
               cfg.model_dir, "' has no MTP modules (num_nextn_predict_layers is 0).");
  auto lambda_at = [&](int64_t step) {
    return lambda0 > 0 && cfg.mtp_lambda_switch > 0 && step >= cfg.mtp_lambda_switch ? cfg.mtp_lambda_later : lambda0;
  };
  model->set_mtp_lambda(lambda0);
  AdamW opt(cfg.adamw);
  model->add_to(opt);
  if (on_gpu) opt.use_backend(model->backend());  // the update runs beside the weights: no tensor crosses per step
  fs::create_directories(cfg.out_dir);
  const std::string ckpt_root = (fs::path(cfg.out_dir) / "checkpoints").string();
  TrainerState st;
  TrainResult result;
  if (resume) {
    std::vector<std::string> rejected;
    const std::optional<std::string> latest = latest_checkpoint(ckpt_root, &rejected);
    for (const std::string& r : rejected) std::fprintf(stderr, "fathom: skipped checkpoint: %s\n", r.c_str());
    FATHOM_CHECK(latest.has_value(), "--resume: no valid checkpoint under '", ckpt_root, "'.");
    const Checkpoint c = load_checkpoint(*latest);
    restore(opt, c);
    opt.to_device();
    st = c.state;
    result.last_checkpoint = *latest;
  }
  std::ofstream log((fs::path(cfg.out_dir) / "log.jsonl").string(), std::ios::app);
  FATHOM_CHECK(log.good(), "cannot write '", (fs::path(cfg.out_dir) / "log.jsonl").string(), "'.");
  Progress progress("training", cfg.steps, /*bytes=*/false, cfg.progress);
  progress.add(st.step);
  auto save = [&]() {
    opt.to_host();
    result.last_checkpoint = save_checkpoint(ckpt_root, model->config_json(), opt, st);
  };
  const int64_t window_tokens = cfg.seq_len + 1;
  const int64_t micro = cfg.micro_batch > 0 ? cfg.micro_batch : cfg.batch;  // windows per pass
  const double part = double(micro) / double(cfg.batch);                   // a pass's share of the step
  const int64_t last = cfg.stop_at > 0 ? std::min(cfg.stop_at, cfg.steps) : cfg.steps;
  const auto run_start = std::chrono::steady_clock::now();
  while (st.step < last) {
    const auto t0 = std::chrono::steady_clock::now();
    model->zero_grad();
    model->reset_expert_load();
    model->set_mtp_lambda(lambda_at(st.step));
    double objective = 0, loss = 0, balance = 0, mtp = 0;
    for (int64_t b0 = 0; b0 < cfg.batch; b0 += micro) {
      std::vector<std::vector<int32_t>> windows;
      for (int64_t b = b0; b < b0 + micro; ++b)
        windows.push_back(window(train_ids,
                                 cfg.lanes ? window_start(st.data_offset, b, cfg.batch, int64_t(train_ids.size()))
                                           : (st.data_offset + b * cfg.seq_len) % int64_t(train_ids.size()),
                                 window_tokens));
      objective += model->loss_and_grad_batch(windows) * part;  // (the gradient of this pass's mean)
      loss += model->last_lm_loss() * part;
      balance += model->last_balance_loss() * part;
      mtp += model->last_mtp_loss() * part;
    }
    st.data_offset = (st.data_offset + (cfg.lanes ? 1 : cfg.batch) * cfg.seq_len) % int64_t(train_ids.size());
    opt.scale_grads(float(part));  // the passes' means summed: the batch's mean
    const double gnorm = opt.clip_grad_norm(cfg.clip);
    FATHOM_CHECK(std::isfinite(objective) && std::isfinite(gnorm), "training stopped at step ", st.step + 1,
                 ": the loss (", objective, ") or the gradient norm (", gnorm, ") is not finite; the last good checkpoint is ",
                 result.last_checkpoint.empty() ? std::string("none") : result.last_checkpoint, ".");
    const double lr = cfg.lr.at(st.step);
    opt.step(float(lr));
    json loads = json::object();
    for (const auto& [layer, load] : model->expert_load()) {
      loads[std::to_string(layer)] = load_imbalance(load);
      const std::string bias = cat("model.layers.", layer, ".mlp.gate.e_score_correction_bias");
      if (cfg.bias_update > 0 && model->has(bias)) {
        // the bias has no gradient, so the optimizer never moves it: its host value is current
        update_expert_bias(model->value(bias), load, cfg.bias_update);
        model->value_to_device(bias);
      }
    }
    ++st.step;
    st.optimizer_steps = opt.steps();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // numbers as JSON writes doubles: 17 significant digits, so a log compares exactly
    json line = {{"step", st.step}, {"loss", loss}, {"balance_loss", balance}, {"objective", objective},
                 {"lr", lr}, {"grad_norm", gnorm}, {"tokens_per_s", double(cfg.batch * cfg.seq_len) / secs},
                 {"expert_load_max_over_mean", loads}};
    if (cfg.capacity_factor > 0) {
      int64_t dropped = 0;
      for (const auto& [layer, n] : model->expert_dropped()) dropped += n;
      line["dropped_tokens"] = dropped;  // (token, expert) pairs over the step's MoE layers
    }
    if (model->mtp_lambda() > 0) {
      line["mtp_loss"] = mtp;
      line["mtp_lambda"] = model->mtp_lambda();
    }
    if (cfg.eval_every > 0 && (st.step % cfg.eval_every == 0 || st.step == cfg.steps) &&
        int64_t(val_ids.size()) > cfg.seq_len) {
      double val = 0, val_mtp = 0;
      for (int64_t b0 = 0; b0 < cfg.eval_batches; b0 += micro) {
        std::vector<std::vector<int32_t>> windows;
        for (int64_t b = b0; b < std::min(cfg.eval_batches, b0 + micro); ++b)
          windows.push_back(window(val_ids, b * cfg.seq_len, window_tokens));
        model->loss_batch(windows);
        const double share = double(windows.size()) / double(cfg.eval_batches);
        val += model->last_lm_loss() * share;
        val_mtp += model->last_mtp_loss() * share;
      }
      line["val_loss"] = val;
      if (model->mtp_lambda() > 0) line["val_mtp_loss"] = val_mtp;
    }
    log << line.dump() << "\n";
    log.flush();
    char note[96];
    std::snprintf(note, sizeof(note), "loss %.4f  %.0f tok/s", loss, double(cfg.batch * cfg.seq_len) / secs);
    progress.set_note(note);
    progress.add(1);
    result.last_loss = loss;
    const bool out_of_time =
        cfg.time_limit_s > 0 &&
        std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count() >= cfg.time_limit_s;
    if ((cfg.checkpoint_every > 0 && st.step % cfg.checkpoint_every == 0) || st.step == last || out_of_time) save();
    if (out_of_time && st.step < last) {
      result.stopped_by_time = true;
      break;
    }
  }
  progress.finish();
  result.steps_done = st.step;
  // the curves of the whole log (earlier runs of a resumed one included); a missing gnuplot costs
  // the pictures, not the run
  if (cfg.plots) {
    try {
      write_training_plots((fs::path(cfg.out_dir) / "log.jsonl").string(), cfg.out_dir);
    } catch (const Error& e) {
      std::fprintf(stderr, "fathom: training plots not written: %s\n", e.what());
    }
  }
  return result;
}

}  // namespace fathom::train
