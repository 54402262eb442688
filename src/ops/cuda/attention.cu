// Scaled dot-product attention on the GPU: the CUDA counterpart of src/ops/cpu/attention.cpp,
// for AttentionParams exactly (strided Q/K/V, GQA/MQA mapping, causal with q_pos0, F32 or BF16
// keys and values, paged cache through a block table).
//
// One kernel serves prefill and decode ("flash-decoding" split-KV, FlashAttention's online
// softmax, fp32 throughout):
// - The query rows of one KV head g are the pairs (token i, head h of g's group), ordered
//   token-major; a block takes kRows = 16 of them, so the 16-128 query heads of absorbed MLA
//   or a GQA group share every key row loaded, and prefill takes 16 tokens of a head at once.
// - The block walks its range of keys in tiles of kKeys = 32: the tile's key rows are gathered
//   (through the block table when paged) and converted to fp32 in shared memory; each warp owns
//   two query rows, lane j scores key j against both, the warp keeps the running max and sum
//   with shuffles, and then accumulates p · V with lane d owning output dims d*4 + 128*i.
//   When V is a prefix of K in memory (absorbed MLA: V = [latent | pe]'s latent), K's tile is V's.
// - With AttentionParams::kv_len (graph-replayed decode) the key count is read on the device;
//   the grid is sized for the bound p.n_kv and blocks past the actual keys contribute nothing.
// - When one pass over the keys would leave SMs idle (decode, short prompts), the keys are
//   split into chunks handled by separate blocks (gridDim.z); each writes its unnormalised
//   output with its max and sum to a work space and attention_merge_kernel combines them:
//   out = Σ_c e^(m_c − m) o_c / Σ_c e^(m_c − m) l_c.
#include <algorithm>
#include <atomic>
#include <limits>
#include <mutex>
#include <vector>

#include "core/error.h"
#include "ops/cuda/attention_mla.cuh"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_util.cuh"

