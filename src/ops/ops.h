// The op interface: everything the model does to numbers goes through an Ops backend, so
// model code never sees CUDA headers and the CPU implementation is the reference that a
// GPU backend is tested against. Activations are F32 (both backends accumulate in fp32);
// weights keep the dtype they were placed with (F32, BF16, F16, or F8_E4M3 with 128x128
// block scales) and are dequantized inside the matmul. A backend owns the memory it computes
// on: tensors and raw pointers handed to an op live on `device()` (host memory for the CPU
// backend, GPU memory for CUDA); `upload`/`download` cross between host and device.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"

namespace fathom {

// Matmuls over more rows than this take the FP8 x FP8 product when asked (Ops::set_fp8_activations).
constexpr int64_t kFp8ActivationRows = 128;

// A linear layer's weight, y = x · Wᵀ, exactly as the checkpoint stores it.
struct LinearWeight {
  std::string name;    // checkpoint tensor name, for error messages
  Tensor weight;       // [out_features, in_features]  F32 | BF16 | F16 | F8_E4M3
  Tensor scale_inv;    // F8_E4M3 only: [ceil(out/block), ceil(in/block)] F32; block (i,j) of W is multiplied by it
  int64_t block = 128; // the quantization block edge (DeepSeek: 128x128)

  int64_t out_features() const { return weight.dim(0); }
  int64_t in_features() const { return weight.dim(1); }
  bool quantized() const { return weight.dtype() == DType::F8_E4M3; }
  size_t nbytes() const { return weight.nbytes() + (quantized() ? scale_inv.nbytes() : 0); }
};

// Scaled dot-product attention over strided Q/K/V, with grouped heads: query head h reads
// key/value head h / (n_q_heads / n_kv_heads) — MHA when they are equal, MQA when
// n_kv_heads == 1 (absorbed MLA is MQA over the latent cache: K = [latent, pe], V = latent).
// Query i sits at absolute position q_pos0 + i; key j at position j; causal masks j > position.
//
// Keys and values are F32 or BF16 (kv_dtype; the CPU backend takes F32 only). With a block
// table the cache is paged: key j lives at token row block_table[j / block_size] * block_size
// + j % block_size of k and v (FlashMLA's layout); without one, at row j.
struct AttentionParams {
  const float* q = nullptr;  // (n_q, n_q_heads, d_qk) with the strides below
  int64_t q_token_stride = 0, q_head_stride = 0;
  const void* k = nullptr;   // (n_kv rows, n_kv_heads, d_qk) in kv_dtype
  int64_t k_token_stride = 0, k_head_stride = 0;
  const void* v = nullptr;   // (n_kv rows, n_kv_heads, d_v) in kv_dtype
  int64_t v_token_stride = 0, v_head_stride = 0;
  DType kv_dtype = DType::F32;
  const int32_t* block_table = nullptr;  // (ceil(n_kv / block_size)) or null
  int block_size = 0;
  float* out = nullptr;      // (n_q, n_q_heads, d_v)
  int64_t out_token_stride = 0, out_head_stride = 0;
  int64_t n_q = 0, n_kv = 0, q_pos0 = 0;
  int n_q_heads = 0, n_kv_heads = 0, d_qk = 0, d_v = 0;
  float scale = 1.0f;
  bool causal = true;
  // Decode steps replayed from a CUDA graph cannot bake the context length into the launch:
  // when set, the key count is *kv_len (device memory, ≤ n_kv, which then only bounds the
  // work) and q_pos0 = *kv_len - n_q.
  const int32_t* kv_len = nullptr;
};

// Sequence b of a batch stacked row after row (Ops::attention_backward's n_seq): p with q, k and v
// moved to that sequence's first rows (q by b·n_q rows, k and v by b·n_kv; F32 keys and values).
inline AttentionParams sequence_of(const AttentionParams& p, int64_t b) {
  AttentionParams s = p;
  s.q += b * p.n_q * p.q_token_stride;
  s.k = static_cast<const float*>(p.k) + b * p.n_kv * p.k_token_stride;
  s.v = static_cast<const float*>(p.v) + b * p.n_kv * p.v_token_stride;
  return s;
}

// Rotary embedding on a slice of every head: dims [offset, offset + rope_dim) of each
// (token, head) vector at x + t*token_stride + h*head_stride. Interleaved pairs (2i, 2i+1)
// (DeepSeek's published layout) or halves (i, i + rope_dim/2). rope_dim must be even.
struct RopeParams {
  float* x = nullptr;
  int64_t n_tokens = 0, token_stride = 0, head_stride = 0;
  int n_heads = 0, offset = 0, rope_dim = 0;
  const float* cos = nullptr;  // (n_tokens, rope_dim/2), attention factor already applied
  const float* sin = nullptr;  // (n_tokens, rope_dim/2)
  bool interleaved = true;
  // The inverse (transposed) rotation, each pair turned by minus its angle: the rotation's
  // backward (a gradient goes through the transposed matrix).
  bool inverse = false;
  // Null: in place. Otherwise rotated dim i of (t, h) goes to out + t*out_token_stride +
  // h*out_head_stride + out_offset + i and x is only read (the two must not overlap): absorbed
  // MLA ropes q_pe straight into its absorbed query.
  float* out = nullptr;
  int64_t out_token_stride = 0, out_head_stride = 0;
  int out_offset = 0;
};

// Appends tokens to an absorbed-MLA latent cache in one op. kv (n_tokens, kv_lora_rank +
// rope_dim) = [c_kv | k_pe] is kv_a_proj_with_mqa's raw output (only read); token t's cache row
// [rmsnorm(c_kv) * norm_weight | rope(k_pe)] is written in out_dtype (F32, or BF16 rounded to
// nearest-even) at out + row * (kv_lora_rank + rope_dim) elements, row = out_token_index[t]
// (device memory, as CopyParams) when given, else pos0 + t. The CPU result equals, bit for bit,
// rope of k_pe, rmsnorm of c_kv and the copies into the cache done as separate ops.
struct MlaAppendParams {
  void* out = nullptr;  // the cache (rows, kv_lora_rank + rope_dim) in out_dtype
  DType out_dtype = DType::F32;
  int64_t pos0 = 0;
  const int32_t* out_token_index = nullptr;  // (n_tokens) or null
  const float* kv = nullptr;                 // (n_tokens, kv_lora_rank + rope_dim), rows kv_token_stride apart
  int64_t kv_token_stride = 0, n_tokens = 0;
  int kv_lora_rank = 0, rope_dim = 0;  // rope_dim even
  const float* norm_weight = nullptr;  // (kv_lora_rank): kv_a_layernorm
  float eps = 1e-6f;
  const float* cos = nullptr;  // (n_tokens, rope_dim/2), as RopeParams
  const float* sin = nullptr;
  bool interleaved = true;
};

// Per-head matmul over strided activations: out[t, h, :] = x[t, h, :] · W[h]ᵀ with W (H, N, K)
// unquantized (F32, BF16, F16). MLA's absorption uses it: q_nope → latent space with W_UKᵀ,
// latent → values with W_UV.
struct HeadMatmulParams {
  float* out = nullptr;     // (n_tokens, n_heads, N) with the strides below
  int64_t out_token_stride = 0, out_head_stride = 0;
  const float* x = nullptr;  // (n_tokens, n_heads, K)
  int64_t x_token_stride = 0, x_head_stride = 0;
  int64_t n_tokens = 0;
  // Optional small ops done with the matmul, as Ops::rope / Ops::mla_cache_append would do them
  // after it; they must read nothing the matmul writes and write nothing it reads. Absorbed MLA
  // passes its q_pe RoPE and latent-cache append with W_UK: the CUDA backend runs them in spare
  // blocks of the same launch when decoding (two kernel boundaries less per layer).
  const RopeParams* also_rope = nullptr;
  const MlaAppendParams* also_append = nullptr;
};

// An RMSNorm an op applies to its input rows before using them: x / rms(x) * weight, exactly as
// Ops::rmsnorm would (weight (K) F32), so that the normalised rows need not be written out and
// read back by a separate op. In decode that is one kernel less per norm: the consumer (a GEMV,
// the experts) reads every input row whole anyway and sums its squares on the way.
struct InputNorm {
  const Tensor* weight = nullptr;  // null: no norm
  float eps = 0.f;
  explicit operator bool() const { return weight != nullptr; }
};

// One matmul of a batch: out (M, N) = x (M, K) · Wᵀ, or out += with accumulate (a residual add
// fused into the projection that feeds it); x first normalised when `norm` is set.
struct MatmulJob {
  MatmulJob() = default;
  MatmulJob(float* out_, const float* x_, int64_t M_, const LinearWeight* w_, InputNorm norm_ = {},
            bool accumulate_ = false)
      : out(out_), x(x_), M(M_), w(w_), norm(norm_), accumulate(accumulate_) {}
  float* out = nullptr;
  const float* x = nullptr;
  int64_t M = 0;
  const LinearWeight* w = nullptr;
  InputNorm norm;
  bool accumulate = false;
};

// A strided copy of F32 activations, converting to out_dtype (F32 or BF16, rounded to
// nearest-even): out[t, h, c] = in[t, h, c] for t < n_tokens, h < n_heads, c < cols. A head
// stride of 0 on the input broadcasts one row to every head. The model's data movement
// (splitting [c_kv | k_pe], writing the KV cache, concatenating) goes through it.
struct CopyParams {
  void* out = nullptr;
  int64_t out_token_stride = 0, out_head_stride = 0;
  DType out_dtype = DType::F32;
  const float* in = nullptr;
  int64_t in_token_stride = 0, in_head_stride = 0;
  int64_t n_tokens = 0;
  int n_heads = 1, cols = 0;
  // When set, input token t goes to output token out_token_index[t] (device memory) instead
  // of t: appending to a KV cache at a position the host does not bake into the launch.
  const int32_t* out_token_index = nullptr;
};

// The routed experts of one MoE layer as the backend computes them. `prepared` is the
// backend's own form (the CUDA backend: device arrays of every expert's weight and scale
// pointers), made once by Ops::prepare_experts after the weights are placed.
struct ExpertWeights {
  const LinearWeight* gate_proj = nullptr;  // (moe_intermediate, hidden)
  const LinearWeight* up_proj = nullptr;    // (moe_intermediate, hidden)
  const LinearWeight* down_proj = nullptr;  // (hidden, moe_intermediate)
};
struct ExpertSet {
  std::vector<ExpertWeights> experts;
  std::shared_ptr<const void> prepared;
};

// One row's token choice for Ops::sample: the engine's SamplingParams without the penalties
// (applied to the logits before, or off) plus the uniform number that draws the token. Rows
// live in device memory as raw bytes, so a replayed decode graph reads values copied in anew.
struct SampleRow {
  float temperature = 0.0f;  // >= 0; 0 = greedy argmax (ties -> lowest id), the rest ignored
  int32_t top_k = 0;         // keep the k most likely tokens; 0 (or >= vocab) = off
  float top_p = 1.0f;        // in (0, 1]: the smallest most-likely set with mass >= top_p; 1 = off
  float min_p = 0.0f;        // in [0, 1]: keep tokens with p >= min_p * p_max; 0 = off
  double u = 0.0;            // in [0, 1): the point of the inverse CDF that picks the token
};

enum class ScoringFunc : uint8_t { Softmax, Sigmoid };

// DeepSeekMoE routing for one layer: scores = score_fn(logits); experts are chosen by
// score + bias (bias may be null), restricted to the best `topk_group` of `n_group` groups;
// the routing weights are the unbiased scores of the chosen experts, optionally normalised,
// times routed_scaling_factor.
struct MoeGateParams {
  ScoringFunc scoring = ScoringFunc::Sigmoid;
  int n_experts = 0, top_k = 0, n_group = 1, topk_group = 1;
  // Group rank: sum of the top-2 biased scores in the group (V3 noaux_tc) or the maximum
  // score (V2 group_limited_greedy).
  bool group_by_top2_sum = true;
  bool norm_topk_prob = false;
  float routed_scaling_factor = 1.0f;
};

// One AdamW update (Ops::adamw_step), with g = grad · grad_scale:
//   w ← w · decay;  m ← m + (1 − β1)(g − m);  v ← β2 v + (1 − β2) g²;
//   w ← w − step_size · m / (sqrt(v) / bc2_sqrt + eps)
// where decay = 1 − lr · weight_decay (1 for parameters without decay), step_size = lr / (1 − β1^t)
// and bc2_sqrt = sqrt(1 − β2^t).
struct AdamWStepParams {
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  float decay = 1.0f, step_size = 0.0f, bc2_sqrt = 1.0f, grad_scale = 1.0f;
};
// One tensor of Ops::adamw_steps: its value, moments and gradient, and its own parameters.
struct AdamWTensor {
  Tensor* w = nullptr;
  Tensor* m = nullptr;
  Tensor* v = nullptr;
  const Tensor* grad = nullptr;
  AdamWStepParams p;
};

// The per-group M, N, K of Ops::matmul_stacked's operands (out may be the output or its gradient),
// checked: w (groups·N, K), x (groups·M, K), out (groups·M, N); a clear error otherwise.
struct StackedDims {
  int64_t M = 0, N = 0, K = 0;
};
StackedDims stacked_dims(const char* op, const Tensor& out, const Tensor& x, const Tensor& w, int64_t groups);

class Ops {
 public:
  virtual ~Ops() = default;
  virtual const char* name() const = 0;
  virtual Device device() const = 0;

