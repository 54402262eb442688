// Absorbed-MLA attention on tensor cores, in the spirit of FlashMLA: the 16 (or 128) query heads
// of a token share one latent key row [c_kv | k_pe] of 576 BF16 values, and the value is the
// row's first 512 columns. Decode therefore multiplies a 16-row query tile with 64-key tiles of
// the cache, which is exactly an m16n8k16 tensor-core MMA (mma.sync, sm_80 and later).
//
// A block (8 warps) owns 16 query rows (the heads of a token, token-major when a row tile spans
// tokens) and one chunk of keys, walked in tiles of 64 keys:
//   1. the tile's key rows are copied with cp.async (through the block table when paged; rows
//      past the keys are zero-filled), double-buffered when shared memory allows, so the next
//      tile streams in while this one is multiplied;
//   2. S = Q Kᵀ: warp w scores keys 8w..8w+7 of the tile over all 576 dims;
//   3. online softmax (FlashAttention): the row max and sum over the tile are combined across the
//      8 warps through shared memory; P = exp(S - m) goes to shared memory as BF16;
//   4. O += P V: warp w owns output dims 64w..64w+63, V read transposed from the same tile
//      (ldmatrix.trans), so the latent row is loaded once for both products.
// A decode call is short (a few tiles per block), so the block's fixed work counts as much as
// the tiles: eight warps share it, and each thread computes a key row's (or a query row's)
// address once and then issues its copies back to back. With the keys split over several
// blocks, attention.cu's merge kernel combines their partial results — or, on Hopper with 2 to 8
// chunks (a short context decoding alone), the blocks of a row tile run as one thread-block
// cluster and combine them through distributed shared memory before they exit
// (merge_in_cluster): one launch less a layer.
// Precision: the CPU reference computes in fp32, and so must this kernel (1e-4). Q and P are
// each split into a BF16 high part and a BF16 remainder (x = hi + lo to ~2^-17 relative) and
// both parts are multiplied, with fp32 accumulation: twice the tensor-core work, still far
// below the memory time, and the result matches fp32 arithmetic on the BF16 cache.
//
// FATHOM_KERNEL_EMU: the kernel alone, for scripts/kernel-emu/mla_attention_emu.cpp (which runs
// it on the CPU with its own versions of the device helpers and the warp-collective
// instructions; CI runs it as KernelEmu.MlaAttention, so the kernel is checked without a GPU);
// the host code and the inline assembly are left out then.
#ifndef FATHOM_KERNEL_EMU
#include <cuda_bf16.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#include "core/error.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/device_util.cuh"
#endif
#include "ops/cuda/attention_mla.cuh"

