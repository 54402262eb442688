// The training loop (src/train/trainer.h, `fathom train`) on the v3-tiny fixture: the loss falls
// on a learnable sequence, a run interrupted and resumed ends bit for bit where an uninterrupted
// one does, a NaN stops the run without a checkpoint, and bad configs are clear errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/files.h"
#include "core/safetensors.h"
#include "test_util.h"
#include "train/checkpoint.h"
#include "train/data.h"
#include "train/trainer.h"
#include "ops/ops.h"

using namespace fathom;
using namespace fathom::test;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// a data set whose training text repeats a short pattern (learnable), in the prepare_data format
std::string make_data(const TempDir& tmp) {
  const std::string dir = tmp.file("data");
  fs::create_directories(dir);
  std::vector<int32_t> train, val;
  for (int i = 0; i < 600; ++i) train.push_back(int32_t(3 + (i * 7) % 23));
  for (int i = 0; i < 100; ++i) val.push_back(int32_t(3 + (i * 7) % 23));
  train::write_shard(dir + "/train-00000.bin", train);
  train::write_shard(dir + "/val-00000.bin", val);
  json m = {{"shards", json::array({{{"file", "train-00000.bin"}, {"split", "train"}, {"tokens", train.size()}},
                                    {{"file", "val-00000.bin"}, {"split", "val"}, {"tokens", val.size()}}})}};
  write_file_atomic(dir + "/manifest.json", m.dump());
  return dir;
}

std::string write_config(const TempDir& tmp, const std::string& name, json extra) {
  json c = {{"model", fixture_dir("v3-tiny")}, {"data", "data"}, {"out", name}, {"seq_len", 16}, {"batch", 2},
            {"steps", 6}, {"lr", {{"schedule", "cosine"}, {"peak", 3e-3}, {"min", 3e-4}, {"warmup", 2}}},
            {"clip", 1.0}, {"eval_every", 3}, {"bias_update", 0.01}};
  c.update(extra);
  const std::string path = tmp.file(name + ".json");
  write_file_atomic(path, c.dump(2));
  return path;
}

std::vector<json> log_lines(const std::string& out) {
  std::vector<json> lines;
  std::ifstream in(out + "/log.jsonl");
  for (std::string l; std::getline(in, l);) lines.push_back(json::parse(l));
  return lines;
}

TEST(Trainer, TheLossFallsAndEveryStepIsLogged) {
  TempDir tmp;
  make_data(tmp);
  train::TrainConfig c = train::load_train_config(write_config(tmp, "run", {{"steps", 12}}));
  c.progress = false;
  const train::TrainResult r = train::train(c, false);
  EXPECT_EQ(r.steps_done, 12);
  const std::vector<json> log = log_lines(tmp.file("run"));
  ASSERT_EQ(log.size(), 12u);
  const double first = log.front()["loss"].get<double>(), last = log.back()["loss"].get<double>();
  EXPECT_LT(last, 0.7 * first) << "first " << first << " last " << last;
  EXPECT_TRUE(log[2].contains("val_loss"));
  EXPECT_EQ(log[0]["expert_load_max_over_mean"].size(), 3u);  // the three MoE layers of v3-tiny
  EXPECT_EQ(fs::path(r.last_checkpoint).filename().string(), "step-00000012");
  EXPECT_NO_THROW(train::load_checkpoint(r.last_checkpoint));
}

