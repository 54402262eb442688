// Training's attention on the flash attention kernels (flash_attention.cu, its backward in
// flash_attention_backward.cu) when the matmuls are in bf16 mixed precision (Ops::
// set_bf16_matmuls): training keeps Q, K, V and their gradients in F32 with its own head dims
// (DeepSeek-V3's 192/128; the 0.5B benchmark model's 96/64), while the Hopper kernels take bf16
// at (64, 64), (128, 128) or (192, 128). So each call rounds the heads to bf16 into a scratch copy
// zero-padded to the next of those shapes — zeros in the padded dims of Q and K leave every
// score unchanged, zeros in V's give output dims of zero that are dropped —, runs the kernel over
// the n_seq equal-length sequences at once (cu_seqlens of equal steps) and writes the F32 result
// back at the caller's strides. The backward has no forward outputs to read (Ops::
// attention_backward takes none), so it runs the forward again for out and the log-sum-exp
// first: FlashAttention's backward recomputes P from them, never stores it. The products are
// bf16's (the mode's promise); the softmax, the log-sum-exp and every gradient's accumulation
// are fp32. Against the materialized-scores GEMM path (attention_gemm.cu) this keeps the scores
// out of memory: at T = 2,048 and 4 sequences that path's softmax kernels alone were ~19% of the
// 0.5B model's step (bench/RESULTS.md, bench_train).
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>

#include "core/error.h"
#include "ops/cuda/cublas_util.cuh"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/head_rows.cuh"
#include "ops/flash_attention.h"

namespace fathom::cuda {
namespace {

// rows_to_bf16_kernel<float> (head_rows.cuh) without a block table, 8 dims a thread (two 16-byte
// loads, one 16-byte store): d and dp multiples of 8, src 16-byte aligned with strides of whole
// 4-float units.
__global__ void pad_to_bf16_x8_kernel(uint4* __restrict__ dst, const float* __restrict__ src, int64_t ts, int64_t hs,
                                      int64_t rows, int heads, int d, int dp) {
  pdl_wait();
  const int g8 = dp / 8;
  const int64_t n = rows * heads * g8;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const auto [r, h, g] = row_head_col(i, heads, g8);
    const int k = g * 8;
    uint4 o = make_uint4(0, 0, 0, 0);
    if (k < d) {
      const float4* s4 = reinterpret_cast<const float4*>(src + r * ts + int64_t(h) * hs + k);
      const float4 a = s4[0], b = s4[1];
      auto pack = [](float lo, float hi) { return uint32_t(f32_to_bf16_bits(lo)) | uint32_t(f32_to_bf16_bits(hi)) << 16; };
      o = make_uint4(pack(a.x, a.y), pack(a.z, a.w), pack(b.x, b.y), pack(b.z, b.w));
    }
    dst[i] = o;
  }
}

// rows_to_f32_kernel<float> (head_rows.cuh) 4 dims a thread (16-byte load and store): d and dp
// multiples of 4, dst 16-byte aligned with strides of whole 4-float units.
__global__ void unpad_x4_kernel(float* __restrict__ dst, int64_t ts, int64_t hs, const float4* __restrict__ src,
                                int64_t rows, int heads, int d, int dp) {
  pdl_wait();
  const int g4 = d / 4;
  const int64_t n = rows * heads * g4;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const auto [r, h, g] = row_head_col(i, heads, g4);
    const int k = g * 4;
    *reinterpret_cast<float4*>(dst + r * ts + int64_t(h) * hs + k) = src[((r * heads + h) * dp + k) / 4];
  }
}

// cu_q = [0, lq, 2·lq, ...], cu_k = [0, lk, ...]: n_seq sequences of equal lengths.
__global__ void equal_seqlens_kernel(int32_t* __restrict__ cu_q, int32_t* __restrict__ cu_k, int n_seq, int32_t lq,
                                     int32_t lk) {
  pdl_wait();
  for (int b = threadIdx.x; b <= n_seq; b += blockDim.x) cu_q[b] = b * lq, cu_k[b] = b * lk;
}

// src's heads rounded to bf16 and zero-padded from d to dp dims, 8 dims a thread where the shapes
// and alignment allow.
void pad_to_bf16(uint16_t* dst, const float* src, int64_t ts, int64_t hs, int64_t rows, int heads, int d, int dp,
                 cudaStream_t s) {
  if (d % 8 == 0 && dp % 8 == 0 && aligned16(src) && ts % 4 == 0 && hs % 4 == 0)
    launch_kernel(pad_to_bf16_x8_kernel, grid_blocks_per_sm(rows * heads * dp / 8, 256), 256, 0, s, reinterpret_cast<uint4*>(dst),
                  src, ts, hs, rows, heads, d, dp);
  else
    launch_kernel(rows_to_bf16_kernel<float>, grid_blocks_per_sm(rows * heads * dp, 256), 256, 0, s, dst, src, ts, hs,
                  static_cast<const int32_t*>(nullptr), 1, rows, heads, d, dp);
}

