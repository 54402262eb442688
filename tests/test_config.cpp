// config.json parsing (both RoPE spellings, V2/V3 defaults, every validation error naming its
// field) and the ways one model can be stored that must not change what it computes: sharded vs
// single-file, F32/F16/BF16 weights, FP8 dequantized at load or in the matmul, MLA naive vs
// absorbed; and random checkpoints written by `fathom init-random` whose parameter counts add up.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/safetensors.h"
#include "fathom/model.h"
#include "model/config.h"
#include "model/random_init.h"
#include "test_util.h"

using namespace fathom;
using namespace fathom::test;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const char* kSource = "models/x/config.json";

json fixture_config(const std::string& fixture) {
  std::ifstream in(fixture_dir(fixture) + "/config.json");
  return json::parse(in);
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

// parse_config must throw a fathom::Error naming the source file and every needle.
testing::AssertionResult config_error(const json& j, const std::vector<std::string>& needles) {
  std::string message;
  try {
    parse_config(j, kSource);
    return testing::AssertionFailure() << "parse_config accepted the config";
  } catch (const Error& e) {
    message = e.what();
  } catch (const std::exception& e) {
    return testing::AssertionFailure() << "not a fathom::Error: " << e.what();
  }
  if (message.find(kSource) == std::string::npos)
    return testing::AssertionFailure() << "the message does not name the file: " << message;
  for (const std::string& n : needles)
    if (message.find(n) == std::string::npos)
      return testing::AssertionFailure() << "the message does not name '" << n << "': " << message;
  if (message.find('\n') != std::string::npos) return testing::AssertionFailure() << "multi-line message: " << message;
  return testing::AssertionSuccess();
}

// The v3-tiny config with its RoPE written the newer way: everything in rope_parameters.
json with_rope_parameters(json j) {
  json r = j.at("rope_scaling");
  json p = {{"rope_type", r.at("type")}, {"rope_theta", j.at("rope_theta")}};
  for (const char* k : {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"})
    p[k] = r.at(k);
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = p;
  return j;
}

// A model directory: this config.json beside a link to the fixture's weights.
std::string linked_model(const TempDir& tmp, const std::string& fixture, const json& config) {
  std::string dir = tmp.file("model");
  fs::create_directories(dir);
  write_text(dir + "/config.json", config.dump(2));
  fs::create_symlink(fixture_dir(fixture) + "/model.safetensors", dir + "/model.safetensors");
  return dir;
}

struct Reference {
  std::shared_ptr<SafetensorsFile> file;
  std::vector<std::vector<int32_t>> rows;
  explicit Reference(const std::string& fixture)
      : file(SafetensorsFile::open(fixture_dir(fixture) + "/reference.safetensors")),
        rows(id_rows(file->tensor("input_ids"))) {}
};

// Logits (T, vocab) of each row, from a full forward pass.
std::vector<Tensor> logits_of(Model& m, const std::vector<std::vector<int32_t>>& rows) {
  std::vector<Tensor> out;
  for (const auto& ids : rows) {
    KvCache cache = m.new_cache(int64_t(ids.size()));
    out.push_back(m.forward(ids, cache).logits);
  }
  return out;
}

double max_rel_err(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].shape(), b[i].shape());
    double e = rel_err(a[i].f32(), b[i].f32(), size_t(b[i].numel()));
    worst = std::isnan(e) ? e : std::max(worst, e);
  }
  return worst;
}

// Against the fixture's reference logits (B, T, V).
double rel_err_vs_reference(const std::vector<Tensor>& got, const Reference& ref) {
  Tensor want = ref.file->tensor("logits");
  double worst = 0;
  for (size_t b = 0; b < got.size(); ++b) {
    const size_t n = size_t(got[b].numel());
    double e = rel_err(got[b].f32(), want.f32() + b * n, n);
    worst = std::isnan(e) ? e : std::max(worst, e);
  }
  return worst;
}

bool bit_identical(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].shape() != b[i].shape() || std::memcmp(a[i].data(), b[i].data(), a[i].nbytes()) != 0) return false;
  return true;
}

