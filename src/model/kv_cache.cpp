#include "model/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "ops/ops.h"

namespace fathom {

const char* mla_mode_name(MlaMode m) { return m == MlaMode::Naive ? "naive" : "absorbed"; }

KvCache::KvCache(Ops& ops, const ModelConfig& c, int n_layers, MlaMode mode, int64_t capacity, DType dtype,
                 int64_t max_capacity)
    : ops_(&ops), config_(c), mode_(mode), dtype_(dtype), capacity_(std::max<int64_t>(capacity, 1)),
      max_capacity_(max_capacity), layers_(size_t(n_layers)) {
  FATHOM_CHECK(dtype == DType::F32 || dtype == DType::BF16, "KV cache elements must be F32 or BF16, not ",
               dtype_name(dtype));
  FATHOM_CHECK(capacity_ <= max_capacity_, "a KV cache of ", capacity_, " tokens does not fit the memory budget, which holds ",
               max_capacity_, " tokens (", bytes_per_token_per_layer(c, mode, int64_t(dtype_size(dtype))) * n_layers,
               " bytes each); raise --gpu-memory or shorten the sequence");
  for (auto& l : layers_) allocate(l, capacity_);
}

void KvCache::allocate(LayerKvCache& l, int64_t capacity) const {
  const ModelConfig& c = config_;
  if (mode_ == MlaMode::Absorbed) {
    l.latent = ops_->empty({capacity, c.kv_lora_rank + c.qk_rope_head_dim}, dtype_);
  } else {
    l.k = ops_->empty({capacity, c.num_attention_heads, c.qk_head_dim()}, dtype_);
    l.v = ops_->empty({capacity, c.num_attention_heads, c.v_head_dim}, dtype_);
  }
}

void KvCache::reserve(int64_t n_more) {
  if (length_ + n_more <= capacity_) return;
  FATHOM_CHECK(length_ + n_more <= max_capacity_, "the KV cache is full: ", length_, " tokens cached and ", n_more,
               " more requested, but the memory budget holds ", max_capacity_, " tokens; raise --gpu-memory or shorten "
               "the conversation");
  int64_t cap = std::min(std::max(length_ + n_more, capacity_ * 2), max_capacity_);
  for (auto& l : layers_) {
    LayerKvCache grown;
    allocate(grown, cap);
    auto keep = [&](Tensor& to, const Tensor& from) {
      if (from.defined()) ops_->copy_bytes(to.data(), from.data(), from.nbytes() / size_t(capacity_) * size_t(length_));
    };
    keep(grown.latent, l.latent);
    keep(grown.k, l.k);
    keep(grown.v, l.v);
    l = grown;
  }
  capacity_ = cap;
}

std::vector<const void*> KvCache::storage() const {
  std::vector<const void*> out;
  for (const auto& l : layers_)
    for (const Tensor* t : {&l.latent, &l.k, &l.v})
      if (t->defined()) out.push_back(t->data());
  return out;
}

int64_t KvCache::bytes_per_token_per_layer(const ModelConfig& c, MlaMode mode, int64_t elem_bytes) {
  if (mode == MlaMode::Absorbed) return (c.kv_lora_rank + c.qk_rope_head_dim) * elem_bytes;
  return int64_t(c.num_attention_heads) * (c.qk_head_dim() + c.v_head_dim) * elem_bytes;
}

}  // namespace fathom
