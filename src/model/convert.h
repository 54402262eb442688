// Rewriting a checkpoint in another weight format (`fathom convert`): FP8 e4m3 with 128x128
// block scales in the published DeepSeek-V3 layout (every linear weight F8_E4M3 with its
// `<name>_scale_inv`; embeddings, the LM head, the router and the norms BF16; the routing bias
// F32; `quantization_config` in config.json), or plain BF16 / F32 (FP8 sources dequantized).
// A linear weight with a dimension over 128 that is not a multiple of 128 stays BF16 and is listed
// in quantization_config.modules_to_not_convert: HF transformers cannot load its scale grid.
// Shards of at most a given size with model.safetensors.index.json, as HF writes them.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/dtype.h"

namespace fathom {

struct ConvertOptions {
  DType dtype = DType::F8_E4M3;           // F8_E4M3, BF16 or F32
  size_t max_shard_bytes = size_t(16) << 20;  // 0: one model.safetensors
};

struct ConvertSummary {
  int64_t tensors = 0;  // written, scales included
  int64_t bytes = 0;    // tensor data written
  int shards = 0;
};

// Reads the checkpoint in `in_dir` (config.json + safetensors; F32, BF16, F16 or FP8 weights)
// and writes it to `out_dir`, which must not exist yet or be empty: into a temporary directory
// beside it first, renamed at the end, so a failure leaves no partial checkpoint. The
// tokenizer and generation files of `in_dir` are copied. Throws fathom::Error naming the file,
// the tensor or the field when the input is incomplete or holds tensors the config does not
// explain.
ConvertSummary convert_checkpoint(const std::string& in_dir, const std::string& out_dir, const ConvertOptions& o);

}  // namespace fathom