// Every BF16 tensor of the fixture converted to `to`; other dtypes (the F32
// e_score_correction_bias) kept as they are.
void write_converted(const std::string& fixture, const std::string& dir, DType to) {
  auto src = SafetensorsFile::open(fixture_dir(fixture) + "/model.safetensors");
  SafetensorsWriter w;
  for (const TensorInfo& info : src->tensors()) {
    Tensor t = src->tensor(info.name);
    if (t.dtype() == DType::BF16) {
      Tensor f = to_f32(t);
      if (to == DType::F32) {
        t = f;
      } else {
        t = Tensor::empty(f.shape(), DType::F16);
        for (int64_t i = 0; i < f.numel(); ++i) t.ptr<uint16_t>()[i] = f32_to_f16(f.f32()[i]);
      }
    }
    w.add(info.name, t);
  }
  w.write(dir + "/model.safetensors");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// parse_config / load_config

TEST(Config, ParsesV3Fixture) {
  ModelConfig c = parse_config(fixture_config("v3-tiny"), kSource);
  EXPECT_EQ(c.model_type, "deepseek_v3");
  EXPECT_EQ(c.vocab_size, 1024);
  EXPECT_EQ(c.hidden_size, 256);
  EXPECT_EQ(c.num_hidden_layers, 4);
  EXPECT_EQ(c.q_lora_rank, 96);
  EXPECT_EQ(c.kv_lora_rank, 64);
  EXPECT_EQ(c.qk_head_dim(), 48);
  EXPECT_EQ(c.n_routed_experts, 16);
  EXPECT_EQ(c.n_group, 4);
  EXPECT_EQ(c.topk_group, 2);
  EXPECT_EQ(c.scoring_func, "sigmoid");
  EXPECT_EQ(c.topk_method, "noaux_tc");
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_EQ(c.rope_scaling.type, "yarn");
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 4.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.original_max_position_embeddings, 128);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.fp8);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{1});
  // yarn with mscale_all_dim 1 and factor 4: (0.1 ln 4 + 1)^2 / sqrt(48)
  double m = 0.1 * std::log(4.0) + 1.0;
  EXPECT_NEAR(c.softmax_scale(), m * m / std::sqrt(48.0), 1e-12);

  ModelConfig q = parse_config(fixture_config("v3-tiny-fp8"), kSource);
  EXPECT_TRUE(q.fp8);
  EXPECT_EQ(q.weight_block_size[0], 128);
  EXPECT_EQ(q.weight_block_size[1], 128);
}

