// The decode step replayed from a CUDA graph (Model::decode_greedy, decode_sample and the serving
// engine's decode steps through forward_batch_sample): one new token for each of B sequences,
// recorded once per batch shape and replayed with new inputs copied in from pinned memory.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "fathom/model.h"
#include "model/kv_pool.h"
#include "model/transformer.h"

namespace fathom {

// The decode step a CUDA graph replays: its inputs (token ids, positions, key counts; for paged
// caches also each new token's storage row and the block tables) sit in device buffers filled
// from pinned host memory by the graph's first nodes, so nothing the host knows at capture time
// changes between replays except what those buffers hold.
//
// A graph over contiguous caches bakes in their storage and capacity (a reallocating reserve
// means a new graph). One over paged caches of one pool bakes in only the pool's storage, B and
// the width W of the block tables it reads: any B sequences of the pool whose tables fit W
// blocks replay it — the serving engine's decode steps, whose requests come and go. W is a power
// of two (from 16 blocks) at least the longest table, so the attention's grid, sized for W
// blocks per sequence (the chunks past a sequence's keys exit at once), stays within twice the
// work the longest context needs, and a graph lasts until some context doubles.
struct Model::DecodeGraph {
  int64_t B = 0;
  bool sample = false;         // the next token by Ops::sample instead of the argmax
  bool paged = false;
  int64_t W = 0;               // paged: block-table width
  int block_size = 0;          // paged
  std::vector<KvCache*> caches;      // this step's (contiguous: also the capture's)
  std::vector<const void*> storage;  // every cache's layer storage at capture (paged: the pool's)
  std::vector<int64_t> capacity;     // contiguous: every cache's capacity at capture
  // (B) I32 each: ids, positions, key counts after appending; paged: storage rows, then the
  // (B, W) block tables
  Tensor in_host, in_dev;
  Tensor rows_host, rows_dev;  // (B * sizeof(SampleRow)) U8: each row's sampling, when sampling
  Tensor next_dev, next_host;  // (B) I32: the token chosen for each row
  Tensor logits;               // (B, vocab) F32
  std::shared_ptr<void> graph;  // null: the backend has no graphs, the body runs eagerly
};

Model::Model() = default;
Model::~Model() {
  graphs_.clear();  // before the backend that owns their memory
}

void Model::drop_graphs() {
  graphs_.clear();
  last_graph_miss_.clear();
}

void Model::decode_body(DecodeGraph& g) {
  const ModelConfig& c = w_->config;
  Ops& ops = *ops_;
  const int64_t B = g.B, D = c.hidden_size;
  ops.copy_from_host(g.in_dev, g.in_host);
  if (g.sample) ops.copy_from_host(g.rows_dev, g.rows_host);
  const int32_t* in = g.in_dev.ptr<int32_t>();
  Tensor ids = g.in_dev.slice_rows(0, B).reshape({B});
  Tensor positions = g.in_dev.slice_rows(B, 2 * B).reshape({B});
  const int64_t half = w_->rope_inv_freq.numel();
  Tensor cos = ops.empty({B, half}), sin = ops.empty({B, half});
  ops.rope_tables(cos, sin, positions, w_->rope_inv_freq, w_->rope->attention_factor());
  RopeTables rope{&cos, &sin};
  Tensor x = ops.empty({B, D});
  ops.embedding(x, ids, w_->embed_tokens);
  std::vector<SeqSlice> seqs(static_cast<size_t>(B));
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    for (int64_t b = 0; b < B; ++b) {
      SeqSlice& s = seqs[size_t(b)];
      s.cache = &g.caches[size_t(b)]->layer(l);  // paged: the pool's storage, the same for every cache
      s.t0 = b;
      s.n = 1;
      s.pos_device = in + B + b;
      s.len_device = in + 2 * B + b;
      if (g.paged) {
        s.capacity = g.W * g.block_size;
        s.rows = in + 3 * B + b;
        s.block_table = in + 4 * B + b * g.W;
        s.block_size = g.block_size;
      } else {
        s.capacity = g.caches[size_t(b)]->capacity();
      }
    }
    decoder_layer_forward(ops, w_->layers[size_t(l)], c, options_.mla_mode, x, seqs, rope);
  }
  // the final norm, applied by the LM head as it reads x
  ops.matmul_batch({{g.logits.f32(), x.f32(), B, &w_->lm_head, InputNorm{&w_->norm, float(c.rms_norm_eps)}}});
  if (g.sample)
    ops.sample(g.next_dev, g.logits, g.rows_dev);
  else
    ops.argmax(g.next_dev, g.logits);
  ops.copy_to_host(g.next_host, g.next_dev);
}

