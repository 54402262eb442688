// Bad input, end to end through the `fathom` CLI: for every way a model directory, its
// config.json, its safetensors or an input_ids file can be wrong, the process must exit with
// code 2 and print one line "fathom: error: ..." that names the file, tensor or field, without
// crashing, hanging (each run is under `timeout 60`) or leaving a partial output file behind.
// The good path goes through the same binary: logits, MTP logits and greedy generation of the
// v3-tiny fixtures against the HuggingFace reference.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/safetensors.h"
#include "test_util.h"

using namespace fathom;
using namespace fathom::test;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Nothing at `path` and nothing beside it whose name starts with its file name (no temporary).
testing::AssertionResult left_nothing(const std::string& path) {
  if (fs::exists(fs::symlink_status(path))) return testing::AssertionFailure() << path << " was left behind";
  const std::string stem = fs::path(path).filename().string();
  for (const auto& e : fs::directory_iterator(fs::path(path).parent_path())) {
    std::string name = e.path().filename().string();
    if (name.compare(0, stem.size(), stem) == 0) return testing::AssertionFailure() << e.path() << " was left behind";
  }
  return testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// Building broken inputs

const std::string kTiny = "v3-tiny";

std::string fixture_file(const std::string& fixture, const std::string& name) { return fixture_dir(fixture) + "/" + name; }

json read_json(const std::string& path) { return json::parse(slurp(path)); }

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

// A model directory in `tmp` with the fixture's config.json (optionally edited) and its weights
// linked (read-only) unless the test replaces them.
std::string model_dir(const TempDir& tmp, const std::string& fixture = kTiny,
                      const std::function<void(json&)>& edit_config = nullptr, bool link_weights = true) {
  std::string dir = tmp.file("model");
  fs::create_directories(dir);
  json c = read_json(fixture_file(fixture, "config.json"));
  if (edit_config) edit_config(c);
  write_text(dir + "/config.json", c.dump(2));
  if (link_weights) fs::create_symlink(fixture_file(fixture, "model.safetensors"), dir + "/model.safetensors");
  return dir;
}

// The raw bytes of a safetensors file split into its header (parsed) and its data section.
struct RawSafetensors {
  json header;
  std::string data;
};

RawSafetensors read_raw(const std::string& path) {
  std::string bytes = slurp(path);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(bytes[size_t(i)])) << (8 * i);
  return {json::parse(bytes.substr(8, size_t(n))), bytes.substr(8 + size_t(n))};
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[size_t(i)] = char(uint8_t(n >> (8 * i)));
  return s;
}

void write_raw(const std::string& path, const json& header, const std::string& data) {
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  write_text(path, le64(text.size()) + text + data);
}

// Rewrites the fixture's weights into dir/model.safetensors through SafetensorsWriter, letting
// `edit` drop or replace tensors (return false to drop).
void rewrite_weights(const std::string& fixture, const std::string& dir,
                     const std::function<bool(const std::string&, Tensor&)>& edit) {
  auto src = SafetensorsFile::open(fixture_file(fixture, "model.safetensors"));
  fs::remove(dir + "/model.safetensors");
  SafetensorsWriter w;
  std::vector<Tensor> keep;  // the writer references tensors: keep replacements alive
  for (const TensorInfo& info : src->tensors()) {
    Tensor t = src->tensor(info.name);
    if (!edit(info.name, t)) continue;
    keep.push_back(t);
    w.add(info.name, keep.back());
  }
  w.write(dir + "/model.safetensors");
}

// An input_ids file holding `t` under `name`.
std::string ids_file(const TempDir& tmp, const Tensor& t, const std::string& name = "input_ids") {
  std::string path = tmp.file("ids.safetensors");
  SafetensorsWriter w;
  w.add(name, t);
  w.write(path);
  return path;
}

Tensor i64_ids(const std::vector<int64_t>& ids) {
  Tensor t = Tensor::empty({1, int64_t(ids.size())}, DType::I64);
  if (!ids.empty()) std::memcpy(t.data(), ids.data(), ids.size() * sizeof(int64_t));
  return t;
}