namespace fathom::cuda {
namespace {

constexpr int kRows = 16;      // query rows per block: 8 warps x 2
constexpr int kKeys = 32;      // keys per tile: one per lane
constexpr int kThreads = 256;
constexpr int kMaxDv = 512;    // 4 float4 per lane
constexpr int kStaticSmem = kRows * sizeof(int64_t);  // attention_kernel's q_off, beside the dynamic part

// Everything the kernels need, derived once on the host.
struct AttnLaunch {
  AttentionParams p;
  int group = 1;            // query heads per KV head
  int64_t rows = 0;         // query rows per KV head: n_q * group
  int dqk4 = 0, dv4 = 0;    // d_qk, d_v rounded up to a multiple of 4
  int q_stride = 0, kv_stride = 0;  // shared-memory row strides (floats), = 4 mod 8: conflict-free float4 reads
  int64_t chunk = 0;        // keys per block along gridDim.z
  int n_chunks = 1;
  float* part_o = nullptr;   // n_chunks > 1: (n_chunks, n_q, n_q_heads, d_v) unnormalised outputs
  float* part_ml = nullptr;  // (n_chunks, n_q, n_q_heads, 2): running max and sum
  bool v_from_k = false;     // V rows are the first d_v columns of the K rows
  bool vec_k = false, vec_v = false;  // 16-byte loads of K / V rows
  // The merge of a batched latent launch: block x merges pair merge_items[x].y of sequence
  // merge_items[x].x, whose own fields (n_q, out, n_chunks, the partials) come from seqs.
  const MlaSeq* seqs = nullptr;
  const int2* merge_items = nullptr;
  // The merge of a uniform latent batch (attention_mla.cuh): attention_merge_uniform_kernel.
  MlaUniform u;
};

template <typename T> struct KvType;
template <> struct KvType<float> { static constexpr DType value = DType::F32; };
template <> struct KvType<uint16_t> { static constexpr DType value = DType::BF16; };

template <typename T>
__device__ inline float kv_to_f32(T v) {
  if constexpr (sizeof(T) == 4) return v;
  else return bf16_bits_to_f32(v);
}

// The tile's key (or value) rows into shared memory as fp32: dst (kKeys, stride), zero past
// the valid keys (off < 0) and in the padding columns [d, d4).
template <typename T>
__device__ inline void load_rows(float* dst, int stride, const T* __restrict__ base, const int64_t* off, int d, int d4,
                                 bool vec) {
  if (vec) {  // d % (16 / sizeof(T)) == 0, rows 16-byte aligned, hence d4 == d
    constexpr int V = 16 / int(sizeof(T));
    constexpr int kBatch = 4;  // 16-byte loads in flight per thread before any is converted
    const int per_row = d / V, total = kKeys * per_row;
    for (int idx0 = threadIdx.x; idx0 < total; idx0 += kBatch * kThreads) {
      uint4 raw[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int idx = idx0 + b * kThreads;
        raw[b] = make_uint4(0, 0, 0, 0);
        if (idx < total) {
          const int64_t o = off[idx / per_row];
          if (o >= 0) raw[b] = __ldg(reinterpret_cast<const uint4*>(base + o + (idx % per_row) * V));
        }
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int idx = idx0 + b * kThreads;
        if (idx >= total) break;
        const int j = idx / per_row, c = (idx % per_row) * V;
        float v[V];
        convert16<KvType<T>::value>(raw[b], v);  // zero bits convert to zeros: rows past the keys
#pragma unroll
        for (int i = 0; i < V; i += 4)
          *reinterpret_cast<float4*>(dst + j * stride + c + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < kKeys * d4; idx += kThreads) {
      const int j = idx / d4, c = idx % d4;
      const int64_t o = off[j];
      dst[j * stride + c] = o >= 0 && c < d ? kv_to_f32(base[o + c]) : 0.f;
    }
  }
}

// grid (ceil(rows / kRows), n_kv_heads, n_chunks), block kThreads, dynamic shared memory
// (kRows * q_stride + kKeys * kv_stride) floats + 2 * kKeys int64.
template <int NDV, typename T>
__global__ void __launch_bounds__(kThreads) attention_kernel(AttnLaunch a) {
  pdl_wait();
  extern __shared__ __align__(16) float smem[];
  const AttentionParams& p = a.p;
  float* qs = smem;                                   // (kRows, q_stride)
  float* kvs = qs + kRows * a.q_stride;               // (kKeys, kv_stride)
  int64_t* koff = reinterpret_cast<int64_t*>(kvs + kKeys * a.kv_stride);  // (kKeys)
  int64_t* voff = koff + kKeys;                                           // (kKeys)
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = blockIdx.y, c = blockIdx.z;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  // a graph-replayed decode step reads the key count from the device; p.n_kv only bounds it
  const int64_t n_kv = p.kv_len ? min(int64_t(*p.kv_len), p.n_kv) : p.n_kv;
  const int64_t q_pos0 = p.kv_len ? n_kv - p.n_q : p.q_pos0;

  // Where each of the block's query rows starts (-1: past the rows), once per block: 64-bit
  // divisions per element would cost more than the loads.
  __shared__ int64_t q_off[kRows];
  if (tid < kRows) {
    const int64_t row = row0 + tid;
    q_off[tid] = row < a.rows ? (row / a.group) * p.q_token_stride + (g * a.group + int(row % a.group)) * p.q_head_stride
                              : -1;
  }
  __syncthreads();
  // The block's query rows, scaled by nothing (the scale multiplies the dot products, like the
  // CPU); eight loads in flight per thread, so the rows arrive in about one memory round trip.
  {
    constexpr int kBatch = 8;
    const int total = kRows * a.dqk4;
    for (int idx0 = tid; idx0 < total; idx0 += kBatch * kThreads) {
      float v[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int idx = idx0 + b * kThreads;
        v[b] = 0.f;
        if (idx < total) {
          const int r = idx / a.dqk4, d = idx - r * a.dqk4;
          if (q_off[r] >= 0 && d < p.d_qk) v[b] = __ldg(p.q + q_off[r] + d);
        }
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int idx = idx0 + b * kThreads;
        if (idx < total) qs[(idx / a.dqk4) * a.q_stride + idx % a.dqk4] = v[b];
      }
    }
  }

  // This warp's two rows: token, head, and the keys they may see.
  int64_t tok[2], lim[2];
  int head[2];
  bool valid[2];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int64_t row = row0 + 2 * warp + s;
    valid[s] = row < a.rows;
    tok[s] = valid[s] ? row / a.group : 0;
    head[s] = g * a.group + int(valid[s] ? row % a.group : 0);
    lim[s] = p.causal ? min(n_kv, q_pos0 + tok[s] + 1) : n_kv;
  }
  // The block's keys: its chunk, cut at the last row's causal limit.
  const int64_t last_tok = (min(row0 + kRows, a.rows) - 1) / a.group;
  const int64_t k_begin = int64_t(c) * a.chunk;
  int64_t k_end = min(n_kv, k_begin + a.chunk);
  if (p.causal) k_end = min(k_end, q_pos0 + last_tok + 1);

  constexpr float kNegInf = -INFINITY;
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};
  float o[2][NDV][4];
#pragma unroll
  for (int s = 0; s < 2; ++s)
#pragma unroll
    for (int i = 0; i < NDV; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[s][i][e] = 0.f;

  for (int64_t j0 = k_begin; j0 < k_end; j0 += kKeys) {
    if (tid < kKeys) {
      const int64_t j = j0 + tid;
      int64_t kr = -1, vr = -1;
      if (j < k_end) {
        const int64_t row = p.block_table ? int64_t(p.block_table[j / p.block_size]) * p.block_size + j % p.block_size : j;
        kr = row * p.k_token_stride + int64_t(g) * p.k_head_stride;
        vr = row * p.v_token_stride + int64_t(g) * p.v_head_stride;
      }
      koff[tid] = kr;
      voff[tid] = vr;
    }
    __syncthreads();  // offsets ready; the previous tile's readers are done with kvs
    load_rows<T>(kvs, a.kv_stride, kbase, koff, p.d_qk, a.dqk4, a.vec_k);
    __syncthreads();

    // scores: lane j against the warp's two query rows
    float s0 = 0.f, s1 = 0.f;
    {
      const float* kr = kvs + lane * a.kv_stride;
      const float* q0 = qs + (2 * warp) * a.q_stride;
      const float* q1 = q0 + a.q_stride;
#pragma unroll 4
      for (int d = 0; d < a.dqk4; d += 4) {
        const float4 kv = *reinterpret_cast<const float4*>(kr + d);
        const float4 x0 = *reinterpret_cast<const float4*>(q0 + d);
        const float4 x1 = *reinterpret_cast<const float4*>(q1 + d);
        s0 += x0.x * kv.x + x0.y * kv.y + x0.z * kv.z + x0.w * kv.w;
        s1 += x1.x * kv.x + x1.y * kv.y + x1.z * kv.z + x1.w * kv.w;
      }
    }
    const int64_t j = j0 + lane;
    float sc[2] = {valid[0] && j < k_end && j < lim[0] ? s0 * p.scale : kNegInf,
                   valid[1] && j < k_end && j < lim[1] ? s1 * p.scale : kNegInf};
    float pj[2];
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const float m_new = fmaxf(m[s], warp_max(sc[s]));
      const float m_use = m_new == kNegInf ? 0.f : m_new;  // no visible key yet: everything stays 0
      pj[s] = expf(sc[s] - m_use);
      const float alpha = expf(m[s] - m_use);
      l[s] = l[s] * alpha + warp_sum(pj[s]);
      m[s] = m_new;
#pragma unroll
      for (int i = 0; i < NDV; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[s][i][e] *= alpha;
    }

    if (!a.v_from_k) {
      __syncthreads();  // every warp is done scoring against the K tile
      load_rows<T>(kvs, a.kv_stride, vbase, voff, p.d_v, a.dv4, a.vec_v);
      __syncthreads();
    }
    const int n_keys = k_end - j0 < kKeys ? int(k_end - j0) : kKeys;
    for (int jj = 0; jj < n_keys; ++jj) {
      const float p0 = __shfl_sync(kFullMask, pj[0], jj), p1 = __shfl_sync(kFullMask, pj[1], jj);
      const float* vr = kvs + jj * a.kv_stride;
#pragma unroll
      for (int i = 0; i < NDV; ++i) {
        const int d = lane * 4 + i * 128;
        if (d < a.dv4) {
          const float4 v = *reinterpret_cast<const float4*>(vr + d);
          o[0][i][0] += p0 * v.x, o[0][i][1] += p0 * v.y, o[0][i][2] += p0 * v.z, o[0][i][3] += p0 * v.w;
          o[1][i][0] += p1 * v.x, o[1][i][1] += p1 * v.y, o[1][i][2] += p1 * v.z, o[1][i][3] += p1 * v.w;
        }
      }
    }
  }

#pragma unroll
  for (int s = 0; s < 2; ++s) {
    if (!valid[s]) continue;
    float* dst;
    float mult = 1.f;
    if (a.n_chunks == 1) {
      dst = p.out + tok[s] * p.out_token_stride + int64_t(head[s]) * p.out_head_stride;
      mult = l[s] > 0.f ? 1.f / l[s] : 0.f;  // no visible key: zeros, like the CPU
    } else {
      const int64_t part = (int64_t(c) * p.n_q + tok[s]) * p.n_q_heads + head[s];
      dst = a.part_o + part * p.d_v;
      if (lane == 0) a.part_ml[2 * part] = m[s], a.part_ml[2 * part + 1] = l[s];
    }
#pragma unroll
    for (int i = 0; i < NDV; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = lane * 4 + i * 128 + e;
        if (d < p.d_v) dst[d] = o[s][i][e] * mult;
      }
  }
}

// grid (n_q * n_q_heads, ceil(d_v / 128)), block kMergeThreads: one (query, head) pair and 128
// of its output dims. The chunk weights w_c = e^(m_c − m) are computed once per block into
// shared memory; then each warp walks every 8th chunk, its lanes on 4 adjacent dims, with the
// loads of 4 chunks in flight (a serial walk over the chunks is a chain of L2 round trips),
// and the 8 warps' sums are added through shared memory.
constexpr int kMergeThreads = 256, kMergeWarps = kMergeThreads / 32, kMergeDims = 128;
constexpr int kMaxChunks = 1024;  // split_keys never makes more
__global__ void __launch_bounds__(kMergeThreads) attention_merge_kernel(AttnLaunch a) {
  pdl_wait();
  __shared__ float wts[kMaxChunks];
  __shared__ float red[kMergeWarps];
  __shared__ float4 sums[kMergeWarps][kMergeDims / 4];
  int64_t pair = blockIdx.x;
  if (a.merge_items) {  // batched: this block's sequence and (query, head) pair
    const int2 it = a.merge_items[blockIdx.x];
    const MlaSeq& sq = a.seqs[it.x];
    a.p.n_q = sq.n_q;
    a.p.out = sq.out;
    a.n_chunks = sq.n_chunks;
    a.part_o = sq.part_o;
    a.part_ml = sq.part_ml;
    pair = it.y;
  }
  const AttentionParams& p = a.p;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t R = p.n_q * p.n_q_heads;
  const int n = a.n_chunks;
  float mx = -INFINITY;
  for (int c = tid; c < n; c += kMergeThreads) mx = fmaxf(mx, a.part_ml[2 * (c * R + pair)]);
  mx = warp_max(mx);
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  mx = red[0];
  for (int w = 1; w < kMergeWarps; ++w) mx = fmaxf(mx, red[w]);
  __syncthreads();  // red is reused below
  float den = 0.f;
  for (int c = tid; c < n; c += kMergeThreads) {
    const float w = mx == -INFINITY ? 0.f : expf(a.part_ml[2 * (c * R + pair)] - mx);
    wts[c] = w;
    den += w * a.part_ml[2 * (c * R + pair) + 1];
  }
  den = warp_sum(den);
  if (lane == 0) red[warp] = den;
  __syncthreads();  // wts and red are complete
  den = 0.f;
  for (int w = 0; w < kMergeWarps; ++w) den += red[w];

  const int64_t d0 = int64_t(blockIdx.y) * kMergeDims + 4 * lane;
  const bool vec = p.d_v % 4 == 0;
  auto load4 = [&](int c) -> float4 {
    const float* src = a.part_o + (c * R + pair) * p.d_v + d0;
    if (vec && d0 < p.d_v) return __ldcg(reinterpret_cast<const float4*>(src));
    float v[4];
    for (int e = 0; e < 4; ++e) v[e] = d0 + e < p.d_v ? __ldcg(src + e) : 0.f;
    return make_float4(v[0], v[1], v[2], v[3]);
  };
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  int c = warp;
  for (; c + 3 * kMergeWarps < n; c += 4 * kMergeWarps) {
    float4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = load4(c + u * kMergeWarps);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float w = wts[c + u * kMergeWarps];
      acc.x += w * v[u].x, acc.y += w * v[u].y, acc.z += w * v[u].z, acc.w += w * v[u].w;
    }
  }
  for (; c < n; c += kMergeWarps) {
    const float4 v = load4(c);
    const float w = wts[c];
    acc.x += w * v.x, acc.y += w * v.y, acc.z += w * v.z, acc.w += w * v.w;
  }
  sums[warp][lane] = acc;
  __syncthreads();
  if (warp != 0) return;
  float4 t = sums[0][lane];
  for (int w = 1; w < kMergeWarps; ++w) {
    const float4 v = sums[w][lane];
    t.x += v.x, t.y += v.y, t.z += v.z, t.w += v.w;
  }
  const float inv = den > 0.f ? 1.f / den : 0.f;  // no visible key: zeros, like the CPU
  const int64_t i = pair / p.n_q_heads;
  const int h = int(pair % p.n_q_heads);
  float* out = p.out + i * p.out_token_stride + int64_t(h) * p.out_head_stride + d0;
  const float r[4] = {t.x * inv, t.y * inv, t.z * inv, t.w * inv};
  for (int e = 0; e < 4; ++e)
    if (d0 + e < p.d_v) out[e] = r[e];
}

// The merge of a uniform latent batch (d_v = 512): one block of 128 threads per (sequence,
// query-head pair), each thread 4 of the 512 dims over the chunks that ran, their loads in flight
// together — a fifth of attention_merge_kernel's blocks, each reducing (max, sum) once instead of
// once per 128 dims. A sequence whose keys fit in chunk 0 was written by the attention kernel.
constexpr int kUniformMergeThreads = 128;
__global__ void __launch_bounds__(kUniformMergeThreads) attention_merge_uniform_kernel(AttnLaunch a) {
  pdl_wait();
  const int64_t pairs = a.p.n_q * a.p.n_q_heads, seq = blockIdx.x / pairs, pair = blockIdx.x % pairs;
  a.chunk = uniform_chunk(a.p.kv_len, a.p.n_kv, a.u, a.n_chunks, a.chunk);  // as the attention kernel chose it
  take_uniform_seq(a.p, a.part_o, a.part_ml, a.u, seq);
  const AttentionParams& p = a.p;
  const int64_t keys = min(int64_t(*p.kv_len), p.n_kv);
  const int64_t ran = (keys + a.chunk - 1) / a.chunk;
  if (ran <= 1) return;
  const int n = int(ran < a.n_chunks ? ran : a.n_chunks);
  float mx = -INFINITY;
  for (int c = 0; c < n; ++c) mx = fmaxf(mx, __ldcg(a.part_ml + 2 * (c * pairs + pair)));
  float den = 0.f;
  for (int c = 0; c < n; ++c) {
    const float m = __ldcg(a.part_ml + 2 * (c * pairs + pair));
    den += (mx == -INFINITY ? 0.f : expf(m - mx)) * __ldcg(a.part_ml + 2 * (c * pairs + pair) + 1);
  }
  const int d = 4 * int(threadIdx.x);
  if (d >= p.d_v) return;
  constexpr int kAhead = 4;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int c0 = 0; c0 < n; c0 += kAhead) {
    float4 v[kAhead];
    float w[kAhead];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
      const int c = c0 + u;
      v[u] = c < n ? __ldcg(reinterpret_cast<const float4*>(a.part_o + (c * pairs + pair) * p.d_v + d))
                   : make_float4(0.f, 0.f, 0.f, 0.f);
      const float m = c < n ? __ldcg(a.part_ml + 2 * (c * pairs + pair)) : -INFINITY;
      w[u] = m == -INFINITY ? 0.f : expf(m - mx);
    }
#pragma unroll
    for (int u = 0; u < kAhead; ++u)
      acc.x += w[u] * v[u].x, acc.y += w[u] * v[u].y, acc.z += w[u] * v[u].z, acc.w += w[u] * v[u].w;
  }
  const float inv = den > 0.f ? 1.f / den : 0.f;  // no visible key: zeros, like the CPU
  const int64_t i = pair / p.n_q_heads;
  const int h = int(pair % p.n_q_heads);
  float* out = p.out + i * p.out_token_stride + int64_t(h) * p.out_head_stride + d;
  *reinterpret_cast<float4*>(out) = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
}

