// Held-out evaluation (src/train/eval.h, `fathom eval`): the model loss against a direct
// computation, the n-gram baselines against their formulas, MTP acceptance's bookkeeping, and
// bad input.
#include <cmath>
#include <filesystem>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/files.h"
#include "fathom/model.h"
#include "test_util.h"
#include "train/data.h"
#include "train/eval.h"

namespace fathom {
namespace {

using test::TempDir;

std::unique_ptr<Model> tiny(const std::string& name) {
  ModelOptions o;
  o.device = DeviceKind::Cpu;
  o.precision = Precision::Fp32;
  return Model::load(test::fixture_dir(name), o);
}

std::vector<int32_t> tokens(int64_t n, int64_t vocab, int seed) {
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < n; ++i) ids.push_back(int32_t((i * 131 + seed * 17 + (i * i) % 7) % vocab));
  return ids;
}

TEST(Eval, ModelLossIsTheMeanCrossEntropyOfItsWindows) {
  auto m = tiny("v3-tiny");
  const int64_t V = m->config().vocab_size, seq = 8;
  const std::vector<int32_t> ids = tokens(30, V, 1);  // windows at 0, 8, 16 (24 + 8 > 29: not)
  const train::LossResult r = train::model_loss(*m, ids, seq, 0);
  EXPECT_EQ(r.tokens, 24);
  double want = 0;
  for (int64_t start : {0, 8, 16}) {
    const std::vector<int32_t> in(ids.begin() + start, ids.begin() + start + seq);
    KvCache cache = m->new_cache(seq);
    const Tensor logits = m->forward(in, cache).logits;
    for (int64_t t = 0; t < seq; ++t) {
      const float* row = logits.f32() + t * V;
      double z = 0;
      for (int64_t v = 0; v < V; ++v) z += std::exp(double(row[v]));
      want += std::log(z) - double(row[ids[size_t(start + t + 1)]]);
    }
  }
  EXPECT_NEAR(r.loss, want / 24, 1e-9 * std::abs(want / 24));
  EXPECT_NEAR(r.perplexity(), std::exp(want / 24), 1e-6 * std::exp(want / 24));
  EXPECT_EQ(train::model_loss(*m, ids, seq, 10).tokens, 16);  // stops after the window that passes 10
  EXPECT_THROW(train::model_loss(*m, std::vector<int32_t>(ids.begin(), ids.begin() + 8), seq, 0), Error);
  std::vector<int32_t> bad = ids;
  bad[3] = int32_t(V);
  EXPECT_THROW(train::model_loss(*m, bad, seq, 0), Error);
}

TEST(Eval, NgramBaselinesFollowTheirFormulas) {
  // a strict cycle 3, 5, 7: the bigram predicts it almost surely, the unigram cannot
  std::vector<int32_t> train, val;
  for (int i = 0; i < 3000; ++i) train.push_back(3 + 2 * (i % 3));
  for (int i = 0; i < 301; ++i) val.push_back(3 + 2 * (i % 3));
  const int64_t V = 10;
  const train::NgramBaselines b = train::ngram_baselines(train, val, V, 0);
  EXPECT_EQ(b.unigram.tokens, 300);
  // add-one unigram over the first 95% (2,850 tokens, 950 of each): p = 951 / (2850 + 10)
  EXPECT_NEAR(b.unigram.loss, -std::log(951.0 / 2860.0), 1e-12);
  EXPECT_NEAR(b.bigram_weight, 0.95, 1e-12);  // the most the grid allows
  EXPECT_NEAR(b.bigram.loss, -std::log(0.95 + 0.05 * 951.0 / 2860.0), 1e-9);
  EXPECT_LT(b.bigram.loss, b.unigram.loss);
  EXPECT_THROW(train::ngram_baselines(train, {3, 12}, V, 0), Error);  // 12 is outside the vocabulary
}

TEST(Eval, MtpAcceptanceCountsEveryDraftAfterAGeneratedToken) {
  auto m = tiny("v3-tiny-mtp");
  const std::vector<int32_t> ids = tokens(200, m->config().vocab_size, 2);
  const train::MtpAcceptance a = train::mtp_acceptance(*m, ids, 3, 16, 10);
  EXPECT_EQ(a.drafts, 3 * (10 - 1));  // positions prompt_len-1 .. T-3 of each prompt: new_tokens - 1
  EXPECT_GE(a.rate(), 0.0);
  EXPECT_LE(a.rate(), 1.0);
  auto plain = tiny("v3-tiny");
  EXPECT_THROW(train::mtp_acceptance(*plain, ids, 1, 16, 10), Error);
}

TEST(Eval, Cli) {
  TempDir tmp;
  const std::string dir = tmp.file("data");
  std::filesystem::create_directories(dir);
  const std::vector<int32_t> tr = tokens(400, 1024, 3), va = tokens(100, 1024, 4);
  train::write_shard(dir + "/train-00000.bin", tr);
  train::write_shard(dir + "/val-00000.bin", va);
  nlohmann::json man = {{"shards", nlohmann::json::array({{{"file", "train-00000.bin"}, {"split", "train"}, {"tokens", 400}},
                                                           {{"file", "val-00000.bin"}, {"split", "val"}, {"tokens", 100}}})}};
  write_file_atomic(dir + "/manifest.json", man.dump());
  test::CliRun r = test::run_fathom({"eval", "--model", test::fixture_dir("v3-tiny-mtp"), "--data", dir, "--seq-len", "16",
                                     "--baselines", "--mtp-prompts", "2", "--json", "--device", "cpu"},
                                    tmp);
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["tokens"], 96);
  EXPECT_GT(j["loss"].get<double>(), 0);
  EXPECT_TRUE(j.contains("bigram_loss") && j.contains("mtp_acceptance"));
  EXPECT_TRUE(test::is_user_error(test::run_fathom({"eval", "--model", test::fixture_dir("v3-tiny"), "--data",
                                                    tmp.file("nope"), "--device", "cpu"},
                                                   tmp),
                                  {"nope"}));
}

}  // namespace
}  // namespace fathom
