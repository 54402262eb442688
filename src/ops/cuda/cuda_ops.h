// The CUDA backend's kernels, as plain launchers over device pointers (launcher-only header:
// no CUDA types here, so model and test code compile without CUDA headers). Activations are
// F32 like the CPU backend's; weights and the KV cache may be BF16/F16/F8. Every launcher
// enqueues its work on the stream it is given, never synchronizes the host, checks its
// preconditions (fathom::Error sentences) and reports a CUDA failure as fathom::Error.
//
// The Ops backend that the model calls (make_cuda_ops in ops.h, cuda_backend.cu) is assembled
// from these launchers; each kernel family lives in its own .cu:
//   runtime.cu      device discovery, memory figures, error checks
//   elementwise.cu  embedding, fill_random, rmsnorm, silu_mul, add, copy, rope, rope_tables,
//                   mla_cache_append, argmax
//   matmul.cu       dense matmul: GEMV for M <= 8 (decode), tiled SIMT GEMM for larger M
//   attention.cu    split-KV flash attention (GQA/MQA/absorbed MLA, causal, paged, BF16 KV)
//   moe.cu          routing (moe_gate) and the routed experts (gather path)
//   moe_grouped.cu  the routed experts for large batches (sorted by expert, tiled GEMMs)
//   fp8_gemm.cu     FP8 x FP8 block-scaled GEMM (DeepSeek-V3's recipe) on Hopper (wgmma, TMA)
//   fp8_gemm_simt.cu  its SIMT kernel for other GPUs, the 1x128 activation quantization
//   flash_attention.cu  bf16 flash attention of packed variable-length batches (FA3 on Hopper)
//   hopper.cu       the sm_90a probe and TMA tensor maps (hopper.cuh: mbarriers, TMA, wgmma)
//   sample.cu       token sampling: temperature, top-k, top-p, min-p, the draw (Ops::sample)
//   backward.cu     the training passes' backward kernels
//   optimizer.cu    AdamW and the gradient norm on the device (training)
//
// Built only when CMake finds nvcc (FATHOM_HAVE_CUDA).
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>
#include <string>

#include "core/dtype.h"
#include "ops/flash_attention.h"
#include "ops/ops.h"

