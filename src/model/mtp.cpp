// The multi-token prediction (MTP) modules of a Model (DeepSeek-V3 §2.2; docs/mtp.md): over a
// whole sequence (mtp_logits: the training objective's view, evaluation) and incrementally over
// the module's own KV cache (new_mtp_cache, mtp_step: the drafts of speculative decoding,
// src/serve/engine.cpp). Both start from the same input projection, mtp_input.
#include <algorithm>

#include "core/error.h"
#include "fathom/model.h"
#include "model/transformer.h"

namespace fathom {

namespace {

// The module's input at each position: eh_proj([enorm(embedding of the next token) ;
// hnorm(the previous depth's hidden state)]), (T, hidden) on the device.
Tensor mtp_input(Ops& ops, const MtpWeights& m, const ModelConfig& c, const Tensor& next_d, const Tensor& h_d) {
  const int64_t T = next_d.numel(), D = c.hidden_size;
  const float eps = float(c.rms_norm_eps);
  Tensor e = ops.empty({T, D}), hn = ops.empty({T, D});
  ops.embedding(e, next_d, m.embed_tokens);
  ops.rmsnorm(e, e, m.enorm, eps);
  ops.rmsnorm(hn, h_d, m.hnorm, eps);
  Tensor cat_eh = ops.empty({T, 2 * D});
  for (int half = 0; half < 2; ++half) {
    CopyParams cp;
    cp.out = cat_eh.f32() + half * D;
    cp.out_token_stride = 2 * D;
    cp.in = (half ? hn : e).f32();
    cp.in_token_stride = D;
    cp.n_tokens = T;
    cp.cols = int(D);
    ops.copy(cp);
  }
  Tensor x = ops.empty({T, D});
  ops.matmul(x, cat_eh, m.eh_proj);
  return x;
}

}  // namespace

Tensor Model::mtp_logits(const std::vector<int32_t>& ids, const Tensor& h, int depth, Tensor* mtp_hidden) {
  const ModelConfig& c = w_->config;
  FATHOM_CHECK(depth >= 0 && depth < int(w_->mtp.size()), "model ", dir_, " has ", w_->mtp.size(),
               " MTP module(s) (num_nextn_predict_layers); module ", depth, " was requested");
  check_ids(ids, "input ids");
  const int64_t T = int64_t(ids.size()), D = c.hidden_size;
  const int64_t n = T - 1 - depth;  // positions that have a next token for this depth
  FATHOM_CHECK(n >= 1, "MTP depth ", depth + 1, " needs at least ", depth + 2, " input tokens, got ", T);
  FATHOM_CHECK(h.dim(0) >= n && h.dim(1) == D, "MTP input hidden states have shape ", shape_str(h.shape()));
  const MtpWeights& m = w_->mtp[size_t(depth)];
  Ops& ops = *ops_;
  const float eps = float(c.rms_norm_eps);

  std::vector<int32_t> next(ids.begin() + 1 + depth, ids.end());  // the token after each position
  Tensor h_host = h.slice_rows(0, n);
  FATHOM_CHECK(h_host.device() == Device::CPU && h.dtype() == DType::F32, "MTP input hidden states must be F32 host memory");
  Tensor x = mtp_input(ops, m, c, ops.upload(Tensor::view(next.data(), {n}, DType::I32, nullptr)), ops.upload(h_host));

  std::vector<int64_t> positions(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) positions[size_t(i)] = i;
  Tensor cos, sin;
  rope_tables(positions, cos, sin);
  KvCache cache(ops, c, 1, options_.mla_mode, n, kv_dtype());
  decoder_layer_forward(ops, m.layer, c, options_.mla_mode, x, {{&cache.layer(0), 0, 0, n}}, RopeTables{&cos, &sin});
  Tensor normed = ops.empty({n, D});  // after shared_head.norm
  ops.rmsnorm(normed, x, m.shared_head_norm, eps);
  if (mtp_hidden) {
    *mtp_hidden = Tensor::empty({n, D});
    ops.download(mtp_hidden->data(), x);
  }
  Tensor logits = ops.empty({n, c.vocab_size});
  ops.matmul(logits, normed, m.shared_head);
  Tensor host_logits = Tensor::empty({n, c.vocab_size});
  ops.download(host_logits.data(), logits);
  return host_logits;
}

KvCache Model::new_mtp_cache(int64_t capacity, int depth) const {
  FATHOM_CHECK(depth >= 0 && depth < int(w_->mtp.size()), "model ", dir_, " has ", w_->mtp.size(),
               " MTP module(s) (num_nextn_predict_layers); module ", depth, " was requested");
  if (capacity <= 0) capacity = std::min<int64_t>(256, max_cache_tokens_);
  return KvCache(*ops_, w_->config, 1, options_.mla_mode, capacity, kv_dtype(), max_cache_tokens_);
}

Tensor Model::mtp_step(const std::vector<std::vector<int32_t>>& next_ids, const Tensor& h,
                       const std::vector<KvCache*>& mtp_caches, int depth) {
  const ModelConfig& c = w_->config;
  FATHOM_CHECK(depth >= 0 && depth < int(w_->mtp.size()), "model ", dir_, " has ", w_->mtp.size(),
               " MTP module(s) (num_nextn_predict_layers); module ", depth, " was requested");
  check_batch(next_ids, mtp_caches.size(), "mtp_step");
  const int64_t B = int64_t(next_ids.size()), D = c.hidden_size;
  StagedBatch sb = stage_batch(next_ids, mtp_caches, 1, "mtp_step");
  const std::vector<int64_t>& starts = sb.starts;
  const std::vector<int64_t>& n_new = sb.n_new;
  const int64_t T = int64_t(sb.ids.size());
  FATHOM_CHECK(h.device() == Device::CPU && h.dtype() == DType::F32 && h.dim(0) == T && h.dim(1) == D,
               "mtp_step: hidden states ", shape_str(h.shape()), " for ", T, " positions of width ", D,
               " (host F32 expected)");
  const MtpWeights& m = w_->mtp[size_t(depth)];
  Ops& ops = *ops_;
  const float eps = float(c.rms_norm_eps);
  Tensor x = mtp_input(ops, m, c, ops.upload(Tensor::view(sb.ids.data(), {T}, DType::I32, nullptr)), ops.upload(h));
  Tensor cos, sin;
  rope_tables(sb.positions, cos, sin);
  const KvPaging paging(ops, mtp_caches, n_new);
  std::vector<SeqSlice> seqs;
  for (int64_t b = 0; b < B; ++b)
    seqs.push_back(cache_slice(*mtp_caches[size_t(b)], 0, paging, size_t(b), starts[size_t(b)], n_new[size_t(b)]));
  decoder_layer_forward(ops, m.layer, c, options_.mla_mode, x, seqs, RopeTables{&cos, &sin});
  for (int64_t b = 0; b < B; ++b) mtp_caches[size_t(b)]->advance(int64_t(next_ids[size_t(b)].size()));
  Tensor last = gather_last_rows(ops, x, starts, next_ids, {}, D);
  Tensor normed = ops.empty({B, D});
  ops.rmsnorm(normed, last, m.shared_head_norm, eps);
  Tensor logits = ops.empty({B, c.vocab_size});
  ops.matmul(logits, normed, m.shared_head);
  Tensor host = Tensor::empty({B, c.vocab_size});
  ops.download(host.data(), logits);
  return host;
}

}  // namespace fathom