namespace fathom::cuda {
namespace {

constexpr int kDqk = 576, kDv = 512;
constexpr int kWarps = 8, kThreads = kWarps * 32;
// Shared-memory row strides in BF16 elements: 16-byte multiples whose 16-byte count is odd,
// so the 8 row addresses of an ldmatrix hit 8 different bank groups.
constexpr int kQs = kDqk + 8;        // Q rows
constexpr int kKs = kDqk + 8;        // key rows
constexpr int kPs = kMlaKeys + 8;    // P rows
constexpr int kDvPerWarp = kDv / kWarps;        // 64: 8 n8 tiles
constexpr int kKeysPerWarp = kMlaKeys / kWarps;  // 8: one n8 tile
static_assert(kKeysPerWarp == 8 && kDvPerWarp % 16 == 0, "the fragment layout below assumes these");
constexpr size_t kRowSmem = 4 * kMlaRows * sizeof(int64_t);  // the kernel's static per-row table

template <int STAGES>
struct MlaSmem {
  static constexpr size_t q = size_t(kMlaRows) * kQs * 2;       // one of Q hi / Q lo
  static constexpr size_t k = size_t(kMlaKeys) * kKs * 2;       // one key tile
  static constexpr size_t pp = size_t(kMlaRows) * kPs * 2;      // one of P hi / P lo
  static constexpr size_t red = size_t(2) * kWarps * kMlaRows * sizeof(float);
  static constexpr size_t bytes = 2 * q + STAGES * k + 2 * pp + red;
};


#ifndef FATHOM_KERNEL_EMU
__device__ inline void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// c (16x8 fp32) += a (16x16 BF16, row major) · b (16x8 BF16, column major)
__device__ inline void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// hi = bf16(x), lo = bf16(x - hi), two values packed low-first.
__device__ inline void split2(float a, float b, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(a - hf.x, b - hf.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// Issues the cp.async copies of keys [j0, j0 + kMlaKeys) ∩ [.., k_end) into `tile`: 8 threads
// per key row (each finds the row once, then copies 9 of its 72 16-byte pieces, the 8 threads
// together 128 contiguous bytes per instruction), 32 rows per pass.
__device__ inline void load_tile(uint16_t* tile, const uint16_t* __restrict__ kbase, const AttentionParams& p, int g,
                                 int64_t j0, int64_t k_end) {
  constexpr int kPieces = kDqk / 8, kLanes = 8, kRowsPerPass = kThreads / kLanes;
  const int sub = threadIdx.x % kLanes;
#pragma unroll
  for (int pass = 0; pass < kMlaKeys / kRowsPerPass; ++pass) {
    const int key = pass * kRowsPerPass + threadIdx.x / kLanes;
    const int64_t j = j0 + key;
    const bool valid = j < k_end;
    const uint16_t* src = kbase;  // zero fill reads nothing, but the address stays a valid one
    if (valid) {
      const int jj = int(j);  // < 2^31 keys (checked by the launcher)
      const int64_t row = p.block_table ? int64_t(p.block_table[jj / p.block_size]) * p.block_size + jj % p.block_size : j;
      src = kbase + row * p.k_token_stride + int64_t(g) * p.k_head_stride;
    }
    const uint32_t dst = smem_u32(tile + key * kKs);
#pragma unroll
    for (int m = 0; m < kPieces / kLanes; ++m) {
      const int c = sub + kLanes * m;
      cp_async16(dst + c * 16, valid ? src + c * 8 : src, valid);
    }
  }
  cp_async_commit();
}

// grid (ceil(rows / 16), n_kv_heads, n_chunks), block kThreads, MlaSmem<STAGES>::bytes.
// The key rows of the block's chunk into L2, before the wait (one bulk prefetch per run of
// rows contiguous in the cache): every row but this step's new ones was written by kernels that
// finished before the one this kernel waits for, the key count and the block table by copies
// that precede every kernel of the step, and L2 is where writes land, so a prefetched line is
// never stale; the rows are read (cp.async) after the wait, from L2 instead of memory.
__device__ inline void prefetch_chunk(const MlaLaunch& a, int g, int c) {
  const AttentionParams& p = a.p;
  const int64_t n_kv = p.kv_len ? min(int64_t(*p.kv_len), p.n_kv) : p.n_kv;
  const int64_t kb = int64_t(c) * a.chunk, ke = min(n_kv, kb + a.chunk);
  const uint16_t* base = static_cast<const uint16_t*>(p.k) + int64_t(g) * p.k_head_stride;
  const uint64_t stride = uint64_t(p.k_token_stride) * 2, row = kDqk * 2;
  for (int64_t j = kb; j < ke;) {
    int64_t end = ke, first = j;
    if (p.block_table) {
      const int64_t page = j / p.block_size;
      end = min(ke, (page + 1) * p.block_size);
      first = int64_t(p.block_table[page]) * p.block_size + j % p.block_size;
    }
    prefetch_l2(base + first * p.k_token_stride, uint64_t(end - j - 1) * stride + row);
    j = end;
  }
}

#if !defined(FATHOM_KERNEL_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// MlaLaunch::cluster_merge: the block's unnormalised output o (rows gq, gq + 8; dims 64 warp + 8i +
// 2tq + {0, 1}) and its rows' (max, sum) go to its own shared memory (`buf`, the key tiles' space,
// free by now); after a cluster barrier, block `rank` of the n combines dims [rank * per, ...) of
// every row from all n blocks' buffers (ld.shared::cluster) with the weights exp(m_c - M) / L, as
// the merge kernel would, and writes them out; a second barrier keeps each buffer alive until
// every peer has read it.
constexpr int kPo = kDv + 4;  // a row of the staged output, padded (float4-aligned rows)
__device__ inline void merge_in_cluster(const MlaLaunch& a, const float (&o)[kDvPerWarp / 8][4], const float (&m)[2],
                                        const float (&l)[2], const int64_t* row_out, float* buf) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gq = lane / 4, tq = lane % 4;
  float* po = buf;                         // (16, kPo)
  float* pml = buf + kMlaRows * kPo;       // (16, 2)
  __shared__ float wts[kMlaRows][kMlaClusterMax];
  __syncthreads();  // every warp is done with the last key tile
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int rr = gq + 8 * r;
#pragma unroll
    for (int i = 0; i < kDvPerWarp / 8; ++i) {
      const int d = kDvPerWarp * warp + 8 * i + 2 * tq;
      *reinterpret_cast<float2*>(po + rr * kPo + d) = make_float2(o[i][2 * r], o[i][2 * r + 1]);
    }
    if (warp == 0 && tq == 0) pml[2 * rr] = m[r], pml[2 * rr + 1] = l[r];
  }
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
  const int n = a.n_chunks;
  uint32_t rank = 0;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  auto remote = [](const float* local, int c) {
    uint32_t addr;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(addr) : "r"(smem_u32(local)), "r"(c));
    return addr;
  };
  if (tid < kMlaRows) {  // row tid's weights over the chunks
    float mc[kMlaClusterMax], lc[kMlaClusterMax], mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < kMlaClusterMax; ++c) {
      mc[c] = -INFINITY, lc[c] = 0.f;
      if (c < n) {
        float2 v;
        asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(remote(pml + 2 * tid, c)));
        mc[c] = v.x, lc[c] = v.y, mx = fmaxf(mx, v.x);
      }
    }
    float den = 0.f;
#pragma unroll
    for (int c = 0; c < kMlaClusterMax; ++c) den += mc[c] == -INFINITY ? 0.f : expf(mc[c] - mx) * lc[c];
    const float inv = den > 0.f ? 1.f / den : 0.f;  // no visible key: zeros, like the CPU
#pragma unroll
    for (int c = 0; c < kMlaClusterMax; ++c) wts[tid][c] = mc[c] == -INFINITY ? 0.f : expf(mc[c] - mx) * inv;
  }
  __syncthreads();
  // this block's dims: a multiple of 4 each, [d0, d1)
  const int per = (kDv / 4 + n - 1) / n * 4, d0 = int(rank) * per, d1 = min(kDv, d0 + per);
  const int quads = (d1 - d0) / 4;
  for (int idx = tid; idx < kMlaRows * quads; idx += kThreads) {
    const int row = idx / quads, d = d0 + 4 * (idx % quads);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int c = 0; c < n; ++c) {
      float4 v;
      asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                   : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                   : "r"(remote(po + row * kPo + d, c)));
      const float w = wts[row][c];
      acc.x += w * v.x, acc.y += w * v.y, acc.z += w * v.z, acc.w += w * v.w;
    }
    if (row_out[row] >= 0) {
      float* out = a.p.out + row_out[row] + d;
      out[0] = acc.x, out[1] = acc.y, out[2] = acc.z, out[3] = acc.w;
    }
  }
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
#endif