namespace fathom::cuda {

// A cudaStream_t, opaque here; nullptr is the legacy default stream.
using Stream = void*;

// Waits for all work queued on the current device, on every stream: for tests and benchmarks that
// call the launchers below on the legacy stream (nullptr) beside an Ops backend, whose own stream
// does not synchronize with it.
void device_synchronize();

// Number of usable CUDA devices; 0 when there is no driver or no GPU (never throws).
int device_count();
// "NVIDIA H200 (sm_90, 132 SMs, 143771 MiB)"
std::string device_name(int device);

// Device memory of the current device, in bytes (cudaMemGetInfo). Memory cached by the
// stream-ordered pool of a CudaOps backend counts as used.
struct MemoryInfo {
  int64_t free = 0;
  int64_t total = 0;
};
MemoryInfo memory_info();

// Benchmarks only (bench_cuda_decode --repeat): every op of the kinds in `mask` is launched
// twice, the second launch redoing the first's work (values that accumulate grow, nothing else
// changes), so a decode step's time grows by what those ops cost inside the step — the
// measurement by repetition that needs no profiler. 0 (the default) turns it off.
enum RepeatKind : int { kRepeatGemv = 1, kRepeatAttention = 2, kRepeatGate = 4, kRepeatExperts = 8 };
void set_repeat(int mask);
int repeats(RepeatKind kind);  // 2 when kind is in the mask, else 1

// Which kernels stream the weights of decode's memory-bound matmuls and experts (M <= 8 rows,
// and the grouped experts' 8-row tiles) for 16-bit and FP8 weights: the SIMT GEMV (gemv.cuh), the
// tensor-core one (mma_gemv.cuh), or Auto, the default — each where it measured faster on the
// H200 (bench/RESULTS.md, 2026-11-30 and 2026-12-01): tensor cores for the grouped experts of
// two tokens and more and for the dense matmuls of 3 rows and more (FP8 weights: 2), SIMT for
// one token's experts and the dense GEMVs below those rows. FATHOM_GEMV=auto|simt|mma sets it at start;
// tests and benchmarks switch it per run.
enum class GemvKind { Simt, TensorCores, Auto };
void set_gemv_kind(GemvKind k);
GemvKind gemv_kind();
// The grouped experts' tensor-core small tiles (moe_grouped.cu, batched decode): ThreeBlocks —
// each warp one weight unit in flight, three blocks a SM — or Ahead — the next unit in flight
// too, two blocks a SM (measured slower on the H200: bench/RESULTS.md). Auto (the default)
// takes FATHOM_GROUPED_FORM=3x1|ahead, else ThreeBlocks. Tests and benchmarks switch it per run.
enum class GroupedForm { Auto, Ahead, ThreeBlocks };
void set_grouped_form(GroupedForm f);
// One token's FP8 experts: gate and up on the tensor cores (moe.cu's
// mma_expert_gate_up_tiles_kernel), each 16-row tile's K split over 1, 2 or 4 warps, or the SIMT
// per-pair kernel (0). -1 (the default): FATHOM_EXPERT_TILES=0|1|2|4 if set, else the split that
// fills the GPU once (moe.cu). Only where the GEMV kind is not forced to SIMT.
void set_token_expert_tiles(int splits);

// ---- elementwise.cu

// out (T, H) f32 = table[ids[t]] converted from `dtype` (F32, BF16, F16); ids (T) I32.
void embedding(float* out, const int32_t* ids, int64_t n_tokens, const void* table, DType dtype, int64_t H,
               Stream stream);
// out (n) in dtype (F32, BF16, F16, F8_E4M3) = scale * random_uniform(seed, i) (core/random_fill.h)
// rounded like core's from_f32: the same bits as CpuOps::fill_random.
void fill_random(void* out, DType dtype, int64_t n, uint64_t seed, float scale, Stream stream);
// out (M, N) = x / rms(x) * w, w (N) f32; one block per row, fp32 sum of squares. out may alias x.
void rmsnorm(float* out, const float* x, const float* w, int64_t M, int64_t N, float eps, Stream stream);
// out (n) = silu(gate) * up; out may alias gate.
void silu_mul(float* out, const float* gate, const float* up, int64_t n, Stream stream);
// x (n) += y
void add(float* x, const float* y, int64_t n, Stream stream);
// x (M, N) += y, then out = x / rms(x) * w: the residual add and the next norm in one pass.
void add_rmsnorm(float* x, const float* y, float* out, const float* w, int64_t M, int64_t N, float eps, Stream stream);
// CopyParams (ops.h): 3-D strided f32 -> F32 or BF16 (round to nearest-even, like core's
// f32_to_bf16), optionally to the output tokens out_token_index[t] (device memory). Input and
// output must not overlap.
void copy(const CopyParams& p, Stream stream);
// RopeParams (ops.h): interleaved or halves rotation of a slice of every head, in place or
// into p.out.
void rope(const RopeParams& p, Stream stream);
// MlaAppendParams (ops.h): the absorbed-MLA cache rows [rmsnorm(c_kv) * w | rope(k_pe)] in F32
// or BF16, one block per token (replaces rope + copy + rmsnorm + two copies).
void mla_cache_append(const MlaAppendParams& p, Stream stream);
// The checks rope() and mla_cache_append() make, for a launcher that runs them in its own
// launch (GemvSide below); false when there is nothing to do.
bool rope_checked(const RopeParams& p);
bool mla_append_checked(const MlaAppendParams& p);
// cos, sin (T, half) = cos/sin(positions[t] * inv_freq[i]) * attention_factor, in double like
// the CPU; positions (T) I32, inv_freq (half) F64.
void rope_tables(float* cos, float* sin, const int32_t* positions, const double* inv_freq, int64_t T, int64_t half,
                 float attention_factor, Stream stream);
// ids (B) = the index of the largest of each row of logits (B, V); the first one on ties.
void argmax(int32_t* ids, const float* logits, int64_t B, int64_t V, Stream stream);

// ---- matmul.cu

// A batch of dense matmuls with strided rows:
//   out[b][m][n] = sum_k x[b][m][k] * W[b][n][k]     b < batch, m < M, n < N, k < K
// where row m of x in batch b starts at x + b*x_batch_stride + m*ldx (likewise out), and W[b]
// is (N, K) contiguous at w + b*w_batch_stride elements. W is F32, BF16, F16 or F8_E4M3; for
// F8 (batch 1 only) element (n, k) is multiplied by scale_inv[n / block][k / block], the scales
// being (ceil(N/block), ceil(K/block)) F32. fp32 accumulation. x and out must not overlap.
struct MatmulParams {
  float* out = nullptr;  // (batch, M, N) with the strides below, in floats
  int64_t ldo = 0, out_batch_stride = 0;
  const float* x = nullptr;  // (batch, M, K)
  int64_t ldx = 0, x_batch_stride = 0;
  const void* w = nullptr;  // (batch, N, K) in w_dtype
  DType w_dtype = DType::F32;
  int64_t w_batch_stride = 0;       // in elements
  const float* scale_inv = nullptr;  // F8_E4M3 only
  int64_t block = 128;
  int64_t M = 0, N = 0, K = 0;
  int batch = 1;
  // Optional RMSNorm of the x rows first (InputNorm in ops.h): weight (K) and eps; batch 1.
  const float* norm = nullptr;
  float eps = 0.f;
  bool accumulate = false;  // out += instead of out =
  // FP8 weight (128 blocks), more than kFp8ActivationRows rows, rows contiguous, no batch: x
  // quantized 1x128 into a work space and the FP8 x FP8 product (fp8_gemm) instead of W
  // dequantized in the tiled GEMM (Ops::set_fp8_activations).
  bool fp8_activations = false;
};
// Small ops a GEMV launch may run in spare blocks of its grid, one kernel boundary less each
// (the q_pe RoPE and the latent-cache append ride in MLA's W_UK launch when decoding). They must
// read nothing the matmul writes and write nothing it reads; when the matmul is not a GEMV they
// are launched after it.
struct GemvSide {
  const RopeParams* rope = nullptr;
  const MlaAppendParams* append = nullptr;
};
// M <= 8: a GEMV that streams W once with 16-byte loads; larger M: a tiled SIMT GEMM that
// dequantizes W while loading its tiles.
void matmul(const MatmulParams& p, Stream stream, const GemvSide& side = {});
// Several matmuls in order; runs of GEMVs (M <= 8) of one dtype and the same M share a launch.
void matmul_batch(const MatmulParams* ps, int n, Stream stream);

// ---- attention.cu

// AttentionParams (ops.h) exactly: strided q/k/v (element strides), GQA mapping, causal with
// q_pos0, F32 or BF16 keys/values, optional block table. d_qk <= 1024 (padded to a multiple of
// 4 it must fit in shared memory: 576 does) and d_v <= 512. When one pass over the keys would
// leave SMs idle (decode), the keys are split over blocks and a second kernel merges the partial
// softmax results; the work space comes from the stream-ordered pool (cudaMallocAsync).
void attention(const AttentionParams& p, Stream stream);
// Several independent attentions (Ops::attention_batch): the latent ones of a decode step in one
// launch and one merge, others one call each.
void attention_batch(const std::vector<AttentionParams>& ps, Stream stream);
// Whether attention() may use the tensor-core latent kernel (default true); benchmarks turn it
// off to time the general kernel on the same shape.
void set_latent_attention(bool enabled);
// Once per device: lets the attention kernels use the device's shared memory. attention() calls
// it itself; call it before capturing a graph, where attribute changes do not belong.
void attention_setup();
// (attention_flash.cu) attention() hands a prefill in bf16 precision — BF16 keys and values (the
// bf16 KV cache), at least kFlashPrefillMinQueries queries, no device key count, head dims the
// Hopper flash kernel takes, an sm_90a device — to that kernel (flash_prefill_takes), converting
// the F32 queries and gathering the keys to bf16 first. set_flash_prefill(false) (or
// FATHOM_FLASH_PREFILL=0) keeps such calls on the kernels below, for comparisons.
constexpr int64_t kFlashPrefillMinQueries = 128;
void set_flash_prefill(bool enabled);
bool flash_prefill_takes(const AttentionParams& p);
void attention_flash(const AttentionParams& p, Stream stream);

// ---- flash_attention.cu

// FlashAttentionParams (src/ops/flash_attention.h) on the device: out (bf16) and lse of packed
// variable-length sequences, causal or not, GQA/MQA. Auto takes the Hopper kernel (wgmma, TMA)
// when flash_wgmma_refusal(p) is null, else the SIMT fallback (any GPU, any head dims <= 256);
// Wgmma insists (an error saying why it cannot), Simt forces the fallback.
enum class FlashKernel { Auto, Wgmma, Simt };
void flash_attention_forward(const FlashAttentionParams& p, Stream stream, FlashKernel kernel = FlashKernel::Auto);
// Why the Hopper kernel cannot take p, or null: head dims (64, 64), (128, 128) or (192, 128);
// 16-byte aligned tensors and strides; an sm_90a device and build.
const char* flash_wgmma_refusal(const FlashAttentionParams& p);
// Once per device, before any graph capture: the sm_90a probe and the kernels' shared memory.
void flash_attention_setup();
// (flash_attention_backward.cu) dq, dk, dv (FlashAttentionGrads: fp32, contiguous, overwritten)
// from dout and the forward's out and lse (p.out, p.lse); deterministic (no atomics). The Hopper
// kernels under the same conditions as the forward's, else the SIMT ones.
void flash_attention_backward(const FlashAttentionParams& p, const FlashAttentionGrads& g, Stream stream,
                              FlashKernel kernel = FlashKernel::Auto);

// ---- moe.cu

// MoeGateParams (ops.h), one block per token, the same choice as CpuOps::moe_gate:
// weights (T, top_k) F32, experts (T, top_k) I32 from logits (T, n_experts) F32; bias
// (n_experts) F32 on the device or null. n_experts <= 1024.
void moe_gate(float* weights, int32_t* experts, const float* logits, const float* bias, int64_t n_tokens,
              const MoeGateParams& p, Stream stream);

// Ops::moe_route in one kernel for decode-sized batches (moe_router_fits): per token, x's row
// RMS-normalised (norm: the weight, or null for none; xn, optional: the normalised rows out),
// the router's logits (router (n_experts, hidden) BF16 or F32), then moe_gate's choice.
bool moe_router_fits(int64_t n_tokens, int64_t hidden, DType router, int n_experts);
void moe_router_gate(float* weights, int32_t* experts, float* xn, const float* x, const void* router, DType router_dtype,
                     const float* norm, float eps, int64_t n_tokens, int64_t hidden, const float* bias,
                     const MoeGateParams& p, Stream stream);

// One routed expert as the kernels see it (an array of these lives in device memory).
struct ExpertPointers {
  const void* gate = nullptr;  // (inter, hidden)
  const void* up = nullptr;    // (inter, hidden)
  const void* down = nullptr;  // (hidden, inter)
  const float* gate_scale = nullptr;  // F8_E4M3 only: (ceil(inter/block), ceil(hidden/block))
  const float* up_scale = nullptr;
  const float* down_scale = nullptr;  // (ceil(hidden/block), ceil(inter/block))
};
// The routed experts of one layer: out (T, hidden) = sum_k weights[t, k] * SwiGLU_e(x[t]),
// e = experts[t, k], everything resolved on the device (no host synchronization). Every expert
// shares dtype and shapes.
struct MoeExpertsParams {
  float* out = nullptr;              // (T, hidden)
  const float* x = nullptr;          // (T, hidden)
  const float* weights = nullptr;    // (T, top_k)
  const int32_t* experts = nullptr;  // (T, top_k)
  const ExpertPointers* table = nullptr;  // (n_experts), device memory
  int64_t n_tokens = 0, hidden = 0, inter = 0, block = 128;
  int n_experts = 0, top_k = 0;
  DType dtype = DType::BF16;
  bool aligned16 = false;  // every weight pointer 16-byte aligned (vectorized loads allowed)
  // A dense SwiGLU (shared experts, a dense MLP) through the same kernels: experts and weights
  // null, top_k 1, every token uses expert 0 with weight 1. accumulate: out += instead of out =.
  bool accumulate = false;  // for routed experts too: out may then be x (read whole before out is written)
  // Routed experts only, optional: one more expert every token uses with weight 1 (the shared
  // experts), of its own intermediate size, in the same launches.
  bool has_shared = false;
  ExpertPointers shared;
  const ExpertPointers* shared_table = nullptr;  // the same in device memory
  int64_t shared_inter = 0;
  // Optional RMSNorm of the x rows first (InputNorm in ops.h): weight (hidden) and eps.
  const float* norm = nullptr;
  float eps = 0.f;
};
void moe_experts(const MoeExpertsParams& p, Stream stream);
// Whether a batch of n_tokens (top_k of n_experts each) runs in the grouped small tiles, which
// take a shared expert in the same launches (Ops::moe_takes_shared).
bool moe_small_tiles(int64_t n_tokens, int top_k, int n_experts);

// ---- fp8_gemm.cu: DeepSeek-V3's FP8 GEMM recipe (the CPU reference and its statement:
// src/ops/cpu/fp8_gemm.h; docs/fp8-gemm.md)

// q (M, K) e4m3 codes and scales (M, ceil(K / 128)) F32 from x (M, K) F32, bit for bit the CPU's
// quantize_1x128: per row and 128-wide tile s = max|x| / 448 (1 for an all-zero tile), q =
// e4m3(x / s) rounded to nearest even. One warp per tile. A non-finite x gives NaN codes (the CPU
// version refuses it; here it propagates into the product).
void quantize_1x128(uint8_t* q, float* scales, const float* x, int64_t M, int64_t K, Stream stream);

// The layouts of fp8_gemm's rows (DeepGEMM's three).
enum class Fp8Layout {
  Dense,       // A (M, K) against one B (N, K); out (M, N)
  Contiguous,  // MoE prefill/training: A's rows sorted by expert, expert[m] the expert of row m, -1 a
               // padding row (output 0); every 128-row tile of A holds one expert's rows (and padding):
               // pad each expert's group to a multiple of 128. A row naming another expert than its
               // tile's first row gets NaN. B (groups, N, K) stacked.
  Masked,      // MoE decode: A (groups, M, K), group g's first count[g] rows are real; out (groups, M, N),
               // rows past count[g] left as they are. B (groups, N, K) stacked.
};
// Which kernel: the Hopper one (wgmma on e4m3 from shared memory, TMA loads on mbarriers, two or
// three warpgroups a block) needs an sm_90a device and K % 16 == 0; the
// SIMT one runs anywhere (sm_80: A100) and is the GPU-side oracle. Auto takes wgmma where it can.
enum class Fp8GemmKernel { Auto, Wgmma, Simt };
struct Fp8GemmParams {
  void* out = nullptr;  // (rows, N) with row stride ldo, BF16 or F32 (out_dtype)
  DType out_dtype = DType::BF16;
  int64_t ldo = 0;      // 0: N
  bool accumulate = false;  // F32 only: out += product
  const uint8_t* a = nullptr;   // (rows, K) e4m3, rows = M (Dense, Contiguous) or groups * M (Masked)
  const float* a_scale = nullptr;  // (rows, ceil(K / 128)) F32: quantize_1x128's scales
  const uint8_t* b = nullptr;   // (groups, N, K) e4m3
  const float* b_scale = nullptr;  // (groups, ceil(N / 128), ceil(K / 128)) F32: 128x128 blocks
  int64_t M = 0, N = 0, K = 0;
  int groups = 1;
  Fp8Layout layout = Fp8Layout::Dense;
  const int32_t* expert = nullptr;  // Contiguous: (M) I32, device memory
  const int32_t* count = nullptr;   // Masked: (groups) I32, device memory
  // true (the recipe): each 128-wide K tile's sum leaves the tensor cores' accumulator and is
  // scaled into an fp32 one. false, for contrast only: one accumulator over all of K, scaled at
  // the end by the first tile's scales — the same product only when the scales do not vary along K.
  bool promote = true;
  Fp8GemmKernel kernel = Fp8GemmKernel::Auto;
};
// out = the recipe's product (fp8_gemm in ops/cpu/fp8_gemm.h) in the chosen layout.
void fp8_gemm(const Fp8GemmParams& p, Stream stream);
// Whether Auto takes the wgmma kernel on the current device (an sm_90a kernel image and a
// compute capability 9.0 device). The first call runs a probe kernel and synchronizes: make it
// (fp8_gemm_setup) before any graph capture.
bool fp8_gemm_wgmma_available();
// The probe and the wgmma kernels' shared-memory limits, for the current device, outside any
// graph capture (CudaOps does it when made).
void fp8_gemm_setup();

// ---- sample.cu

// ids (B) = the token each row of logits (B, V) F32 chooses under rows[b] (device memory):
// select_token's choice (src/ops/cpu/sample.h) with weights in double, so the same token as the
// CPU unless u lies within rounding of a CDF boundary. Work space from the stream-ordered pool
// (12 bytes per logit). B <= 65535.
void sample(int32_t* ids, const float* logits, const SampleRow* rows, int64_t B, int64_t V, Stream stream);

// ---- backward passes (backward.cu): the CUDA side of Ops::*_backward, F32 device pointers
void embedding_backward(float* dtable, const float* dout, const int32_t* ids, int64_t T, int64_t H, int64_t V,
                        Stream stream);
void rmsnorm_backward(float* dx, float* dweight, const float* dout, const float* x, const float* w, int64_t M,
                      int64_t N, float eps, Stream stream);
void silu_mul_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t n,
                       Stream stream);