// A model with an MTP module trains it (λ from the config, switching at a step), logs its loss,
// and checkpoints its weights with the rest; with λ 0 the module is kept as loaded.
TEST(Trainer, TheMtpModuleTrainsWithTheModel) {
  TempDir tmp;
  make_data(tmp);
  train::TrainConfig c = train::load_train_config(write_config(
      tmp, "mtp", {{"model", fixture_dir("v3-tiny-mtp")}, {"steps", 8}, {"mtp_lambda", 0.3}, {"mtp_lambda_switch", 5}}));
  c.progress = false;
  c.plots = false;
  const train::TrainResult r = train::train(c, false);
  const std::vector<json> log = log_lines(tmp.file("mtp"));
  ASSERT_EQ(log.size(), 8u);
  EXPECT_EQ(log[3]["mtp_lambda"].get<double>(), double(0.3f));
  EXPECT_EQ(log[5]["mtp_lambda"].get<double>(), double(0.1f));  // step 6 is past the switch
  EXPECT_LT(log.back()["mtp_loss"].get<double>(), 0.8 * log.front()["mtp_loss"].get<double>());
  EXPECT_EQ(log[0]["expert_load_max_over_mean"].size(), 4u);  // three MoE layers and the MTP module's
  EXPECT_TRUE(log[2].contains("val_mtp_loss"));
  const double objective = log[4]["objective"].get<double>();
  EXPECT_NEAR(objective,
              log[4]["loss"].get<double>() + log[4]["balance_loss"].get<double>() + 0.3 * log[4]["mtp_loss"].get<double>(),
              1e-6 * objective);
  const auto fixture = SafetensorsFile::open(fixture_dir("v3-tiny-mtp") + "/model.safetensors");
  auto changed = [&](const train::Checkpoint& ck, const std::string& name) {
    const Tensor a = to_f32(fixture->tensor(name));
    const Tensor& b = ck.values.at(name);
    for (int64_t i = 0; i < a.numel(); ++i)
      if (a.f32()[i] != b.f32()[i]) return true;
    return false;
  };
  const train::Checkpoint ck = train::load_checkpoint(r.last_checkpoint);
  EXPECT_TRUE(changed(ck, "model.layers.4.eh_proj.weight"));
  EXPECT_TRUE(changed(ck, "model.layers.4.shared_head.head.weight"));

  train::TrainConfig off = train::load_train_config(
      write_config(tmp, "off", {{"model", fixture_dir("v3-tiny-mtp")}, {"steps", 2}, {"mtp_lambda", 0}}));
  off.progress = false;
  off.plots = false;
  const train::Checkpoint ck0 = train::load_checkpoint(train::train(off, false).last_checkpoint);
  EXPECT_FALSE(changed(ck0, "model.layers.4.eh_proj.weight"));
  EXPECT_TRUE(ck0.values.count("model.layers.4.enorm.weight"));
  EXPECT_TRUE(changed(ck0, "model.layers.3.self_attn.o_proj.weight"));
  EXPECT_FALSE(log_lines(tmp.file("off"))[0].contains("mtp_loss"));
}

// Recomputation and a capacity factor through the config: recomputation logs the same losses bit
// for bit; a tight capacity logs the tokens it dropped.
TEST(Trainer, RecomputeAndCapacityOptions) {
  TempDir tmp;
  make_data(tmp);
  auto run = [&](const std::string& name, json extra) {
    train::TrainConfig c = train::load_train_config(write_config(tmp, name, extra));
    c.progress = false;
    c.plots = false;
    train::train(c, false);
    return log_lines(tmp.file(name));
  };
  const std::vector<json> plain = run("plain", {{"steps", 3}}), re = run("re", {{"steps", 3}, {"recompute", true}});
  for (size_t i = 0; i < plain.size(); ++i) EXPECT_EQ(plain[i]["objective"], re[i]["objective"]) << i;
  const std::vector<json> cap = run("cap", {{"steps", 2}, {"capacity_factor", 0.5}});
  EXPECT_GT(cap[0]["dropped_tokens"].get<int64_t>(), 0);
  EXPECT_FALSE(plain[0].contains("dropped_tokens"));
}

// Auxiliary-loss-free balancing at work on a real MoE: v3-tiny trained 120 steps on a text of 23
// distinct tokens (so the router starts far from even) with the bias update γ = 0.03 ends with a
// lower max/mean expert load than the same run with γ = 0 (the mean over the MoE layers and the
// last 30 steps: 1.49 against 2.24 when written; scripts/make-balance-plots.sh draws the same two
// runs for docs/balancing.md).
TEST(Trainer, TheBiasUpdateBalancesTheExperts) {
  TempDir tmp;
  make_data(tmp);
  auto imbalance = [&](const std::string& name, double gamma) {
    train::TrainConfig c = train::load_train_config(write_config(
        tmp, name,
        {{"steps", 120}, {"seq_len", 24}, {"batch", 1}, {"eval_every", 0}, {"bias_update", gamma},
         {"lr", {{"schedule", "constant"}, {"peak", 1e-3}}}}));
    c.progress = false;
    c.plots = false;
    train::train(c, false);
    const std::vector<json> log = log_lines(tmp.file(name));
    double sum = 0;
    int n = 0;
    for (size_t i = log.size() - 30; i < log.size(); ++i)
      for (const auto& [layer, r] : log[i]["expert_load_max_over_mean"].items()) sum += r.get<double>(), ++n;
    return sum / n;
  };
  const double off = imbalance("gamma0", 0.0), on = imbalance("gamma003", 0.03);
  std::printf("  max/mean expert load over the last 30 steps: %.3f with γ = 0, %.3f with γ = 0.03\n", off, on);
  EXPECT_LT(on, 0.8 * off);
}