void launch_merge(const AttnLaunch& m, cudaStream_t s, int64_t n_items = 0) {
  if (m.u.n_seqs) {
    launch_kernel(attention_merge_uniform_kernel, unsigned(m.u.n_seqs * m.p.n_q * m.p.n_q_heads),
                  kUniformMergeThreads, 0, s, m);
    return check_launch("attention_merge_uniform_kernel");
  }
  const dim3 grid(unsigned(m.merge_items ? n_items : m.p.n_q * m.p.n_q_heads), unsigned(ceil_div(m.p.d_v, kMergeDims)));
  launch_kernel(attention_merge_kernel, grid, kMergeThreads, 0, s, m);
  check_launch("attention_merge_kernel");
}

int smem_stride(int d4) { return d4 % 8 == 4 ? d4 : d4 + 4; }

template <int NDV, typename T>
void launch(const AttnLaunch& a, dim3 grid, size_t smem, cudaStream_t s) {
  launch_kernel(attention_kernel<NDV, T>, grid, kThreads, smem, s, a);
  check_launch("attention_kernel");
}

// Lets every instantiation use all the shared memory a block may have (d_qk 576 needs ~110 KB).
template <int NDV, typename T>
void allow_smem(int bytes) {
  check(cudaFuncSetAttribute(attention_kernel<NDV, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
        "attention (cudaFuncSetAttribute)");
}
template <typename T>
void allow_smem_all(int bytes) {
  allow_smem<1, T>(bytes);
  allow_smem<2, T>(bytes);
  allow_smem<3, T>(bytes);
  allow_smem<4, T>(bytes);
}

std::once_flag g_setup_done[kMaxDevices];

template <typename T>
void launch_ndv(const AttnLaunch& a, dim3 grid, size_t smem, cudaStream_t s) {
  switch ((a.dv4 + 127) / 128) {
    case 0:
    case 1: return launch<1, T>(a, grid, smem, s);
    case 2: return launch<2, T>(a, grid, smem, s);
    case 3: return launch<3, T>(a, grid, smem, s);
    default: return launch<4, T>(a, grid, smem, s);
  }
}

// How the keys of each (row tile, KV head) are cut: into chunks of whole `tile`-key tiles, enough
// that base_blocks x chunks reaches target_blocks, but never less than a tile per chunk nor more
// than 1024 chunks. Without a device key count the causal limit bounds the keys.
struct KeySplit {
  int64_t chunk;
  int n_chunks;
};
KeySplit split_keys(const AttentionParams& p, int tile, int64_t base_blocks, int64_t target_blocks) {
  const int64_t visible = p.causal && !p.kv_len ? std::min(p.n_kv, p.q_pos0 + p.n_q) : p.n_kv;
  const int64_t key_tiles = std::max<int64_t>(1, ceil_div(visible, tile));
  int64_t n_chunks = std::clamp<int64_t>(ceil_div(target_blocks, base_blocks), 1, key_tiles);
  n_chunks = std::min<int64_t>(n_chunks, kMaxChunks);
  const int64_t chunk = ceil_div(key_tiles, n_chunks) * tile;
  return {chunk, int(std::max<int64_t>(1, ceil_div(visible, chunk)))};
}

// The split chunks' work space: their unnormalised outputs (n_chunks, n_q, n_q_heads, d_v), then
// their (max, sum) pairs (n_chunks, n_q, n_q_heads, 2) from partial_ml(part_o) on.
size_t partial_bytes(const AttentionParams& p, int n_chunks) {
  const int64_t pairs = p.n_q * p.n_q_heads;
  FATHOM_CHECK(pairs < (int64_t(1) << 31), "attention: ", pairs, " (query, head) pairs is too many for one launch.");
  return size_t(n_chunks) * size_t(pairs) * size_t(p.d_v + 2) * sizeof(float);
}
float* partial_ml(const AttentionParams& p, int n_chunks, float* part_o) {
  return part_o + size_t(n_chunks) * size_t(p.n_q * p.n_q_heads) * size_t(p.d_v);
}

// The absorbed-MLA shape on tensor cores (attention_mla.cu). The kernel needs ~190 KB of shared
// memory, so one block per SM: the keys are split until the blocks about fill the GPU, in whole
// 64-key tiles, and the chunks are combined by the merge kernel above — or, 2 to 8 of them on
// Hopper, inside the launch by a cluster of the chunks' blocks (H200, v3-4.9b batch-1 decode:
// 196 to 512 keys 10.5 -> 8.5-9.1 us a call with the merge, 1,110 -> 1,139 tokens/s bf16).
void attention_latent(const AttentionParams& p, cudaStream_t s) {
  MlaLaunch a;
  a.p = p;
  a.vec_q = aligned16(p.q) && p.q_token_stride % 4 == 0 && p.q_head_stride % 4 == 0;
  a.group = p.n_q_heads / p.n_kv_heads;
  a.rows = p.n_q * a.group;
  const int64_t row_tiles = ceil_div(a.rows, kMlaRows);
  FATHOM_CHECK(a.rows < (int64_t(1) << 31) && p.n_kv < (int64_t(1) << 31), "attention: ", p.n_q, " queries x ",
               a.group, " heads or ", p.n_kv, " keys is too many for one launch.");
  const KeySplit split = split_keys(p, kMlaKeys, row_tiles * p.n_kv_heads, sm_count());
  a.chunk = split.chunk;
  a.n_chunks = split.n_chunks;
  if (a.n_chunks == 1) return mla_attention(a, s);
  if (a.n_chunks <= kMlaClusterMax && mla_cluster_merge_ok()) {  // merged inside the launch
    a.cluster_merge = true;
    return mla_attention(a, s);
  }
  StreamScratch work(partial_bytes(p, a.n_chunks), s, "attention");
  a.part_o = work.as<float>();
  a.part_ml = partial_ml(p, a.n_chunks, a.part_o);
  mla_attention(a, s);
  AttnLaunch m;  // what the merge reads
  m.p = p;
  m.n_chunks = a.n_chunks;
  m.part_o = a.part_o;
  m.part_ml = a.part_ml;
  launch_merge(m, s);
}

// Whether s is recording a CUDA graph (the batched launch uploads its descriptors from the host,
// which a replayed graph would not redo).
bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(s, &st), "cudaStreamIsCapturing");
  return st != cudaStreamCaptureStatusNone;
}

