// Training checkpoints (src/train/checkpoint.h): a bit-exact round trip that resumes AdamW
// exactly, corrupted or incomplete checkpoints rejected with the previous one used, a writer
// killed with SIGKILL mid-write never leaving a checkpoint that fails to load, and a disk that
// fills up mid-write failing the save with a clear error and nothing half-written left.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "core/error.h"
#include "core/files.h"
#include "test_util.h"
#include "train/checkpoint.h"

using namespace fathom;
using namespace fathom::test;
using namespace fathom::train;
namespace fs = std::filesystem;

namespace {

const std::string kConfig = R"({"model_type": "deepseek_v3", "hidden_size": 8})";

void fill(std::mt19937& gen, Tensor& t) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(gen);
}

// an optimizer over two parameters after `steps` AdamW steps on random gradients
AdamW trained(uint32_t seed, int steps, int64_t rows = 6) {
  std::mt19937 gen(seed);
  AdamW opt;
  Tensor w = Tensor::empty({rows, 5}), b = Tensor::empty({5});
  fill(gen, w);
  fill(gen, b);
  opt.add("model.layers.0.mlp.up_proj.weight", w, Tensor::zeros({rows, 5}));
  opt.add("model.norm.weight", b, Tensor::zeros({5}));
  for (int s = 0; s < steps; ++s) {
    for (Param& p : opt.params()) fill(gen, p.grad);
    opt.step(1e-2f);
  }
  return opt;
}

bool same(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

TEST(Checkpoint, RoundTripResumesAdamWExactly) {
  TempDir tmp;
  AdamW a = trained(11, 3);
  TrainerState st{3, a.steps(), "mt19937 state 1 2 3", 2, 99};
  const std::string dir = save_checkpoint(tmp.file("ckpt"), kConfig, a, st, std::string(FATHOM_SHARED_DATA) + "/deepseek-v3-tokenizer");
  EXPECT_EQ(fs::path(dir).filename().string(), "step-00000003");
  EXPECT_TRUE(fs::exists(dir + "/tokenizer.json"));
  const Checkpoint c = load_checkpoint(dir);
  EXPECT_EQ(c.config_json, kConfig);
  EXPECT_EQ(c.state.step, 3);
  EXPECT_EQ(c.state.optimizer_steps, 3);
  EXPECT_EQ(c.state.rng, st.rng);
  EXPECT_EQ(c.state.data_shard, 2);
  EXPECT_EQ(c.state.data_offset, 99);
  AdamW b = trained(999, 0);  // same names and shapes, other values
  restore(b, c);
  EXPECT_EQ(b.steps(), 3);
  for (size_t i = 0; i < a.params().size(); ++i) {
    EXPECT_TRUE(same(a.params()[i].value, b.params()[i].value));
    EXPECT_TRUE(same(a.params()[i].m, b.params()[i].m));
    EXPECT_TRUE(same(a.params()[i].v, b.params()[i].v));
  }
  // one more step with the same gradients: the resumed optimizer moves exactly as the original
  std::mt19937 gen(5);
  for (size_t i = 0; i < a.params().size(); ++i) {
    fill(gen, a.params()[i].grad);
    std::memcpy(b.params()[i].grad.data(), a.params()[i].grad.data(), a.params()[i].grad.nbytes());
  }
  a.step(3e-3f);
  b.step(3e-3f);
  for (size_t i = 0; i < a.params().size(); ++i) EXPECT_TRUE(same(a.params()[i].value, b.params()[i].value));
  // steps only move forward; a model of another shape does not take the checkpoint
  EXPECT_THROW(save_checkpoint(tmp.file("ckpt"), kConfig, a, st), Error);
  AdamW other = trained(1, 0, /*rows=*/7);
  EXPECT_THROW(restore(other, c), Error);
}

TEST(Checkpoint, CorruptOrIncompleteCheckpointsAreRejectedAndThePreviousUsed) {
  TempDir tmp;
  const std::string root = tmp.file("ckpt");
  AdamW a = trained(3, 1);
  const std::string first = save_checkpoint(root, kConfig, a, TrainerState{1, 1, "", 0, 0});
  const std::string second = save_checkpoint(root, kConfig, a, TrainerState{2, 1, "", 0, 0});
  EXPECT_EQ(latest_checkpoint(root).value(), second);
  // one byte of the newest model file altered
  std::string bytes = read_file(second + "/model.safetensors");
  bytes[bytes.size() - 5] ^= 0x40;
  write_file_atomic(second + "/model.safetensors", bytes);
  try {
    load_checkpoint(second);
    ADD_FAILURE() << "an altered checkpoint loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors"), std::string::npos) << e.what();
  }
  std::vector<std::string> rejected;
  EXPECT_EQ(latest_checkpoint(root, &rejected).value(), first);
  ASSERT_EQ(rejected.size(), 1u);
  EXPECT_NE(rejected[0].find("SHA-256"), std::string::npos);
  // a half-written directory of a killed writer is never a candidate, an incomplete one is rejected
  fs::create_directories(root + "/step-00000009.tmp-123");
  fs::create_directories(root + "/step-00000008");
  write_file_atomic(root + "/step-00000008/config.json", kConfig);
  rejected.clear();
  EXPECT_EQ(latest_checkpoint(root, &rejected).value(), first);
  EXPECT_EQ(rejected.size(), 2u);
  EXPECT_FALSE(latest_checkpoint(tmp.file("nothing")).has_value());
}