std::vector<int32_t> Model::decode_greedy(const std::vector<int32_t>& tokens, const std::vector<KvCache*>& caches) {
  return decode_step(tokens, caches, nullptr, "decode_greedy");
}

std::vector<int32_t> Model::decode_sample(const std::vector<int32_t>& tokens, const std::vector<KvCache*>& caches,
                                          const std::vector<SampleRow>& rows) {
  check_sample_rows(rows, tokens.size(), "decode_sample");
  return decode_step(tokens, caches, &rows, "decode_sample");
}

void Model::check_sample_rows(const std::vector<SampleRow>& rows, size_t n, const char* what) {
  FATHOM_CHECK(rows.size() == n, what, ": ", rows.size(), " sampling rows for ", n, " sequences");
  for (size_t b = 0; b < rows.size(); ++b) {
    const SampleRow& r = rows[b];
    FATHOM_CHECK(std::isfinite(r.temperature) && r.temperature >= 0.0f && r.top_k >= 0 && r.top_p > 0.0f &&
                     r.top_p <= 1.0f && r.min_p >= 0.0f && r.min_p <= 1.0f && r.u >= 0.0 && r.u < 1.0,
                 what, ": row ", b, " has temperature ", r.temperature, ", top_k ", r.top_k, ", top_p ", r.top_p,
                 ", min_p ", r.min_p, ", u ", r.u,
                 "; expected temperature >= 0, top_k >= 0, top_p in (0, 1], min_p in [0, 1], u in [0, 1)");
  }
}

bool Model::graph_step_takes(const std::vector<KvCache*>& caches) const {
  if (caches.empty()) return false;
  const KvBlockPool* pool = caches[0]->pool();
  for (const KvCache* kc : caches)
    if (kc->pool() != pool || kc->n_layers() != w_->config.num_hidden_layers) return false;
  // a paged graph reads the block tables of the latent cache (the absorbed mode's)
  return !pool || options_.mla_mode == MlaMode::Absorbed;
}