TEST(Config, RopeParametersFormEqualsRopeScalingForm) {
  json published = fixture_config("v3-tiny");
  ModelConfig a = parse_config(published, kSource);
  ModelConfig b = parse_config(with_rope_parameters(published), kSource);
  // the older spelling "rope_type" inside rope_scaling is the same too
  json renamed = published;
  renamed["rope_scaling"].erase("type");
  renamed["rope_scaling"]["rope_type"] = "yarn";
  ModelConfig c = parse_config(renamed, kSource);
  for (const ModelConfig* x : {&b, &c}) {
    EXPECT_EQ(x->rope_scaling.type, a.rope_scaling.type);
    EXPECT_EQ(x->rope_scaling.factor, a.rope_scaling.factor);
    EXPECT_EQ(x->rope_scaling.original_max_position_embeddings, a.rope_scaling.original_max_position_embeddings);
    EXPECT_EQ(x->rope_scaling.beta_fast, a.rope_scaling.beta_fast);
    EXPECT_EQ(x->rope_scaling.beta_slow, a.rope_scaling.beta_slow);
    EXPECT_EQ(x->rope_scaling.mscale, a.rope_scaling.mscale);
    EXPECT_EQ(x->rope_scaling.mscale_all_dim, a.rope_scaling.mscale_all_dim);
    EXPECT_EQ(x->rope_scaling.attention_factor.has_value(), a.rope_scaling.attention_factor.has_value());
    EXPECT_EQ(x->rope_scaling.truncate, a.rope_scaling.truncate);
    EXPECT_EQ(x->rope_theta, a.rope_theta);
    EXPECT_EQ(x->softmax_scale(), a.softmax_scale());
  }

  // rope_theta inside rope_parameters wins over a top-level one; a top-level one is the fallback
  json p = with_rope_parameters(published);
  p["rope_parameters"]["rope_theta"] = 50000.0;
  p["rope_theta"] = 20000.0;
  EXPECT_EQ(parse_config(p, kSource).rope_theta, 50000.0);
  p["rope_parameters"].erase("rope_theta");
  EXPECT_EQ(parse_config(p, kSource).rope_theta, 20000.0);
  // default rope via rope_parameters
  json d = published;
  d.erase("rope_scaling");
  d.erase("rope_theta");
  d["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1e6}};
  ModelConfig dc = parse_config(d, kSource);
  EXPECT_EQ(dc.rope_scaling.type, "default");
  EXPECT_EQ(dc.rope_theta, 1e6);
  EXPECT_EQ(dc.softmax_scale(), 1.0 / std::sqrt(48.0));
  // yarn without original_max_position_embeddings falls back to max_position_embeddings
  json f = with_rope_parameters(published);
  f["rope_parameters"].erase("original_max_position_embeddings");
  EXPECT_EQ(parse_config(f, kSource).rope_scaling.original_max_position_embeddings, 512);
}

TEST(Config, RopeParametersFormGivesSameLogits) {
  TempDir tmp;
  Reference ref("v3-tiny");
  auto published = Model::load(fixture_dir("v3-tiny"));
  auto newer = Model::load(linked_model(tmp, "v3-tiny", with_rope_parameters(fixture_config("v3-tiny"))));
  std::vector<Tensor> a = logits_of(*published, ref.rows), b = logits_of(*newer, ref.rows);
  EXPECT_TRUE(bit_identical(a, b));
  EXPECT_LE(rel_err_vs_reference(b, ref), 1e-4);

  // and the RoPE settings do reach the computation: plain RoPE gives other logits
  TempDir tmp2;
  json plain = fixture_config("v3-tiny");
  plain.erase("rope_scaling");
  auto other = Model::load(linked_model(tmp2, "v3-tiny", plain));
  EXPECT_GT(max_rel_err(logits_of(*other, ref.rows), a), 1e-3);
}

TEST(Config, V2Defaults) {
  ModelConfig lite = parse_config(fixture_config("v2-lite-tiny"), kSource);
  EXPECT_EQ(lite.model_type, "deepseek_v2");
  EXPECT_EQ(lite.q_lora_rank, 0);  // null: no query compression
  EXPECT_EQ(lite.scoring_func, "softmax");
  EXPECT_EQ(lite.topk_method, "greedy");
  EXPECT_EQ(lite.rope_scaling.type, "default");  // rope_scaling: null
  EXPECT_EQ(lite.n_shared_experts, 2);

  // Fields left out take the defaults of the architecture named by model_type.
  json j = fixture_config("v2-lite-tiny");
  for (const char* k : {"scoring_func", "topk_method", "norm_topk_prob", "n_group", "topk_group", "num_key_value_heads",
                        "rope_theta", "rope_scaling", "max_position_embeddings", "routed_scaling_factor",
                        "first_k_dense_replace", "rms_norm_eps", "q_lora_rank", "n_shared_experts", "eos_token_id",
                        "bos_token_id", "tie_word_embeddings", "hidden_act"})
    j.erase(k);
  ModelConfig v2 = parse_config(j, kSource);
  EXPECT_EQ(v2.scoring_func, "softmax");
  EXPECT_EQ(v2.topk_method, "greedy");
  EXPECT_FALSE(v2.norm_topk_prob);
  EXPECT_EQ(v2.n_group, 1);
  EXPECT_EQ(v2.topk_group, 1);
  EXPECT_EQ(v2.num_key_value_heads, v2.num_attention_heads);
  EXPECT_EQ(v2.rope_theta, 10000.0);
  EXPECT_EQ(v2.rope_scaling.type, "default");
  EXPECT_EQ(v2.max_position_embeddings, 4096);
  EXPECT_EQ(v2.routed_scaling_factor, 1.0);
  EXPECT_EQ(v2.first_k_dense_replace, 0);
  EXPECT_EQ(v2.moe_layer_freq, 1);
  EXPECT_EQ(v2.rms_norm_eps, 1e-6);
  EXPECT_EQ(v2.q_lora_rank, 0);
  EXPECT_EQ(v2.n_shared_experts, 0);
  EXPECT_TRUE(v2.eos_token_ids.empty());
  EXPECT_EQ(v2.bos_token_id, -1);
  EXPECT_FALSE(v2.tie_word_embeddings);
  EXPECT_EQ(v2.num_nextn_predict_layers, 0);
  EXPECT_FALSE(v2.fp8);

  // the same config called deepseek_v3 gets V3's router defaults
  j["model_type"] = "deepseek_v3";
  ModelConfig v3 = parse_config(j, kSource);
  EXPECT_EQ(v3.scoring_func, "sigmoid");
  EXPECT_EQ(v3.topk_method, "noaux_tc");
  EXPECT_TRUE(v3.norm_topk_prob);

  // a dense model: no MoE fields needed at all
  json dense = fixture_config("v2-lite-tiny");
  for (const char* k : {"n_routed_experts", "moe_intermediate_size", "num_experts_per_tok", "n_shared_experts"})
    dense.erase(k);
  ModelConfig dc = parse_config(dense, kSource);
  EXPECT_EQ(dc.n_routed_experts, 0);
  EXPECT_FALSE(dc.is_moe_layer(1));
}

TEST(Config, EosTokenIdIntOrList) {
  json j = fixture_config("v3-tiny");
  j["eos_token_id"] = 7;
  EXPECT_EQ(parse_config(j, kSource).eos_token_ids, std::vector<int64_t>{7});
  j["eos_token_id"] = {1, 7, 9};
  EXPECT_EQ(parse_config(j, kSource).eos_token_ids, (std::vector<int64_t>{1, 7, 9}));
  j["eos_token_id"] = json::array();
  EXPECT_TRUE(parse_config(j, kSource).eos_token_ids.empty());
  j["eos_token_id"] = nullptr;
  EXPECT_TRUE(parse_config(j, kSource).eos_token_ids.empty());
  j["eos_token_id"] = "1";
  EXPECT_TRUE(config_error(j, {"'eos_token_id'", "integer"}));
  j["eos_token_id"] = {1, "2"};
  EXPECT_TRUE(config_error(j, {"'eos_token_id'"}));
  j["eos_token_id"] = {{"id", 1}};
  EXPECT_TRUE(config_error(j, {"'eos_token_id'"}));
}

TEST(Config, IntegersWrittenAsFloatsAreAccepted) {
  json j = fixture_config("v3-tiny");
  j["hidden_size"] = 256.0;
  j["num_hidden_layers"] = 4.0;
  ModelConfig c = parse_config(j, kSource);
  EXPECT_EQ(c.hidden_size, 256);
  EXPECT_EQ(c.num_hidden_layers, 4);
}

TEST(Config, MissingFieldIsNamed) {
  const json base = fixture_config("v3-tiny");
  for (const char* field : {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                            "moe_intermediate_size", "num_experts_per_tok"}) {
    json j = base;
    j.erase(field);
    EXPECT_TRUE(config_error(j, {std::string("'") + field + "'", "missing"})) << field;
    j[field] = nullptr;  // null counts as missing
    EXPECT_TRUE(config_error(j, {std::string("'") + field + "'", "missing"})) << field << " = null";
  }
}

TEST(Config, WrongTypeIsNamed) {
  const json base = fixture_config("v3-tiny");
  struct Case {
    const char* field;
    json value;
    const char* expected;
  };
  for (const Case& k : {Case{"hidden_size", "256", "integer"}, Case{"vocab_size", 1024.5, "integer"},
                        Case{"num_hidden_layers", true, "integer"}, Case{"kv_lora_rank", {64}, "integer"},
                        Case{"n_routed_experts", {{"n", 16}}, "integer"}, Case{"q_lora_rank", "96", "integer"},
                        Case{"rms_norm_eps", "1e-6", "number"}, Case{"routed_scaling_factor", false, "number"},
                        Case{"rope_theta", "10000", "number"}, Case{"norm_topk_prob", 1, "true or false"},
                        Case{"tie_word_embeddings", "no", "true or false"}, Case{"model_type", 3, "string"},
                        Case{"scoring_func", {"sigmoid"}, "string"}, Case{"rope_scaling", "yarn", "object"},
                        Case{"rope_parameters", 4.0, "object"}}) {
    json j = base;
    j[k.field] = k.value;
    EXPECT_TRUE(config_error(j, {std::string("'") + k.field + "'", k.expected})) << k.field << " = " << k.value.dump();
  }
  // inside rope_scaling / quantization_config: the nested field is named
  json j = base;
  j["rope_scaling"]["factor"] = "4";
  EXPECT_TRUE(config_error(j, {"'rope_scaling'", "'factor'", "number"}));
  j = fixture_config("v3-tiny-fp8");
  j["quantization_config"]["fmt"] = 4;
  EXPECT_TRUE(config_error(j, {"'quantization_config'", "'fmt'"}));
  j = base;
  EXPECT_TRUE(config_error(json::array({base}), {"object"}));
}

TEST(Config, BadValuesAreNamed) {
  const json base = fixture_config("v3-tiny");
  struct Case {
    const char* field;
    json value;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"model_type", "llama", {"model_type", "'llama'"}},
      {"n_group", 3, {"'n_routed_experts' (16)", "'n_group' (3)"}},
      {"n_routed_experts", 10, {"'n_routed_experts' (10)", "'n_group' (4)"}},
      {"num_experts_per_tok", 17, {"'num_experts_per_tok' (17)", "'n_routed_experts' (16)"}},
      {"qk_rope_head_dim", 15, {"'qk_rope_head_dim'", "even", "15"}},
      {"topk_group", 5, {"'topk_group'"}},
      {"hidden_size", 0, {"'hidden_size'", "positive"}},
      {"vocab_size", -5, {"'vocab_size'", "positive", "-5"}},
      {"q_lora_rank", -1, {"'q_lora_rank'"}},
      {"n_routed_experts", -16, {"'n_routed_experts'"}},
      {"moe_layer_freq", 0, {"'moe_layer_freq'"}},
      {"num_nextn_predict_layers", -1, {"'num_nextn_predict_layers'"}},
      {"scoring_func", "relu", {"scoring_func", "'relu'"}},
      {"topk_method", "magic", {"topk_method", "'magic'"}},
      {"hidden_act", "gelu", {"hidden_act", "'gelu'"}},
      {"rope_theta", -1.0, {"'rope_theta'", "positive"}},
      {"rope_scaling", {{"type", "longrope"}, {"factor", 4.0}}, {"'rope_scaling'", "'longrope'"}},
      {"rope_scaling", {{"type", "yarn"}}, {"'rope_scaling'", "'factor'"}},
      {"rope_scaling", {{"type", "yarn"}, {"factor", 0.5}}, {"'rope_scaling'", "'factor'"}},
      {"quantization_config", {{"quant_method", "int4"}}, {"'quantization_config.quant_method'", "'int4'"}},
      {"quantization_config", {{"quant_method", "fp8"}, {"fmt", "e5m2"}}, {"'quantization_config.fmt'", "'e5m2'"}},
      {"quantization_config",
       {{"quant_method", "fp8"}, {"weight_block_size", {128}}},
       {"quantization_config.weight_block_size"}},
      {"quantization_config", "fp8", {"'quantization_config'", "object"}},
  };
  for (const Case& k : cases) {
    json j = base;
    j[k.field] = k.value;
    EXPECT_TRUE(config_error(j, k.needles)) << k.field << " = " << k.value.dump();
  }
}