TEST(Checkpoint, AWriterKilledMidWriteLeavesALoadableLatest) {
  TempDir tmp;
  const std::string root = tmp.file("ckpt");
  AdamW big = trained(8, 1, /*rows=*/400000);  // ~2 x 8 MB per file: the kill lands mid-write
  save_checkpoint(root, kConfig, big, TrainerState{1, 1, "", 0, 0});
  for (int delay_ms : {5, 40, 120}) {
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      try {
        for (int64_t step = 2;; ++step) {
          if (!fs::exists(root + "/" + checkpoint_name(step))) save_checkpoint(root, kConfig, big, TrainerState{step, 1, "", 0, 0});
        }
      } catch (...) {
      }
      _exit(0);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    kill(child, SIGKILL);
    int status = 0;
    waitpid(child, &status, 0);
    const std::optional<std::string> latest = latest_checkpoint(root);
    ASSERT_TRUE(latest.has_value());
    const Checkpoint c = load_checkpoint(*latest);
    EXPECT_TRUE(same(c.values.at("model.norm.weight"), big.params()[1].value)) << "after a kill at " << delay_ms << " ms";
  }
}

// A full disk, simulated with RLIMIT_FSIZE (no file may grow past the limit: write(2) fails with
// EFBIG once SIGXFSZ is ignored) in a child process, at three sizes: config.json, then
// model.safetensors (~2 MB), then optimizer.safetensors (~4 MB) is the file that does not fit.
TEST(Checkpoint, AFullDiskFailsTheSaveAndKeepsThePrevious) {
  TempDir tmp;
  const std::string root = tmp.file("ckpt");
  AdamW big = trained(9, 1, /*rows=*/100000);
  const std::string first = save_checkpoint(root, kConfig, big, TrainerState{1, 1, "", 0, 0});
  for (const auto& [limit, file] : std::vector<std::pair<rlim_t, std::string>>{
           {16, "config.json"}, {1 << 20, "model.safetensors"}, {3 << 20, "optimizer.safetensors"}}) {
    int pipe_fds[2];
    ASSERT_EQ(pipe(pipe_fds), 0);
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      // exit 0: a fathom::Error, its message down the pipe (a pipe is not limited by RLIMIT_FSIZE)
      close(pipe_fds[0]);
      signal(SIGXFSZ, SIG_IGN);
      const rlimit lim{limit, limit};
      if (setrlimit(RLIMIT_FSIZE, &lim) != 0) _exit(3);
      int code = 0;
      std::string message;
      try {
        save_checkpoint(root, kConfig, big, TrainerState{2, 1, "", 0, 0});
        message = "the checkpoint was saved despite the limit";
        code = 4;
      } catch (const Error& e) {
        message = e.what();
      } catch (const std::exception& e) {
        message = std::string("not a fathom::Error: ") + e.what();
        code = 5;
      }
      const ssize_t n = write(pipe_fds[1], message.data(), message.size());
      (void)n;
      _exit(code);
    }
    close(pipe_fds[1]);
    std::string message;
    char buf[512];
    for (ssize_t n; (n = read(pipe_fds[0], buf, sizeof(buf))) > 0;) message.append(buf, size_t(n));
    close(pipe_fds[0]);
    int status = 0;
    waitpid(child, &status, 0);
    ASSERT_TRUE(WIFEXITED(status)) << "the saving child did not exit (limit " << limit << ")";
    EXPECT_EQ(WEXITSTATUS(status), 0) << "limit " << limit << ": " << message;
    // the message names the checkpoint, the file that did not fit and the OS error
    EXPECT_NE(message.find(checkpoint_name(2)), std::string::npos) << message;
    EXPECT_NE(message.find(file), std::string::npos) << message;
    EXPECT_TRUE(message.find("File too large") != std::string::npos ||
                message.find("No space left") != std::string::npos)
        << message;
    // the previous checkpoint is still the latest and loads; nothing of the failed one is left
    std::vector<std::string> rejected;
    EXPECT_EQ(latest_checkpoint(root, &rejected).value_or("none"), first);
    EXPECT_TRUE(rejected.empty());
    const Checkpoint c = load_checkpoint(first);
    EXPECT_TRUE(same(c.values.at("model.layers.0.mlp.up_proj.weight"), big.params()[0].value));
    std::vector<std::string> entries;
    for (const auto& e : fs::directory_iterator(root)) entries.push_back(e.path().filename().string());
    EXPECT_EQ(entries, std::vector<std::string>{checkpoint_name(1)}) << "limit " << limit;
  }
  // with room again the same step saves: the failed attempt blocks nothing
  const std::string second = save_checkpoint(root, kConfig, big, TrainerState{2, 1, "", 0, 0});
  EXPECT_EQ(latest_checkpoint(root).value_or("none"), second);
}

}  // namespace