// `"device": "cuda"`: the same run on the GPU logs the CPU run's losses (within float rounding:
// the GPU's sums run in another order).
TEST(Trainer, TrainsOnTheGpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA build or GPU: GPU training is not checked here";
  TempDir tmp;
  make_data(tmp);
  auto run = [&](const std::string& name, const char* device) {
    train::TrainConfig c = train::load_train_config(
        write_config(tmp, name, {{"model", fixture_dir("v3-tiny-mtp")}, {"steps", 6}, {"device", device}}));
    c.progress = false;
    c.plots = false;
    train::train(c, false);
    return log_lines(tmp.file(name));
  };
  const std::vector<json> cpu = run("cpu", "cpu"), gpu = run("gpu", "cuda");
  ASSERT_EQ(cpu.size(), gpu.size());
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double a = cpu[i]["objective"].get<double>(), b = gpu[i]["objective"].get<double>();
    EXPECT_NEAR(b, a, 1e-4 * a) << "step " << i + 1;
    EXPECT_NEAR(gpu[i]["mtp_loss"].get<double>(), cpu[i]["mtp_loss"].get<double>(), 1e-4 * a) << "step " << i + 1;
  }
  EXPECT_TRUE(gpu[2].contains("val_loss"));
}

// bf16 mixed precision on the GPU ("precision": "bf16"): the matrix products' inputs rounded to
// bf16 move each step's objective by far less than training moves it — within 1% of the F32 CPU
// run's, step by step — and not by nothing (the mode took effect).
TEST(Trainer, TrainsOnTheGpuInBf16) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA build or GPU: GPU training is not checked here";
  TempDir tmp;
  make_data(tmp);
  auto run = [&](const std::string& name, const char* device, const char* precision) {
    train::TrainConfig c = train::load_train_config(write_config(
        tmp, name, {{"model", fixture_dir("v3-tiny-mtp")}, {"steps", 6}, {"device", device}, {"precision", precision}}));
    c.progress = false;
    c.plots = false;
    train::train(c, false);
    return log_lines(tmp.file(name));
  };
  const std::vector<json> cpu = run("cpu", "cpu", "fp32"), gpu = run("gpu", "cuda", "bf16");
  ASSERT_EQ(cpu.size(), gpu.size());
  double most = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double a = cpu[i]["objective"].get<double>(), b = gpu[i]["objective"].get<double>();
    EXPECT_NEAR(b, a, 1e-2 * a) << "step " << i + 1;
    most = std::max(most, std::fabs(b - a) / a);
  }
  EXPECT_GT(most, 1e-6) << "the bf16 run logged the F32 run's objectives exactly";
  // the same run again logs the same objectives, bit for bit (no atomics in the GPU's sums)
  const std::vector<json> repeat = run("gpu-repeat", "cuda", "bf16");
  ASSERT_EQ(repeat.size(), gpu.size());
  for (size_t i = 0; i < gpu.size(); ++i)
    EXPECT_EQ(repeat[i]["objective"].get<double>(), gpu[i]["objective"].get<double>()) << "step " << i + 1;
  // and the process is back to F32 products for what comes next
  const std::vector<json> again = run("gpu-f32", "cuda", "fp32");
  for (size_t i = 0; i < cpu.size(); ++i)
    EXPECT_NEAR(again[i]["objective"].get<double>(), cpu[i]["objective"].get<double>(),
                1e-4 * cpu[i]["objective"].get<double>()) << "step " << i + 1;
}