// grid (ceil(rows / 16), n_kv_heads, n_chunks), or batched (items, n_kv_heads, 1), or a uniform
// batch (n_chunks * n_seqs * row tiles, n_kv_heads, 1).
template <int STAGES>
__global__ void __launch_bounds__(kThreads) mla_attention_kernel(MlaLaunch a) {
  int tile_x = blockIdx.x, c = blockIdx.z;
  if (a.items) {  // batched: this block's sequence, row tile and key chunk
    const int4 it = a.items[blockIdx.x];
    take_seq(a, a.seqs[it.x]);
    tile_x = it.y;
    c = it.z;
  } else if (a.u.n_seqs) {  // uniform batch: (chunk, sequence, row tile) from the block index
    a.chunk = uniform_chunk(a.p.kv_len, a.p.n_kv, a.u, a.n_chunks, a.chunk);
    const int64_t per_chunk = int64_t(a.u.n_seqs) * a.u.row_tiles;
    const int64_t r = blockIdx.x % per_chunk, seq = r / a.u.row_tiles;
    c = int(blockIdx.x / per_chunk);
    tile_x = int(r % a.u.row_tiles);
    take_uniform_seq(a.p, a.part_o, a.part_ml, a.u, seq);
    // the key count was copied in before the step's first kernel (see prefetch_chunk); chunk 0
    // always runs (so that the grid waits on the kernel before it), the others only over keys
    if (c > 0 && int64_t(c) * a.chunk >= min(int64_t(*a.p.kv_len), a.p.n_kv)) return;
  }
  if (threadIdx.x == 0) prefetch_chunk(a, blockIdx.y, c);
  pdl_wait();
#ifdef FATHOM_KERNEL_EMU
  unsigned char* smem_raw = emu_smem();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
  using S = MlaSmem<STAGES>;
  uint16_t* q_hi = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* q_lo = reinterpret_cast<uint16_t*>(smem_raw + S::q);
  uint16_t* k_tiles = reinterpret_cast<uint16_t*>(smem_raw + 2 * S::q);
  uint16_t* p_hi = reinterpret_cast<uint16_t*>(smem_raw + 2 * S::q + STAGES * S::k);
  uint16_t* p_lo = reinterpret_cast<uint16_t*>(smem_raw + 2 * S::q + STAGES * S::k + S::pp);
  float* red_max = reinterpret_cast<float*>(smem_raw + 2 * S::q + STAGES * S::k + 2 * S::pp);  // (warps, 16)
  float* red_sum = red_max + kWarps * kMlaRows;

  const AttentionParams& p = a.p;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gq = lane / 4, tq = lane % 4;  // the MMA fragment's row group and column pair
  const int g = blockIdx.y;
  const int64_t row0 = int64_t(tile_x) * kMlaRows;
  const uint16_t* kbase = static_cast<const uint16_t*>(p.k);

  const int64_t n_kv = p.kv_len ? min(int64_t(*p.kv_len), p.n_kv) : p.n_kv;
  const int64_t q_pos0 = p.kv_len ? n_kv - p.n_q : p.q_pos0;
  const int64_t last_tok = int(min(row0 + kMlaRows, a.rows) - 1) / a.group;
  const int64_t k_begin = int64_t(c) * a.chunk;
  int64_t k_end = min(n_kv, k_begin + a.chunk);
  if (p.causal) k_end = min(k_end, q_pos0 + last_tok + 1);
  const int n_tiles = k_end > k_begin ? int((k_end - k_begin + kMlaKeys - 1) / kMlaKeys) : 0;

  if (n_tiles > 0) load_tile(k_tiles, kbase, p, g, k_begin, k_end);

  // Each row's token and head, once per block (divisions are dozens of instructions, and this
  // kernel is short): Q and output offsets, the chunk-partial index and the causal key limit.
  __shared__ int64_t row_q[kMlaRows], row_out[kMlaRows], row_part[kMlaRows], row_lim[kMlaRows];
  if (tid < kMlaRows) {
    const int64_t row = row0 + tid;
    const bool valid = row < a.rows;
    const int rr = int(valid ? row : a.rows - 1);  // rows < 2^31 (checked by the launcher)
    const int tok = rr / a.group, head = g * a.group + rr % a.group;
    row_q[tid] = valid ? tok * p.q_token_stride + int64_t(head) * p.q_head_stride : -1;
    row_out[tid] = valid ? tok * p.out_token_stride + int64_t(head) * p.out_head_stride : -1;
    row_part[tid] = int64_t(tok) * p.n_q_heads + head;
    row_lim[tid] = p.causal ? q_pos0 + tok + 1 : n_kv;
  }
  __syncthreads();

  // Q rows as hi/lo BF16 pairs; rows past the block's rows are zeros (their outputs are dropped).
  // Every load of the thread is issued before the first is converted: the rows then arrive in
  // one memory round trip rather than one per element.
  auto q_row = [&](int r) -> const float* { return row_q[r] >= 0 ? p.q + row_q[r] : nullptr; };
  if (a.vec_q) {
    // 16 threads per query row, 9 float4 each: the row's address is found once
    constexpr int kPerRow = kThreads / kMlaRows, kPer = (kDqk / 4) / kPerRow;
    static_assert((kDqk / 4) % kPerRow == 0, "a Q row splits evenly over its threads");
    const int r = tid / kPerRow, c0 = tid % kPerRow;
    const float* q = q_row(r);
    float4 v[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      v[i] = q ? __ldg(reinterpret_cast<const float4*>(q + 4 * (c0 + kPerRow * i))) : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = 4 * (c0 + kPerRow * i);
      uint32_t hi[2], lo[2];
      split2(v[i].x, v[i].y, hi[0], lo[0]);
      split2(v[i].z, v[i].w, hi[1], lo[1]);
      *reinterpret_cast<uint2*>(q_hi + r * kQs + d) = make_uint2(hi[0], hi[1]);
      *reinterpret_cast<uint2*>(q_lo + r * kQs + d) = make_uint2(lo[0], lo[1]);
    }
  } else {
    constexpr int kBatch = 8;
    for (int idx0 = tid; idx0 < kMlaRows * (kDqk / 2); idx0 += kBatch * kThreads) {
      float2 v[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int idx = idx0 + b * kThreads, r = idx / (kDqk / 2), d = 2 * (idx % (kDqk / 2));
        const float* q = idx < kMlaRows * (kDqk / 2) ? q_row(r) : nullptr;
        v[b] = q ? make_float2(__ldg(q + d), __ldg(q + d + 1)) : make_float2(0.f, 0.f);
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int idx = idx0 + b * kThreads, r = idx / (kDqk / 2), d = 2 * (idx % (kDqk / 2));
        if (idx >= kMlaRows * (kDqk / 2)) break;
        uint32_t hi, lo;
        split2(v[b].x, v[b].y, hi, lo);
        *reinterpret_cast<uint32_t*>(q_hi + r * kQs + d) = hi;
        *reinterpret_cast<uint32_t*>(q_lo + r * kQs + d) = lo;
      }
    }
  }

  // The two rows this thread's fragments cover: gq and gq + 8 of the tile.
  const int64_t lim[2] = {row_lim[gq], row_lim[gq + 8]};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[kDvPerWarp / 8][4];
#pragma unroll
  for (int i = 0; i < kDvPerWarp / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

  // ldmatrix row addresses: A (16x16 of Q or P); B for S: the warp's 8 key rows, four 8-dim
  // pieces = two k-steps per ldmatrix.x4; B for PV: V (keys x dims) read transposed.
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
  const int bk_key = kKeysPerWarp * warp + (lane & 7), bk_col = (lane >> 3) * 8;
  const int bv_key = (lane & 7) + ((lane >> 3) & 1) * 8, bv_col = (lane >> 4) * 8;
  const uint32_t qh_addr = smem_u32(q_hi + a_row * kQs + a_col), ql_addr = smem_u32(q_lo + a_row * kQs + a_col);
  const uint32_t ph_addr = smem_u32(p_hi + a_row * kPs + a_col), pl_addr = smem_u32(p_lo + a_row * kPs + a_col);

  for (int t = 0; t < n_tiles; ++t) {
    const int64_t j0 = k_begin + int64_t(t) * kMlaKeys;
    const uint16_t* tile = k_tiles + (STAGES == 2 ? (t & 1) : 0) * (kMlaKeys * kKs);
    cp_async_wait<0>();  // this tile's copies (the only ones in flight)
    // the tile (and, the first time, Q) is in shared memory, and with two stages every warp is
    // done with the last tile — its keys, P and the reductions — so this one barrier also frees
    // the other stage for the next tile's copies (one barrier a tile fewer than a barrier at the
    // end of each tile and another here)
    __syncthreads();
    if (STAGES == 2 && t + 1 < n_tiles)
      load_tile(k_tiles + ((t + 1) & 1) * (kMlaKeys * kKs), kbase, p, g, j0 + kMlaKeys, k_end);

    // ---- S = Q Kᵀ for keys 8*warp .. +7 of the tile; the hi and lo products accumulate apart
    // (two dependency chains of 36 MMAs instead of one of 72)
    float sh[4] = {0.f, 0.f, 0.f, 0.f}, sl[4] = {0.f, 0.f, 0.f, 0.f};
    const uint32_t k_addr = smem_u32(tile + bk_key * kKs + bk_col);
#pragma unroll 3
    for (int k0 = 0; k0 < kDqk; k0 += 32) {
      uint32_t b[4], qh0[4], ql0[4], qh1[4], ql1[4];
      ldsm_x4(b, k_addr + k0 * 2);
      ldsm_x4(qh0, qh_addr + k0 * 2);
      ldsm_x4(ql0, ql_addr + k0 * 2);
      ldsm_x4(qh1, qh_addr + (k0 + 16) * 2);
      ldsm_x4(ql1, ql_addr + (k0 + 16) * 2);
      mma_bf16(sh, qh0, b[0], b[1]);
      mma_bf16(sl, ql0, b[0], b[1]);
      mma_bf16(sh, qh1, b[2], b[3]);
      mma_bf16(sl, ql1, b[2], b[3]);
    }
    // scale and mask; s[e]: row gq + 8*(e/2), key j0 + 8*warp + 2tq + e%2
    float s[4], mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t j = j0 + kKeysPerWarp * warp + 2 * tq + (e & 1);
      const int r = e >> 1;
      s[e] = j < k_end && j < lim[r] ? (sh[e] + sl[e]) * p.scale : -INFINITY;
      mx[r] = fmaxf(mx[r], s[e]);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(kFullMask, mx[r], 2));
    }
    if (tq == 0) red_max[warp * kMlaRows + gq] = mx[0], red_max[warp * kMlaRows + gq + 8] = mx[1];
    __syncthreads();
    float m_use[2], alpha[2], sum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) tile_max = fmaxf(tile_max, red_max[w * kMlaRows + gq + 8 * r]);
      const float m_new = fmaxf(m[r], tile_max);
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: everything stays 0
      alpha[r] = expf(m[r] - m_use[r]);
      m[r] = m_new;
    }
    // P = exp(S - m) as hi/lo BF16 in shared memory, and this thread's share of the row sums
    {
      float pv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pv[e] = expf(s[e] - m_use[e >> 1]);
        sum[e >> 1] += pv[e];
      }
      const int key = kKeysPerWarp * warp + 2 * tq;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        uint32_t hi, lo;
        split2(pv[2 * r], pv[2 * r + 1], hi, lo);
        *reinterpret_cast<uint32_t*>(p_hi + (gq + 8 * r) * kPs + key) = hi;
        *reinterpret_cast<uint32_t*>(p_lo + (gq + 8 * r) * kPs + key) = lo;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      sum[r] += __shfl_xor_sync(kFullMask, sum[r], 1);
      sum[r] += __shfl_xor_sync(kFullMask, sum[r], 2);
    }
    if (tq == 0) red_sum[warp * kMlaRows + gq] = sum[0], red_sum[warp * kMlaRows + gq + 8] = sum[1];
    __syncthreads();  // P and the partial sums are visible
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) tile_sum += red_sum[w * kMlaRows + gq + 8 * r];
      l[r] = l[r] * alpha[r] + tile_sum;
    }
