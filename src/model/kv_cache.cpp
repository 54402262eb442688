#include "model/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "model/kv_pool.h"
#include "ops/ops.h"

namespace fathom {

const char* mla_mode_name(MlaMode m) { return m == MlaMode::Naive ? "naive" : "absorbed"; }

KvCache::KvCache(Ops& ops, const ModelConfig& c, int n_layers, MlaMode mode, int64_t capacity, DType dtype,
                 int64_t max_capacity)
    : ops_(&ops), config_(c), mode_(mode), dtype_(dtype), n_layers_(n_layers), capacity_(std::max<int64_t>(capacity, 1)),
      max_capacity_(max_capacity), layers_(size_t(n_layers)) {
  FATHOM_CHECK(dtype == DType::F32 || dtype == DType::BF16, "KV cache elements must be F32 or BF16, not ",
               dtype_name(dtype));
  FATHOM_CHECK(capacity_ <= max_capacity_, "a KV cache of ", capacity_, " tokens does not fit the memory budget, which holds ",
               max_capacity_, " tokens (", bytes_per_token_per_layer(c, mode, int64_t(dtype_size(dtype))) * n_layers,
               " bytes each); raise --gpu-memory or shorten the sequence");
  for (auto& l : layers_) allocate(l, capacity_);
}

KvCache::KvCache(std::shared_ptr<KvBlockPool> pool)
    : ops_(&pool->ops()), config_(pool->config()), mode_(pool->mode()), dtype_(pool->dtype()),
      n_layers_(pool->n_layers()), max_capacity_(pool->n_blocks() * pool->block_size()), pool_(std::move(pool)) {}

KvCache::~KvCache() { release_all(); }

KvCache::KvCache(KvCache&& o) noexcept
    : ops_(o.ops_), config_(o.config_), mode_(o.mode_), dtype_(o.dtype_), n_layers_(o.n_layers_), length_(o.length_),
      capacity_(o.capacity_), max_capacity_(o.max_capacity_), layers_(std::move(o.layers_)), pool_(std::move(o.pool_)),
      blocks_(std::move(o.blocks_)), n_published_(o.n_published_) {
  o.blocks_.clear();
  o.length_ = o.capacity_ = o.n_published_ = 0;
}

KvCache& KvCache::operator=(KvCache&& o) noexcept {
  if (this == &o) return *this;
  release_all();
  ops_ = o.ops_;
  config_ = o.config_;
  mode_ = o.mode_;
  dtype_ = o.dtype_;
  n_layers_ = o.n_layers_;
  length_ = o.length_;
  capacity_ = o.capacity_;
  max_capacity_ = o.max_capacity_;
  layers_ = std::move(o.layers_);
  pool_ = std::move(o.pool_);
  blocks_ = std::move(o.blocks_);
  n_published_ = o.n_published_;
  o.blocks_.clear();
  o.length_ = o.capacity_ = o.n_published_ = 0;
  return *this;
}

void KvCache::release_all() {
  if (pool_)
    for (int32_t b : blocks_) pool_->release(b);
  blocks_.clear();
}

LayerKvCache& KvCache::layer(int i) {
  FATHOM_ASSERT(i >= 0 && i < n_layers_, "KV cache layer ", i, " of ", n_layers_);
  return pool_ ? pool_->layer(i) : layers_[size_t(i)];
}

int KvCache::block_size() const { return pool_ ? pool_->block_size() : 0; }

int64_t KvCache::row(int64_t p) const {
  if (!pool_) return p;
  const int64_t bs = pool_->block_size();
  return int64_t(blocks_[size_t(p / bs)]) * bs + p % bs;
}

int64_t KvCache::blocks_needed(int64_t n_more) const {
  if (!pool_ || n_more <= 0) return 0;
  const int64_t bs = pool_->block_size();
  const int64_t have = int64_t(blocks_.size()), need = (length_ + n_more + bs - 1) / bs;
  int64_t n = std::max<int64_t>(need - have, 0);
  for (int64_t i = length_ / bs; i < std::min(need, have); ++i) n += pool_->refs(blocks_[size_t(i)]) > 1;
  return n;
}

void KvCache::truncate(int64_t n) {
  length_ = n < length_ ? (n < 0 ? 0 : n) : length_;
  if (!pool_) return;
  const int64_t bs = pool_->block_size(), keep = (length_ + bs - 1) / bs;
  while (int64_t(blocks_.size()) > keep) {
    pool_->release(blocks_.back());
    blocks_.pop_back();
  }
  n_published_ = std::min(n_published_, keep);
  capacity_ = int64_t(blocks_.size()) * bs;
}

KvCache KvCache::fork() const {
  if (pool_) {
    KvCache f(pool_);
    for (int32_t b : blocks_) pool_->retain(b);
    f.blocks_ = blocks_;
    f.length_ = length_;
    f.capacity_ = capacity_;
    f.n_published_ = n_published_;
    return f;
  }
  KvCache f(*ops_, config_, n_layers_, mode_, capacity_, dtype_, max_capacity_);
  for (int l = 0; l < n_layers_; ++l) {
    const LayerKvCache& from = layers_[size_t(l)];
    LayerKvCache& to = f.layers_[size_t(l)];
    for (auto [t, s] : {std::pair{&to.latent, &from.latent}, {&to.k, &from.k}, {&to.v, &from.v}})
      if (s->defined()) ops_->copy_bytes(t->data(), s->data(), s->nbytes() / size_t(capacity_) * size_t(length_));
  }
  f.length_ = length_;
  return f;
}

int64_t KvCache::attach_prefix(const std::vector<int32_t>& tokens, int64_t limit, uint64_t root, int64_t shift) {
  FATHOM_CHECK(pool_ && length_ == 0 && blocks_.empty(), "attach_prefix needs an empty paged cache");
  FATHOM_CHECK(shift >= 0, "attach_prefix: negative shift ", shift);
  const int64_t bs = pool_->block_size();
  limit = std::min<int64_t>(limit, int64_t(tokens.size()) - shift);
  uint64_t parent = root;
  while (int64_t(blocks_.size() + 1) * bs <= limit) {
    const int32_t b = pool_->find(parent, tokens.data() + shift + int64_t(blocks_.size()) * bs);
    if (b < 0) break;
    blocks_.push_back(b);
    parent = pool_->key(b);
  }
  n_published_ = int64_t(blocks_.size());
  length_ = capacity_ = int64_t(blocks_.size()) * bs;
  pool_->count_lookup(std::max<int64_t>(limit, 0), length_);
  return length_;
}

void KvCache::publish(const std::vector<int32_t>& tokens, uint64_t root, int64_t shift) {
  if (!pool_) return;
  const int64_t bs = pool_->block_size();
  const int64_t full = std::min<int64_t>(length_, int64_t(tokens.size()) - shift) / bs;
  for (; n_published_ < full; ++n_published_) {
    const int32_t b = blocks_[size_t(n_published_)];
    if (pool_->published(b)) continue;  // a shared block its other holder published
    const uint64_t parent = n_published_ == 0 ? root : pool_->key(blocks_[size_t(n_published_ - 1)]);
    pool_->publish(b, parent, tokens.data() + shift + n_published_ * bs);
  }
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
  if (pool_) {
    if (n_more <= 0) return;
    const int64_t bs = pool_->block_size();
    FATHOM_CHECK(length_ + n_more <= max_capacity_, "a sequence of ", length_ + n_more,
                 " tokens does not fit the KV cache, which holds ", max_capacity_, " tokens in all");
    const int64_t want = blocks_needed(n_more);
    if (want > pool_->free_blocks())
      throw KvCacheFull(cat("the KV cache is full: ", n_more, " more tokens need ", want, " blocks of ", bs,
                            " tokens and ", pool_->free_blocks(), " are free"));
    const int64_t need = (length_ + n_more + bs - 1) / bs, first = length_ / bs;
    // the blocks the new tokens are written into change: a shared one is copied first, and
    // none of them stays published (its content is no longer what was published)
    for (int64_t i = first; i < std::min<int64_t>(need, int64_t(blocks_.size())); ++i) {
      int32_t& b = blocks_[size_t(i)];
      if (pool_->refs(b) > 1) {
        const int32_t copy = pool_->allocate();
        pool_->copy_block(copy, b);
        pool_->release(b);
        b = copy;
      } else {
        pool_->unpublish(b);
      }
    }
    n_published_ = std::min(n_published_, first);
    while (int64_t(blocks_.size()) < need) blocks_.push_back(pool_->allocate());
    capacity_ = int64_t(blocks_.size()) * bs;
    return;
  }
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
  if (pool_) {
    for (int l = 0; l < n_layers_; ++l)
      for (const Tensor* t : {&pool_->layer(l).latent, &pool_->layer(l).k, &pool_->layer(l).v})
        if (t->defined()) out.push_back(t->data());
    return out;
  }
  for (const auto& l : layers_)
    for (const Tensor* t : {&l.latent, &l.k, &l.v})
      if (t->defined()) out.push_back(t->data());
  return out;
}

KvPaging::KvPaging(Ops& ops, const std::vector<KvCache*>& caches, const std::vector<int64_t>& n_new) {
  FATHOM_ASSERT(caches.size() == n_new.size(), "KvPaging: ", caches.size(), " caches, ", n_new.size(), " counts");
  // every paged cache's rows first, in sequence order (consecutive sequences' rows follow each
  // other: one append can write a whole step's tokens), then their block tables
  for (size_t b = 0; b < caches.size(); ++b) {
    const KvCache& kc = *caches[b];
    rows_at_.push_back(kc.paged() ? int64_t(host_.size()) : -1);
    if (!kc.paged()) continue;
    FATHOM_ASSERT(kc.length() + n_new[b] <= kc.capacity(), "KvPaging: cache ", b, " was not reserved");
    for (int64_t i = 0; i < n_new[b]; ++i) host_.push_back(int32_t(kc.row(kc.length() + i)));
  }
  for (size_t b = 0; b < caches.size(); ++b) {
    const KvCache& kc = *caches[b];
    table_at_.push_back(kc.paged() ? int64_t(host_.size()) : -1);
    if (kc.paged()) host_.insert(host_.end(), kc.block_table().begin(), kc.block_table().end());
  }
  if (!host_.empty()) dev_ = ops.upload(Tensor::view(host_.data(), {int64_t(host_.size())}, DType::I32, nullptr));
}

int64_t KvCache::bytes_per_token_per_layer(const ModelConfig& c, MlaMode mode, int64_t elem_bytes) {
  if (mode == MlaMode::Absorbed) return (c.kv_lora_rank + c.qk_rope_head_dim) * elem_bytes;
  return int64_t(c.num_attention_heads) * (c.qk_head_dim() + c.v_head_dim) * elem_bytes;
}

}  // namespace fathom