// On the GPU the optimizer's state lives there (AdamW::use_backend): a run stopped at step 3 and
// resumed must bring the values and both moments back out of the checkpoint. Its final weights
// and moments equal an unbroken GPU run's bit for bit (no GPU kernel of training sums with
// atomics), and the checkpoints hold the GPU's values, not the stale host copies.
TEST(Trainer, AGpuRunResumesWithItsOptimizerState) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA build or GPU: GPU training is not checked here";
  TempDir tmp;
  make_data(tmp);
  auto config = [&](const std::string& name) {
    train::TrainConfig c = train::load_train_config(write_config(tmp, name, {{"device", "cuda"}}));
    c.progress = false;
    c.plots = false;
    return c;
  };
  train::train(config("straight"), false);
  train::TrainConfig part = config("parts");
  part.stop_at = 3;
  EXPECT_EQ(train::train(part, false).steps_done, 3);
  part.stop_at = 0;
  EXPECT_EQ(train::train(part, true).steps_done, 6);
  const std::string a = tmp.file("straight/checkpoints/step-00000006"), b = tmp.file("parts/checkpoints/step-00000006");
  const SafetensorsSet init = SafetensorsSet::open_dir(fixture_dir("v3-tiny"));
  for (const char* f : {"model.safetensors", "optimizer.safetensors"}) {
    const SafetensorsSet fa = SafetensorsSet::open_file(a + "/" + f), fb = SafetensorsSet::open_file(b + "/" + f);
    ASSERT_EQ(fa.names(), fb.names()) << f;
    double moved = 0;
    for (const std::string& n : fa.names()) {
      const Tensor ta = to_f32(fa.tensor(n)), tb = to_f32(fb.tensor(n));
      ASSERT_EQ(ta.numel(), tb.numel()) << n;
      for (int64_t i = 0; i < ta.numel(); ++i)
        ASSERT_EQ(std::bit_cast<uint32_t>(tb.f32()[i]), std::bit_cast<uint32_t>(ta.f32()[i]))
            << f << " " << n << " [" << i << "]: " << tb.f32()[i] << " vs " << ta.f32()[i];
      if (std::string(f) == "model.safetensors" && init.contains(n)) {
        const Tensor t0 = to_f32(init.tensor(n));
        for (int64_t i = 0; i < ta.numel(); ++i) moved = std::max(moved, double(std::fabs(ta.f32()[i] - t0.f32()[i])));
      }
    }
    if (std::string(f) == "model.safetensors") {
      EXPECT_GT(moved, 1e-4) << "the saved weights are the trained ones";
    }
  }
}

// A step's windows are a lane apart; the position moves one window per step; all wrap around.
TEST(Trainer, BatchRowsReadTheirOwnLanes) {
  EXPECT_EQ(train::window_start(0, 0, 4, 1000), 0);
  EXPECT_EQ(train::window_start(0, 1, 4, 1000), 250);
  EXPECT_EQ(train::window_start(0, 3, 4, 1000), 750);
  EXPECT_EQ(train::window_start(900, 3, 4, 1000), 650);  // 900 + 750 wraps
  EXPECT_EQ(train::window_start(17, 2, 3, 10), 3);        // lanes of 3 over 10 tokens: (17 + 6) % 10
  EXPECT_EQ(train::window_start(5, 4, 8, 6), 3);          // fewer tokens than rows: lanes of 1
  EXPECT_THROW(train::window_start(0, 4, 4, 1000), Error);
  EXPECT_THROW(train::window_start(0, 0, 4, 0), Error);
}

