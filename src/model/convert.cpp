// Checkpoint conversion (see convert.h).
#include "model/convert.h"

#include <unistd.h>

#include <filesystem>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/files.h"
#include "core/safetensors.h"
#include "model/config.h"
#include "model/random_init.h"
#include "model/weights.h"

namespace fathom {

ConvertSummary convert_checkpoint(const std::string& in_dir, const std::string& out_dir, const ConvertOptions& o) {
  namespace fs = std::filesystem;
  FATHOM_CHECK(o.dtype == DType::F8_E4M3 || o.dtype == DType::BF16 || o.dtype == DType::F32,
               "convert: the output dtype must be F8_E4M3, BF16 or F32, not ", dtype_name(o.dtype));
  FATHOM_CHECK(fs::is_directory(in_dir), "convert: ", in_dir, " is not a checkpoint directory");
  const std::string config_path = (fs::path(in_dir) / "config.json").string();
  FATHOM_CHECK(fs::is_regular_file(config_path), "convert: ", config_path, " does not exist");
  nlohmann::json j = nlohmann::json::parse(read_file(config_path), nullptr, false);
  FATHOM_CHECK(!j.is_discarded() && j.is_object(), "convert: ", config_path, " is not a JSON object");
  const ModelConfig c = parse_config(j, config_path);
  std::error_code ec;
  if (fs::exists(out_dir, ec))
    FATHOM_CHECK(fs::is_directory(out_dir) && fs::is_empty(out_dir), "convert: ", out_dir,
                 " already exists and is not an empty directory; give a new one");

  const SafetensorsSet set = SafetensorsSet::open_dir(in_dir);
  const int64_t in_block = c.weight_block_size[0];
  WeightLoader loader(set, LoadOptions{/*dequantize_fp8=*/true}, in_block);
  const bool fp8 = o.dtype == DType::F8_E4M3;
  const DType plain = fp8 ? DType::BF16 : o.dtype;  // what tensors other than linear weights become
  constexpr int64_t kBlock = 128;
  // HF transformers takes a block's size from the weight's shape and its scale grid (dim / grid),
  // so a dimension of more than one block that is not a multiple of 128 (fathom-mini's q_b_proj,
  // 576 rows = 4.5 blocks) fails to load there. Such matrices stay BF16 and are named in
  // quantization_config.modules_to_not_convert, which HF honours; fathom reads each tensor's dtype.
  auto hf_blocks = [](int64_t d) { return d % kBlock == 0 || d < kBlock; };
  nlohmann::json not_converted = nlohmann::json::array();

  // every tensor of the layout the source holds (optional MTP copies of the embedding and the
  // head may be absent: they are then shared, and stay absent)
  SafetensorsWriter w;
  std::set<std::string> used;
  ConvertSummary sum;
  auto add = [&](const std::string& name, Tensor t) {
    sum.bytes += int64_t(t.nbytes());
    ++sum.tensors;
    w.add(name, t);
  };
  for (const TensorSpec& s : checkpoint_layout(c)) {
    const bool optional = s.name.find(".shared_head.head.") != std::string::npos ||
                          (s.name.find(".embed_tokens.") != std::string::npos && s.name != "model.embed_tokens.weight");
    if (optional && !set.contains(s.name)) continue;
    used.insert(s.name);
    if (s.role == TensorRole::Linear) {
      if (set.contains(s.name + "_scale_inv")) used.insert(s.name + "_scale_inv");
      const Tensor f = dequantize(loader.linear(s.name, s.shape[0], s.shape[1]));
      if (fp8 && !(hf_blocks(s.shape[0]) && hf_blocks(s.shape[1]))) {
        add(s.name, from_f32(f.f32(), s.shape, DType::BF16));
        not_converted.push_back(s.name.substr(0, s.name.size() - std::string(".weight").size()));
      } else if (fp8) {
        Tensor q, scale;
        quantize_fp8(f.f32(), s.shape[0], s.shape[1], kBlock, q, scale);
        add(s.name, q);
        add(s.name + "_scale_inv", scale);
      } else {
        add(s.name, from_f32(f.f32(), s.shape, plain));
      }
    } else if (s.role == TensorRole::Bias) {
      add(s.name, loader.f32(s.name, s.shape));
    } else {
      const Tensor f = to_f32(s.role == TensorRole::Norm ? loader.f32(s.name, s.shape) : loader.table(s.name, s.shape));
      add(s.name, from_f32(f.f32(), s.shape, plain));
    }
  }
  for (const std::string& name : set.names())
    FATHOM_CHECK(used.count(name), "convert: ", in_dir, " holds the tensor ", name,
                 ", which the config's architecture does not have (a checkpoint of another shape?)");

  // config.json: the quantization block as written, the dtype named
  if (fp8)
    j["quantization_config"] = {{"activation_scheme", "dynamic"}, {"fmt", "e4m3"}, {"quant_method", "fp8"},
                                {"weight_block_size", {kBlock, kBlock}}};
  if (fp8 && !not_converted.empty()) {
    // a list given replaces HF's default one, which keeps the LM head out of FP8: name it too
    not_converted.insert(not_converted.begin(), "lm_head");
    j["quantization_config"]["modules_to_not_convert"] = not_converted;
  }
  else
    j.erase("quantization_config");
  j["torch_dtype"] = o.dtype == DType::F32 ? "float32" : "bfloat16";

  // everything into a temporary directory beside the target, renamed at the end
  const fs::path target = fs::absolute(out_dir);
  const fs::path tmp = target.parent_path() / cat(".", target.filename().string(), ".tmp-", getpid());
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  FATHOM_CHECK(!ec, "convert: cannot create ", tmp.string(), ": ", ec.message());
  try {
    if (o.max_shard_bytes > 0) {
      w.write_sharded(tmp.string(), o.max_shard_bytes);
    } else {
      w.write((tmp / "model.safetensors").string());
    }
    write_file_atomic((tmp / "config.json").string(), j.dump(2) + "\n");
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"}) {
      const fs::path src = fs::path(in_dir) / f;
      if (fs::is_regular_file(src)) write_file_atomic((tmp / f).string(), read_file(src.string()));
    }
    for (const auto& e : fs::directory_iterator(tmp))
      if (e.path().extension() == ".safetensors") ++sum.shards;
    if (fs::exists(target)) fs::remove(target);  // empty (checked above)
    fs::rename(tmp, target);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  return sum;
}

}  // namespace fathom