// Every sequence of a step in one latent launch (and one merge): what attention_latent does per
// sequence, with each block's (sequence, row tile, key chunk) from a table. The keys of each
// sequence are split so that all sequences' blocks together about fill the GPU.
void attention_latent_batch(const std::vector<AttentionParams>& ps, cudaStream_t s) {
  const AttentionParams& p0 = ps[0];
  MlaLaunch a;
  a.p = p0;
  a.group = p0.n_q_heads / p0.n_kv_heads;
  a.vec_q = true;
  int64_t tiles = 0;
  for (const AttentionParams& p : ps) {
    a.vec_q = a.vec_q && aligned16(p.q) && p.q_token_stride % 4 == 0 && p.q_head_stride % 4 == 0;
    FATHOM_CHECK(p.n_q * a.group < (int64_t(1) << 31) && p.n_kv < (int64_t(1) << 31), "attention: ", p.n_q,
                 " queries x ", a.group, " heads or ", p.n_kv, " keys is too many for one launch.");
    tiles += ceil_div(p.n_q * a.group, kMlaRows);
  }
  std::vector<MlaSeq> seqs(ps.size());
  std::vector<int4> items;
  std::vector<int2> merge_items;
  size_t part_floats = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    const AttentionParams& p = ps[i];
    MlaSeq& q = seqs[i];
    q.q = p.q, q.out = p.out, q.block_table = p.block_table;
    q.n_q = p.n_q, q.n_kv = p.n_kv, q.q_pos0 = p.q_pos0;
    q.rows = p.n_q * a.group;
    const int64_t row_tiles = ceil_div(q.rows, kMlaRows);
    const KeySplit split = split_keys(p, kMlaKeys, tiles * p0.n_kv_heads, sm_count());
    q.chunk = split.chunk;
    q.n_chunks = split.n_chunks;
    for (int64_t t = 0; t < row_tiles; ++t)
      for (int c = 0; c < q.n_chunks; ++c) items.push_back(make_int4(int(i), int(t), c, 0));
    if (q.n_chunks > 1) {
      for (int64_t pair = 0; pair < p.n_q * p.n_q_heads; ++pair) merge_items.push_back(make_int2(int(i), int(pair)));
      part_floats += partial_bytes(p, q.n_chunks) / sizeof(float);
    }
  }
  FATHOM_CHECK(items.size() < (size_t(1) << 31) && merge_items.size() < (size_t(1) << 31),
               "attention: a batch of ", items.size(), " blocks is too many for one launch.");
  StreamScratch work(std::max<size_t>(part_floats, 1) * sizeof(float), s, "attention (batched partials)");
  float* at = work.as<float>();
  for (size_t i = 0; i < ps.size(); ++i) {
    if (seqs[i].n_chunks == 1) continue;
    seqs[i].part_o = at;
    seqs[i].part_ml = partial_ml(ps[i], seqs[i].n_chunks, at);
    at += partial_bytes(ps[i], seqs[i].n_chunks) / sizeof(float);
  }
  // the descriptors, copied in stream order (the copy of pageable memory is staged before the
  // call returns, so the vectors may go)
  const size_t b_seqs = (seqs.size() * sizeof(MlaSeq) + 15) / 16 * 16, b_items = items.size() * sizeof(int4),
               b_merge = merge_items.size() * sizeof(int2);
  StreamScratch desc(b_seqs + b_items + b_merge, s, "attention (batched descriptors)");
  char* d = desc.as<char>();
  check(cudaMemcpyAsync(d, seqs.data(), seqs.size() * sizeof(MlaSeq), cudaMemcpyHostToDevice, s),
        "attention (descriptors)");
  check(cudaMemcpyAsync(d + b_seqs, items.data(), b_items, cudaMemcpyHostToDevice, s), "attention (descriptors)");
  if (b_merge)
    check(cudaMemcpyAsync(d + b_seqs + b_items, merge_items.data(), b_merge, cudaMemcpyHostToDevice, s),
          "attention (descriptors)");
  a.seqs = reinterpret_cast<const MlaSeq*>(d);
  a.items = reinterpret_cast<const int4*>(d + b_seqs);
  mla_attention(a, s, int64_t(items.size()));
  if (merge_items.empty()) return;
  AttnLaunch m;
  m.p = p0;
  m.seqs = a.seqs;
  m.merge_items = reinterpret_cast<const int2*>(d + b_seqs + b_items);
  launch_merge(m, s, int64_t(merge_items.size()));
}