// rows_to_f32_kernel<float> (the gradients) 4 dims a thread where the shapes and alignment allow.
void unpad_f32(float* dst, int64_t ts, int64_t hs, const float* src, int64_t rows, int heads, int d, int dp,
               cudaStream_t s) {
  if (d % 4 == 0 && dp % 4 == 0 && aligned16(dst) && ts % 4 == 0 && hs % 4 == 0)
    launch_kernel(unpad_x4_kernel, grid_blocks_per_sm(rows * heads * d / 4, 256), 256, 0, s, dst, ts, hs,
                  reinterpret_cast<const float4*>(src), rows, heads, d, dp);
  else
    launch_kernel(rows_to_f32_kernel<float>, grid_blocks_per_sm(rows * heads * d, 256), 256, 0, s, dst, ts, hs, src, rows, heads, d, dp);
}

// The kernel shape the heads are padded to, or {0, 0} when none holds them.
std::pair<int, int> padded_dims(int d_qk, int d_v) {
  if (d_qk <= 64 && d_v <= 64) return {64, 64};
  if (d_qk <= 128 && d_v <= 128) return {128, 128};
  if (d_qk <= 192 && d_v <= 128) return {192, 128};
  return {0, 0};
}

// The scratch of one call: bf16 Q, K, V and out padded, the sequence tables, the log-sum-exp.
struct Padded {
  int dqk = 0, dv = 0;
  int64_t rows_q = 0, rows_k = 0;
  uint16_t *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr;
  int32_t *cu_q = nullptr, *cu_k = nullptr;
  float* lse = nullptr;
  size_t bytes = 0;  // the scratch it all takes
  FlashAttentionParams f;
};

size_t up256(size_t b) { return (b + 255) / 256 * 256; }

// The scratch's layout at `base` (null: only its size, in Padded::bytes).
Padded carve(const AttentionParams& p, int64_t n_seq, uint8_t* base) {
  Padded a;
  std::tie(a.dqk, a.dv) = padded_dims(p.d_qk, p.d_v);
  a.rows_q = n_seq * p.n_q, a.rows_k = n_seq * p.n_kv;
  const int H = p.n_q_heads, G = p.n_kv_heads;
  auto take = [&](size_t bytes) {
    uint8_t* at = base ? base + a.bytes : nullptr;
    a.bytes += up256(bytes);
    return at;
  };
  a.q = reinterpret_cast<uint16_t*>(take(size_t(a.rows_q * H * a.dqk) * 2));
  a.k = reinterpret_cast<uint16_t*>(take(size_t(a.rows_k * G * a.dqk) * 2));
  a.v = reinterpret_cast<uint16_t*>(take(size_t(a.rows_k * G * a.dv) * 2));
  a.out = reinterpret_cast<uint16_t*>(take(size_t(a.rows_q * H * a.dv) * 2));
  a.cu_q = reinterpret_cast<int32_t*>(take(size_t(n_seq + 1) * 4));
  a.cu_k = reinterpret_cast<int32_t*>(take(size_t(n_seq + 1) * 4));
  a.lse = reinterpret_cast<float*>(take(size_t(a.rows_q * H) * 4));
  return a;
}

// Lays out the scratch at `base`, fills the padded Q, K, V and the tables, and runs the forward
// (out and the log-sum-exp into the scratch).
Padded forward_padded(const AttentionParams& p, int64_t n_seq, uint8_t* base, cudaStream_t s) {
  Padded a = carve(p, n_seq, base);
  const int H = p.n_q_heads, G = p.n_kv_heads;
  const auto* kf = static_cast<const float*>(p.k);
  const auto* vf = static_cast<const float*>(p.v);
  pad_to_bf16(a.q, p.q, p.q_token_stride, p.q_head_stride, a.rows_q, H, p.d_qk, a.dqk, s);
  pad_to_bf16(a.k, kf, p.k_token_stride, p.k_head_stride, a.rows_k, G, p.d_qk, a.dqk, s);
  pad_to_bf16(a.v, vf, p.v_token_stride, p.v_head_stride, a.rows_k, G, p.d_v, a.dv, s);
  launch_kernel(equal_seqlens_kernel, 1u, 256, 0, s, a.cu_q, a.cu_k, int(n_seq), int32_t(p.n_q), int32_t(p.n_kv));
  check_launch("attention (training, flash: the bf16 copies)");
  FlashAttentionParams& f = a.f;
  f.q = a.q, f.k = a.k, f.v = a.v, f.out = a.out, f.lse = a.lse;
  f.q_token_stride = int64_t(H) * a.dqk, f.q_head_stride = a.dqk;
  f.k_token_stride = int64_t(G) * a.dqk, f.k_head_stride = a.dqk;
  f.v_token_stride = int64_t(G) * a.dv, f.v_head_stride = a.dv;
  f.out_token_stride = int64_t(H) * a.dv, f.out_head_stride = a.dv;
  f.cu_seqlens_q = a.cu_q, f.cu_seqlens_k = a.cu_k;
  f.batch = int(n_seq), f.total_q = a.rows_q, f.total_k = a.rows_k;
  f.max_seqlen_q = int(p.n_q), f.max_seqlen_k = int(p.n_kv);
  f.n_heads = H, f.n_kv_heads = G, f.d_qk = a.dqk, f.d_v = a.dv;
  f.scale = p.scale, f.causal = p.causal;
  flash_attention_forward(f, s, FlashKernel::Wgmma);
  return a;
}

}  // namespace