#pragma unroll
    for (int i = 0; i < kDvPerWarp / 8; ++i) {
      o[i][0] *= alpha[0], o[i][1] *= alpha[0];
      o[i][2] *= alpha[1], o[i][3] *= alpha[1];
    }

    // ---- O += P V for dims 64*warp .. +63: V[key][dim] is the tile read transposed
    const uint32_t v_addr = smem_u32(tile + bv_key * kKs + kDvPerWarp * warp + bv_col);
#pragma unroll
    for (int k0 = 0; k0 < kMlaKeys; k0 += 16) {
      uint32_t ph[4], pl[4];
      ldsm_x4(ph, ph_addr + k0 * 2);
      ldsm_x4(pl, pl_addr + k0 * 2);
#pragma unroll
      for (int np = 0; np < kDvPerWarp / 16; ++np) {
        uint32_t b[4];
        ldsm_x4_trans(b, v_addr + (k0 * kKs + 16 * np) * 2);
        mma_bf16(o[2 * np], ph, b[0], b[1]);
        mma_bf16(o[2 * np], pl, b[0], b[1]);
        mma_bf16(o[2 * np + 1], ph, b[2], b[3]);
        mma_bf16(o[2 * np + 1], pl, b[2], b[3]);
      }
    }
    if (STAGES == 1) {
      __syncthreads();  // every warp is done with this tile, P and the reductions
      if (t + 1 < n_tiles) load_tile(k_tiles, kbase, p, g, j0 + kMlaKeys, k_end);
    }
  }

  // ---- results: o[i][e] is row gq + 8*(e/2), dim 64*warp + 8i + 2tq + e%2