// Whether ps is a uniform batch (MlaUniform): the latent shape, key counts on the device, the
// same queries per sequence and key bound, and every pointer a fixed stride from the first's.
bool uniform_batch(const std::vector<AttentionParams>& ps) {
  if (ps.size() < 2) return false;
  const AttentionParams& f = ps[0];
  const int64_t dq = ps[1].q - f.q, dout = ps[1].out - f.out;
  const int64_t dt = f.block_table && ps[1].block_table ? ps[1].block_table - f.block_table : 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    const AttentionParams& p = ps[i];
    const int64_t n = int64_t(i);
    const bool fields = mla_supported(p) && p.kv_len && p.n_q > 0 && p.n_q == f.n_q && p.n_kv == f.n_kv &&
                        p.k == f.k && p.k_token_stride == f.k_token_stride && p.k_head_stride == f.k_head_stride &&
                        p.q_token_stride == f.q_token_stride && p.q_head_stride == f.q_head_stride &&
                        p.out_token_stride == f.out_token_stride && p.out_head_stride == f.out_head_stride &&
                        p.n_q_heads == f.n_q_heads && p.n_kv_heads == f.n_kv_heads && p.scale == f.scale &&
                        p.causal == f.causal && p.block_size == f.block_size &&
                        (p.block_table != nullptr) == (f.block_table != nullptr) && aligned16(p.out) &&
                        p.out_token_stride % 4 == 0 && p.out_head_stride % 4 == 0 &&
                        p.d_v <= 4 * kUniformMergeThreads;  // the merge's float4 per thread
    if (!fields || p.q != f.q + n * dq || p.out != f.out + n * dout || p.kv_len != f.kv_len + n ||
        (p.block_table && p.block_table != f.block_table + n * dt))
      return false;
  }
  return true;
}

