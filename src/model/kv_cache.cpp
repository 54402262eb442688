#include "model/kv_cache.h"

#include <algorithm>
#include <cstring>

namespace fathom {

const char* mla_mode_name(MlaMode m) { return m == MlaMode::Naive ? "naive" : "absorbed"; }

KvCache::KvCache(const ModelConfig& c, int n_layers, MlaMode mode, int64_t capacity)
    : config_(c), mode_(mode), capacity_(std::max<int64_t>(capacity, 1)), layers_(size_t(n_layers)) {
  for (auto& l : layers_) allocate(l, capacity_);
}

void KvCache::allocate(LayerKvCache& l, int64_t capacity) const {
  const ModelConfig& c = config_;
  if (mode_ == MlaMode::Absorbed) {
    l.latent = Tensor::zeros({capacity, c.kv_lora_rank + c.qk_rope_head_dim});
  } else {
    l.k = Tensor::zeros({capacity, c.num_attention_heads, c.qk_head_dim()});
    l.v = Tensor::zeros({capacity, c.num_attention_heads, c.v_head_dim});
  }
}

void KvCache::reserve(int64_t n_more) {
  if (length_ + n_more <= capacity_) return;
  int64_t cap = std::max(length_ + n_more, capacity_ * 2);
  for (auto& l : layers_) {
    LayerKvCache grown;
    allocate(grown, cap);
    auto keep = [&](Tensor& to, const Tensor& from) {
      if (from.defined()) std::memcpy(to.data(), from.data(), from.nbytes() / size_t(capacity_) * size_t(length_));
    };
    keep(grown.latent, l.latent);
    keep(grown.k, l.k);
    keep(grown.v, l.v);
    l = grown;
  }
  capacity_ = cap;
}

int64_t KvCache::bytes_per_token_per_layer(const ModelConfig& c, MlaMode mode, int64_t elem_bytes) {
  if (mode == MlaMode::Absorbed) return (c.kv_lora_rank + c.qk_rope_head_dim) * elem_bytes;
  return int64_t(c.num_attention_heads) * (c.qk_head_dim() + c.v_head_dim) * elem_bytes;
}

}  // namespace fathom