std::vector<int32_t> Model::decode_step(const std::vector<int32_t>& tokens, const std::vector<KvCache*>& caches,
                                        const std::vector<SampleRow>* rows, const char* what, bool wait_to_capture,
                                        bool launch_only) {
  FATHOM_CHECK(!launched_, what, ": a step launched by decode_launch was not waited for (decode_wait)");
  FATHOM_CHECK(!tokens.empty() && tokens.size() == caches.size(), what, ": ", tokens.size(), " tokens for ",
               caches.size(), " caches");
  check_ids(tokens, "decode tokens");
  Ops& ops = *ops_;
  const int64_t B = int64_t(tokens.size());
  check_caches(caches, what);
  FATHOM_CHECK(graph_step_takes(caches), what, ": the caches mix paged and contiguous ones, or pools, or are not "
               "the model's (paged ones step together in absorbed MLA mode only; step others with forward_batch)");
  const bool paged = caches[0]->paged();
  std::vector<const void*> storage;
  std::vector<int64_t> capacity;
  int64_t longest = 0;  // paged: the longest block table after reserving
  for (int64_t b = 0; b < B; ++b) {
    KvCache& kc = *caches[size_t(b)];
    kc.reserve(1);
    if (paged) {
      longest = std::max<int64_t>(longest, int64_t(kc.block_table().size()));
      continue;
    }
    for (const void* p : kc.storage()) storage.push_back(p);
    capacity.push_back(kc.capacity());
  }
  int64_t W = 0;
  if (paged) {
    storage = caches[0]->storage();
    W = 16;
    while (W < longest) W *= 2;
  }
  const bool sample = rows != nullptr;
  auto fits = [&](const DecodeGraph& g) {
    if (g.B != B || g.sample != sample || g.paged != paged || g.storage != storage) return false;
    return paged ? g.W == W : g.caches == caches && g.capacity == capacity;
  };
  // the graph for this step: the most recently used first; a new one replaces the least recent
  auto it = std::find_if(graphs_.begin(), graphs_.end(), [&](const auto& g) { return fits(*g); });
  if (it == graphs_.end() && wait_to_capture) {
    const std::vector<int64_t> key = {B, W, sample ? 1 : 0, paged ? 1 : 0};
    if (key != last_graph_miss_) {
      last_graph_miss_ = key;
      return {};
    }
  }
  if (it == graphs_.end()) {
    if (graphs_.size() >= kMaxDecodeGraphs) graphs_.pop_back();  // its buffers go back to the pool first
    auto fresh = std::make_unique<DecodeGraph>();
    DecodeGraph& g = *fresh;
    g.B = B;
    g.sample = sample;
    g.paged = paged;
    g.W = W;
    g.block_size = paged ? caches[0]->block_size() : 0;
    g.caches = caches;
    g.storage = storage;
    g.capacity = capacity;
    const int64_t n_in = paged ? B * (4 + W) : 3 * B;
    g.in_host = ops.pinned_host({n_in}, DType::I32);
    g.in_dev = ops.empty({n_in}, DType::I32);
    if (sample) {
      g.rows_host = ops.pinned_host({B * int64_t(sizeof(SampleRow))}, DType::U8);
      g.rows_dev = ops.empty({B * int64_t(sizeof(SampleRow))}, DType::U8);
    }
    g.next_dev = ops.empty({B}, DType::I32);
    g.next_host = ops.pinned_host({B}, DType::I32);
    g.logits = ops.empty({B, w_->config.vocab_size});
    if (ops.capture_begin()) {
      try {
        decode_body(g);
      } catch (...) {
        ops.capture_end();
        throw;
      }
      g.graph = ops.capture_end();
    }
    graphs_.insert(graphs_.begin(), std::move(fresh));
  } else if (it != graphs_.begin()) {
    std::rotate(graphs_.begin(), it, it + 1);
  }
  DecodeGraph& g = *graphs_.front();
  g.caches = caches;
  int32_t* in = g.in_host.ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    const KvCache& kc = *caches[size_t(b)];
    const int64_t pos = kc.length();
    in[b] = tokens[size_t(b)];
    in[B + b] = int32_t(pos);
    in[2 * B + b] = int32_t(pos + 1);
    if (!paged) continue;
    in[3 * B + b] = int32_t(kc.row(pos));
    const std::vector<int32_t>& table = kc.block_table();
    int32_t* t = in + 4 * B + b * W;
    std::copy(table.begin(), table.end(), t);
    std::fill(t + table.size(), t + W, 0);  // past the keys: never read
  }
  if (sample) std::memcpy(g.rows_host.data(), rows->data(), size_t(B) * sizeof(SampleRow));
  if (g.graph)
    ops.replay(g.graph);
  else
    decode_body(g);
  if (launch_only) {
    launched_graph_ = &g;
    launched_caches_ = caches;
    return {};
  }
  return decode_finish(g, caches);
}

std::vector<int32_t> Model::decode_finish(DecodeGraph& g, const std::vector<KvCache*>& caches) {
  ops_->synchronize();
  for (KvCache* kc : caches) kc->advance(1);
  const int32_t* next = g.next_host.ptr<int32_t>();
  return std::vector<int32_t>(next, next + g.B);
}

void Model::decode_launch(const std::vector<int32_t>& tokens, const std::vector<KvCache*>& caches,
                          const std::vector<SampleRow>& rows) {
  FATHOM_CHECK(!launched_, "decode_launch: the step launched before was not waited for (decode_wait)");
  check_sample_rows(rows, tokens.size(), "decode_launch");
  launched_graph_ = nullptr;
  launched_ids_.clear();
  std::vector<std::vector<int32_t>> one(tokens.size());
  for (size_t b = 0; b < tokens.size(); ++b) one[b] = {tokens[b]};
  // forward_batch_sample's graph step, left running; without one (the CPU, a shape seen for the
  // first time) its eager step, run now
  graph_sample_step(one, caches, rows, "decode_launch", /*launch_only=*/true);
  if (!launched_graph_) launched_ids_ = sample_eagerly(one, caches, rows);
  launched_ = true;
}

std::vector<int32_t> Model::decode_wait() {
  FATHOM_CHECK(launched_, "decode_wait: no step was launched (decode_launch)");
  launched_ = false;
  if (!launched_graph_) return std::move(launched_ids_);
  DecodeGraph& g = *launched_graph_;
  launched_graph_ = nullptr;
  return decode_finish(g, launched_caches_);
}

}  // namespace fathom