void cross_entropy_backward(float* losses, float* dlogits, const float* logits, const int32_t* targets, int64_t T,
                            int64_t V, float dloss, Stream stream);
void moe_gate_backward(float* dlogits, const float* dweights, const float* logits, const int32_t* experts, int64_t T,
                       const MoeGateParams& p, Stream stream);
// n_seq sequences of equal length stacked row after row (attention_backward.cu).
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const AttentionParams& p, int64_t n_seq,
                        Stream stream);
// Which kernels attention_backward runs: Auto (the default) takes the GEMM path when two score
// matrices of one head fit in its scratch limit, else the tiled kernels; the others force one
// set, for tests and bench_train (a forced GEMM path that does not fit is an error).
// Flash: the flash attention kernels in bf16 (attention_train_flash.cu), which Auto takes
// whenever train_flash_takes.
enum class AttentionBackwardPath { Auto, Gemm, Tiled, Rows, Flash };
void set_attention_backward_path(AttentionBackwardPath path);
// The GEMM path (attention_gemm.cu): scores materialized, the products as cuBLAS SGEMMs,
// as many KV heads at a time as fit in the scratch limit (kAttentionGemmScratchDefault, 512 MiB; tests lower it to run one head
// at a time).
constexpr int64_t kAttentionGemmScratchDefault = int64_t(512) << 20;
void set_attention_gemm_scratch_limit(int64_t bytes);
bool attention_backward_gemm_fits(const AttentionParams& p);
// The forward on the same path, which attention() takes when attention_gemm_forward_takes(p):
// F32 keys and values in their own buffers (no block table, no device key count), at least
// kAttentionGemmForwardMinQueries queries (below, at 512, it measured slower than the kernel;
// tests lower it), one head's scores within the scratch limit.
constexpr int64_t kAttentionGemmForwardMinQueries = 1024;
void set_attention_gemm_forward_min_queries(int64_t n);
bool attention_gemm_forward_takes(const AttentionParams& p);
void attention_forward_gemm(const AttentionParams& p, Stream stream);
void attention_backward_gemm(float* dq, float* dk, float* dv, const float* dout, const AttentionParams& p,
                             int64_t n_seq, Stream stream);
