// Multi-head latent attention (MLA), DeepSeek-V2/V3.
//
// Queries: h -> q_a_proj -> q_a_layernorm -> q_b_proj (or one q_proj when q_lora_rank is 0),
// split per head into q_nope (qk_nope_head_dim) and q_pe (qk_rope_head_dim, rotated).
// Keys/values: h -> kv_a_proj_with_mqa -> [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)];
// c_kv -> kv_a_layernorm -> kv_b_proj -> per head [k_nope | v]; k_pe is rotated and shared by
// all heads.
//
// Two equivalent ways to attend (DeepSeek's `attn_impl`):
//  naive    — decompress k_nope and v for every head and cached token, then ordinary MHA;
//  absorbed — fold kv_b_proj into the query (q_nope · W_UK per head gives a query in latent
//             space) and into the output (latent · W_UVᵀ), so attention runs as MQA directly
//             over the cached [c_kv | k_pe] rows: the cache holds kv_lora_rank + rope floats per
//             token instead of n_heads * (qk_head_dim + v_head_dim).
#pragma once
#include <vector>

#include "model/config.h"
#include "model/kv_cache.h"
#include "model/weights.h"
#include "ops/ops.h"

namespace fathom {

struct MlaWeights {
  // with q LoRA
  LinearWeight q_a_proj;        // (q_lora_rank, hidden)
  Tensor q_a_layernorm;         // (q_lora_rank) F32
  LinearWeight q_b_proj;        // (n_heads * qk_head_dim, q_lora_rank)
  // without q LoRA
  LinearWeight q_proj;          // (n_heads * qk_head_dim, hidden)
  LinearWeight kv_a_proj_with_mqa;  // (kv_lora_rank + qk_rope_head_dim, hidden)
  Tensor kv_a_layernorm;        // (kv_lora_rank) F32
  LinearWeight kv_b_proj;       // (n_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank)
  LinearWeight o_proj;          // (hidden, n_heads * v_head_dim)
  // absorbed mode: kv_b_proj split per head, prepared at load (stored dtype, or F32 for FP8)
  Tensor w_uk_t;  // (n_heads, kv_lora_rank, qk_nope_head_dim): q_latent[h] = q_nope[h] · W_UK[h]
  Tensor w_uv;    // (n_heads, v_head_dim, kv_lora_rank):       o[h] = latent[h] · W_UV[h]ᵀ

  int64_t nbytes() const;  // weight bytes one decoded token reads (absorbed: W_UK/W_UV instead of kv_b_proj)
};

// `mode` decides what is prepared: absorbed mode also cuts W_UK/W_UV out of kv_b_proj.
MlaWeights load_mla(const WeightLoader& w, const ModelConfig& c, const std::string& prefix, MlaMode mode);

struct RopeTables {
  const Tensor* cos;  // (T, rope/2)
  const Tensor* sin;
};

// The tokens of one sequence within a batch: rows [t0, t0 + n) of the activations sit at
// positions pos0 .. pos0 + n - 1 of the sequence whose cache (this layer's) is `cache`.
// In a step replayed from a CUDA graph the positions are device data: then pos_device[0] is
// pos0 and len_device[0] the key count after appending (pos0 + n), and `capacity` (the cache's
// rows) bounds the work. A paged cache (model/kv_pool.h) gives its block table and the storage
// row of each new token (device memory, see KvPaging; in a graph, buffers the replay fills); a
// contiguous one leaves them null.
struct SeqSlice {
  LayerKvCache* cache = nullptr;
  int64_t pos0 = 0, t0 = 0, n = 0;
  const int32_t* pos_device = nullptr;
  const int32_t* len_device = nullptr;
  int64_t capacity = 0;
  const int32_t* block_table = nullptr;  // paged: (blocks) the cache's block table
  int block_size = 0;
  const int32_t* rows = nullptr;  // paged: (n) where the new tokens are written
};

// out (T, hidden) = MLA(norm(x)) for x (T, hidden) holding the tokens of one or more
// sequences (`seqs` cover the T rows), or out += that with accumulate (out may then be x: the
// residual add, fused into the output projection). norm: the input norm, applied by the first
// projections as they read x (none: x is already normed). The projections run over all T rows
// at once, each sequence appends its tokens to its cache and attends over it (the caller
// advances caches). rope: tables for the T rows' positions.
void mla_forward(Ops& ops, const MlaWeights& w, const ModelConfig& c, MlaMode mode, Tensor& out, const Tensor& x,
                 const std::vector<SeqSlice>& seqs, const RopeTables& rope, InputNorm norm = {},
                 bool accumulate = false);

}  // namespace fathom