// A uniform batch in one latent launch and one merge, the grid sized for every sequence's key
// bound (the blocks past its key count exit), with room for the bound split so that its blocks
// would fill the GPU twice over; the kernels then cut the keys there are into one wave
// (uniform_chunk). (Splitting the bound itself — the chunk fixed on the host — left 1.2 waves
// of 4-tile blocks at 1,152 keys x 32 sequences, and one wave of the bound's chunks, 8 tiles a
// block, measured slower still: 45.5 against 36.4 us a layer.)
void attention_latent_uniform(const std::vector<AttentionParams>& ps, cudaStream_t s) {
  const AttentionParams& p0 = ps[0];
  MlaLaunch a;
  a.p = p0;
  a.group = p0.n_q_heads / p0.n_kv_heads;
  a.rows = p0.n_q * a.group;
  a.vec_q = true;
  for (const AttentionParams& p : ps)
    a.vec_q = a.vec_q && aligned16(p.q) && p.q_token_stride % 4 == 0 && p.q_head_stride % 4 == 0;
  const int64_t B = int64_t(ps.size()), row_tiles = ceil_div(a.rows, kMlaRows);
  FATHOM_CHECK(a.rows < (int64_t(1) << 31) && p0.n_kv < (int64_t(1) << 31), "attention: ", p0.n_q, " queries x ",
               a.group, " heads or ", p0.n_kv, " keys is too many for one launch.");
  const KeySplit split = split_keys(p0, kMlaKeys, B * row_tiles * p0.n_kv_heads, 2 * int64_t(sm_count()));
  a.chunk = split.chunk;
  a.n_chunks = split.n_chunks;
  MlaUniform& u = a.u;
  u.n_seqs = int(B);
  u.row_tiles = row_tiles;
  u.q = ps[1].q - p0.q;
  u.out = ps[1].out - p0.out;
  u.table = p0.block_table ? ps[1].block_table - p0.block_table : 0;
  u.wave = int(std::max<int64_t>(1, sm_count() / p0.n_kv_heads));  // one block per SM (its shared memory)
  const int64_t items = B * row_tiles * a.n_chunks;
  FATHOM_CHECK(items < (int64_t(1) << 31), "attention: a batch of ", items, " blocks is too many for one launch.");
  if (a.n_chunks == 1) return mla_attention(a, s, items);
  const size_t per_seq = partial_bytes(p0, a.n_chunks) / sizeof(float);
  StreamScratch work(size_t(B) * per_seq * sizeof(float), s, "attention (uniform batch partials)");
  u.part_o = int64_t(a.n_chunks) * p0.n_q * p0.n_q_heads * p0.d_v;
  u.part_ml = int64_t(a.n_chunks) * p0.n_q * p0.n_q_heads * 2;
  a.part_o = work.as<float>();
  a.part_ml = a.part_o + B * u.part_o;
  mla_attention(a, s, items);
  AttnLaunch m;
  m.p = p0;
  m.chunk = a.chunk;
  m.n_chunks = a.n_chunks;
  m.part_o = a.part_o;
  m.part_ml = a.part_ml;
  m.u = u;
  launch_merge(m, s);
}

}  // namespace