  // ---- memory
  // Uninitialised storage on this backend's device.
  virtual Tensor empty(Shape shape, DType dtype = DType::F32) = 0;
  // A copy of a host tensor on this backend's device (the CPU backend returns `host` itself).
  virtual Tensor upload(const Tensor& host) = 0;
  // Copies `t` (on this backend's device) into host memory of t.nbytes() bytes; waits for it.
  virtual void download(void* host, const Tensor& t) = 0;
  virtual void copy(const CopyParams& p) = 0;
  // n bytes from src to dst, both on this backend's device (they must not overlap).
  virtual void copy_bytes(void* dst, const void* src, size_t n) = 0;
  // Random weights made where they live (benchmarks of models too large to write to disk):
  // element i = scale · u_i, u_i ∈ [-1, 1) from a counter-based hash of (seed, i), then rounded
  // to t's dtype (F32, BF16, F16, F8_E4M3) — the same values on every backend.
  virtual void fill_random(Tensor& t, uint64_t seed, float scale) = 0;
  // Bytes free on the device now; -1 for host memory, which is not budgeted.
  virtual int64_t free_memory() { return -1; }
  // Makes the backend's form of a layer's experts (after their weights are placed).
  virtual void prepare_experts(ExpertSet& set) { (void)set; }

  // ---- compute
  // out (T, H) = table[ids[t]] as F32; ids (T) I32, already validated against the vocabulary.
  virtual void embedding(Tensor& out, const Tensor& ids, const Tensor& table) = 0;
  // out (M, N) = x / rms(x) * weight;  weight (N) F32. out may alias x.
  virtual void rmsnorm(Tensor& out, const Tensor& x, const Tensor& weight, float eps) = 0;
  // x (M, N) += y, then h = x / rms(x) * weight: a block's residual add fused with the norm
  // that follows it (the next block's input norm, or the final norm).
  virtual void add_rmsnorm(Tensor& x, const Tensor& y, Tensor& h, const Tensor& weight, float eps) = 0;
  // out (M, N) = x (M, K) · Wᵀ, fp32 accumulation, block-wise dequantization for FP8.
  virtual void matmul(Tensor& out, const Tensor& x, const LinearWeight& w) = 0;
  // Independent matmuls run together: in decode, the small projections that share an input
  // (q_a and kv_a, gate and up, the chosen experts) fill all threads in one parallel region
  // instead of each waking them for a few microseconds of work.
  virtual void matmul_batch(const std::vector<MatmulJob>& jobs) = 0;
  virtual void rope(const RopeParams& p) = 0;
  virtual void mla_cache_append(const MlaAppendParams& p) = 0;
  // cos, sin (T, rope_dim/2) = cos/sin(position[t] · inv_freq[i]) · attention_factor, computed
  // in double: the tables of Rope::tables for positions (T) I32 and inv_freq (rope_dim/2) F64.
  virtual void rope_tables(Tensor& cos, Tensor& sin, const Tensor& positions, const Tensor& inv_freq,
                           float attention_factor) = 0;
  virtual void attention(const AttentionParams& p) = 0;
  // Independent attentions (the sequences of a batched step, each over its own cache), as
  // attention() on each; the CUDA backend runs a decode step's latent ones in one launch.
  virtual void attention_batch(const std::vector<AttentionParams>& ps) {
    for (const AttentionParams& p : ps) attention(p);
  }
  // w (H, N, K): one unquantized weight per head.
  virtual void matmul_per_head(const HeadMatmulParams& p, const Tensor& w) = 0;
  // out (M, N) = silu(gate) * up; out may alias gate.
  virtual void silu_mul(Tensor& out, const Tensor& gate, const Tensor& up) = 0;
  // x += y (same shape)
  virtual void add(Tensor& x, const Tensor& y) = 0;
  // weights (T, top_k) F32 and experts (T, top_k) I32 from router logits (T, n_experts) F32.
  virtual void moe_gate(Tensor& weights, Tensor& experts, const Tensor& logits, const float* bias,
                        const MoeGateParams& p) = 0;
  // Routing as one op: logits = x · routerᵀ (x RMS-normalised by `norm` first, when given), then
  // moe_gate's choice from them. xn (optional): set to the normalised rows ((T, D) F32) where
  // the backend makes them on the way; returns whether it did (the experts then take xn
  // without a norm, else x with it). This composition (a matmul with the input norm, then
  // moe_gate) is the reference and makes none; the CUDA backend runs a decode step's tokens
  // through one kernel that does.
  virtual bool moe_route(Tensor& weights, Tensor& experts, Tensor* xn, const Tensor& x, const LinearWeight& router,
                         InputNorm norm, const float* bias, const MoeGateParams& p) {
    (void)xn;
    const int64_t T = x.dim(0);
    Tensor logits = empty({T, int64_t(p.n_experts)});
    matmul_batch({{logits.f32(), x.f32(), T, &router, norm}});
    moe_gate(weights, experts, logits, bias, p);
    return false;
  }
  // The routed experts of a MoE layer: out (T, D) = Σ_k weights[t, k] · SwiGLU_e(x[t]) with
  // e = experts[t, k]; x (T, D), weights (T, top_k) F32, experts (T, top_k) I32 from moe_gate.
  // shared (optional, one expert prepared like `set`, e.g. the shared experts): out += its
  // SwiGLU of x as well, as swiglu(out, x, *shared, true) would, in the same launches on CUDA.
  // accumulate: out += the sum instead of out = (the residual add); norm: x normalised first.
  // out may be x itself (the residual stream): x is read whole before out is written.
  virtual void moe_experts(Tensor& out, const Tensor& x, const Tensor& weights, const Tensor& experts,
                           const ExpertSet& set, const ExpertSet* shared = nullptr, bool accumulate = false,
                           InputNorm norm = {}) = 0;
  // out (T, D) = (or += with accumulate) down(silu(x · gateᵀ) * (x · upᵀ)) for the one expert
  // of `set` (prepared like routed experts): the shared experts or a dense MLP as two fused
  // passes (gate and up together, then down) instead of five ops. For decode-sized T. norm and
  // aliasing as for moe_experts.
  virtual void swiglu(Tensor& out, const Tensor& x, const ExpertSet& set, bool accumulate, InputNorm norm = {}) = 0;
  // Whether moe_experts of n_tokens tokens (top_k of n_experts each) runs its `shared` expert in
  // the routed experts' launches beyond the decode-sized batches that swiglu's fused form is for
  // (the model passes it to moe_experts then, instead of a separate SwiGLU).
  virtual bool moe_takes_shared(int64_t n_tokens, int top_k, int n_experts) const {
    (void)n_tokens, (void)top_k, (void)n_experts;
    return false;
  }
  // ids (B) I32 = the index of each row's largest logit (the first on ties); logits (B, V).
  virtual void argmax(Tensor& ids, const Tensor& logits) = 0;
  // ids (B) I32 = one token per row of logits (B, V) F32 (finite or -inf, one finite at least),
  // chosen like the engine's Sampler after penalties: l = (l - max) / temperature, then top-k,
  // top-p, min-p (ranks: larger l first, the lower id on ties), then the token where u * mass
  // falls on the CDF of the kept tokens in ascending id order. params (B * sizeof(SampleRow))
  // U8 on this backend's device. The CUDA op picks the CPU's token unless u lies within
  // rounding (~1e-12) of a CDF boundary.
  virtual void sample(Tensor& ids, const Tensor& logits, const Tensor& params) = 0;