TEST(Config, LoadConfigErrorsNameTheFile) {
  TempDir tmp;
  auto expect_error = [](const std::string& path, const std::string& needle) {
    try {
      load_config(path);
      ADD_FAILURE() << "load_config(" << path << ") did not throw";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(tmp.file("config.json"), "config.json");
  write_text(tmp.file("bad.json"), "{\"model_type\": \"deepseek_v3\",");
  expect_error(tmp.file("bad.json"), "JSON");
  write_text(tmp.file("list.json"), "[1, 2]");
  expect_error(tmp.file("list.json"), "object");
  json j = fixture_config("v3-tiny");
  j.erase("v_head_dim");
  write_text(tmp.file("short.json"), j.dump());
  expect_error(tmp.file("short.json"), "'v_head_dim'");
  write_text(tmp.file("good.json"), fixture_config("v3-tiny").dump());
  EXPECT_EQ(load_config(tmp.file("good.json")).hidden_size, 256);
}

// ---------------------------------------------------------------------------------------------
// One model, stored or run in different ways

TEST(Config, ShardedCheckpointGivesBitIdenticalLogits) {
  TempDir tmp;
  std::string dir = tmp.file("sharded");
  fs::create_directories(dir);
  auto src = SafetensorsFile::open(fixture_dir("v3-tiny") + "/model.safetensors");
  SafetensorsWriter w;
  for (const TensorInfo& info : src->tensors()) w.add(info.name, src->tensor(info.name));
  w.write_sharded(dir, size_t(src->data_bytes() / 4));
  fs::copy_file(fixture_dir("v3-tiny") + "/config.json", dir + "/config.json");
  int shards = 0;
  for (const auto& e : fs::directory_iterator(dir)) shards += e.path().extension() == ".safetensors";
  EXPECT_GE(shards, 3);
  ASSERT_TRUE(fs::exists(dir + "/model.safetensors.index.json"));
  ASSERT_FALSE(fs::exists(dir + "/model.safetensors"));

  Reference ref("v3-tiny");
  auto single = Model::load(fixture_dir("v3-tiny"));
  auto sharded = Model::load(dir);
  EXPECT_TRUE(bit_identical(logits_of(*single, ref.rows), logits_of(*sharded, ref.rows)));
  EXPECT_EQ(single->param_counts().total, sharded->param_counts().total);
}

TEST(Config, F32AndF16CopiesMatchReference) {
  Reference ref("v3-tiny");
  auto bf16 = Model::load(fixture_dir("v3-tiny"));
  std::vector<Tensor> base = logits_of(*bf16, ref.rows);
  for (DType to : {DType::F32, DType::F16}) {
    SCOPED_TRACE(dtype_name(to));
    TempDir tmp;
    std::string dir = tmp.file("model");
    fs::create_directories(dir);
    write_converted("v3-tiny", dir, to);
    fs::copy_file(fixture_dir("v3-tiny") + "/config.json", dir + "/config.json");
    auto check = SafetensorsFile::open(dir + "/model.safetensors");
    EXPECT_EQ(check->find("model.layers.1.self_attn.o_proj.weight")->dtype, to);
    EXPECT_EQ(check->find("model.layers.1.mlp.gate.e_score_correction_bias")->dtype, DType::F32);

    auto m = Model::load(dir);
    std::vector<Tensor> got = logits_of(*m, ref.rows);
    EXPECT_LE(rel_err_vs_reference(got, ref), 1e-4);
    // F32 holds every BF16 value exactly, so it computes what the BF16 checkpoint computes
    if (to == DType::F32) {
      EXPECT_LE(max_rel_err(got, base), 1e-6);
    }
  }
}

TEST(Config, Fp8DequantizedAtLoadAgreesWithFp8Matmul) {
  Reference ref("v3-tiny-fp8");
  auto fp8 = Model::load(fixture_dir("v3-tiny-fp8"));
  ModelOptions o;
  o.dequantize_fp8 = true;
  auto deq = Model::load(fixture_dir("v3-tiny-fp8"), o);
  std::vector<Tensor> a = logits_of(*fp8, ref.rows), b = logits_of(*deq, ref.rows);
  EXPECT_LE(max_rel_err(a, b), 1e-5);
  EXPECT_LE(max_rel_err(b, a), 1e-5);
  EXPECT_LE(rel_err_vs_reference(a, ref), 1e-4);
  EXPECT_EQ(fp8->param_counts().total, deq->param_counts().total);
}

TEST(Config, NaiveAndAbsorbedMlaAgreeOnRealDims) {
  Reference ref("v3-realdims-fp8");
  ModelOptions naive_o, absorbed_o;
  naive_o.mla_mode = MlaMode::Naive;
  absorbed_o.mla_mode = MlaMode::Absorbed;
  auto naive = Model::load(fixture_dir("v3-realdims-fp8"), naive_o);
  auto absorbed = Model::load(fixture_dir("v3-realdims-fp8"), absorbed_o);
  const auto& rows = ref.rows;  // 2 x 300 tokens
  std::vector<Tensor> a = logits_of(*naive, rows), b = logits_of(*absorbed, rows);
  EXPECT_LE(max_rel_err(a, b), 1e-5);  // each the oracle of the other
  EXPECT_LE(max_rel_err(b, a), 1e-5);

  // and the same holds token by token through each mode's own cache
  const std::vector<int32_t>& ids = rows[0];
  const int64_t split = int64_t(ids.size()) - 4, V = naive->config().vocab_size;
  KvCache nc = naive->new_cache(int64_t(ids.size())), ac = absorbed->new_cache(int64_t(ids.size()));
  std::vector<int32_t> prefix(ids.begin(), ids.begin() + split);
  naive->forward(prefix, nc);
  absorbed->forward(prefix, ac);
  for (int64_t t = split; t < int64_t(ids.size()); ++t) {
    Tensor ln = naive->forward({ids[size_t(t)]}, nc).logits, la = absorbed->forward({ids[size_t(t)]}, ac).logits;
    EXPECT_LE(rel_err(ln.f32(), la.f32(), size_t(V)), 1e-5) << "position " << t;
  }
}

// ---------------------------------------------------------------------------------------------
// init-random

namespace {

// Elements of every tensor in the checkpoint, FP8 block scales excluded.
int64_t checkpoint_numel(const std::string& dir, bool* has_fp8) {
  SafetensorsSet set = SafetensorsSet::open_dir(dir);
  int64_t n = 0;
  *has_fp8 = false;
  for (const std::string& name : set.names()) {
    const std::string suffix = "_scale_inv";
    if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) continue;
    const TensorInfo* info = set.find(name);
    n += shape_numel(info->shape);
    *has_fp8 = *has_fp8 || info->dtype == DType::F8_E4M3;
  }
  return n;
}

// Small enough that FP8 quantization stays quick; hidden 160 leaves partial 128x128 blocks.
json small_v3_config() {
  json j = fixture_config("v3-tiny");
  j.update({{"hidden_size", 160}, {"intermediate_size", 192}, {"moe_intermediate_size", 32}, {"vocab_size", 384},
            {"num_hidden_layers", 2}, {"num_attention_heads", 2}, {"num_key_value_heads", 2}, {"q_lora_rank", 64},
            {"kv_lora_rank", 32}, {"n_routed_experts", 8}, {"num_experts_per_tok", 2}, {"n_group", 4},
            {"topk_group", 2}, {"num_nextn_predict_layers", 1}});
  return j;
}

json small_v2_config() {
  json j = fixture_config("v2-lite-tiny");
  j.update({{"hidden_size", 160}, {"intermediate_size", 192}, {"moe_intermediate_size", 32}, {"vocab_size", 384},
            {"num_hidden_layers", 2}, {"num_attention_heads", 2}, {"num_key_value_heads", 2}, {"n_routed_experts", 4},
            {"num_experts_per_tok", 2}, {"tie_word_embeddings", true}});
  return j;
}

}  // namespace

TEST(Config, InitRandomParamCountsAddUp) {
  struct Case {
    const char* what;
    json config;
    DType dtype;
    size_t shard_bytes;
  };
  for (const Case& k : {Case{"v3+mtp bf16", small_v3_config(), DType::BF16, 0},
                        Case{"v3+mtp fp8", small_v3_config(), DType::F8_E4M3, 0},
                        Case{"v2 tied bf16 sharded", small_v2_config(), DType::BF16, 100'000},
                        Case{"v2 tied fp8", small_v2_config(), DType::F8_E4M3, 0}}) {
    SCOPED_TRACE(k.what);
    TempDir tmp;
    std::string dir = tmp.file("random");
    RandomInitOptions o;
    o.dtype = k.dtype;
    o.max_shard_bytes = k.shard_bytes;
    write_random_checkpoint(k.config.dump(2), dir, o);
    auto m = Model::load(dir);
    EXPECT_EQ(m->config().fp8, k.dtype == DType::F8_E4M3);
    bool has_fp8 = false;
    const int64_t numel = checkpoint_numel(dir, &has_fp8);
    EXPECT_EQ(has_fp8, k.dtype == DType::F8_E4M3);
    ParamCounts p = m->param_counts();
    EXPECT_EQ(p.total, numel);
    EXPECT_EQ(p.total, p.main + p.mtp);
    EXPECT_EQ(p.mtp > 0, m->has_mtp());
    EXPECT_LT(p.active_per_token, p.main);
    // it runs
    KvCache cache = m->new_cache(4);
    Tensor logits = m->forward({1, 2, 3}, cache).logits;
    EXPECT_EQ(logits.shape(), (Shape{3, m->config().vocab_size}));
    for (int64_t i = 0; i < logits.numel(); ++i) ASSERT_TRUE(std::isfinite(logits.f32()[i]));
  }
}

TEST(Config, InitRandomThroughCli) {
  TempDir tmp;
  write_text(tmp.file("config.json"), small_v3_config().dump(2));
  for (const char* dtype : {"bf16", "fp8"}) {
    SCOPED_TRACE(dtype);
    std::string dir = tmp.file(std::string("out-") + dtype);
    std::string cmd = cat("timeout 120 '", fathom_binary(), "' init-random --config '", tmp.file("config.json"),
                          "' --out '", dir, "' --dtype ", dtype, " --seed 7 --shard-mb 0.2 2>'", tmp.file("err"), "'");
    int rc = std::system(cmd.c_str());
    ASSERT_TRUE(rc != -1 && WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << cmd << "\n" << rc;
    ASSERT_TRUE(fs::exists(dir + "/model.safetensors.index.json"));
    auto m = Model::load(dir);
    bool has_fp8 = false;
    EXPECT_EQ(m->param_counts().total, checkpoint_numel(dir, &has_fp8));
    EXPECT_EQ(has_fp8, std::string(dtype) == "fp8");
  }
  // a bad config through the same command: exit 2, nothing written
  json bad = small_v3_config();
  bad["qk_rope_head_dim"] = 7;
  write_text(tmp.file("bad.json"), bad.dump());
  std::string dir = tmp.file("out-bad");
  std::string cmd = cat("timeout 60 '", fathom_binary(), "' init-random --config '", tmp.file("bad.json"), "' --out '",
                        dir, "' 2>'", tmp.file("err"), "'");
  int rc = std::system(cmd.c_str());
  EXPECT_TRUE(rc != -1 && WIFEXITED(rc) && WEXITSTATUS(rc) == 2) << rc;
  std::ifstream err(tmp.file("err"));
  std::string line;
  std::getline(err, line);
  EXPECT_NE(line.find("qk_rope_head_dim"), std::string::npos) << line;
  EXPECT_FALSE(fs::exists(dir));
}