#ifndef FATHOM_KERNEL_EMU
  if (a.cluster_merge) {  // (set only for Hopper launches)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    merge_in_cluster(a, o, m, l, row_out, reinterpret_cast<float*>(k_tiles));
#endif
    return;
  }
#endif
  // a uniform batch's sequence whose keys all fell in chunk 0 (this block): the output itself,
  // and the merge leaves the sequence alone (it reads the same key count)
  const bool alone = a.n_chunks == 1 || (a.u.n_seqs && n_kv <= a.chunk);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int rr = gq + 8 * r;
    if (row_out[rr] < 0) continue;
    float* dst;
    float mult = 1.f;
    if (alone) {
      dst = p.out + row_out[rr];
      mult = l[r] > 0.f ? 1.f / l[r] : 0.f;  // no visible key: zeros, like the CPU
    } else {
      const int64_t part = int64_t(c) * p.n_q * p.n_q_heads + row_part[rr];
      dst = a.part_o + part * kDv;
      if (warp == 0 && tq == 0) a.part_ml[2 * part] = m[r], a.part_ml[2 * part + 1] = l[r];
    }
#pragma unroll
    for (int i = 0; i < kDvPerWarp / 8; ++i) {
      const int d = kDvPerWarp * warp + 8 * i + 2 * tq;
      dst[d] = o[i][2 * r] * mult;
      dst[d + 1] = o[i][2 * r + 1] * mult;
    }
  }
}

