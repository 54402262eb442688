// The KV cache of multi-head latent attention (MLA).
//
// Absorbed mode caches, per token and layer, only what MLA compresses keys and values into:
// the normalised latent c_kv (kv_lora_rank floats; DeepSeek's `kv_cache`) and the rotated
// decoupled rope key k_pe (qk_rope_head_dim floats, shared by all heads; `pe_cache`). They sit
// side by side in one row, [c_kv | k_pe], so attention reads the row as a 576-wide MQA key
// (for V3) and its first kv_lora_rank floats as the value.
//
// Naive mode caches what standard multi-head attention would: the decompressed per-head
// keys (n_heads * qk_head_dim) and values (n_heads * v_head_dim).
//
// A cache is contiguous (its own storage, position p at row p, grown by reallocation) or paged:
// its positions live in blocks of a shared KvBlockPool (model/kv_pool.h) listed by its block
// table, taken a block at a time, shared with other sequences (fork, prefix caching) and
// copied before a write to a shared one (copy-on-write).
#pragma once
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"

// Storage comes from the backend (host or GPU memory); elements are F32, or BF16 on the GPU.

namespace fathom {

class Ops;
class KvBlockPool;

enum class MlaMode { Naive, Absorbed };
const char* mla_mode_name(MlaMode m);

struct LayerKvCache {
  Tensor latent;  // absorbed: (capacity, kv_lora_rank + qk_rope_head_dim)  [c_kv | k_pe]
  Tensor k;       // naive: (capacity, n_heads, qk_head_dim)
  Tensor v;       // naive: (capacity, n_heads, v_head_dim)
};

class KvCache {
 public:
  // A contiguous cache. `max_capacity` bounds growth (the backend's memory budget); reserve
  // beyond it throws.
  KvCache(Ops& ops, const ModelConfig& c, int n_layers, MlaMode mode, int64_t capacity = 256,
          DType dtype = DType::F32, int64_t max_capacity = std::numeric_limits<int64_t>::max());
  // An empty paged cache drawing its blocks from `pool`.
  explicit KvCache(std::shared_ptr<KvBlockPool> pool);
  ~KvCache();  // a paged cache gives its blocks back
  KvCache(KvCache&& o) noexcept;
  KvCache& operator=(KvCache&& o) noexcept;
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  MlaMode mode() const { return mode_; }
  int64_t length() const { return length_; }    // tokens already cached
  int64_t capacity() const { return capacity_; }  // paged: the blocks held, in tokens
  int64_t max_capacity() const { return max_capacity_; }
  DType dtype() const { return dtype_; }
  // The storage of layer i: the cache's own, or (paged) the pool's, rows found via block_table()
  LayerKvCache& layer(int i);
  int n_layers() const { return n_layers_; }

  bool paged() const { return pool_ != nullptr; }
  KvBlockPool* pool() const { return pool_.get(); }
  int block_size() const;
  const std::vector<int32_t>& block_table() const { return blocks_; }
  // The storage row of position p (p < capacity()).
  int64_t row(int64_t p) const;
  // Where every layer's storage is now (changes when reserve grows the cache): a replayed
  // graph that baked these addresses in is valid while they stay the same.
  std::vector<const void*> storage() const;

  // Makes room for n more tokens (keeping the cached ones): contiguous, growing geometrically;
  // paged, taking blocks from the pool (KvCacheFull when it has none: nothing changes then) and
  // copying any shared block the n tokens will be written into.
  void reserve(int64_t n_more);
  // Blocks reserve(n_more) would take from the pool now (paged; 0 for a contiguous cache).
  int64_t blocks_needed(int64_t n_more) const;
  // Marks n tokens appended (every layer has written them).
  void advance(int64_t n) { length_ += n; }
  void clear() { truncate(0); }
  // Forgets every token from position n on (a shared prefix is kept, the rest recomputed); a
  // paged cache gives back the blocks past them.
  void truncate(int64_t n);

  // A second cache holding the same tokens: paged, sharing every block (copy-on-write later);
  // contiguous, a copy.
  KvCache fork() const;
  // Prefix caching (paged, empty cache): takes the pool's published blocks that hold tokens
  // [0, k * block_size) of `tokens`, for the largest k with k * block_size <= limit, and
  // returns how many tokens they hold (the cache's new length). Counted in the pool's stats.
  // `root` keys what precedes the first block (0: nothing) and `shift` says that position p's
  // content is keyed by tokens[p + shift]: the MTP module's cache, whose position p combines
  // the token after it, keys its blocks by the sequence shifted by one, rooted in its first
  // token (mtp_prefix_root).
  int64_t attach_prefix(const std::vector<int32_t>& tokens, int64_t limit, uint64_t root = 0, int64_t shift = 0);
  // Publishes every block full of the first min(length(), tokens.size() - shift) positions,
  // keyed as attach_prefix looks them up, for later prefix hits (paged; a no-op for a
  // contiguous cache).
  void publish(const std::vector<int32_t>& tokens, uint64_t root = 0, int64_t shift = 0);

  // Bytes one token occupies in one layer's cache, for elements of `elem_bytes` bytes.
  static int64_t bytes_per_token_per_layer(const ModelConfig& c, MlaMode mode, int64_t elem_bytes);

 private:
  void allocate(LayerKvCache& l, int64_t capacity) const;

  void release_all();

  Ops* ops_;             // the backend whose memory holds the cache (outlives it: owned by the Model)
  ModelConfig config_;  // a copy: the cache may outlive nothing it points at
  MlaMode mode_;
  DType dtype_;
  int n_layers_ = 0;
  int64_t length_ = 0, capacity_ = 0, max_capacity_;
  std::vector<LayerKvCache> layers_;  // contiguous only
  std::shared_ptr<KvBlockPool> pool_;  // paged only
  std::vector<int32_t> blocks_;        // paged: the block table
  int64_t n_published_ = 0;            // paged: leading blocks published (or taken from the prefix cache)
};

// The root key of an MTP cache's prefix chain (attach_prefix, publish with shift 1): its blocks
// depend on the sequence's first token too. Above every block key a pool hands out.
inline uint64_t mtp_prefix_root(int32_t first_token) { return (uint64_t(1) << 63) | uint32_t(first_token); }

// The paging arrays of a batched step, in device memory: for each paged cache, its block table
// and the storage rows its new tokens are written to. Build after reserving, before advancing.
class KvPaging {
 public:
  KvPaging(Ops& ops, const std::vector<KvCache*>& caches, const std::vector<int64_t>& n_new);
  // Sequence b's pointers for the step (null for a contiguous cache).
  const int32_t* block_table(size_t b) const { return at(table_at_[b]); }
  const int32_t* rows(size_t b) const { return at(rows_at_[b]); }

 private:
  const int32_t* at(int64_t i) const { return i < 0 ? nullptr : dev_.ptr<int32_t>() + i; }
  std::vector<int32_t> host_;  // kept alive: the CPU backend's upload is a view of it
  Tensor dev_;
  std::vector<int64_t> table_at_, rows_at_;
};

}  // namespace fathom