  // ---- backward passes (training). Each differentiates the forward op of its name, with the
  // forward's argument order after the gradients it produces; the math of each is written beside
  // the CPU reference in src/ops/cpu/backward.h. Input gradients are written, parameter gradients
  // (dtable, dweight, dw) accumulate. All F32 on this backend's device.
  virtual void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) = 0;
  virtual void rmsnorm_backward(Tensor& dx, Tensor& dweight, const Tensor& dout, const Tensor& x,
                                const Tensor& weight, float eps) = 0;
  // dx may be undefined (not wanted); w is the F32 master weight (N, K).
  virtual void matmul_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x, const Tensor& w) = 0;
  virtual void silu_mul_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate,
                                 const Tensor& up) = 0;
  // In place on p.x (p.out null): the inverse rotation (rope with p.inverse toggled).
  virtual void rope_backward(const RopeParams& p) = 0;
  // F32 q/k/v in separate buffers, no block table or device key count (the training layout).
  // n_seq sequences of equal length stacked row after row, each attending only to its own keys:
  // sequence b's queries, outputs and their gradients (strides of q and out) start at row b·n_q,
  // its keys, values and their gradients (strides of k and v) at row b·n_kv.
  virtual void attention_backward(float* dq, float* dk, float* dv, const float* dout, const AttentionParams& p,
                                  int64_t n_seq) = 0;
  virtual void moe_gate_backward(Tensor& dlogits, const Tensor& dweights, const Tensor& logits,
                                 const Tensor& experts, const MoeGateParams& p) = 0;
  // Row helpers of the MoE's gather/scatter in training: x (M, N) row m *= s[m] (s (M) F32);
  // out (M) = the dot products of the rows of a and b (M, N), summed in double on the CPU.
  virtual void mul_rows(Tensor& x, const Tensor& s) = 0;
  virtual void row_dot(Tensor& out, const Tensor& a, const Tensor& b) = 0;
  // out[t, c] = Σ_h in[t, h, c] over p.n_heads heads in order, for t < p.n_tokens, c < p.cols,
  // with CopyParams' strides (out F32; out_head_stride and out_token_index unused): the gradient
  // of a row that a copy broadcast to every head (MLA's shared k_pe). This loop is the reference.
  virtual void sum_heads(const CopyParams& p);
  // out (T, N) = (or += with accumulate) Σ_k in[pos[t, k]] over the k < K of pos (T, K) I32 with
  // pos[t, k] >= 0 (< 0: nothing), added in order of k: the rows of in (P, N) a token's top-k
  // routed experts produced, summed back into the token's row without atomics (the same sum on
  // every run). F32. This loop is the reference.
  virtual void gather_sum_rows(Tensor& out, const Tensor& in, const Tensor& pos, bool accumulate);
  // Many products of one shape at once: for g < groups, rows [g·M, (g+1)·M) of out (groups·M, N) =
  // rows [g·M, (g+1)·M) of x (groups·M, K) · W_gᵀ, W_g rows [g·N, (g+1)·N) of w (groups·N, K): the
  // routed experts of a MoE layer in training, their matrices stacked and each expert's tokens
  // padded to one count. All F32 (mixed precision as matmul_backward). This loop is the reference.
  virtual void matmul_stacked(Tensor& out, const Tensor& x, const Tensor& w, int64_t groups);
  // The backward of matmul_stacked, as matmul_backward per group: dx written (may be undefined),
  // dw (groups·N, K) accumulated.
  virtual void matmul_stacked_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x, const Tensor& w,
                                       int64_t groups);
  // losses (T) and dlogits (T, V) (which may be logits itself) from logits and targets (T) I32
  // (< 0: no target, zero loss and gradient), the gradient scaled by dloss.
  virtual void cross_entropy_backward(Tensor& losses, Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                      float dloss) = 0;

  // ---- the optimizer's passes (training), so that the update runs where the weights are.
  // One AdamW update of an F32 parameter w with its moments m and v (same size) from gradient
  // grad · p.grad_scale — train/optimizer.h writes the formula; every value is F32 math, the same
  // expression on every backend.
  virtual void adamw_step(Tensor& w, Tensor& m, Tensor& v, const Tensor& grad, const AdamWStepParams& p) = 0;
  // adamw_step for each of many tensors (a model's parameters; decay differs between matrices and
  // the rest). This loop is the reference; the CUDA backend updates them all in one launch.
  virtual void adamw_steps(const std::vector<AdamWTensor>& ts) {
    for (const AdamWTensor& t : ts) {
      FATHOM_CHECK(t.w && t.m && t.v && t.grad, "adamw_steps: a tensor is missing.");
      adamw_step(*t.w, *t.m, *t.v, *t.grad, t.p);
    }
  }
  // Σ x² over every element of the F32 tensors, accumulated in double (the global gradient norm).
  virtual double sum_squares(const std::vector<Tensor>& xs) = 0;
  // Every byte of t set to zero.
  virtual void zero(Tensor& t) = 0;
  // zero() of each tensor (a model's gradients); the CUDA backend clears them in one launch.
  virtual void zero_many(const std::vector<Tensor*>& ts) {
    for (Tensor* t : ts) zero(*t);
  }

  // ---- mixed precision (training). On: the matrix products of F32 tensors (matmul with F32
  // weights, matmul_backward, attention_backward) run on tensor cores from inputs rounded to bf16
  // (or to TF32, which is more precise, where the library picks it), accumulating in F32; weights, activations, gradients and the optimizer stay F32 in
  // memory. Off (the default): true F32 products. Returns whether the backend did as asked: the
  // CPU backend only computes in F32. (CUDA: process-wide, every CUDA backend of the process.)
  virtual bool set_bf16_matmuls(bool enabled) { return !enabled; }

  // ---- FP8 x FP8 products (DeepSeek-V3's recipe, docs/fp8-gemm.md). On: a matmul with an FP8
  // weight (128x128 blocks) over more than kFp8ActivationRows rows (prefill) quantizes its input
  // rows in 1x128 tiles as it goes and multiplies e4m3 by e4m3, promoting every 128 of K into fp32
  // (CPU: ops/cpu/fp8_gemm.h, the reference, slow; CUDA: fp8_gemm.cu, wgmma on Hopper). The
  // activations' quantization costs a few percent of relative error per product. Off (the
  // default): weight-only FP8, the weight dequantized inside the matmul, exact. Fewer rows
  // (decode) stay weight-only: there the weight's bytes, not the multiplies, bound the time.
  // Returns whether the backend did as asked. Per backend.
  virtual bool set_fp8_activations(bool enabled) { return !enabled; }

  // ---- graphs: a decode step recorded once and replayed (CUDA graphs). Between capture_begin
  // and capture_end ops are recorded, not run; they may not synchronize or read host memory
  // other than pinned buffers from pinned_host(). Backends without graphs return false from
  // capture_begin and the caller runs eagerly.
  virtual bool capture_begin() { return false; }
  virtual std::shared_ptr<void> capture_end() { return nullptr; }
  virtual void replay(const std::shared_ptr<void>& graph) { (void)graph; }
  // Host memory the device can copy from/to asynchronously (inside graphs too).
  virtual Tensor pinned_host(Shape shape, DType dtype) { return Tensor::empty(std::move(shape), dtype); }
  // Asynchronous copies between a pinned_host tensor and a device tensor of the same size;
  // synchronize() waits for them.
  virtual void copy_from_host(Tensor& dst, const Tensor& pinned_src) { download(dst.data(), pinned_src); }
  virtual void copy_to_host(Tensor& pinned_dst, const Tensor& src) { download(pinned_dst.data(), src); }
  virtual void synchronize() {}
};

// The CPU backend (reference semantics; multithreaded, SIMD matmul).
std::unique_ptr<Ops> make_cpu_ops();

// The CUDA backend on GPU `device` (src/ops/cuda); throws fathom::Error when the build has no
// CUDA or the machine no usable GPU.
std::unique_ptr<Ops> make_cuda_ops(int device = 0);
// Whether make_cuda_ops can succeed: a CUDA build on a machine with a GPU (never throws).
bool cuda_available();

}  // namespace fathom