// Training's attention on the flash kernels (attention_train_flash.cu), taken by attention() and
// attention_backward() when train_flash_takes: bf16 matmuls on (set_bf16_gemms), F32 Q/K/V in
// separate buffers without a block table or device key count, n_seq sequences each a
// self-attention window of n_q = n_kv >= kTrainFlashMinQueries queries (q_pos0 0), head dims
// within (192, 128) — padded with zeros to the kernels' (64, 64), (128, 128) or (192, 128) — and
// the Hopper kernels available.
constexpr int64_t kTrainFlashMinQueries = 128;
bool train_flash_takes(const AttentionParams& p, int64_t n_seq);
void attention_train_flash(const AttentionParams& p, int64_t n_seq, Stream stream);
void attention_backward_train_flash(float* dq, float* dk, float* dv, const float* dout, const AttentionParams& p,
                                    int64_t n_seq, Stream stream);
void mul_rows(float* x, const float* s, int64_t M, int64_t N, Stream stream);
void row_dot(float* out, const float* a, const float* b, int64_t M, int64_t N, Stream stream);
// Ops::sum_heads: out[t, c] (token stride out_ts) = Σ_h in[t·in_ts + h·in_hs + c], h in order.
void sum_heads(float* out, int64_t out_ts, const float* in, int64_t in_ts, int64_t in_hs, int64_t n, int heads,
               int cols, Stream stream);