void attention_setup() {
  once_per_device(g_setup_done, [] {
    const int smem_max = smem_optin();  // also sets up the latent kernel
    allow_smem_all<float>(smem_max - kStaticSmem);
    allow_smem_all<uint16_t>(smem_max - kStaticSmem);
  });
}

namespace {
std::atomic<bool> g_latent_attention{true};
}  // namespace

void set_latent_attention(bool enabled) { g_latent_attention = enabled; }

void attention(const AttentionParams& p, Stream stream) {
  FATHOM_CHECK(p.kv_dtype == DType::F32 || p.kv_dtype == DType::BF16, "attention: keys and values in ",
               dtype_name(p.kv_dtype), " are not supported on CUDA; expected F32 or BF16.");
  FATHOM_CHECK(p.n_kv_heads > 0 && p.n_q_heads > 0 && p.n_q_heads % p.n_kv_heads == 0, "attention: ", p.n_q_heads,
               " query heads cannot be grouped over ", p.n_kv_heads, " key/value heads.");
  FATHOM_CHECK(p.d_qk > 0 && p.d_qk <= 1024 && p.d_v > 0 && p.d_v <= kMaxDv, "attention: head dims d_qk ", p.d_qk,
               " and d_v ", p.d_v, " are outside what the CUDA kernel supports (d_qk <= 1024, d_v <= ", kMaxDv, ").");
  FATHOM_CHECK(p.n_q >= 0 && p.n_kv >= 0 && (p.q_pos0 >= 0 || p.kv_len), "attention: negative n_q ", p.n_q, ", n_kv ", p.n_kv,
               " or q_pos0 ", p.q_pos0, ".");
  FATHOM_CHECK(!p.block_table || p.block_size > 0, "attention: a block table needs a positive block_size, not ",
               p.block_size, ".");
  FATHOM_CHECK(p.n_kv_heads <= 65535, "attention: ", p.n_kv_heads, " key/value heads is too many for one launch.");
  if (p.n_q == 0) return;
  FATHOM_ASSERT(p.q && p.k && p.v && p.out, "attention with a null pointer");
  const cudaStream_t s = as_cuda(stream);
  if (g_latent_attention && mla_supported(p)) return attention_latent(p, s);
  if (flash_prefill_takes(p)) return attention_flash(p, stream);
  // training's windows in bf16 mixed precision: the flash kernels, the scores never stored
  if (train_flash_takes(p, 1)) return attention_train_flash(p, 1, stream);
  // a long F32 self-attention (training's forward, F32 prefill): the scores materialized and the
  // two products as cuBLAS GEMMs (attention_gemm.cu) beat this kernel's CUDA-core loops
  if (attention_gemm_forward_takes(p)) return attention_forward_gemm(p, stream);

  AttnLaunch a;
  a.p = p;
  a.group = p.n_q_heads / p.n_kv_heads;
  a.rows = p.n_q * a.group;
  a.dqk4 = (p.d_qk + 3) / 4 * 4;
  a.dv4 = (p.d_v + 3) / 4 * 4;
  a.q_stride = smem_stride(a.dqk4);
  a.kv_stride = smem_stride(std::max(a.dqk4, a.dv4));
  a.v_from_k = p.v == p.k && p.v_token_stride == p.k_token_stride && p.v_head_stride == p.k_head_stride &&
               p.d_v <= p.d_qk;
  const bool bf16 = p.kv_dtype == DType::BF16;
  const int vec_elems = bf16 ? 8 : 4;
  auto vec_ok = [&](const void* base, int64_t ts, int64_t hs, int d) {
    return aligned16(base) && ts % vec_elems == 0 && hs % vec_elems == 0 && d % vec_elems == 0;
  };
  a.vec_k = vec_ok(p.k, p.k_token_stride, p.k_head_stride, p.d_qk);
  a.vec_v = vec_ok(p.v, p.v_token_stride, p.v_head_stride, p.d_v);

  const size_t smem = size_t(kRows * a.q_stride + kKeys * a.kv_stride) * sizeof(float) + 2 * kKeys * sizeof(int64_t);
  attention_setup();
  const int smem_max = smem_optin();
  FATHOM_CHECK(smem + kStaticSmem <= size_t(smem_max), "attention: d_qk ", p.d_qk, " / d_v ", p.d_v, " need ",
               smem + kStaticSmem, " bytes of shared memory per block but the GPU offers ", smem_max, ".");

  // Split the keys when the (row tile, KV head) blocks alone would leave SMs idle, down to one
  // tile of keys per chunk: a decode step's latency is then one tile's, not the context's.
  const int64_t row_tiles = ceil_div(a.rows, kRows);
  FATHOM_CHECK(row_tiles < (int64_t(1) << 31), "attention: ", p.n_q, " queries is too many for one launch.");
  const KeySplit split = split_keys(p, kKeys, row_tiles * p.n_kv_heads, 4 * int64_t(sm_count()));
  a.chunk = split.chunk;
  a.n_chunks = split.n_chunks;

  const dim3 grid(unsigned(row_tiles), unsigned(p.n_kv_heads), unsigned(a.n_chunks));
  if (a.n_chunks == 1) {
    if (bf16) launch_ndv<uint16_t>(a, grid, smem, s);
    else launch_ndv<float>(a, grid, smem, s);
    return;
  }
  StreamScratch work(partial_bytes(p, a.n_chunks), s, "attention");
  a.part_o = work.as<float>();
  a.part_ml = partial_ml(p, a.n_chunks, a.part_o);
  if (bf16) launch_ndv<uint16_t>(a, grid, smem, s);
  else launch_ndv<float>(a, grid, smem, s);
  launch_merge(a, s);
}

