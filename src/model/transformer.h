// The weights of a whole DeepSeek model and the decoder layer they make up.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/safetensors.h"
#include "model/attention.h"
#include "model/config.h"
#include "model/moe.h"
#include "model/rope.h"

namespace fathom {

struct DecoderLayerWeights {
  Tensor input_layernorm;           // (hidden) F32
  Tensor post_attention_layernorm;  // (hidden) F32
  MlaWeights attn;
  bool is_moe = false;
  SwiGluWeights mlp;  // dense layers
  MoeWeights moe;     // MoE layers
};

// One MTP module (DeepSeek-V3 §2.2): combines the previous depth's hidden state with the
// embedding of the next token and runs one more decoder layer.
struct MtpWeights {
  Tensor enorm, hnorm;         // (hidden) F32
  LinearWeight eh_proj;        // (hidden, 2 * hidden): [enorm(emb) ; hnorm(h)] -> hidden
  DecoderLayerWeights layer;
  Tensor shared_head_norm;     // (hidden) F32
  LinearWeight shared_head;    // (vocab, hidden)
  Tensor embed_tokens;         // (vocab, hidden) as stored
};

struct ModelWeights {
  ModelConfig config;
  std::shared_ptr<SafetensorsSet> files;  // keeps the memory maps alive
  Tensor embed_tokens;                    // (vocab, hidden) as stored
  std::vector<DecoderLayerWeights> layers;
  Tensor norm;                            // (hidden) F32
  LinearWeight lm_head;                   // (vocab, hidden)
  std::vector<MtpWeights> mtp;
  std::unique_ptr<Rope> rope;
  Tensor rope_inv_freq;                   // (qk_rope_head_dim/2) F64, where the backend computes
};

// x (T, hidden) += attn(input_layernorm(x)); x += ffn(post_attention_layernorm(x)) — for the
// tokens of one or more sequences (see SeqSlice). Neither norm is written out: the first ops of
// attention and of the MLP/MoE apply it as they read x (InputNorm), and the residual adds are
// the accumulating output projections (o_proj, down). `choices`, when given and the layer is
// MoE, receives what its router chose.
void decoder_layer_forward(Ops& ops, const DecoderLayerWeights& w, const ModelConfig& c, MlaMode mode, Tensor& x,
                           const std::vector<SeqSlice>& seqs, const RopeTables& rope,
                           ExpertChoices* choices = nullptr);

// The last want[b] rows of sequence b of a batched step's residual stream x (its rows from
// starts[b], lens[b] of them), all sequences' in order: a new (sum of want, D) device tensor. An
// empty `want` takes one row (the last) of each.
Tensor gather_last_rows(Ops& ops, const Tensor& x, const std::vector<int64_t>& starts,
                        const std::vector<std::vector<int32_t>>& lens, const std::vector<int64_t>& want, int64_t D);

// Layer `layer`'s slice of a step for a cache: rows [t0, t0 + n) of the activations, appended at
// the cache's length, through its block table when it is paged (paging: the step's KvPaging,
// b: the cache's index in it).
SeqSlice cache_slice(KvCache& cache, int layer, const KvPaging& paging, size_t b, int64_t t0, int64_t n);

// The batched steps' arguments (Model::forward_batch, forward_batch_rows, mtp_step): one non-empty
// token list per cache; a fathom::Error naming `what` otherwise.
void check_batch(const std::vector<std::vector<int32_t>>& tokens, size_t n_caches, const char* what);

}  // namespace fathom
