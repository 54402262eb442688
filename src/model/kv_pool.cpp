#include "model/kv_pool.h"

#include <algorithm>
#include <cstring>

#include "ops/ops.h"

namespace fathom {

KvBlockPool::KvBlockPool(Ops& ops, const ModelConfig& c, int n_layers, MlaMode mode, DType dtype, int block_size,
                         int64_t n_blocks)
    : ops_(&ops), config_(c), mode_(mode), dtype_(dtype), block_size_(block_size), layers_(size_t(n_layers)) {
  FATHOM_CHECK(block_size >= 1 && block_size <= 4096, "KV block size ", block_size, " is out of range (1 to 4096)");
  FATHOM_CHECK(n_blocks >= 1 && n_blocks <= (int64_t(1) << 31) / block_size, "a KV pool of ", n_blocks,
               " blocks of ", block_size, " tokens is out of range (at least one block, fewer than 2^31 rows)");
  FATHOM_CHECK(dtype == DType::F32 || dtype == DType::BF16, "KV cache elements must be F32 or BF16, not ",
               dtype_name(dtype));
  const int64_t rows = n_blocks * block_size;
  for (auto& l : layers_) {
    if (mode == MlaMode::Absorbed) {
      l.latent = ops.empty({rows, c.kv_lora_rank + c.qk_rope_head_dim}, dtype);
    } else {
      l.k = ops.empty({rows, c.num_attention_heads, c.qk_head_dim()}, dtype);
      l.v = ops.empty({rows, c.num_attention_heads, c.v_head_dim}, dtype);
    }
  }
  refs_.assign(size_t(n_blocks), 0);
  keys_.assign(size_t(n_blocks), 0);
  published_.assign(size_t(n_blocks), false);
  parent_.assign(size_t(n_blocks), 0);
  tokens_.assign(size_t(n_blocks * block_size), 0);
  lru_at_.resize(size_t(n_blocks));
  free_.reserve(size_t(n_blocks));
  for (int64_t b = n_blocks - 1; b >= 0; --b) free_.push_back(int32_t(b));  // block 0 handed out first
}

void KvBlockPool::check(int32_t b, const char* what) const {
  FATHOM_ASSERT(b >= 0 && b < int32_t(refs_.size()), what, ": block ", b, " is not in the pool of ", refs_.size());
}

int32_t KvBlockPool::allocate() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {
    b = lru_.front();
    lru_.pop_front();
    unpublish(b);
    ++stats_.evictions;
  } else {
    throw KvCacheFull(cat("the KV cache is full: all ", n_blocks(), " blocks of ", block_size_,
                          " tokens are held by running sequences"));
  }
  refs_[size_t(b)] = 1;
  keys_[size_t(b)] = next_key_++;
  return b;
}

void KvBlockPool::retain(int32_t b) {
  check(b, "retain");
  if (refs_[size_t(b)]++ == 0) {  // a cached block taken back: no longer evictable
    FATHOM_ASSERT(published_[size_t(b)], "retain: block ", b, " is free");
    lru_.erase(lru_at_[size_t(b)]);
  }
}

void KvBlockPool::release(int32_t b) {
  check(b, "release");
  FATHOM_ASSERT(refs_[size_t(b)] > 0, "release: block ", b, " is not held");
  if (--refs_[size_t(b)] > 0) return;
  if (published_[size_t(b)]) {
    lru_at_[size_t(b)] = lru_.insert(lru_.end(), b);
  } else {
    free_.push_back(b);
  }
}

void KvBlockPool::copy_block(int32_t dst, int32_t src) {
  check(dst, "copy_block");
  check(src, "copy_block");
  for (auto& l : layers_)
    for (Tensor* t : {&l.latent, &l.k, &l.v})
      if (t->defined()) {
        const size_t row = t->nbytes() / size_t(t->dim(0)), bytes = row * size_t(block_size_);
        char* base = static_cast<char*>(t->data());
        ops_->copy_bytes(base + size_t(dst) * bytes, base + size_t(src) * bytes, bytes);
      }
  ++stats_.cow_copies;
}

uint64_t KvBlockPool::hash(uint64_t parent, const int32_t* tokens) const {
  uint64_t h = 1469598103934665603ull ^ (parent * 0x9E3779B97F4A7C15ull);  // FNV-1a over the ids
  for (int i = 0; i < block_size_; ++i) {
    h ^= uint32_t(tokens[i]);
    h *= 1099511628211ull;
  }
  return h;
}

int32_t KvBlockPool::find(uint64_t parent, const int32_t* tokens) {
  auto [lo, hi] = index_.equal_range(hash(parent, tokens));
  for (auto it = lo; it != hi; ++it) {
    const int32_t b = it->second;
    if (parent_[size_t(b)] == parent &&
        std::equal(tokens, tokens + block_size_, tokens_.begin() + int64_t(b) * block_size_)) {
      retain(b);
      return b;
    }
  }
  return -1;
}

void KvBlockPool::publish(int32_t b, uint64_t parent, const int32_t* tokens) {
  check(b, "publish");
  FATHOM_ASSERT(refs_[size_t(b)] > 0 && !published_[size_t(b)], "publish: block ", b, " is free or published");
  published_[size_t(b)] = true;
  parent_[size_t(b)] = parent;
  std::copy(tokens, tokens + block_size_, tokens_.begin() + int64_t(b) * block_size_);
  index_.emplace(hash(parent, tokens), b);
}

void KvBlockPool::unpublish(int32_t b) {
  check(b, "unpublish");
  if (!published_[size_t(b)]) return;
  auto [lo, hi] = index_.equal_range(hash(parent_[size_t(b)], tokens_.data() + int64_t(b) * block_size_));
  for (auto it = lo; it != hi; ++it)
    if (it->second == b) {
      index_.erase(it);
      break;
    }
  published_[size_t(b)] = false;
}

}  // namespace fathom
