// Absorbed-MLA attention on tensor cores (attention_mla.cu), used by attention() (attention.cu)
// for the shape DeepSeek models decode with: one shared latent row [c_kv (512) | k_pe (64)] per
// key in a BF16 cache, the value being its first 512 columns.
#pragma once
#ifndef FATHOM_KERNEL_EMU  // (the kernel emulator brings its own cudaStream_t)
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "ops/ops.h"

namespace fathom::cuda {

// One launch of the latent kernel. The key range of each (row tile, KV head) is cut into
// n_chunks chunks of `chunk` keys (a multiple of kMlaKeys); with n_chunks > 1 every block
// writes its unnormalised output and (max, sum) to part_o / part_ml, in the layout of
// attention.cu's merge kernel, which combines them. (A merge by the last block to finish,
// behind a fence and an atomic counter, measured slower than that second kernel: 12.9 against
// 10.3 us a call at 196 keys, 16.6 against 11.0 at 1,024.)
// Batched launches (attention_batch: a decode step's sequences in one launch) give each
// sequence its own fields of MlaLaunch / AttentionParams here, and each block its (sequence,
// row tile, key chunk) in `items`; the rest of MlaLaunch is common to all of them.
struct MlaSeq {
  const float* q = nullptr;
  float* out = nullptr;
  const int32_t* block_table = nullptr;
  int64_t n_q = 0, n_kv = 0, q_pos0 = 0, rows = 0, chunk = 0;
  int n_chunks = 1;
  float* part_o = nullptr;
  float* part_ml = nullptr;
};

// A uniform batch (attention_batch for a graph-replayed decode step, whose key counts are read
// on the device): n_seqs sequences with the same n_q, key bound p.n_kv and split, whose fields
// step by fixed strides from a.p's — sequence i's q is p.q + i * q, out p.out + i * out, block
// table p.block_table + i * table, key count p.kv_len[i], partials part_o + i * part_o (and
// part_ml likewise) — so no descriptor table is built on the host (nothing a replay would have
// to upload again). Block x is (chunk, sequence, row tile), chunk-major: the chunks past a
// sequence's keys (the grid covers the bound) exit at once, and the merge takes only the chunks
// that ran.
struct MlaUniform {
  int n_seqs = 0;  // 0: not a uniform batch
  int64_t row_tiles = 0;
  int64_t q = 0, out = 0, table = 0;  // strides between sequences, in elements
  int64_t part_o = 0, part_ml = 0;    // floats of partials per sequence
  // > 0: the blocks one wave holds (one per SM); the chunk is then chosen on the device for the
  // keys there are (uniform_chunk), not for the bound the launch was sized for
  int wave = 0;
};

struct MlaLaunch {
  AttentionParams p;
  int group = 1;     // query heads per KV head
  int64_t rows = 0;  // query rows per KV head: n_q * group
  int64_t chunk = 0;
  int n_chunks = 1;
  float* part_o = nullptr;
  float* part_ml = nullptr;
  bool vec_q = false;  // Q rows 16-byte aligned: float4 loads
  // Single launches on Hopper with 2 to kMlaClusterMax chunks: the chunks of a row tile run as one
  // thread-block cluster and merge through distributed shared memory at the end (each block
  // combines its share of the dims from every chunk's partial output) — no partials in global
  // memory and no merge kernel.
  bool cluster_merge = false;
  const MlaSeq* seqs = nullptr;  // batched: the sequences (device memory)
  const int4* items = nullptr;   // batched: block x's (sequence, row tile, chunk) (device memory)
  MlaUniform u;                  // a uniform batch (items null)
};

// A sequence's fields of s set into a (the batched kernels' first step).
__device__ inline void take_seq(MlaLaunch& a, const MlaSeq& s) {
  a.p.q = s.q;
  a.p.out = s.out;
  a.p.block_table = s.block_table;
  a.p.n_q = s.n_q;
  a.p.n_kv = s.n_kv;
  a.p.q_pos0 = s.q_pos0;
  a.rows = s.rows;
  a.chunk = s.chunk;
  a.n_chunks = s.n_chunks;
  a.part_o = s.part_o;
  a.part_ml = s.part_ml;
}

// Sequence `seq`'s fields of a uniform batch set into a.p and a's partials.
__device__ inline void take_uniform_seq(AttentionParams& p, float*& part_o, float*& part_ml, const MlaUniform& u,
                                        int64_t seq) {
  p.q += seq * u.q;
  p.out += seq * u.out;
  if (p.block_table) p.block_table += seq * u.table;
  p.kv_len += seq;
  if (part_o) part_o += seq * u.part_o;
  if (part_ml) part_ml += seq * u.part_ml;
}

constexpr int kMlaKeys = 64;  // keys per tile of the latent kernel
constexpr int kMlaRows = 16;  // query rows per block (one m16 MMA tile)
constexpr int kMlaClusterMax = 8;  // the portable cluster size: the most chunks merged in a cluster

// A uniform batch's keys per chunk for this step (u.wave > 0; else `chunk`, the host's split of
// the bound): the batch's longest key count cut into as many chunks per sequence as let all of
// them run in one wave, at most n_chunks (the partials' room), in whole tiles. The launch is
// sized (and a graph recorded) for the key bound, up to twice the keys a step has; splitting the
// bound put 160 blocks of 4 tiles on 132 SMs at 32 x 1,152 keys — two waves, 8 tile times —
// where 128 blocks of at most 5 tiles run in one. kv_len: the batch's key counts (sequence 0's
// pointer); every thread of the calling warps takes part (a warp reduction).
__device__ inline int64_t uniform_chunk(const int32_t* kv_len, int64_t n_kv, const MlaUniform& u, int n_chunks,
                                        int64_t chunk) {
  if (u.wave <= 0) return chunk;
  int64_t longest = 0;
  for (int i = int(threadIdx.x % 32); i < u.n_seqs; i += 32) longest = max(longest, min(int64_t(kv_len[i]), n_kv));
  for (int off = 16; off > 0; off >>= 1) longest = max(longest, __shfl_xor_sync(0xffffffffu, longest, off));
  const int64_t per = max(int64_t(1), min(int64_t(n_chunks), int64_t(u.wave) / (int64_t(u.n_seqs) * u.row_tiles)));
  const int64_t tiles = max(int64_t(1), (longest + kMlaKeys - 1) / kMlaKeys);
  return (tiles + per - 1) / per * kMlaKeys;
}

// Once per device (attention_setup() calls it, before any graph capture): the kernel's shared
// memory attribute, and the device's opt-in shared memory per block, which smem_optin() returns
// without asking the driver again.
void mla_setup();
int smem_optin();
// Whether single launches merge their chunks in a cluster (MlaLaunch::cluster_merge): a Hopper GPU
// that can place a cluster of kMlaClusterMax blocks of this kernel; FATHOM_MLA_CLUSTER=0 turns it
// off (the merge kernel then combines the chunks, as on other GPUs).
bool mla_cluster_merge_ok();

// Whether p has the latent shape the kernel is built for (BF16, d_qk 576, d_v 512, V the
// prefix of K, 16-byte aligned rows) and the device has the shared memory it needs.
bool mla_supported(const AttentionParams& p);
// Launches the kernel (no merge); batched (a.items set): n_items blocks per KV head.
void mla_attention(const MlaLaunch& a, cudaStream_t stream, int64_t n_items = 0);

}  // namespace fathom::cuda
