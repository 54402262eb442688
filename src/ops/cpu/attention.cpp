#include "ops/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/error.h"
#include "ops/cpu/vec.h"

namespace fathom::cpu {

namespace {

// One unit of work: keys [k0, k1) of query i against KV head g.
struct Item {
  int64_t i, k0, k1;
  int g;
};

}  // namespace

void attention(const AttentionParams& p, ThreadPool& pool) {
  FATHOM_ASSERT(p.n_kv_heads > 0 && p.n_q_heads % p.n_kv_heads == 0);
  FATHOM_CHECK(p.kv_dtype == DType::F32, "CPU attention reads an F32 KV cache, not ", dtype_name(p.kv_dtype));
  FATHOM_ASSERT(!p.block_table || p.block_size > 0);
  const float* kbase = static_cast<const float*>(p.k);
  const float* vbase = static_cast<const float*>(p.v);
  // The cache row of key j: paged through the block table, or row j.
  auto row = [&](int64_t j) {
    return p.block_table ? int64_t(p.block_table[j / p.block_size]) * p.block_size + j % p.block_size : j;
  };
  const int group = p.n_q_heads / p.n_kv_heads;
  const int dv = p.d_v;
  auto n_keys = [&](int64_t i) { return p.causal ? std::min(p.n_kv, p.q_pos0 + i + 1) : p.n_kv; };

  // Chunks of keys: small enough that a single decoded query still spreads over all
  // threads, large enough that the partial results stay few.
  const int64_t chunk = std::clamp<int64_t>((p.n_kv + 4 * pool.size() - 1) / (4 * pool.size()), 64, 1024);
  std::vector<Item> items;
  std::vector<int64_t> first_item(static_cast<size_t>(p.n_q * p.n_kv_heads) + 1);
  for (int64_t i = 0; i < p.n_q; ++i)
    for (int g = 0; g < p.n_kv_heads; ++g) {
      first_item[size_t(i * p.n_kv_heads + g)] = int64_t(items.size());
      const int64_t n = n_keys(i);
      for (int64_t k0 = 0; k0 < n; k0 += chunk) items.push_back({i, k0, std::min(n, k0 + chunk), g});
    }
  first_item.back() = int64_t(items.size());

  // Per item and query head of the group: [max, sum, out (dv)]
  const int64_t part = 2 + dv;
  std::vector<float> partial(static_cast<size_t>(int64_t(items.size()) * group * part));
  std::vector<std::vector<float>> scores(static_cast<size_t>(pool.size()));

  pool.parallel_for(int64_t(items.size()), [&](int64_t b, int64_t e, int tid) {
    std::vector<float>& s = scores[size_t(tid)];  // (group, chunk)
    s.resize(size_t(group * chunk));
    for (int64_t it = b; it < e; ++it) {
      const Item& w = items[size_t(it)];
      const int64_t len = w.k1 - w.k0;
      const float* q0 = p.q + w.i * p.q_token_stride + int64_t(w.g) * group * p.q_head_stride;
      // scores: each key row is loaded once and dotted with every query head of the group
      float dots[8];
      for (int64_t j = 0; j < len; ++j) {
        const float* k = kbase + row(w.k0 + j) * p.k_token_stride + int64_t(w.g) * p.k_head_stride;
        for (int h0 = 0; h0 < group; h0 += 8) {
          const int n = std::min(8, group - h0);
          dot_many(k, q0 + h0 * p.q_head_stride, p.q_head_stride, n, p.d_qk, dots);
          for (int h = 0; h < n; ++h) s[size_t((h0 + h) * chunk + j)] = dots[h] * p.scale;
        }
      }
      float* out0 = partial.data() + it * group * part;
      for (int h = 0; h < group; ++h) {
        float* sh = s.data() + h * chunk;
        float mx = *std::max_element(sh, sh + len);
        double sum = 0.0;
        for (int64_t j = 0; j < len; ++j) sum += (sh[j] = std::exp(sh[j] - mx));
        out0[h * part] = mx;
        out0[h * part + 1] = float(sum);
        std::memset(out0 + h * part + 2, 0, sizeof(float) * size_t(dv));
      }
      // values: each value row is loaded once and accumulated into every head of the group
      for (int64_t j = 0; j < len; ++j) {
        const float* v = vbase + row(w.k0 + j) * p.v_token_stride + int64_t(w.g) * p.v_head_stride;
        for (int h = 0; h < group; ++h) axpy(out0 + h * part + 2, s[size_t(h * chunk + j)], v, dv);
      }
    }
  });

  // Merge the chunks of each (query, head): out = Σ e^(m_c − m) o_c / Σ e^(m_c − m) l_c
  for (int64_t i = 0; i < p.n_q; ++i)
    for (int g = 0; g < p.n_kv_heads; ++g) {
      const int64_t b = first_item[size_t(i * p.n_kv_heads + g)], e = first_item[size_t(i * p.n_kv_heads + g) + 1];
      for (int h = 0; h < group; ++h) {
        float* o = p.out + i * p.out_token_stride + int64_t(g * group + h) * p.out_head_stride;
        std::memset(o, 0, sizeof(float) * size_t(dv));
        if (b == e) continue;  // no visible key: zeros
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t it = b; it < e; ++it) mx = std::max(mx, partial[size_t((it * group + h) * part)]);
        double denom = 0.0;
        for (int64_t it = b; it < e; ++it) {
          const float* pc = partial.data() + (it * group + h) * part;
          const float c = std::exp(pc[0] - mx);
          denom += double(c) * pc[1];
          axpy(o, c, pc + 2, dv);
        }
        scale(o, float(1.0 / denom), dv);
      }
    }
}

}  // namespace fathom::cpu