#ifndef FATHOM_KERNEL_EMU
int query_smem_optin(int device) {
  int smem_max = 0;
  check(cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  return smem_max;
}

void allow_smem(int smem_max) {
  if (MlaSmem<2>::bytes + kRowSmem <= size_t(smem_max))
    check(cudaFuncSetAttribute(mla_attention_kernel<2>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(MlaSmem<2>::bytes)),
          "attention (cudaFuncSetAttribute)");
  if (MlaSmem<1>::bytes + kRowSmem <= size_t(smem_max))
    check(cudaFuncSetAttribute(mla_attention_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(MlaSmem<1>::bytes)),
          "attention (cudaFuncSetAttribute)");
}

std::once_flag g_setup[kMaxDevices];
int g_smem_optin[kMaxDevices];

int current_device() { return thread_device(); }

#endif  // FATHOM_KERNEL_EMU
}  // namespace

#ifndef FATHOM_KERNEL_EMU
void mla_setup() {
  const int device = current_device();
  if (device < 0 || device >= kMaxDevices) return allow_smem(query_smem_optin(device));
  std::call_once(g_setup[device], [device] {
    g_smem_optin[device] = query_smem_optin(device);
    allow_smem(g_smem_optin[device]);
  });
}

int smem_optin() {
  const int device = current_device();
  if (device < 0 || device >= kMaxDevices) return query_smem_optin(device);
  mla_setup();
  return g_smem_optin[device];
}