void attention_batch(const std::vector<AttentionParams>& ps, Stream stream) {
  const cudaStream_t s = as_cuda(stream);
  // One launch when every sequence has the latent shape over one cache with the same layout (a
  // decode step of absorbed MLA), its keys counted on the host, and no graph is being recorded;
  // or, with the keys counted on the device, a uniform batch (a graph-replayed step); else one
  // call per sequence.
  bool together = ps.size() > 1 && g_latent_attention && !capturing(s);
  for (size_t i = 0; together && i < ps.size(); ++i) {
    const AttentionParams& p = ps[i];
    const AttentionParams& f = ps[0];
    together = mla_supported(p) && !p.kv_len && p.n_q > 0 && p.k == f.k && p.k_token_stride == f.k_token_stride &&
               p.k_head_stride == f.k_head_stride && p.q_token_stride == f.q_token_stride &&
               p.q_head_stride == f.q_head_stride && p.out_token_stride == f.out_token_stride &&
               p.out_head_stride == f.out_head_stride && p.n_q_heads == f.n_q_heads && p.n_kv_heads == f.n_kv_heads &&
               p.scale == f.scale && p.causal == f.causal && p.block_size == f.block_size &&
               (p.block_table != nullptr) == (f.block_table != nullptr) && p.q_pos0 >= 0;
  }
  if (!together) {
    if (g_latent_attention && uniform_batch(ps)) return attention_latent_uniform(ps, s);
    for (const AttentionParams& p : ps) attention(p, stream);
    return;
  }
  for (const AttentionParams& p : ps)
    FATHOM_CHECK(p.n_q_heads % p.n_kv_heads == 0 && p.n_kv_heads <= 65535 && (!p.block_table || p.block_size > 0) &&
                     p.q && p.out,
                 "attention_batch: a sequence's heads, block size or pointers are invalid");
  attention_latent_batch(ps, s);
}

}  // namespace fathom::cuda
