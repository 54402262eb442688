// `fathom convert` (src/model/convert.h): a checkpoint rewritten as FP8 with DeepSeek's 128x128
// block scales and back; the layout HF and DeepSeek expect, the logits it gives, shards, and
// bad input.
#include <algorithm>
#include <filesystem>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/files.h"
#include "core/safetensors.h"
#include "fathom/model.h"
#include "model/convert.h"
#include "test_util.h"

namespace fathom {
namespace {

namespace fs = std::filesystem;
using test::TempDir;

std::vector<int32_t> prompt(int64_t n, int64_t vocab) {
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < n; ++i) ids.push_back(int32_t((i * 37 + 11) % vocab));
  return ids;
}

Tensor logits(const std::string& dir) {
  ModelOptions o;
  o.device = DeviceKind::Cpu;
  o.precision = Precision::Fp32;
  auto m = Model::load(dir, o);
  const auto ids = prompt(12, m->config().vocab_size);
  KvCache cache = m->new_cache(int64_t(ids.size()));
  return m->forward(ids, cache).logits;
}

double rel(const Tensor& a, const Tensor& b) { return test::rel_err(a.f32(), b.f32(), size_t(b.numel())); }

TEST(Convert, Fp8HasDeepSeeksLayoutAndCloseLogits) {
  TempDir tmp;
  const std::string src = test::fixture_dir("v3-tiny-mtp"), out = tmp.file("fp8");
  ConvertOptions o;
  o.max_shard_bytes = 256 << 10;
  const ConvertSummary s = convert_checkpoint(src, out, o);
  EXPECT_GT(s.shards, 3);
  ASSERT_TRUE(fs::exists(out + "/model.safetensors.index.json"));
  const SafetensorsSet set = SafetensorsSet::open_dir(out);
  // every linear weight F8_E4M3 with F32 scales of ceil(N/128) x ceil(K/128); the rest as published
  const TensorInfo* q = set.find("model.layers.1.self_attn.kv_b_proj.weight");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->dtype, DType::F8_E4M3);
  const TensorInfo* sc = set.find("model.layers.1.self_attn.kv_b_proj.weight_scale_inv");
  ASSERT_NE(sc, nullptr);
  EXPECT_EQ(sc->dtype, DType::F32);
  EXPECT_EQ(sc->shape, (Shape{(q->shape[0] + 127) / 128, (q->shape[1] + 127) / 128}));
  // ... except one whose dimension is over 128 and not a multiple of it (q_b_proj: 4 heads x 48 =
  // 192 rows), which HF cannot load as FP8: BF16, named in modules_to_not_convert
  const TensorInfo* qb = set.find("model.layers.1.self_attn.q_b_proj.weight");
  ASSERT_NE(qb, nullptr);
  EXPECT_EQ(qb->shape, (Shape{192, 96}));
  EXPECT_EQ(qb->dtype, DType::BF16);
  EXPECT_FALSE(set.contains("model.layers.1.self_attn.q_b_proj.weight_scale_inv"));
  EXPECT_EQ(set.find("model.layers.1.mlp.experts.3.down_proj.weight")->dtype, DType::F8_E4M3);
  EXPECT_EQ(set.find("model.embed_tokens.weight")->dtype, DType::BF16);
  EXPECT_EQ(set.find("lm_head.weight")->dtype, DType::BF16);
  EXPECT_EQ(set.find("model.layers.1.mlp.gate.weight")->dtype, DType::BF16);
  EXPECT_EQ(set.find("model.layers.1.mlp.gate.e_score_correction_bias")->dtype, DType::F32);
  EXPECT_EQ(set.find("model.layers.1.input_layernorm.weight")->dtype, DType::BF16);
  for (const std::string& name : set.names()) {
    if (name.size() > 10 && name.compare(name.size() - 10, 10, "_scale_inv") == 0) {
      EXPECT_TRUE(set.contains(name.substr(0, name.size() - 10))) << name;
    }
  }
  const auto cfg = nlohmann::json::parse(read_file(out + "/config.json"));
  EXPECT_EQ(cfg["quantization_config"]["weight_block_size"], nlohmann::json::array({128, 128}));
  EXPECT_EQ(cfg["quantization_config"]["fmt"], "e4m3");
  const auto& skipped = cfg["quantization_config"]["modules_to_not_convert"];
  ASSERT_TRUE(skipped.is_array());
  EXPECT_EQ(skipped.size(), 6u);  // q_b_proj of the 4 layers and of the MTP module, and the LM head
  EXPECT_EQ(skipped[0], "lm_head");  // a list given replaces HF's default, which names it
  for (int l = 0; l < 5; ++l)
    EXPECT_NE(std::find(skipped.begin(), skipped.end(), cat("model.layers.", l, ".self_attn.q_b_proj")), skipped.end()) << l;
  // each weight as FP8 x its block's scale: e4m3 keeps 3 mantissa bits, so the weights move by
  // a few percent (RMS), no more
  const SafetensorsSet orig = SafetensorsSet::open_dir(src);
  for (const std::string name : {"model.layers.1.self_attn.kv_b_proj.weight", "model.layers.2.mlp.experts.5.up_proj.weight",
                                 "model.layers.0.mlp.down_proj.weight", "model.layers.4.eh_proj.weight"}) {
    const Tensor w = to_f32(orig.tensor(name)), qw = set.tensor(name), s8 = set.tensor(name + "_scale_inv");
    const int64_t N = w.dim(0), K = w.dim(1), kb = s8.dim(1);
    std::vector<float> deq(size_t(N * K));
    convert_to_f32(DType::F8_E4M3, qw.data(), deq.data(), deq.size());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) deq[size_t(n * K + k)] *= s8.f32()[(n / 128) * kb + k / 128];
    const double e = test::rel_err(deq.data(), w.f32(), deq.size());
    EXPECT_LT(e, 0.04) << name;
    EXPECT_GT(e, 1e-3) << name << " was not quantized";
  }
  // (2.65% each, measured.) Through a model the independent errors of its matmuls add up in
  // quadrature: the dense fixture's 4 layers run 24 FP8 matmuls (q_b_proj stays BF16), so
  // ~√24 × 2.65% ≈ 13% is expected on its random-weight logits (0.146 measured); a MoE model's
  // move more when tokens pick other experts.
  const std::string dense = tmp.file("dense-fp8");
  convert_checkpoint(test::fixture_dir("v3-dense"), dense, o);
  const double e = rel(logits(dense), logits(test::fixture_dir("v3-dense")));
  EXPECT_LT(e, 0.25);
  EXPECT_GT(e, 0.01);
  // and FP8 -> F32 is exact: the F32 copy gives the FP8 model's logits
  const std::string back = tmp.file("f32");
  ConvertOptions f;
  f.dtype = DType::F32;
  f.max_shard_bytes = 0;
  EXPECT_EQ(convert_checkpoint(out, back, f).shards, 1);
  EXPECT_EQ(SafetensorsSet::open_dir(back).find("model.layers.1.self_attn.kv_b_proj.weight")->dtype, DType::F32);
  EXPECT_FALSE(SafetensorsSet::open_dir(back).contains("model.layers.1.self_attn.kv_b_proj.weight_scale_inv"));
  EXPECT_FALSE(nlohmann::json::parse(read_file(back + "/config.json")).contains("quantization_config"));
  EXPECT_LT(rel(logits(back), logits(out)), 1e-6);
  // FP8 -> FP8 again keeps the same codes (every block's largest value maps to 448 both times)
  const std::string again = tmp.file("fp8-again");
  convert_checkpoint(out, again, o);
  EXPECT_LT(rel(logits(again), logits(out)), 1e-6);
}