bool mla_cluster_merge_ok() {
  static std::once_flag once[kMaxDevices];
  static bool ok[kMaxDevices];
  const int device = current_device();
  if (device < 0 || device >= kMaxDevices) return false;
  std::call_once(once[device], [device] {
    const char* e = std::getenv("FATHOM_MLA_CLUSTER");
    if (e && std::strcmp(e, "0") == 0) return;
    int major = 0;
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
    if (major < 9) return;
    mla_setup();
    const bool two = MlaSmem<2>::bytes + kRowSmem <= size_t(smem_optin());
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(1, 1, kMlaClusterMax);
    config.blockDim = kThreads;
    config.dynamicSmemBytes = two ? MlaSmem<2>::bytes : MlaSmem<1>::bytes;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = kMlaClusterMax;
    config.attrs = attr;
    config.numAttrs = 1;
    int clusters = 0;
    const cudaError_t err = cudaOccupancyMaxActiveClusters(
        &clusters, two ? mla_attention_kernel<2> : mla_attention_kernel<1>, &config);
    if (err != cudaSuccess) cudaGetLastError();
    ok[device] = err == cudaSuccess && clusters > 0;
  });
  return ok[device];
}

bool mla_supported(const AttentionParams& p) {
  const bool shape = p.kv_dtype == DType::BF16 && p.d_qk == kDqk && p.d_v == kDv && p.v == p.k &&
                     p.v_token_stride == p.k_token_stride && p.v_head_stride == p.k_head_stride;
  if (!shape || !aligned16(p.k) || p.k_token_stride % 8 != 0 || p.k_head_stride % 8 != 0) return false;
  return MlaSmem<1>::bytes + kRowSmem <= size_t(smem_optin());
}