// The reference prompts of the fixture (I64 [2, 24]).
std::string good_ids() { return fixture_file(kTiny, "reference.safetensors"); }

// Runs `fathom logits` on dir with the input file; asserts the user error and that no output exists.
void expect_logits_error(const TempDir& tmp, const std::string& dir, const std::string& ids,
                         std::initializer_list<std::string> needles, std::vector<std::string> extra = {}) {
  fs::create_directories(tmp.file("out"));
  std::string out = tmp.file("out/logits.safetensors");
  std::vector<std::string> args = {"logits", "--model", dir, "--input-ids", ids, "--out", out};
  args.insert(args.end(), extra.begin(), extra.end());
  CliRun r = run_fathom(args, tmp);
  EXPECT_TRUE(is_user_error(r, needles));
  EXPECT_TRUE(left_nothing(out));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The good path through the CLI

TEST(BadInputCli, GoodLogitsMatchReference) {
  TempDir tmp;
  std::string out = tmp.file("logits.safetensors");
  CliRun r = run_fathom({"logits", "--model", fixture_dir(kTiny), "--input-ids", good_ids(), "--out", out}, tmp);
  ASSERT_EQ(r.status, 0) << r.err;
  auto got = SafetensorsFile::open(out);
  auto ref = SafetensorsFile::open(good_ids());
  Tensor want = ref->tensor("logits");
  Tensor logits = got->tensor("logits");
  ASSERT_EQ(logits.dtype(), DType::F32);
  ASSERT_EQ(logits.shape(), want.shape());
  EXPECT_LE(rel_err(logits.f32(), want.f32(), size_t(want.numel())), 1e-4);
}

TEST(BadInputCli, GoodMtpLogitsMatchReference) {
  TempDir tmp;
  std::string out = tmp.file("logits.safetensors");
  std::string ref_path = fixture_file("v3-tiny-mtp", "reference.safetensors");
  CliRun r =
      run_fathom({"logits", "--model", fixture_dir("v3-tiny-mtp"), "--input-ids", ref_path, "--out", out, "--mtp"}, tmp);
  ASSERT_EQ(r.status, 0) << r.err;
  auto got = SafetensorsFile::open(out);
  auto ref = SafetensorsFile::open(ref_path);
  for (const char* name : {"logits", "mtp_logits"}) {
    ASSERT_TRUE(got->contains(name)) << name;
    Tensor want = ref->tensor(name), have = got->tensor(name);
    ASSERT_EQ(have.shape(), want.shape()) << name;
    EXPECT_LE(rel_err(have.f32(), want.f32(), size_t(want.numel())), 1e-4) << name;
  }
}

TEST(BadInputCli, GoodGreedyGenerateMatchesReference) {
  TempDir tmp;
  std::string out = tmp.file("gen.json");
  CliRun r = run_fathom({"generate", "--model", fixture_dir(kTiny), "--input-ids", good_ids(), "--max-new-tokens", "16",
                         "--temperature", "0", "--out", out},
                        tmp);
  ASSERT_EQ(r.status, 0) << r.err;
  json j = read_json(out);
  ASSERT_TRUE(j.contains("ids") && j["ids"].is_array()) << j.dump();
  std::vector<int64_t> got = j["ids"].get<std::vector<int64_t>>();
  auto ref = SafetensorsFile::open(good_ids());
  Tensor gen = ref->tensor("generate_ids");  // (1, 24 + 16)
  const int64_t T = ref->tensor("input_ids").dim(1);
  ASSERT_EQ(gen.dim(1) - T, 16);
  std::vector<int64_t> want(gen.ptr<int64_t>() + T, gen.ptr<int64_t>() + gen.dim(1));
  EXPECT_EQ(got, want);
}

TEST(BadInputCli, GoodInfoPrints) {
  TempDir tmp;
  CliRun r = run_fathom({"info", "--model", fixture_dir(kTiny), "--json"}, tmp);
  ASSERT_EQ(r.status, 0) << r.err;
  json j = json::parse(r.out);
  EXPECT_EQ(j["model_type"], "deepseek_v3");
  EXPECT_EQ(j["layers"], 4);
}

// ---------------------------------------------------------------------------------------------
// Model directory and safetensors problems

TEST(BadInputModel, NonexistentModelDirectory) {
  TempDir tmp;
  std::string dir = tmp.file("no-such-model");
  expect_logits_error(tmp, dir, good_ids(), {"no-such-model"});
}

TEST(BadInputModel, MissingSafetensors) {
  TempDir tmp;
  std::string dir = model_dir(tmp, kTiny, nullptr, /*link_weights=*/false);
  expect_logits_error(tmp, dir, good_ids(), {dir, "model.safetensors"});
}

TEST(BadInputModel, MissingConfig) {
  TempDir tmp;
  std::string dir = model_dir(tmp);
  fs::remove(dir + "/config.json");
  expect_logits_error(tmp, dir, good_ids(), {dir + "/config.json"});
}

TEST(BadInputModel, ConfigNotJson) {
  TempDir tmp;
  std::string dir = model_dir(tmp);
  write_text(dir + "/config.json", "{\"model_type\": \"deepseek_v3\", \"hidden_size\": ");
  expect_logits_error(tmp, dir, good_ids(), {dir + "/config.json", "JSON"});
}

TEST(BadInputModel, TruncatedSafetensors) {
  const std::string src = fixture_file(kTiny, "model.safetensors");
  const uint64_t size = fs::file_size(src);
  // inside the length field, inside the JSON header, inside the data section, one byte short
  for (uint64_t keep : {uint64_t(0), uint64_t(5), uint64_t(1000), size / 2, size - 1}) {
    SCOPED_TRACE(cat("kept ", keep, " of ", size, " bytes"));
    TempDir tmp;
    std::string dir = model_dir(tmp, kTiny, nullptr, false);
    write_text(dir + "/model.safetensors", slurp(src).substr(0, size_t(keep)));
    expect_logits_error(tmp, dir, good_ids(), {dir + "/model.safetensors"});
  }
}

TEST(BadInputModel, AbsurdHeaderLength) {
  const std::string src = fixture_file(kTiny, "model.safetensors");
  for (uint64_t n : {uint64_t(1) << 62, ~uint64_t(0), uint64_t(kSafetensorsMaxHeaderBytes) + 1, uint64_t(0)}) {
    SCOPED_TRACE(cat("header length ", n));
    TempDir tmp;
    std::string dir = model_dir(tmp, kTiny, nullptr, false);
    std::string bytes = slurp(src);
    bytes.replace(0, 8, le64(n));
    write_text(dir + "/model.safetensors", bytes);
    expect_logits_error(tmp, dir, good_ids(), {dir + "/model.safetensors"});
  }
}

TEST(BadInputModel, HeaderNotJson) {
  TempDir tmp;
  std::string dir = model_dir(tmp, kTiny, nullptr, false);
  std::string text = "{\"a\": [1, 2";
  text.append((8 - text.size() % 8) % 8, ' ');
  write_text(dir + "/model.safetensors", le64(text.size()) + text + std::string(64, '\0'));
  expect_logits_error(tmp, dir, good_ids(), {dir + "/model.safetensors", "JSON"});
}

// The header rewritten so that it lies about one tensor; the data section is unchanged.
class BadInputHeader : public testing::Test {
 protected:
  void break_header(const std::function<void(json& header, uint64_t data_bytes)>& lie) {
    dir = model_dir(tmp, kTiny, nullptr, false);
    RawSafetensors raw = read_raw(fixture_file(kTiny, "model.safetensors"));
    lie(raw.header, raw.data.size());
    write_raw(dir + "/model.safetensors", raw.header, raw.data);
  }
  TempDir tmp;
  std::string dir;
  const std::string a = "model.layers.0.input_layernorm.weight";
  const std::string b = "model.layers.0.post_attention_layernorm.weight";
};

TEST_F(BadInputHeader, OffsetsPastEndOfFile) {
  break_header([&](json& h, uint64_t data_bytes) {
    uint64_t bytes = h[a]["data_offsets"][1].get<uint64_t>() - h[a]["data_offsets"][0].get<uint64_t>();
    h[a]["data_offsets"] = {data_bytes + 4096 - bytes, data_bytes + 4096};
  });
  expect_logits_error(tmp, dir, good_ids(), {dir + "/model.safetensors", a});
}

TEST_F(BadInputHeader, OverlappingTensors) {
  break_header([&](json& h, uint64_t) { h[b]["data_offsets"] = h[a]["data_offsets"]; });
  expect_logits_error(tmp, dir, good_ids(), {dir + "/model.safetensors", a, b, "overlap"});
}

TEST_F(BadInputHeader, PartialOverlap) {
  break_header([&](json& h, uint64_t) {
    uint64_t begin = h[a]["data_offsets"][0].get<uint64_t>() + 2, end = h[a]["data_offsets"][1].get<uint64_t>() + 2;
    h[b]["data_offsets"] = {begin, end};
  });
  expect_logits_error(tmp, dir, good_ids(), {dir + "/model.safetensors", "overlap"});
}

TEST_F(BadInputHeader, SizeDisagreesWithShape) {
  break_header([&](json& h, uint64_t) { h[a]["shape"] = {512}; });
  expect_logits_error(tmp, dir, good_ids(), {dir + "/model.safetensors", a, "[512]"});
}

TEST_F(BadInputHeader, BeginAfterEnd) {
  break_header([&](json& h, uint64_t) {
    json o = h[a]["data_offsets"];
    h[a]["data_offsets"] = {o[1], o[0]};
  });
  expect_logits_error(tmp, dir, good_ids(), {dir + "/model.safetensors", a});
}

TEST_F(BadInputHeader, NegativeOffset) {
  break_header([&](json& h, uint64_t) { h[a]["data_offsets"][0] = -2; });
  expect_logits_error(tmp, dir, good_ids(), {dir + "/model.safetensors", a, "data_offsets"});
}

TEST_F(BadInputHeader, UnknownDtype) {
  break_header([&](json& h, uint64_t) { h[a]["dtype"] = "Q4_K"; });
  expect_logits_error(tmp, dir, good_ids(), {dir + "/model.safetensors", a, "Q4_K"});
}

TEST_F(BadInputHeader, AbsurdShape) {
  break_header([&](json& h, uint64_t) { h[a]["shape"] = {uint64_t(1) << 40, uint64_t(1) << 40}; });
  expect_logits_error(tmp, dir, good_ids(), {dir + "/model.safetensors", a});
}

TEST(BadInputModel, MissingTensor) {
  TempDir tmp;
  std::string dir = model_dir(tmp, kTiny, nullptr, false);
  const std::string gone = "model.layers.2.self_attn.kv_b_proj.weight";
  rewrite_weights(kTiny, dir, [&](const std::string& name, Tensor&) { return name != gone; });
  expect_logits_error(tmp, dir, good_ids(), {gone, "missing", "[256, 64]"});
}

TEST(BadInputModel, MissingFp8Scale) {
  TempDir tmp;
  std::string dir = model_dir(tmp, "v3-tiny-fp8", nullptr, false);
  const std::string gone = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv";
  rewrite_weights("v3-tiny-fp8", dir, [&](const std::string& name, Tensor&) { return name != gone; });
  expect_logits_error(tmp, dir, good_ids(), {gone});
}

TEST(BadInputModel, TensorOfWrongShape) {
  TempDir tmp;
  std::string dir = model_dir(tmp, kTiny, nullptr, false);
  const std::string name = "model.layers.1.self_attn.o_proj.weight";  // [256, 128]
  rewrite_weights(kTiny, dir, [&](const std::string& n, Tensor& t) {
    if (n == name) t = t.reshape({t.dim(1), t.dim(0)});
    return true;
  });
  expect_logits_error(tmp, dir, good_ids(), {name, "shape", "[128, 256]", "[256, 128]"});
}

TEST(BadInputModel, TensorOfWrongDtype) {
  const std::string norm = "model.norm.weight";                       // BF16 [256]
  const std::string linear = "model.layers.0.mlp.down_proj.weight";  // BF16 [256, 512]
  for (const std::string& name : {norm, linear}) {
    SCOPED_TRACE(name);
    TempDir tmp;
    std::string dir = model_dir(tmp, kTiny, nullptr, false);
    rewrite_weights(kTiny, dir, [&](const std::string& n, Tensor& t) {
      if (n == name) t = Tensor::view(t.data(), t.shape(), DType::I16, t.owner());  // same bytes, an integer dtype
      return true;
    });
    expect_logits_error(tmp, dir, good_ids(), {name, "dtype", "I16", "BF16"});
  }
}

TEST(BadInputModel, ShardIndexNamesMissingShard) {
  TempDir tmp;
  std::string dir = model_dir(tmp, kTiny, nullptr, false);
  auto src = SafetensorsFile::open(fixture_file(kTiny, "model.safetensors"));
  SafetensorsWriter w;
  for (const TensorInfo& info : src->tensors()) w.add(info.name, src->tensor(info.name));
  w.write_sharded(dir, 2'000'000);
  std::string missing;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors") missing = e.path().filename().string();
  ASSERT_FALSE(missing.empty());
  fs::remove(dir + "/" + missing);
  expect_logits_error(tmp, dir, good_ids(), {missing});
}

// ---------------------------------------------------------------------------------------------
// config.json problems

TEST(BadInputConfig, MissingField) {
  for (const char* field : {"hidden_size", "vocab_size", "num_hidden_layers", "kv_lora_rank", "model_type"}) {
    SCOPED_TRACE(field);
    TempDir tmp;
    std::string dir = model_dir(tmp, kTiny, [&](json& c) { c.erase(field); });
    expect_logits_error(tmp, dir, good_ids(), {dir + "/config.json", std::string("'") + field + "'", "missing"});
  }
}

TEST(BadInputConfig, FieldOfWrongType) {
  struct Case {
    const char* field;
    json value;
  };
  for (const Case& k : {Case{"hidden_size", "256"}, Case{"num_attention_heads", 4.5}, Case{"vocab_size", true},
                        Case{"rms_norm_eps", "1e-6"}, Case{"norm_topk_prob", 1}, Case{"scoring_func", 3},
                        Case{"rope_scaling", "yarn"}, Case{"eos_token_id", "1"}}) {
    SCOPED_TRACE(k.field);
    TempDir tmp;
    std::string dir = model_dir(tmp, kTiny, [&](json& c) { c[k.field] = k.value; });
    expect_logits_error(tmp, dir, good_ids(), {dir + "/config.json", k.field});
  }
}

TEST(BadInputConfig, UnsupportedModelType) {
  TempDir tmp;
  std::string dir = model_dir(tmp, kTiny, [](json& c) { c["model_type"] = "llama"; });
  expect_logits_error(tmp, dir, good_ids(), {dir + "/config.json", "model_type", "llama"});
}

TEST(BadInputConfig, BadValues) {
  struct Case {
    const char* field;
    json value;
  };
  for (const Case& k : {Case{"hidden_size", -256}, Case{"n_group", 3}, Case{"num_experts_per_tok", 17},
                        Case{"qk_rope_head_dim", 15}, Case{"topk_method", "magic"}}) {
    SCOPED_TRACE(k.field);
    TempDir tmp;
    std::string dir = model_dir(tmp, kTiny, [&](json& c) { c[k.field] = k.value; });
    expect_logits_error(tmp, dir, good_ids(), {dir + "/config.json", k.field});
  }
}

TEST(BadInputConfig, ConfigDisagreesWithWeights) {
  TempDir tmp;
  std::string dir = model_dir(tmp, kTiny, [](json& c) { c["hidden_size"] = 128; });
  expect_logits_error(tmp, dir, good_ids(), {"model.embed_tokens.weight", "[1024, 256]", "[1024, 128]"});
}

// ---------------------------------------------------------------------------------------------
// input_ids problems

TEST(BadInputIds, Empty) {
  for (const Shape& shape : {Shape{1, 0}, Shape{0, 5}, Shape{0}}) {
    SCOPED_TRACE(shape_str(shape));
    TempDir tmp;
    std::string ids = ids_file(tmp, Tensor::zeros(shape, DType::I64));
    expect_logits_error(tmp, fixture_dir(kTiny), ids, {ids, "input_ids", "empty"});
  }
}

TEST(BadInputIds, OutOfVocabulary) {
  for (int64_t bad : {int64_t(5000), int64_t(-1), int64_t(1024), int64_t(1) << 40}) {
    SCOPED_TRACE(bad);
    TempDir tmp;
    std::string ids = ids_file(tmp, i64_ids({3, 17, bad, 9}));
    expect_logits_error(tmp, fixture_dir(kTiny), ids, {ids, "input_ids", std::to_string(bad), "vocabulary"});
  }
}

TEST(BadInputIds, WrongDtype) {
  TempDir tmp;
  Tensor t = Tensor::zeros({1, 4}, DType::F32);
  std::string ids = ids_file(tmp, t);
  expect_logits_error(tmp, fixture_dir(kTiny), ids, {ids, "input_ids", "dtype", "F32"});
}

TEST(BadInputIds, WrongRank) {
  TempDir tmp;
  std::string ids = ids_file(tmp, Tensor::zeros({1, 2, 3}, DType::I64));
  expect_logits_error(tmp, fixture_dir(kTiny), ids, {ids, "input_ids", "[1, 2, 3]"});
}

TEST(BadInputIds, MissingTensor) {
  TempDir tmp;
  std::string ids = ids_file(tmp, i64_ids({1, 2, 3}), "token_ids");
  expect_logits_error(tmp, fixture_dir(kTiny), ids, {ids, "input_ids"});
}

TEST(BadInputIds, MissingOrCorruptFile) {
  TempDir tmp;
  std::string missing = tmp.file("nope.safetensors");
  expect_logits_error(tmp, fixture_dir(kTiny), missing, {missing});
  std::string garbage = tmp.file("garbage.safetensors");
  write_text(garbage, "this is not a safetensors file at all");
  expect_logits_error(tmp, fixture_dir(kTiny), garbage, {garbage});
}

TEST(BadInputIds, MtpWithoutMtpModule) {
  TempDir tmp;
  expect_logits_error(tmp, fixture_dir(kTiny), good_ids(), {"--mtp", fixture_dir(kTiny)}, {"--mtp"});
}

// ---------------------------------------------------------------------------------------------
// The other subcommands and the command line itself

TEST(BadInputCli, GenerateWithBadInput) {
  TempDir tmp;
  fs::create_directories(tmp.file("out"));
  std::string out = tmp.file("out/gen.json");
  std::string ids = ids_file(tmp, i64_ids({5, 5000}));
  CliRun r = run_fathom({"generate", "--model", fixture_dir(kTiny), "--input-ids", ids, "--max-new-tokens", "4",
                         "--temperature", "0", "--out", out},
                        tmp);
  EXPECT_TRUE(is_user_error(r, {ids, "5000"}));
  EXPECT_TRUE(left_nothing(out));

  std::string empty = ids_file(tmp, Tensor::zeros({1, 0}, DType::I64));
  r = run_fathom({"generate", "--model", fixture_dir(kTiny), "--input-ids", empty, "--out", out}, tmp);
  EXPECT_TRUE(is_user_error(r, {empty, "empty"}));
  EXPECT_TRUE(left_nothing(out));

  r = run_fathom({"generate", "--model", fixture_dir(kTiny), "--input-ids", good_ids(), "--temperature", "0.7", "--out",
                  out},
                 tmp);
  EXPECT_TRUE(is_user_error(r, {"--temperature"}));
  EXPECT_TRUE(left_nothing(out));
}

TEST(BadInputCli, GenerateWithBrokenModel) {
  TempDir tmp;
  std::string dir = model_dir(tmp, kTiny, [](json& c) { c.erase("kv_lora_rank"); });
  fs::create_directories(tmp.file("out"));
  std::string out = tmp.file("out/gen.json");
  CliRun r = run_fathom({"generate", "--model", dir, "--input-ids", good_ids(), "--out", out}, tmp);
  EXPECT_TRUE(is_user_error(r, {"kv_lora_rank"}));
  EXPECT_TRUE(left_nothing(out));
}

TEST(BadInputCli, InfoWithBrokenModel) {
  {
    TempDir tmp;
    std::string dir = model_dir(tmp, kTiny, nullptr, false);
    const std::string gone = "model.layers.3.mlp.gate.e_score_correction_bias";
    rewrite_weights(kTiny, dir, [&](const std::string& name, Tensor&) { return name != gone; });
    CliRun r = run_fathom({"info", "--model", dir}, tmp);
    EXPECT_TRUE(is_user_error(r, {gone}));
    EXPECT_EQ(r.out, "");
  }
  {
    TempDir tmp;
    std::string dir = model_dir(tmp, kTiny, [](json& c) { c["model_type"] = "llama"; });
    CliRun r = run_fathom({"info", "--model", dir, "--json"}, tmp);
    EXPECT_TRUE(is_user_error(r, {"llama"}));
    EXPECT_EQ(r.out, "");
  }
  {
    TempDir tmp;
    CliRun r = run_fathom({"info", "--model", tmp.file("absent")}, tmp);
    EXPECT_TRUE(is_user_error(r, {tmp.file("absent")}));
  }
}

TEST(BadInputCli, OutputDirectoryMissing) {
  TempDir tmp;
  std::string out = tmp.file("no/such/dir/logits.safetensors");
  CliRun r = run_fathom({"logits", "--model", fixture_dir(kTiny), "--input-ids", good_ids(), "--out", out}, tmp);
  EXPECT_TRUE(is_user_error(r, {tmp.file("no/such/dir")}));
  EXPECT_FALSE(fs::exists(tmp.file("no")));
}

TEST(BadInputCli, UsageErrors) {
  TempDir tmp;
  struct Case {
    std::vector<std::string> args;
    std::string named;
  };
  std::string out = tmp.file("o.safetensors");
  // a mistyped subcommand gets the same one-line error as bad input
  EXPECT_TRUE(is_user_error(run_fathom({"frobnicate", "--model", fixture_dir(kTiny)}, tmp), {"'frobnicate'", "logits"}));
  for (const Case& k : {Case{{"frobnicate"}, "frobnicate"},
                        Case{{}, ""},
                        Case{{"--no-such-flag"}, "--no-such-flag"},
                        Case{{"logits", "--model", fixture_dir(kTiny), "--input-ids", good_ids(), "--out", out,
                              "--no-such-option"},
                             "--no-such-option"},
                        Case{{"logits", "--model", fixture_dir(kTiny), "--out", out}, "--input-ids"},
                        Case{{"logits", "--model", fixture_dir(kTiny), "--input-ids", good_ids(), "--out", out,
                              "--mla", "sideways"},
                             "sideways"},
                        Case{{"generate", "--model", fixture_dir(kTiny), "--input-ids", good_ids(), "--out", out,
                              "--max-new-tokens", "many"},
                             "many"},
                        Case{{"logits", "--model", fixture_dir(kTiny), "--input-ids", good_ids(), "--out", out,
                              "--fp8-gemm", "fp4"},
                             "fp4"},
                        Case{{"logits", "--model", fixture_dir(kTiny), "--input-ids", good_ids(), "--out", out,
                              "--fp8-gemm", "fp8", "--dequantize-fp8"},
                             "--dequantize-fp8"}}) {
    CliRun r = run_fathom(k.args, tmp);
    SCOPED_TRACE(r.command);
    // usage errors too: exit 2 and one line naming what was wrong
    EXPECT_TRUE(is_user_error(r, {k.named}));
    EXPECT_FALSE(fs::exists(out));
  }
}
