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
#pragma once
#include <cstdint>
#include <limits>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"

// Storage comes from the backend (host or GPU memory); elements are F32, or BF16 on the GPU.

namespace fathom {

class Ops;

enum class MlaMode { Naive, Absorbed };
const char* mla_mode_name(MlaMode m);

struct LayerKvCache {
  Tensor latent;  // absorbed: (capacity, kv_lora_rank + qk_rope_head_dim)  [c_kv | k_pe]
  Tensor k;       // naive: (capacity, n_heads, qk_head_dim)
  Tensor v;       // naive: (capacity, n_heads, v_head_dim)
};

class KvCache {
 public:
  // `max_capacity` bounds growth (the backend's memory budget); reserve beyond it throws.
  KvCache(Ops& ops, const ModelConfig& c, int n_layers, MlaMode mode, int64_t capacity = 256,
          DType dtype = DType::F32, int64_t max_capacity = std::numeric_limits<int64_t>::max());

  MlaMode mode() const { return mode_; }
  int64_t length() const { return length_; }    // tokens already cached
  int64_t capacity() const { return capacity_; }
  int64_t max_capacity() const { return max_capacity_; }
  DType dtype() const { return dtype_; }
  LayerKvCache& layer(int i) { return layers_[size_t(i)]; }
  int n_layers() const { return int(layers_.size()); }
  // Where every layer's storage is now (changes when reserve grows the cache): a replayed
  // graph that baked these addresses in is valid while they stay the same.
  std::vector<const void*> storage() const;

  // Makes room for n more tokens (keeping the cached ones), growing geometrically.
  void reserve(int64_t n_more);
  // Marks n tokens appended (every layer has written them).
  void advance(int64_t n) { length_ += n; }
  void clear() { length_ = 0; }
  // Forgets every token from position n on (a shared prefix is kept, the rest recomputed).
  void truncate(int64_t n) { length_ = n < length_ ? (n < 0 ? 0 : n) : length_; }

  // Bytes one token occupies in one layer's cache, for elements of `elem_bytes` bytes.
  static int64_t bytes_per_token_per_layer(const ModelConfig& c, MlaMode mode, int64_t elem_bytes);

 private:
  void allocate(LayerKvCache& l, int64_t capacity) const;

  Ops* ops_;             // the backend whose memory holds the cache (outlives it: owned by the Model)
  ModelConfig config_;  // a copy: the cache may outlive nothing it points at
  MlaMode mode_;
  DType dtype_;
  int64_t length_ = 0, capacity_ = 0, max_capacity_;
  std::vector<LayerKvCache> layers_;
};

}  // namespace fathom
