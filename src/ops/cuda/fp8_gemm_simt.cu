// The FP8 GEMM's portable half: the 1x128 activation quantization (quantize_1x128, bit for bit the
// CPU's) and the SIMT kernel that computes the recipe's product on any GPU (fp8_gemm takes it
// where the Hopper kernel of fp8_gemm.cu cannot run) and serves as the GPU-side oracle.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"
#include "ops/cuda/fp8_gemm.cuh"

namespace fathom::cuda {
namespace {

// ---- 1x128 activation quantization

__device__ inline uint8_t to_e4m3(float v) {
  return uint8_t(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// One warp per (row, tile): lane l holds values 4l .. 4l+3 of the tile.
__global__ void quantize_1x128_kernel(uint8_t* __restrict__ q, float* __restrict__ scales, const float* __restrict__ x,
                                      int64_t M, int64_t K, int64_t Kt) {
  pdl_wait();
  const int64_t tile = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = int(threadIdx.x % 32);
  if (tile >= M * Kt) return;
  const int64_t m = tile / Kt, k0 = (tile % Kt) * kTile + 4 * lane;
  const float* row = x + m * K;
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  if (K % 4 == 0 && k0 + 4 <= K && reinterpret_cast<uintptr_t>(row + k0) % 16 == 0) {
    const float4 f = *reinterpret_cast<const float4*>(row + k0);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else {
    for (int i = 0; i < 4; ++i)
      if (k0 + i < K) v[i] = row[k0 + i];
  }
  float amax = 0.f;
  for (int i = 0; i < 4; ++i) amax = fmaxf(amax, fabsf(v[i]));
  amax = warp_max(amax);
  const float s = amax > 0.f ? __fdiv_rn(amax, 448.0f) : 1.0f;
  if (lane == 0) scales[tile] = s;  // (m, t) row-major is the tile index
  for (int i = 0; i < 4; ++i)
    if (k0 + i < K) q[m * K + k0 + i] = to_e4m3(__fdiv_rn(v[i], s));
}

// ---- the SIMT kernel: 64 x 64 tiles, 256 threads of 4 x 4 outputs, K staged 32 at a time as floats

constexpr int kSimtK = 32;

__global__ void __launch_bounds__(256) fp8_gemm_simt_kernel(const Fp8GemmArgs p) {
  pdl_wait();
  __shared__ float As[kSimtTile][kSimtK + 1], Bs[kSimtTile][kSimtK + 1];
  const int tx = int(threadIdx.x % 16), ty = int(threadIdx.x / 16);
  const int64_t n0 = int64_t(blockIdx.x) * kSimtTile, m0 = int64_t(blockIdx.y) * kSimtTile;
  if (p.layout == int(Fp8Layout::Masked) && m0 >= p.count[blockIdx.z]) return;
  // the 128-row tile this 64-row tile belongs to names the group (contiguous layout)
  TileRows t = tile_rows(p, m0 - m0 % kTile, int(blockIdx.z));
  t.row0 += m0 % kTile;
  t.rows = lmin(kSimtTile, t.rows - m0 % kTile);
  if (t.rows <= 0) return;
  if (t.g < 0) return write_padding_tile(p, m0, n0, kSimtTile, int(threadIdx.x), 256);
  const uint8_t* b = p.b + int64_t(t.g) * p.N * p.K;
  const float* sb = p.b_scale + (int64_t(t.g) * p.NB + n0 / kTile) * p.Kt;
  float total[4][4] = {}, part[4][4] = {};
  for (int64_t kt = 0; kt < p.Kt; ++kt) {
    if (p.promote)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) part[i][j] = 0.f;
    for (int64_t kc = kt * kTile; kc < lmin(p.K, (kt + 1) * kTile); kc += kSimtK) {
      for (int i = int(threadIdx.x); i < kSimtTile * kSimtK; i += 256) {
        const int r = i / kSimtK, k = i % kSimtK;
        const int64_t kk = kc + k;
        const bool kin = kk < p.K && kk < (kt + 1) * kTile;
        As[r][k] = kin && r < t.rows ? fp8_to_f32(p.a[(t.row0 + r) * p.K + kk]) : 0.f;
        Bs[r][k] = kin && n0 + r < p.N ? fp8_to_f32(b[(n0 + r) * p.K + kk]) : 0.f;
      }
      __syncthreads();
      for (int k = 0; k < kSimtK; ++k)
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) part[i][j] += As[ty + 16 * i][k] * Bs[tx + 16 * j][k];
      __syncthreads();
    }
    if (p.promote)
      for (int i = 0; i < 4; ++i) {
        const int r = ty + 16 * i;
        const float sa = r < t.rows ? p.a_scale[(t.row0 + r) * p.Kt + kt] : 0.f;
        for (int j = 0; j < 4; ++j) total[i][j] += part[i][j] * (sa * sb[kt]);
      }
  }
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    if (r >= t.rows) continue;
    const float s = p.promote ? 1.f : p.a_scale[(t.row0 + r) * p.Kt] * sb[0];
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col >= p.N) continue;
      const float v = row_value(p, t.g, t.row0 + r, p.promote ? total[i][j] : part[i][j] * s);
      if (p.out_bf16) {
        static_cast<__nv_bfloat16*>(p.out)[(t.row0 + r) * p.ldo + col] = __float2bfloat16_rn(v);
      } else {
        float& o = static_cast<float*>(p.out)[(t.row0 + r) * p.ldo + col];
        o = p.accumulate ? o + v : v;
      }
    }
  }
}

}  // namespace

void quantize_1x128(uint8_t* q, float* scales, const float* x, int64_t M, int64_t K, Stream stream) {
  FATHOM_CHECK(M >= 0 && K > 0, "quantize_1x128: ", M, " x ", K, " is not a matrix");
  if (M == 0) return;
  FATHOM_ASSERT(q && scales && x, "quantize_1x128 with a null pointer");
  const int64_t Kt = ceil_div(K, kTile), warps = M * Kt;
  FATHOM_CHECK(ceil_div(warps, 8) < (int64_t(1) << 31), "quantize_1x128: ", M, " x ", K, " is too large for one launch");
  launch_kernel(quantize_1x128_kernel, dim3(unsigned(ceil_div(warps, 8))), 256, 0, as_cuda(stream), q, scales, x, M, K,
                Kt);
  check_launch("quantize_1x128_kernel");
}

void launch_fp8_gemm_simt(const Fp8GemmArgs& args, unsigned gz, cudaStream_t stream) {
  launch_kernel(fp8_gemm_simt_kernel, dim3(unsigned(ceil_div(args.N, kSimtTile)), unsigned(ceil_div(args.M, kSimtTile)), gz),
                256, 0, stream, args);
  check_launch("fp8_gemm_simt_kernel");
}

}  // namespace fathom::cuda