TEST(Convert, CopiesTheTokenizerAndRefusesToOverwrite) {
  TempDir tmp;
  const std::string src = tmp.file("src");
  fs::create_directories(src);
  for (const char* f : {"config.json", "model.safetensors"})
    fs::copy_file(test::fixture_dir("v3-tiny") + "/" + f, src + "/" + f);
  write_file_atomic(src + "/tokenizer_config.json", "{}\n");
  ConvertOptions o;
  o.dtype = DType::BF16;
  convert_checkpoint(src, tmp.file("out"), o);
  EXPECT_EQ(read_file(tmp.file("out/tokenizer_config.json")), "{}\n");
  EXPECT_LT(rel(logits(tmp.file("out")), logits(src)), 1e-2);
  try {
    convert_checkpoint(src, tmp.file("out"), o);
    ADD_FAILURE() << "overwrote a checkpoint";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("already exists"), std::string::npos) << e.what();
  }
}

TEST(Convert, BadInputIsAClearError) {
  TempDir tmp;
  auto fails_with = [&](const std::string& src, const std::string& needle) {
    try {
      convert_checkpoint(src, tmp.file("out-" + std::to_string(std::rand())), ConvertOptions{});
    } catch (const Error& e) {
      return std::string(e.what()).find(needle) != std::string::npos ? testing::AssertionSuccess()
                                                                      : testing::AssertionFailure() << e.what();
    }
    return testing::AssertionFailure() << "no error";
  };
  EXPECT_TRUE(fails_with(tmp.file("missing"), "is not a checkpoint directory"));
  // a tensor the config does not explain (the checkpoint of another shape)
  const std::string other = tmp.file("other");
  fs::create_directories(other);
  fs::copy_file(test::fixture_dir("v3-tiny") + "/model.safetensors", other + "/model.safetensors");
  auto cfg = nlohmann::json::parse(read_file(test::fixture_dir("v3-tiny") + "/config.json"));
  cfg["num_hidden_layers"] = cfg["num_hidden_layers"].get<int>() - 1;
  write_file_atomic(other + "/config.json", cfg.dump());
  EXPECT_TRUE(fails_with(other, "which the config's architecture does not have"));
  // a missing tensor
  const std::string missing = tmp.file("missing-tensor");
  fs::create_directories(missing);
  fs::copy_file(test::fixture_dir("v3-tiny") + "/model.safetensors", missing + "/model.safetensors");
  cfg["num_hidden_layers"] = cfg["num_hidden_layers"].get<int>() + 2;
  write_file_atomic(missing + "/config.json", cfg.dump());
  EXPECT_TRUE(fails_with(missing, "model.layers."));
  // nothing is left behind by a failed conversion
  for (const auto& e : fs::directory_iterator(tmp.path()))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
  // the command: a bad dtype is a usage error
  test::CliRun r = test::run_fathom({"convert", "--model", test::fixture_dir("v3-tiny"), "-o", tmp.file("c"), "--dtype",
                                     "int4"},
                                    tmp);
  EXPECT_TRUE(test::is_user_error(r, {"int4"}));
}

}  // namespace
}  // namespace fathom
