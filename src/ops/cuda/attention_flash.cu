// The model's attention (AttentionParams: F32 queries, F32 or BF16 keys and values, a paged cache)
// on the flash attention kernel (flash_attention.cu) when the call is a prefill in bf16 precision:
// the queries converted to bf16, the keys and values gathered (through the block table when
// paged) into contiguous bf16 rows, one sequence's flash attention (causal aligned to the bottom
// right: the keys are those up to the last query's position), the output converted back to F32.
// The gathers cost two passes over the keys; the attention is quadratic in them.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/head_rows.cuh"

namespace fathom::cuda {
namespace {

std::atomic<int> g_flash_prefill{-1};  // -1: FATHOM_FLASH_PREFILL decides (default on)

__global__ void seqlens_kernel(int32_t* cu, int32_t n_q, int32_t n_kv) {
  cu[0] = 0, cu[1] = n_q, cu[2] = 0, cu[3] = n_kv;
}

}  // namespace

void set_flash_prefill(bool enabled) { g_flash_prefill = enabled ? 1 : 0; }

bool flash_prefill_takes(const AttentionParams& p) {
  int on = g_flash_prefill.load();
  if (on < 0) {
    const char* e = std::getenv("FATHOM_FLASH_PREFILL");
    on = e && !std::strcmp(e, "0") ? 0 : 1;
  }
  if (!on || p.kv_dtype != DType::BF16 || p.kv_len || p.n_q < kFlashPrefillMinQueries) return false;
  if (p.causal && p.q_pos0 + p.n_q > p.n_kv) return false;
  if (p.n_q > INT32_MAX || p.n_kv > INT32_MAX) return false;
  FlashAttentionParams f;
  f.d_qk = p.d_qk, f.d_v = p.d_v, f.total_k = 1;  // the kernel's own conditions on shapes and the device
  return flash_wgmma_refusal(f) == nullptr;
}

void attention_flash(const AttentionParams& p, Stream stream) {
  const cudaStream_t s = as_cuda(stream);
  const int64_t n_kv = p.causal ? p.q_pos0 + p.n_q : p.n_kv;  // keys past the last query are seen by none
  const int H = p.n_q_heads, G = p.n_kv_heads;
  const int64_t q_elems = p.n_q * H * p.d_qk, k_elems = n_kv * G * p.d_qk, v_elems = n_kv * G * p.d_v,
                o_elems = p.n_q * H * p.d_v;
  auto up16 = [](int64_t e) { return (e * 2 + 255) / 256 * 256; };
  StreamScratch work(size_t(up16(q_elems) + up16(k_elems) + up16(v_elems) + up16(o_elems) + 256), s, "attention (flash)");
  uint8_t* base = work.as<uint8_t>();
  uint16_t* q = reinterpret_cast<uint16_t*>(base);
  uint16_t* k = reinterpret_cast<uint16_t*>(base + up16(q_elems));
  uint16_t* v = reinterpret_cast<uint16_t*>(base + up16(q_elems) + up16(k_elems));
  uint16_t* o = reinterpret_cast<uint16_t*>(base + up16(q_elems) + up16(k_elems) + up16(v_elems));
  int32_t* cu = reinterpret_cast<int32_t*>(base + up16(q_elems) + up16(k_elems) + up16(v_elems) + up16(o_elems));
  launch_kernel(rows_to_bf16_kernel<float>, dim3(grid_blocks_per_sm(q_elems, 256)), dim3(256), 0, s, q, p.q,
                p.q_token_stride, p.q_head_stride, static_cast<const int32_t*>(nullptr), 1, p.n_q, H, p.d_qk, p.d_qk);
  const auto* kb = static_cast<const uint16_t*>(p.k);
  const auto* vb = static_cast<const uint16_t*>(p.v);
  launch_kernel(rows_to_bf16_kernel<uint16_t>, dim3(grid_blocks_per_sm(k_elems, 256)), dim3(256), 0, s, k, kb,
                p.k_token_stride, p.k_head_stride, p.block_table, std::max(1, p.block_size), n_kv, G, p.d_qk, p.d_qk);
  launch_kernel(rows_to_bf16_kernel<uint16_t>, dim3(grid_blocks_per_sm(v_elems, 256)), dim3(256), 0, s, v, vb,
                p.v_token_stride, p.v_head_stride, p.block_table, std::max(1, p.block_size), n_kv, G, p.d_v, p.d_v);
  launch_kernel(seqlens_kernel, dim3(1), dim3(1), 0, s, cu, int32_t(p.n_q), int32_t(n_kv));
  check_launch("attention (flash): gathers");
  FlashAttentionParams f;
  f.q = q, f.k = k, f.v = v, f.out = o;
  f.q_token_stride = int64_t(H) * p.d_qk, f.q_head_stride = p.d_qk;
  f.k_token_stride = int64_t(G) * p.d_qk, f.k_head_stride = p.d_qk;
  f.v_token_stride = int64_t(G) * p.d_v, f.v_head_stride = p.d_v;
  f.out_token_stride = int64_t(H) * p.d_v, f.out_head_stride = p.d_v;
  f.cu_seqlens_q = cu, f.cu_seqlens_k = cu + 2;
  f.batch = 1, f.total_q = p.n_q, f.total_k = n_kv, f.max_seqlen_q = int(p.n_q), f.max_seqlen_k = int(n_kv);
  f.n_heads = H, f.n_kv_heads = G, f.d_qk = p.d_qk, f.d_v = p.d_v, f.scale = p.scale, f.causal = p.causal;
  flash_attention_forward(f, stream, FlashKernel::Wgmma);
  launch_kernel(rows_to_f32_kernel<uint16_t>, dim3(grid_blocks_per_sm(o_elems, 256)), dim3(256), 0, s, p.out,
                p.out_token_stride, p.out_head_stride, static_cast<const uint16_t*>(o), p.n_q, H, p.d_v, p.d_v);
  check_launch("attention (flash): output");
}

}  // namespace fathom::cuda
