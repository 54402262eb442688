// The tensor layout of a DeepSeek checkpoint (the published names and shapes) and a writer
// of random-weight checkpoints in that layout: for benchmarks, tests and as the starting
// point of training.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"

namespace fathom {

enum class TensorRole : uint8_t { Linear, Norm, Bias, Embedding };

struct TensorSpec {
  std::string name;
  Shape shape;
  TensorRole role;
};

// FP8 e4m3 block quantization as DeepSeek publishes it: W (N, K) F32 -> q (N, K) F8_E4M3 and
// scale_inv (ceil(N/block), ceil(K/block)) F32 with W ≈ q * scale_inv, each block scaled so
// that its largest magnitude maps to 448 (e4m3's largest finite value).
void quantize_fp8(const float* w, int64_t N, int64_t K, int64_t block, Tensor& q, Tensor& scale_inv);

// Every tensor a checkpoint of this config holds (main model and MTP modules), in the
// published DeepSeek naming; FP8 scale tensors are not listed.
std::vector<TensorSpec> checkpoint_layout(const ModelConfig& c);

struct RandomInitOptions {
  uint64_t seed = 1234;
  double std = 0.02;          // linear and embedding weights ~ N(0, std)
  DType dtype = DType::BF16;  // BF16, F16, F32, or F8_E4M3 (128x128 block scales)
  size_t max_shard_bytes = 0; // 0: one model.safetensors; else shards + index
  // The MTP modules use the main model's embedding and output head (as the DeepSeek-V3 paper
  // describes them) instead of their own copies (as its published checkpoint stores them):
  // their embed_tokens and shared_head.head are not written.
  bool mtp_shared_embeddings = false;
};

// Writes config.json (the given config, plus quantization_config for FP8) and the weights
// into `dir` (created). `source` names the config in error messages.
void write_random_checkpoint(const std::string& config_json, const std::string& dir, const RandomInitOptions& o,
                             const std::string& source = "model config");

}  // namespace fathom