bool train_flash_takes(const AttentionParams& p, int64_t n_seq) {
  if (!bf16_gemms() || p.kv_dtype != DType::F32 || p.block_table || p.kv_len || p.k == p.v) return false;
  if (p.n_q < kTrainFlashMinQueries || p.n_q != p.n_kv || p.q_pos0 != 0) return false;  // self-attention windows
  if (n_seq < 1 || n_seq > 65535 || n_seq * p.n_q > INT32_MAX || p.n_q_heads > 65535) return false;
  const auto [dqk, dv] = padded_dims(p.d_qk, p.d_v);
  if (dqk == 0) return false;
  FlashAttentionParams f;  // the kernel's own conditions on shapes and the device (scratch is aligned)
  alignas(16) uint16_t dummy[8] = {};
  f.q = f.k = f.v = f.out = dummy;
  f.d_qk = dqk, f.d_v = dv, f.total_k = 1, f.max_seqlen_q = int(p.n_q);
  return flash_wgmma_refusal(f) == nullptr;
}

void attention_train_flash(const AttentionParams& p, int64_t n_seq, Stream stream) {
  FATHOM_CHECK(train_flash_takes(p, n_seq), "attention (training, flash): the call does not fit the flash kernels.");
  const cudaStream_t s = as_cuda(stream);
  StreamScratch work(carve(p, n_seq, nullptr).bytes, s, "attention (training, flash)");
  const Padded a = forward_padded(p, n_seq, work.as<uint8_t>(), s);
  launch_kernel(rows_to_f32_kernel<uint16_t>, grid_blocks_per_sm(a.rows_q * p.n_q_heads * p.d_v, 256), 256, 0, s, p.out,
                p.out_token_stride, p.out_head_stride, static_cast<const uint16_t*>(a.out), a.rows_q, p.n_q_heads,
                p.d_v, a.dv);
  check_launch("attention (training, flash: the output)");
}

void attention_backward_train_flash(float* dq, float* dk, float* dv, const float* dout, const AttentionParams& p,
                                    int64_t n_seq, Stream stream) {
  FATHOM_CHECK(train_flash_takes(p, n_seq),
               "attention_backward (flash): the call does not fit the flash kernels (bf16 matmuls on, F32 "
               "self-attention of at least ", kTrainFlashMinQueries, " queries, head dims within 192/128, sm_90a).");
  const cudaStream_t s = as_cuda(stream);
  const int H = p.n_q_heads, G = p.n_kv_heads;
  const auto [dqk_p, dv_p] = padded_dims(p.d_qk, p.d_v);
  const int64_t rq = n_seq * p.n_q, rk = n_seq * p.n_kv;
  const size_t fwd = carve(p, n_seq, nullptr).bytes;
  const size_t b_dout = up256(size_t(rq * H * dv_p) * 2), b_dq = up256(size_t(rq * H * dqk_p) * 4),
               b_dk = up256(size_t(rk * G * dqk_p) * 4), b_dv = up256(size_t(rk * G * dv_p) * 4);
  StreamScratch work(fwd + b_dout + b_dq + b_dk + b_dv, s, "attention_backward (flash)");
  uint8_t* base = work.as<uint8_t>();
  const Padded a = forward_padded(p, n_seq, base, s);  // out and the log-sum-exp, recomputed
  auto* g_out = reinterpret_cast<uint16_t*>(base + fwd);
  auto* g_dq = reinterpret_cast<float*>(base + fwd + b_dout);
  auto* g_dk = reinterpret_cast<float*>(base + fwd + b_dout + b_dq);
  auto* g_dv = reinterpret_cast<float*>(base + fwd + b_dout + b_dq + b_dk);
  pad_to_bf16(g_out, dout, p.out_token_stride, p.out_head_stride, rq, H, p.d_v, dv_p, s);
  check_launch("attention_backward (flash: the output gradient)");
  FlashAttentionGrads g;
  g.dout = g_out, g.dout_token_stride = int64_t(H) * dv_p, g.dout_head_stride = dv_p;
  g.dq = g_dq, g.dk = g_dk, g.dv = g_dv;
  g.deterministic = true;  // (training resumes bit for bit: no gradient summed by atomics)
  flash_attention_backward(a.f, g, s, FlashKernel::Wgmma);
  unpad_f32(dq, p.q_token_stride, p.q_head_stride, g_dq, rq, H, p.d_qk, dqk_p, s);
  unpad_f32(dk, p.k_token_stride, p.k_head_stride, g_dk, rk, G, p.d_qk, dqk_p, s);
  unpad_f32(dv, p.v_token_stride, p.v_head_stride, g_dv, rk, G, p.d_v, dv_p, s);
  check_launch("attention_backward (flash: the gradients)");
}

}  // namespace fathom::cuda
