// The paged KV cache's block manager: one pool of fixed-size blocks of cache rows that every
// sequence of a serving engine draws from (vLLM's PagedAttention, FlashMLA's block table).
//
// Each layer's storage is one tensor of n_blocks * block_size rows (absorbed MLA: the latent row
// [c_kv | k_pe]; naive: per-head k and v). A sequence (a paged KvCache) holds a block table, the
// ids of the blocks that hold its positions in order: position p lives in row
// table[p / block_size] * block_size + p % block_size. Memory is taken a block at a time as a
// sequence grows, so a request holds what it has used, not prompt + max_tokens up front, and
// fragmentation is at most one partly filled block per sequence.
//
// Blocks are reference-counted:
// - fork: a second sequence shares every block of the first (n > 1 choices of one prompt, or
//   requests with the same prompt admitted together): the prompt's KV is computed once.
// - copy-on-write: a sequence about to write into a block it shares gets its own copy first
//   (KvCache::reserve), so sharing is never visible.
// - prefix caching: a block full of known tokens is published under the key (the key of the
//   block before it, its tokens) — the whole prefix, checked exactly, no hash trusted alone. A
//   new sequence whose prompt starts with published blocks takes them instead of recomputing
//   them. A published block nobody holds stays cached and is evicted, least recently released
//   first, only when a block is needed and none is free.
//
// Not thread-safe: one scheduler thread owns the pool and every cache drawing from it.
#pragma once
#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "model/kv_cache.h"

namespace fathom {

// No block is free (none unused, none cached to evict): the caller preempts a sequence or waits.
struct KvCacheFull : Error {
  using Error::Error;
};

struct KvPoolStats {
  int64_t prefix_query_tokens = 0;  // prompt tokens looked up in the prefix cache
  int64_t prefix_hit_tokens = 0;    // of those, found cached (not recomputed)
  int64_t evictions = 0;            // cached blocks reused for new content
  int64_t cow_copies = 0;           // blocks copied before a write to a shared one
};

class KvBlockPool {
 public:
  KvBlockPool(Ops& ops, const ModelConfig& c, int n_layers, MlaMode mode, DType dtype, int block_size,
              int64_t n_blocks);
  KvBlockPool(const KvBlockPool&) = delete;
  KvBlockPool& operator=(const KvBlockPool&) = delete;

  Ops& ops() const { return *ops_; }
  const ModelConfig& config() const { return config_; }
  MlaMode mode() const { return mode_; }
  DType dtype() const { return dtype_; }
  int block_size() const { return block_size_; }
  int64_t n_blocks() const { return int64_t(refs_.size()); }
  int n_layers() const { return int(layers_.size()); }
  LayerKvCache& layer(int l) { return layers_[size_t(l)]; }

  // Blocks a sequence can get now: unused ones plus cached ones nobody holds (evictable).
  int64_t free_blocks() const { return int64_t(free_.size() + lru_.size()); }
  // Blocks held by at least one sequence.
  int64_t used_blocks() const { return n_blocks() - free_blocks(); }
  // Published blocks nobody holds: kept for prefix hits until evicted.
  int64_t cached_blocks() const { return int64_t(lru_.size()); }
  const KvPoolStats& stats() const { return stats_; }

  // A block for new content, held once: an unused one, else the least recently released cached
  // one (its published content forgotten). Throws KvCacheFull when there is neither.
  int32_t allocate();
  void retain(int32_t b);
  // One holder less; at zero the block is free again, or cached when it is published.
  void release(int32_t b);
  int refs(int32_t b) const { return refs_[size_t(b)]; }
  // Every layer's rows of block src copied into block dst.
  void copy_block(int32_t dst, int32_t src);

  // The block published with these block_size tokens after the block whose key is `parent`
  // (0: at the start of a sequence), held once more; -1 when there is none.
  int32_t find(uint64_t parent, const int32_t* tokens);
  // Publishes block b as holding `tokens` (block_size of them) after the block keyed `parent`.
  void publish(int32_t b, uint64_t parent, const int32_t* tokens);
  // Takes b out of the prefix cache (its content is about to change).
  void unpublish(int32_t b);
  bool published(int32_t b) const { return published_[size_t(b)]; }
  // The identity of block b's current content: unique per allocation, never reused, so a
  // published child names its exact parent content even after the parent block is reused.
  uint64_t key(int32_t b) const { return keys_[size_t(b)]; }
  void count_lookup(int64_t queried, int64_t hit) {
    stats_.prefix_query_tokens += queried;
    stats_.prefix_hit_tokens += hit;
  }

 private:
  uint64_t hash(uint64_t parent, const int32_t* tokens) const;
  void check(int32_t b, const char* what) const;

  Ops* ops_;
  ModelConfig config_;
  MlaMode mode_;
  DType dtype_;
  int block_size_;
  std::vector<LayerKvCache> layers_;
  std::vector<int32_t> refs_;
  std::vector<uint64_t> keys_;
  uint64_t next_key_ = 1;
  std::vector<int32_t> free_;  // unused blocks (a stack)
  std::list<int32_t> lru_;     // cached blocks nobody holds, least recently released first
  std::vector<std::list<int32_t>::iterator> lru_at_;
  // the prefix cache: hash of (parent key, tokens) -> blocks; each published block's parent
  // key and tokens to check a hit exactly
  std::unordered_multimap<uint64_t, int32_t> index_;
  std::vector<bool> published_;
  std::vector<uint64_t> parent_;
  std::vector<int32_t> tokens_;  // (n_blocks, block_size)
  KvPoolStats stats_;
};

}  // namespace fathom