// The batch in one pass or one window per pass is the same step (to rounding): the same losses,
// gradient norms and validation losses in the log. Compared over the first two steps: AdamW's
// first updates are ±lr for every element whatever its gradient's size, so the rounding noise of
// near-zero gradients (summed in another order) moves weights by lr, and later steps drift apart.
TEST(Trainer, MicroBatchesMakeTheSameSteps) {
  TempDir tmp;
  make_data(tmp);
  auto run = [&](const std::string& name, int64_t micro) {
    train::TrainConfig c = train::load_train_config(write_config(
        tmp, name, {{"model", fixture_dir("v3-tiny-mtp")}, {"steps", 4}, {"batch", 4}, {"micro_batch", micro},
                    {"mtp_lambda", 0.3}, {"eval_every", 2}, {"eval_batches", 3}}));
    c.progress = false;
    c.plots = false;
    train::train(c, false);
    return log_lines(tmp.file(name));
  };
  const std::vector<json> one = run("one", 0), each = run("each", 1), pairs = run("pairs", 2);
  ASSERT_EQ(one.size(), 4u);
  for (const auto* other : {&each, &pairs}) {
    ASSERT_EQ(other->size(), 4u);
    for (size_t i = 0; i < 2; ++i)
      for (const char* k : {"loss", "objective", "grad_norm", "mtp_loss"}) {
        const double a = one[i][k].get<double>(), b = (*other)[i][k].get<double>();
        EXPECT_NEAR(b, a, 1e-5 * std::fabs(a)) << "step " << i + 1 << " " << k;
      }
    EXPECT_NEAR((*other)[1]["val_loss"].get<double>(), one[1]["val_loss"].get<double>(), 1e-5 * one[1]["val_loss"].get<double>());
  }
}

// Data and an uninterrupted six-step run in <tmp>/straight; returns the (quiet) config of the
// same run in <tmp>/parts, for a test to interrupt and resume.
train::TrainConfig straight_run_and_parts(const TempDir& tmp) {
  make_data(tmp);
  train::TrainConfig straight = train::load_train_config(write_config(tmp, "straight", json::object()));
  straight.progress = false;
  train::train(straight, false);
  train::TrainConfig part = train::load_train_config(write_config(tmp, "parts", json::object()));
  part.progress = false;
  return part;
}

// Both runs end with byte-identical weights, optimizer state and trainer state.
void expect_same_final_checkpoint(const TempDir& tmp) {
  const std::string a = tmp.file("straight/checkpoints/step-00000006"), b = tmp.file("parts/checkpoints/step-00000006");
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "trainer_state.json"})
    EXPECT_EQ(read_file(a + "/" + f), read_file(b + "/" + f)) << f;
}

// A time limit ends the run after the step that passes it, checkpointed, and --resume finishes
// the same run as one that was never stopped.
TEST(Trainer, ATimeLimitStopsCheckpointedAndResumes) {
  TempDir tmp;
  train::TrainConfig part = straight_run_and_parts(tmp);
  part.time_limit_s = 1e-9;  // past after the first step
  const train::TrainResult r = train::train(part, false);
  EXPECT_TRUE(r.stopped_by_time);
  EXPECT_EQ(r.steps_done, 1);
  EXPECT_TRUE(fs::exists(tmp.file("parts/checkpoints/step-00000001/model.safetensors")));
  part.time_limit_s = 0;
  const train::TrainResult rest = train::train(part, true);
  EXPECT_FALSE(rest.stopped_by_time);
  EXPECT_EQ(rest.steps_done, 6);
  expect_same_final_checkpoint(tmp);
}

TEST(Trainer, AnInterruptedRunResumesBitForBit) {
  TempDir tmp;
  train::TrainConfig part = straight_run_and_parts(tmp);
  part.stop_at = 3;
  EXPECT_EQ(train::train(part, false).steps_done, 3);
  part.stop_at = 0;
  EXPECT_EQ(train::train(part, true).steps_done, 6);
  expect_same_final_checkpoint(tmp);
  const std::vector<json> la = log_lines(tmp.file("straight")), lb = log_lines(tmp.file("parts"));
  ASSERT_EQ(la.size(), 6u);
  ASSERT_EQ(lb.size(), 6u);
  for (size_t i = 0; i < 6; ++i)
    for (const char* k : {"step", "loss", "lr", "grad_norm"}) EXPECT_EQ(la[i][k], lb[i][k]) << "line " << i << " " << k;
}

