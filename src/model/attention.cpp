#include "model/attention.h"

#include <cstring>

#include "core/error.h"

namespace fathom {

namespace {

// kv_b_proj split per head for absorption. W_UK[h] are rows h*(nope+v) .. +nope, W_UV[h] the
// v rows after them. W_UK is stored transposed so that "q_nope · W_UK" is an ordinary x · Wᵀ
// matmul. Unquantized weights keep their dtype (a transpose and a gather are exact and read no
// more bytes than kv_b_proj); FP8 ones are dequantized to F32, since their 128x128 scale
// blocks do not follow head boundaries.
void split_kv_b(MlaWeights& w, const ModelConfig& c) {
  const int H = c.num_attention_heads, nope = c.qk_nope_head_dim, dv = c.v_head_dim;
  const int64_t R = c.kv_lora_rank;
  const LinearWeight& kvb = w.kv_b_proj;  // (H*(nope+dv), R)
  const Tensor src = kvb.quantized() ? dequantize(kvb) : kvb.weight;
  const size_t elem = dtype_size(src.dtype());
  w.w_uk_t = Tensor::empty({H, R, nope}, src.dtype());
  w.w_uv = Tensor::empty({H, dv, R}, src.dtype());
  char* uk = static_cast<char*>(w.w_uk_t.data());
  char* uv = static_cast<char*>(w.w_uv.data());
  for (int h = 0; h < H; ++h) {
    const int64_t row0 = int64_t(h) * (nope + dv);
    const char* base = static_cast<const char*>(src.data()) + size_t(row0 * R) * elem;
    char* dst = uk + size_t(int64_t(h) * R * nope) * elem;
    for (int i = 0; i < nope; ++i)
      for (int64_t r = 0; r < R; ++r) std::memcpy(dst + size_t(r * nope + i) * elem, base + size_t(i * R + r) * elem, elem);
    std::memcpy(uv + size_t(int64_t(h) * dv * R) * elem, base + size_t(nope * R) * elem, size_t(dv * R) * elem);
  }
}

// A strided copy of f32 rows (see CopyParams).
void copy_rows(Ops& ops, void* out, int64_t out_token_stride, DType out_dtype, const float* in, int64_t in_token_stride,
               int64_t n_tokens, int cols, int n_heads = 1, int64_t out_head_stride = 0, int64_t in_head_stride = 0,
               const int32_t* out_token_index = nullptr) {
  CopyParams p;
  p.out_token_index = out_token_index;
  p.out = out;
  p.out_token_stride = out_token_stride;
  p.out_head_stride = out_head_stride;
  p.out_dtype = out_dtype;
  p.in = in;
  p.in_token_stride = in_token_stride;
  p.in_head_stride = in_head_stride;
  p.n_tokens = n_tokens;
  p.n_heads = n_heads;
  p.cols = cols;
  ops.copy(p);
}

char* row_ptr(Tensor& t, int64_t elem_offset) { return static_cast<char*>(t.data()) + size_t(elem_offset) * dtype_size(t.dtype()); }

}  // namespace

int64_t MlaWeights::nbytes() const {
  int64_t n = 0;
  for (const LinearWeight* l : {&q_a_proj, &q_b_proj, &q_proj, &kv_a_proj_with_mqa, &o_proj})
    if (l->weight.defined()) n += int64_t(l->nbytes());
  // absorbed decode reads the per-head stacks, not kv_b_proj itself
  n += w_uk_t.defined() ? int64_t(w_uk_t.nbytes() + w_uv.nbytes()) : int64_t(kv_b_proj.nbytes());
  return n;
}

MlaWeights load_mla(const WeightLoader& w, const ModelConfig& c, const std::string& p, MlaMode mode) {
  MlaWeights m;
  const int64_t H = c.num_attention_heads, D = c.hidden_size;
  if (c.q_lora_rank > 0) {
    m.q_a_proj = w.linear(p + "q_a_proj.weight", c.q_lora_rank, D);
    m.q_a_layernorm = w.f32(p + "q_a_layernorm.weight", {c.q_lora_rank});
    m.q_b_proj = w.linear(p + "q_b_proj.weight", H * c.qk_head_dim(), c.q_lora_rank);
  } else {
    m.q_proj = w.linear(p + "q_proj.weight", H * c.qk_head_dim(), D);
  }
  m.kv_a_proj_with_mqa = w.linear(p + "kv_a_proj_with_mqa.weight", c.kv_lora_rank + c.qk_rope_head_dim, D);
  m.kv_a_layernorm = w.f32(p + "kv_a_layernorm.weight", {c.kv_lora_rank});
  m.kv_b_proj = w.linear(p + "kv_b_proj.weight", H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
  m.o_proj = w.linear(p + "o_proj.weight", D, H * c.v_head_dim);
  if (mode == MlaMode::Absorbed) {
    if (w.random()) {  // random weights live on the device already: draw the per-head stacks directly
      m.w_uk_t = w.random_stack(p + "w_uk_t", {H, c.kv_lora_rank, c.qk_nope_head_dim});
      m.w_uv = w.random_stack(p + "w_uv", {H, c.v_head_dim, c.kv_lora_rank});
    } else {
      split_kv_b(m, c);
    }
  }
  return m;
}

void mla_forward(Ops& ops, const MlaWeights& w, const ModelConfig& c, MlaMode mode, Tensor& out, const Tensor& x,
                 const std::vector<SeqSlice>& seqs, const RopeTables& rope, InputNorm norm, bool accumulate) {
  const int64_t T = x.dim(0);
  const int H = c.num_attention_heads, nope = c.qk_nope_head_dim, rd = c.qk_rope_head_dim, dv = c.v_head_dim;
  const int dqk = c.qk_head_dim();
  const int64_t R = c.kv_lora_rank;
  const float eps = float(c.rms_norm_eps);

  // ---- queries q (T, H, qk_head_dim) = [q_nope | q_pe] per head, and the compressed keys/values
  // kv (T, kv_lora_rank + rope) = [c_kv | k_pe]; both projections read x, so they run together
  Tensor q = ops.empty({T, H, dqk});
  Tensor kv = ops.empty({T, R + rd});
  if (c.q_lora_rank > 0) {
    Tensor qa = ops.empty({T, c.q_lora_rank});  // (T, q_lora_rank)
    ops.matmul_batch({{qa.f32(), x.f32(), T, &w.q_a_proj, norm}, {kv.f32(), x.f32(), T, &w.kv_a_proj_with_mqa, norm}});
    ops.matmul_batch({{q.f32(), qa.f32(), T, &w.q_b_proj, InputNorm{&w.q_a_layernorm, eps}}});  // q_a's norm fused
  } else {
    ops.matmul_batch({{q.f32(), x.f32(), T, &w.q_proj, norm}, {kv.f32(), x.f32(), T, &w.kv_a_proj_with_mqa, norm}});
  }
  RopeParams rq;
  rq.x = q.f32();
  rq.n_tokens = T;
  rq.token_stride = int64_t(H) * dqk;
  rq.head_stride = dqk;
  rq.n_heads = H;
  rq.offset = nope;
  rq.rope_dim = rd;
  rq.cos = rope.cos->f32();
  rq.sin = rope.sin->f32();
  rq.interleaved = c.rope_interleave;

  Tensor attn = ops.empty({T, H, dv});  // (T, H, v_head_dim)
  for (const SeqSlice& sl : seqs) {
    FATHOM_ASSERT(!sl.pos_device || sl.n == 1, "device positions serve one token per sequence");
    FATHOM_ASSERT(!sl.block_table == !sl.rows, "a paged slice has a block table and rows");
  }
  // Each sequence appends its tokens to its own cache and attends over it.
  auto attention_params = [&](const SeqSlice& sl) {
    AttentionParams ap;
    ap.n_q = sl.n;
    ap.n_kv = sl.len_device ? sl.capacity : sl.pos0 + sl.n;  // keys after appending (or their bound)
    ap.q_pos0 = sl.pos0;
    ap.kv_len = sl.len_device;
    ap.block_table = sl.block_table;
    ap.block_size = sl.block_size;
    ap.n_q_heads = H;
    ap.scale = float(c.softmax_scale());
    ap.causal = true;
    return ap;
  };

  if (mode == MlaMode::Naive) {
    ops.rope(rq);
    RopeParams rk = rq;
    rk.x = kv.f32();
    rk.token_stride = R + rd;
    rk.head_stride = 0;
    rk.n_heads = 1;
    rk.offset = int(R);
    ops.rope(rk);
    // normalise c_kv in place (k_pe is not normalised)
    Tensor c_kv = ops.empty({T, R});
    copy_rows(ops, c_kv.data(), R, DType::F32, kv.f32(), R + rd, T, int(R));
    ops.rmsnorm(c_kv, c_kv, w.kv_a_layernorm, eps);
    // decompress: (T, H, nope + v) then write k = [k_nope | k_pe] and v into the cache
    Tensor kvb = ops.empty({T, H, nope + dv});
    ops.matmul(kvb, c_kv, w.kv_b_proj);
    const int64_t kts = int64_t(H) * dqk, vts = int64_t(H) * dv, bts = int64_t(H) * (nope + dv);
    for (const SeqSlice& sl : seqs) {
      LayerKvCache& layer = *sl.cache;
      const DType kd = layer.k.dtype();
      const float* kvb_t = kvb.f32() + sl.t0 * bts;
      // the rows come from rows (paged) or pos_device (a graph's contiguous cache) when set, else
      // they start at pos0
      const int32_t* index = sl.rows ? sl.rows : sl.pos_device;
      const int64_t p0 = index ? 0 : sl.pos0;
      copy_rows(ops, row_ptr(layer.k, p0 * kts), kts, kd, kvb_t, bts, sl.n, nope, H, dqk, nope + dv,
                index);  // k_nope
      copy_rows(ops, row_ptr(layer.k, p0 * kts + nope), kts, kd, kv.f32() + sl.t0 * (R + rd) + R, R + rd, sl.n, rd, H,
                dqk, 0, index);  // k_pe, shared
      copy_rows(ops, row_ptr(layer.v, p0 * vts), vts, kd, kvb_t + nope, bts, sl.n, dv, H, dv, nope + dv,
                index);  // v
      AttentionParams ap = attention_params(sl);
      ap.kv_dtype = kd;
      ap.q = q.f32() + sl.t0 * int64_t(H) * dqk;
      ap.q_token_stride = int64_t(H) * dqk;
      ap.q_head_stride = dqk;
      ap.k = layer.k.data();
      ap.k_token_stride = kts;
      ap.k_head_stride = dqk;
      ap.v = layer.v.data();
      ap.v_token_stride = vts;
      ap.v_head_stride = dv;
      ap.n_kv_heads = H;
      ap.d_qk = dqk;
      ap.d_v = dv;
      ap.out = attn.f32() + sl.t0 * int64_t(H) * dv;
      ap.out_token_stride = int64_t(H) * dv;
      ap.out_head_stride = dv;
      ops.attention(ap);
    }
  } else {
    // absorbed query (T, H, R + rope) = [q_nope · W_UK[h] | rope(q_pe)], q_pe roped straight into it
    Tensor qabs = ops.empty({T, H, R + rd});
    HeadMatmulParams uk;
    uk.x = q.f32();
    uk.x_token_stride = int64_t(H) * dqk;
    uk.x_head_stride = dqk;
    uk.out = qabs.f32();
    uk.out_token_stride = int64_t(H) * (R + rd);
    uk.out_head_stride = R + rd;
    uk.n_tokens = T;
    rq.out = qabs.f32();
    rq.out_token_stride = int64_t(H) * (R + rd);
    rq.out_head_stride = R + rd;
    rq.out_offset = int(R);
    uk.also_rope = &rq;
    // cache row = [rmsnorm(c_kv) | rope(k_pe)] from kv's raw rows, in one op
    auto append_params = [&](const SeqSlice& sl) {
      MlaAppendParams app;
      app.out = sl.cache->latent.data();
      app.out_dtype = sl.cache->latent.dtype();
      app.pos0 = sl.pos0;
      app.out_token_index = sl.rows ? sl.rows : sl.pos_device;  // when set, the rows come from it
      app.kv = kv.f32() + sl.t0 * (R + rd);
      app.kv_token_stride = R + rd;
      app.n_tokens = sl.n;
      app.kv_lora_rank = int(R);
      app.rope_dim = rd;
      app.norm_weight = w.kv_a_layernorm.f32();
      app.eps = eps;
      app.cos = rope.cos->f32() + sl.t0 * (rd / 2);
      app.sin = rope.sin->f32() + sl.t0 * (rd / 2);
      app.interleaved = c.rope_interleave;
      return app;
    };
    // One append for every sequence's tokens when they can share it: one sequence (batch-1
    // decode, a prompt), or paged sequences of one pool whose rows (KvPaging) and activations
    // follow each other — a batched step. It rides with W_UK and the q_pe RoPE (independent of
    // both), which the CUDA backend runs in one launch.
    bool one_append = seqs.size() == 1;
    if (!one_append && seqs[0].rows && seqs[0].t0 == 0) {
      one_append = true;
      for (size_t b = 1; b < seqs.size() && one_append; ++b)
        one_append = seqs[b].rows == seqs[b - 1].rows + seqs[b - 1].n && seqs[b].t0 == seqs[b - 1].t0 + seqs[b - 1].n &&
                     seqs[b].cache->latent.data() == seqs[0].cache->latent.data();
      one_append = one_append && seqs.back().t0 + seqs.back().n == T;
    }
    MlaAppendParams app0;
    if (one_append) {
      app0 = append_params(seqs[0]);
      app0.n_tokens = T;
      uk.also_append = &app0;
    }
    ops.matmul_per_head(uk, w.w_uk_t);
    Tensor lat_out = ops.empty({T, H, R});  // attention output in latent space
    std::vector<AttentionParams> aps;  // every sequence's, run together after the appends
    for (const SeqSlice& sl : seqs) {
      LayerKvCache& layer = *sl.cache;
      const DType ld = layer.latent.dtype();
      if (!one_append) ops.mla_cache_append(append_params(sl));
      AttentionParams ap = attention_params(sl);
      ap.q = qabs.f32() + sl.t0 * int64_t(H) * (R + rd);
      ap.q_token_stride = int64_t(H) * (R + rd);
      ap.q_head_stride = R + rd;
      ap.k = layer.latent.data();
      ap.kv_dtype = ld;
      ap.k_token_stride = R + rd;
      ap.k_head_stride = 0;
      ap.v = layer.latent.data();  // the value is the latent part of the same row
      ap.v_token_stride = R + rd;
      ap.v_head_stride = 0;
      ap.n_kv_heads = 1;
      ap.d_qk = int(R) + rd;
      ap.d_v = int(R);
      ap.out = lat_out.f32() + sl.t0 * int64_t(H) * R;
      ap.out_token_stride = int64_t(H) * R;
      ap.out_head_stride = R;
      aps.push_back(ap);
    }
    ops.attention_batch(aps);
    // back to value space per head: attn[:, h] = lat_out[:, h] · W_UV[h]ᵀ
    HeadMatmulParams uv;
    uv.x = lat_out.f32();
    uv.x_token_stride = int64_t(H) * R;
    uv.x_head_stride = R;
    uv.out = attn.f32();
    uv.out_token_stride = int64_t(H) * dv;
    uv.out_head_stride = dv;
    uv.n_tokens = T;
    ops.matmul_per_head(uv, w.w_uv);
  }
  ops.matmul_batch({{out.f32(), attn.f32(), T, &w.o_proj, {}, accumulate}});
}

}  // namespace fathom