void mla_attention(const MlaLaunch& a, cudaStream_t stream, int64_t n_items) {
  mla_setup();
  const dim3 grid = a.items || a.u.n_seqs ? dim3(unsigned(n_items), unsigned(a.p.n_kv_heads), 1u)
                            : dim3(unsigned(ceil_div(a.rows, kMlaRows)), unsigned(a.p.n_kv_heads), unsigned(a.n_chunks));
  if (a.cluster_merge) {  // the chunks of a (row tile, KV head) as one cluster
    FATHOM_ASSERT(!a.items && !a.u.n_seqs && a.n_chunks >= 2 && a.n_chunks <= kMlaClusterMax,
                  "mla_attention: a cluster merge is for single launches of 2 to 8 chunks");
    const bool two = MlaSmem<2>::bytes + kRowSmem <= size_t(smem_optin());
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = kThreads;
    config.dynamicSmemBytes = two ? MlaSmem<2>::bytes : MlaSmem<1>::bytes;
    config.stream = stream;
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = unsigned(a.n_chunks);
    config.attrs = attr;
    config.numAttrs = 1;
    if (pdl_enabled()) {
      attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[1].val.programmaticStreamSerializationAllowed = 1;
      config.numAttrs = 2;
    }
    check(cudaLaunchKernelEx(&config, two ? mla_attention_kernel<2> : mla_attention_kernel<1>, a),
          "mla_attention_kernel (cluster launch)");
    return check_launch("mla_attention_kernel");
  }
  if (MlaSmem<2>::bytes + kRowSmem <= size_t(smem_optin())) {
    launch_kernel(mla_attention_kernel<2>, grid, kThreads, MlaSmem<2>::bytes, stream, a);
  } else {
    launch_kernel(mla_attention_kernel<1>, grid, kThreads, MlaSmem<1>::bytes, stream, a);
  }
  check_launch("mla_attention_kernel");
}

#endif  // FATHOM_KERNEL_EMU

}  // namespace fathom::cuda