TEST(Trainer, ANonFiniteLossStopsWithoutACheckpoint) {
  TempDir tmp;
  make_data(tmp);
  // v3-tiny with one NaN weight
  const std::string model = tmp.file("nan-model");
  fs::create_directories(model);
  fs::copy_file(fixture_dir("v3-tiny") + "/config.json", model + "/config.json");
  const SafetensorsSet set = SafetensorsSet::open_dir(fixture_dir("v3-tiny"));
  std::vector<Tensor> keep;
  SafetensorsWriter w;
  for (const std::string& n : set.names()) {
    Tensor t = to_f32(set.tensor(n));
    if (n == "model.norm.weight") t.f32()[3] = NAN;
    keep.push_back(t);
    w.add(n, keep.back());
  }
  w.write(model + "/model.safetensors");
  train::TrainConfig c = train::load_train_config(write_config(tmp, "nan", {{"model", model}}));
  c.progress = false;
  try {
    train::train(c, false);
    ADD_FAILURE() << "a NaN loss did not stop training";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not finite"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(train::latest_checkpoint(tmp.file("nan/checkpoints")).has_value());
}

TEST(Trainer, BadConfigsAreClearErrors) {
  TempDir tmp;
  make_data(tmp);
  auto error_of = [&](const std::string& path) -> std::string {
    try {
      train::TrainConfig c = train::load_train_config(path);
      c.progress = false;
      train::train(c, false);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  json no_data = {{"model", fixture_dir("v3-tiny")}, {"out", "x"}};
  write_file_atomic(tmp.file("a.json"), no_data.dump());
  EXPECT_NE(error_of(tmp.file("a.json")).find("\"data\""), std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "b", {{"lr", {{"schedule", "linear"}}}})).find("lr.schedule"), std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "c", {{"batch", 0}})).find("positive"), std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "d", {{"seq_len", 5000}})).find("fewer than one window"), std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "e", {{"data", "nowhere"}})).find("manifest.json"), std::string::npos);
  write_file_atomic(tmp.file("f.json"), "{not json");
  EXPECT_NE(error_of(tmp.file("f.json")).find("not a JSON object"), std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "g", {{"mtp_lambda", 0.3}})).find("no MTP modules"), std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "g3", {{"capacity_factor", -2}})).find("capacity_factor"), std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "g4", {{"recompute", "yes"}})).find("recompute"), std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "g5", {{"device", "tpu"}})).find("device"), std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "g7", {{"lr", {{"schedule", 3}}}})).find("lr.schedule"), std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "g8", {{"micro_batch", 3}})).find("micro_batch"), std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "g10", {{"lanes", 1}})).find("lanes"), std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "g11", {{"precision", "fp16"}})).find("precision must be fp32 or bf16"),
            std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "g12", {{"precision", 16}})).find("precision"), std::string::npos);
  // bf16 mixed precision is the GPU's: on the CPU a clear error, not a silent F32 run
  EXPECT_NE(error_of(write_config(tmp, "g13", {{"precision", "bf16"}, {"device", "cpu"}})).find("needs the CUDA backend"),
            std::string::npos);
  EXPECT_NE(error_of(write_config(tmp, "g9", {{"batch", 4}, {"micro_batch", 3}})).find("divide"), std::string::npos);
  if (!cuda_available()) {  // asking for the GPU where there is none is a clear error, not a CPU run
    EXPECT_NE(error_of(write_config(tmp, "g6", {{"device", "cuda"}, {"steps", 1}})), "");
  }
  EXPECT_NE(error_of(write_config(tmp, "g2", {{"mtp_lambda", -1}})).find("mtp_lambda"), std::string::npos);
  EXPECT_EQ(error_of(write_config(tmp, "h", {{"steps", 1}})), "");  // a good config trains
  // --resume without a checkpoint
  train::TrainConfig c = train::load_train_config(write_config(tmp, "i", json::object()));
  c.progress = false;
  EXPECT_THROW(train::train(c, true), Error);
}

TEST(Trainer, TheCommandLine) {
  TempDir tmp;
  make_data(tmp);
  CliRun r = run_fathom({"train", "--config", write_config(tmp, "cli", {{"steps", 2}}), "--quiet"}, tmp);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("trained to step 2"), std::string::npos) << r.out;
  CliRun bad = run_fathom({"train", "--config", tmp.file("missing.json"), "--quiet"}, tmp);
  EXPECT_TRUE(is_user_error(bad, {"missing.json"}));
}

}  // namespace
