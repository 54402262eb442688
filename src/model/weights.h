// Reading a checkpoint's tensors with the checks a user needs: every tensor the
// architecture expects must exist with the right shape and a supported dtype, and FP8
// weights must come with their 128x128 block scales (`<name>_scale_inv`).
#pragma once
#include <string>

#include "core/safetensors.h"
#include "ops/ops.h"

namespace fathom {

struct LoadOptions {
  // Dequantize FP8 block-quantized weights to F32 at load instead of keeping them FP8 and
  // dequantizing inside the matmul (exact either way; FP8 uses a quarter of the memory).
  bool dequantize_fp8 = false;
};

// Random weights made by a backend where they will live (Model::random): linear weights and
// embeddings ~ U(-std·√3, std·√3) in `dtype` (FP8: e4m3 over the full range with a constant
// block scale), norm weights 1, the routing bias 0.
struct RandomWeights {
  Ops* ops = nullptr;
  DType dtype = DType::BF16;  // F32, BF16, F16 or F8_E4M3 (embeddings: BF16 then)
  uint64_t seed = 1234;
  double std = 0.02;
};

class WeightLoader {
 public:
  WeightLoader(const SafetensorsSet& set, const LoadOptions& options, int64_t fp8_block)
      : set_(&set), options_(options), fp8_block_(fp8_block) {}
  WeightLoader(const RandomWeights& random, int64_t fp8_block) : random_(random), fp8_block_(fp8_block) {}
  bool random() const { return set_ == nullptr; }
  // A random (H, N, K) stack of per-head weights (absorbed MLA's W_UK/W_UV for random models).
  Tensor random_stack(const std::string& name, const Shape& shape) const;

  // A linear weight (out_features, in_features): F32, BF16, F16, or F8_E4M3 with scales.
  LinearWeight linear(const std::string& name, int64_t out_features, int64_t in_features) const;
  // A vector or small table kept as F32 in memory (norm weights, biases), of this shape.
  Tensor f32(const std::string& name, const Shape& shape) const;
  // A table read in place (embeddings): F32, BF16 or F16, of this shape.
  Tensor table(const std::string& name, const Shape& shape) const;
  // Random mode holds the tensors every config needs and no optional ones.
  bool contains(const std::string& name) const { return set_ && set_->contains(name); }

 private:
  Tensor checked(const std::string& name, const Shape& shape, std::initializer_list<DType> allowed) const;
  Tensor random_tensor(const std::string& name, const Shape& shape, DType dtype, float scale) const;

  const SafetensorsSet* set_ = nullptr;
  RandomWeights random_;
  LoadOptions options_;
  int64_t fp8_block_;
};

// Every element of W as F32, (out_features, in_features), dequantizing FP8 blocks.
Tensor dequantize(const LinearWeight& w);

}  // namespace fathom