// The optimizer (optimizer.cu): one AdamW update of n F32 parameters (AdamWStepParams' formula).
void adamw_step(float* w, float* m, float* v, const float* grad, int64_t n, const AdamWStepParams& p, Stream stream);
// The same for many tensors in one launch (Ops::adamw_steps): each its pointers, size and parameters.
struct AdamWSlab {
  float* w;
  float* m;
  float* v;
  const float* g;
  int64_t n;
  AdamWStepParams p;
};
void adamw_steps(const std::vector<AdamWSlab>& slabs, Stream stream);
// Σ x² over many F32 tensors (pointers and sizes) into *out (device memory), accumulated in double
// with a fixed order: one launch over all of them and one for the block sums.
void sum_squares_many(double* out, const std::vector<std::pair<const float*, int64_t>>& xs, Stream stream);
// dx (M, K) = dout (M, N) · w (N, K) when dx is not null; dw (N, K) += doutᵀ · x (M, K). cuBLAS SGEMM.
// With groups > 1, that for each of `groups` stacked problems of one shape (Ops::
// matmul_stacked_backward), one batched call per product.
void matmul_backward(float* dx, float* dw, const float* dout, const float* x, const float* w, int64_t M, int64_t N,
                     int64_t K, Stream stream, int64_t groups = 1);
// Ops::matmul_stacked: out_g (M, N) = x_g (M, K) · w_gᵀ for `groups` stacked F32 problems, one
// batched cuBLAS call.
void matmul_stacked(float* out, const float* x, const float* w, int64_t M, int64_t N, int64_t K, int64_t groups,
                    Stream stream);
// Ops::gather_sum_rows: out (T, N) (+)= Σ_k in[pos[t, k]] for 0 <= pos < P, in order of k.
void gather_sum_rows(float* out, const float* in, const int32_t* pos, int64_t T, int64_t N, int K, int64_t P,
                     bool accumulate, Stream stream);
// Ops::zero_many: each (pointer, bytes) region set to zero, one launch.
void zero_many(const std::vector<std::pair<void*, size_t>>& regions, Stream stream);

}  // namespace fathom::cuda
