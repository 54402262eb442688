// The CUDA Ops backend (make_cuda_ops in ops.h): device memory from the stream-ordered pool,
// uploads through pinned staging buffers, and every op a launcher of cuda_ops.h on one
// non-blocking stream. Nothing here synchronizes the host except download(), synchronize() and
// the one-time prepare_experts, so a decode step can be captured as a CUDA graph
// (capture_begin/capture_end/replay): allocations inside a capture become graph memory nodes.
// Tensors that exist before capture_begin must outlive capture_end (freeing one while
// recording would record the free, and replays would repeat it). The training ops' checks and
// launches live in cuda_backend_train.cu.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "core/error.h"
#include "ops/cuda/cublas_util.cuh"
#include "ops/cuda/cuda_backend_checks.h"
#include "ops/cuda/cuda_check.cuh"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/device_memory.cuh"
#include "ops/ops.h"

namespace fathom {
namespace {

using cuda::check;
using cuda::CudaContext;
using cuda::PinnedStaging;

// ExpertSet::prepared of this backend: the device table of every expert's pointers.
struct PreparedExperts {
  static constexpr uint64_t kTag = 0x6375646145787073ull;  // identifies the type behind the void pointer
  uint64_t tag = kTag;
  std::shared_ptr<CudaContext> ctx;
  cuda::ExpertPointers* table = nullptr;  // (n_experts) device memory
  cuda::ExpertPointers host_table;        // with one expert: table[0], on the host
  DType dtype = DType::F32;
  int64_t hidden = 0, inter = 0, block = 128;
  int n_experts = 0;
  bool aligned16 = false;
  ~PreparedExperts() {
    if (table) cudaFreeAsync(table, ctx->stream);
  }
};

// A captured decode step (Ops::capture_end), replayed with Ops::replay.
struct CudaGraph {
  static constexpr uint64_t kTag = 0x6375646147726170ull;
  uint64_t tag = kTag;
  std::shared_ptr<CudaContext> ctx;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ~CudaGraph() {
    cudaStreamSynchronize(ctx->stream);  // no replay of it may still be running
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
  }
};

using cuda_backend::f32;
using cuda_backend::on_gpu;

class CudaOps final : public Ops {
 public:
  explicit CudaOps(int device) : ctx_(std::make_shared<CudaContext>(device)) {
    cuda::attention_setup();  // kernel attributes now, never inside a graph capture
    cuda::fp8_gemm_setup();
  }
  const char* name() const override { return "cuda"; }
  Device device() const override { return Device::CUDA; }

  // ---- memory

  Tensor empty(Shape shape, DType dtype) override {
    use();
    for (int64_t d : shape) FATHOM_ASSERT(d >= 0, "negative dimension in ", shape_str(shape));
    const size_t bytes = size_t(shape_numel(shape)) * dtype_size(dtype);
    const size_t alloc = std::max<size_t>(256, (bytes + 255) / 256 * 256);
    void* ptr = nullptr;
    cudaError_t e = cudaMallocAsync(&ptr, alloc, ctx_->stream);
    if (e == cudaErrorMemoryAllocation) {
      // Blocks cached by the pool may be free once queued work finishes: return them and retry.
      cudaGetLastError();
      cudaStreamSynchronize(ctx_->stream);
      cudaMemPoolTrimTo(ctx_->pool, 0);
      e = cudaMallocAsync(&ptr, alloc, ctx_->stream);
    }
    if (e != cudaSuccess && e != cudaErrorMemoryAllocation) check(e, "empty (cudaMallocAsync)");
    if (e != cudaSuccess) {
      cudaGetLastError();
      const cuda::MemoryInfo m = memory_info_or_zero();
      throw Error(cat("out of GPU memory: a tensor of shape ", shape_str(shape), " (", dtype_name(dtype), ") needs ",
                      bytes, " bytes but GPU ", ctx_->device, " has ", m.free, " bytes free of ", m.total, " (",
                      cudaGetErrorString(e), ")."));
    }
    std::shared_ptr<CudaContext> ctx = ctx_;
    std::shared_ptr<void> owner(ptr, [ctx](void* q) { cudaFreeAsync(q, ctx->stream); });
    return Tensor::view(ptr, std::move(shape), dtype, std::move(owner), Device::CUDA);
  }

  Tensor upload(const Tensor& host) override {
    if (host.device() == Device::CUDA) return host;  // already here
    FATHOM_CHECK(host.defined() || host.numel() == 0, "upload: the host tensor has no data.");
    Tensor t = empty(host.shape(), host.dtype());
    staging_.copy_to_device(t.data(), host.data(), host.nbytes(), ctx_->stream);
    return t;
  }

  void download(void* host, const Tensor& t) override {
    use();
    on_gpu(t, "download", "the tensor");
    if (t.nbytes())
      check(cudaMemcpyAsync(host, t.data(), t.nbytes(), cudaMemcpyDeviceToHost, ctx_->stream), "download");
    check(cudaStreamSynchronize(ctx_->stream), "download (or a kernel queued before it)");
  }

  void copy(const CopyParams& p) override {
    use();
    cuda::copy(p, ctx_->stream);
  }

  void fill_random(Tensor& t, uint64_t seed, float scale) override {
    use();
    on_gpu(t, "fill_random", "the tensor");
    cuda::fill_random(t.data(), t.dtype(), t.numel(), seed, scale, ctx_->stream);
  }

  void copy_bytes(void* dst, const void* src, size_t n) override {
    use();
    if (n) check(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, ctx_->stream), "copy_bytes");
  }

  int64_t free_memory() override {
    use();
    // free device memory plus what the pool holds but does not use
    uint64_t reserved = 0, used = 0;
    check(cudaMemPoolGetAttribute(ctx_->pool, cudaMemPoolAttrReservedMemCurrent, &reserved), "cudaMemPoolGetAttribute");
    check(cudaMemPoolGetAttribute(ctx_->pool, cudaMemPoolAttrUsedMemCurrent, &used), "cudaMemPoolGetAttribute");
    return cuda::memory_info().free + int64_t(reserved - std::min(reserved, used));
  }

  void prepare_experts(ExpertSet& set) override {
    use();
    if (set.experts.empty()) return;
    auto prep = std::make_shared<PreparedExperts>();
    prep->ctx = ctx_;
    const ExpertWeights& first = set.experts[0];
    FATHOM_CHECK(first.gate_proj && first.up_proj && first.down_proj, "prepare_experts: expert 0 lacks a weight.");
    prep->dtype = first.gate_proj->weight.dtype();
    prep->inter = first.gate_proj->out_features();
    prep->hidden = first.gate_proj->in_features();
    prep->block = first.gate_proj->block;
    prep->n_experts = int(set.experts.size());
    prep->aligned16 = true;
    std::vector<cuda::ExpertPointers> table(set.experts.size());
    for (size_t e = 0; e < set.experts.size(); ++e) {
      const ExpertWeights& x = set.experts[e];
      FATHOM_CHECK(x.gate_proj && x.up_proj && x.down_proj, "prepare_experts: expert ", e, " lacks a weight.");
      const LinearWeight* parts[3] = {x.gate_proj, x.up_proj, x.down_proj};
      const Shape shapes[3] = {{prep->inter, prep->hidden}, {prep->inter, prep->hidden}, {prep->hidden, prep->inter}};
      for (int i = 0; i < 3; ++i) {
        const LinearWeight& w = *parts[i];
        on_gpu(w.weight, "prepare_experts", w.name.c_str());
        FATHOM_CHECK(w.weight.dtype() == prep->dtype && w.weight.shape() == shapes[i], "prepare_experts: ", w.name,
                     " is ", dtype_name(w.weight.dtype()), " ", shape_str(w.weight.shape()), "; every expert of a layer must be ",
                     dtype_name(prep->dtype), " ", shape_str(shapes[i]), " like expert 0.");
        if (w.quantized()) {
          check_scales(w, "prepare_experts");
          FATHOM_CHECK(w.block == prep->block, "prepare_experts: ", w.name, " uses block ", w.block, " but expert 0 uses ",
                       prep->block, ".");
        }
        prep->aligned16 = prep->aligned16 && cuda::aligned16(w.weight.data());
      }
      const bool q = prep->dtype == DType::F8_E4M3;
      table[e] = {x.gate_proj->weight.data(), x.up_proj->weight.data(), x.down_proj->weight.data(),
                  q ? x.gate_proj->scale_inv.f32() : nullptr, q ? x.up_proj->scale_inv.f32() : nullptr,
                  q ? x.down_proj->scale_inv.f32() : nullptr};
    }
    const size_t bytes = table.size() * sizeof(cuda::ExpertPointers);
    void* dev = nullptr;
    check(cudaMallocAsync(&dev, bytes, ctx_->stream), "prepare_experts (cudaMallocAsync)");
    prep->table = static_cast<cuda::ExpertPointers*>(dev);
    prep->host_table = table[0];
    check(cudaMemcpyAsync(dev, table.data(), bytes, cudaMemcpyHostToDevice, ctx_->stream), "prepare_experts");
    check(cudaStreamSynchronize(ctx_->stream), "prepare_experts");  // `table` is about to go away
    set.prepared = std::shared_ptr<const void>(prep, prep.get());
  }

  // ---- compute

  void embedding(Tensor& out, const Tensor& ids, const Tensor& table) override {
    use();
    f32(out, "embedding", "the output");
    on_gpu(ids, "embedding", "the token ids");
    on_gpu(table, "embedding", "the table");
    FATHOM_CHECK(ids.dtype() == DType::I32 && table.ndim() == 2, "embedding: expected I32 ids and a 2-D table, got ",
                 dtype_name(ids.dtype()), " ids and a table of shape ", shape_str(table.shape()), ".");
    const int64_t T = ids.numel(), H = table.dim(1);
    FATHOM_ASSERT(out.numel() == T * H, "embedding: out ", shape_str(out.shape()), " for ", T, " tokens of ", H);
    cuda::embedding(out.f32(), ids.ptr<int32_t>(), T, table.data(), table.dtype(), H, ctx_->stream);
  }

  void rmsnorm(Tensor& out, const Tensor& x, const Tensor& weight, float eps) override {
    use();
    f32(out, "rmsnorm", "the output");
    f32(x, "rmsnorm", "the input");
    f32(weight, "rmsnorm", "the weight");
    const int64_t N = weight.numel();
    FATHOM_ASSERT(N > 0 && x.numel() % N == 0 && out.numel() == x.numel(), "rmsnorm: x ", shape_str(x.shape()),
                  " out ", shape_str(out.shape()), " weight ", shape_str(weight.shape()));
    cuda::rmsnorm(out.f32(), x.f32(), weight.f32(), x.numel() / N, N, eps, ctx_->stream);
  }

  void add_rmsnorm(Tensor& x, const Tensor& y, Tensor& h, const Tensor& weight, float eps) override {
    use();
    f32(x, "add_rmsnorm", "the residual");
    f32(y, "add_rmsnorm", "the addend");
    f32(h, "add_rmsnorm", "the output");
    f32(weight, "add_rmsnorm", "the weight");
    const int64_t N = weight.numel();
    FATHOM_ASSERT(N > 0 && x.numel() % N == 0 && y.numel() == x.numel() && h.numel() == x.numel(), "add_rmsnorm: x ",
                  shape_str(x.shape()), " y ", shape_str(y.shape()), " h ", shape_str(h.shape()));
    cuda::add_rmsnorm(x.f32(), y.f32(), h.f32(), weight.f32(), x.numel() / N, N, eps, ctx_->stream);
  }

  void matmul(Tensor& out, const Tensor& x, const LinearWeight& w) override {
    use();
    f32(out, "matmul", "the output");
    f32(x, "matmul", "the input");
    run_matmul(out.f32(), x.f32(), x.numel(), out.numel(), w);
  }

  void matmul_batch(const std::vector<MatmulJob>& jobs) override {
    use();
    std::vector<cuda::MatmulParams> ps;
    for (const MatmulJob& j : jobs) {
      FATHOM_ASSERT(j.w && j.M >= 0, "matmul_batch: a job without a weight");
      ps.push_back(matmul_params(j.out, j.x, j.M * j.w->in_features(), j.M * j.w->out_features(), *j.w));
      ps.back().accumulate = j.accumulate;
      if (j.norm) {
        ps.back().norm = input_norm(j.norm, j.w->in_features(), "matmul_batch");
        ps.back().eps = j.norm.eps;
      }
    }
    for (int r = 0; r < cuda::repeats(cuda::kRepeatGemv); ++r) cuda::matmul_batch(ps.data(), int(ps.size()), ctx_->stream);
  }

  // The norm weight of an InputNorm over rows of K, checked.
  const float* input_norm(const InputNorm& n, int64_t K, const char* op) {
    f32(*n.weight, op, "the input norm's weight");
    FATHOM_ASSERT(n.weight->numel() == K, op, ": an input norm of ", n.weight->numel(), " weights for rows of ", K);
    return n.weight->f32();
  }

  void rope(const RopeParams& p) override {
    use();
    cuda::rope(p, ctx_->stream);
  }

  void mla_cache_append(const MlaAppendParams& p) override {
    use();
    cuda::mla_cache_append(p, ctx_->stream);
  }

  void attention(const AttentionParams& p) override {
    use();
    for (int r = 0; r < cuda::repeats(cuda::kRepeatAttention); ++r) cuda::attention(p, ctx_->stream);
  }

  void attention_batch(const std::vector<AttentionParams>& ps) override {
    use();
    for (int r = 0; r < cuda::repeats(cuda::kRepeatAttention); ++r) cuda::attention_batch(ps, ctx_->stream);
  }

  void rope_tables(Tensor& cos, Tensor& sin, const Tensor& positions, const Tensor& inv_freq,
                   float attention_factor) override {
    use();
    f32(cos, "rope_tables", "the cosine table");
    f32(sin, "rope_tables", "the sine table");
    on_gpu(positions, "rope_tables", "the positions");
    on_gpu(inv_freq, "rope_tables", "the inverse frequencies");
    const int64_t T = positions.numel(), half = inv_freq.numel();
    FATHOM_ASSERT(positions.dtype() == DType::I32 && inv_freq.dtype() == DType::F64 && cos.numel() == T * half &&
                      sin.numel() == T * half,
                  "rope_tables: positions ", shape_str(positions.shape()), " inv_freq ", shape_str(inv_freq.shape()),
                  " cos ", shape_str(cos.shape()));
    cuda::rope_tables(cos.f32(), sin.f32(), positions.ptr<int32_t>(), inv_freq.ptr<double>(), T, half,
                      attention_factor, ctx_->stream);
  }

  void argmax(Tensor& ids, const Tensor& logits) override {
    use();
    on_gpu(ids, "argmax", "the ids");
    f32(logits, "argmax", "the logits");
    const int64_t B = ids.numel();
    FATHOM_ASSERT(ids.dtype() == DType::I32 && B > 0 && logits.numel() % B == 0, "argmax: ids ",
                  shape_str(ids.shape()), " logits ", shape_str(logits.shape()));
    cuda::argmax(ids.ptr<int32_t>(), logits.f32(), B, logits.numel() / B, ctx_->stream);
  }

  void sample(Tensor& ids, const Tensor& logits, const Tensor& params) override {
    use();
    on_gpu(ids, "sample", "the ids");
    f32(logits, "sample", "the logits");
    on_gpu(params, "sample", "the sampling rows");
    const int64_t B = ids.numel();
    FATHOM_ASSERT(ids.dtype() == DType::I32 && B > 0 && logits.numel() % B == 0 &&
                      params.nbytes() == size_t(B) * sizeof(SampleRow),
                  "sample: ids ", shape_str(ids.shape()), " logits ", shape_str(logits.shape()), " params ",
                  params.nbytes(), " bytes");
    cuda::sample(ids.ptr<int32_t>(), logits.f32(), static_cast<const SampleRow*>(params.data()), B,
                 logits.numel() / B, ctx_->stream);
  }

  // ---- backward passes (backward.cu)
  void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids) override {
    use();
    cuda_backend::embedding_backward(dtable, dout, ids, ctx_->stream);
  }
  void rmsnorm_backward(Tensor& dx, Tensor& dweight, const Tensor& dout, const Tensor& x, const Tensor& weight,
                        float eps) override {
    use();
    cuda_backend::rmsnorm_backward(dx, dweight, dout, x, weight, eps, ctx_->stream);
  }
  void matmul_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x, const Tensor& w) override {
    use();
    cuda_backend::matmul_backward(dx, dw, dout, x, w, ctx_->stream);
  }
  void silu_mul_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate,
                         const Tensor& up) override {
    use();
    cuda_backend::silu_mul_backward(dgate, dup, dout, gate, up, ctx_->stream);
  }
  void rope_backward(const RopeParams& p) override {
    use();
    FATHOM_CHECK(p.out == nullptr, "rope_backward works in place (out must be null).");
    RopeParams q = p;
    q.inverse = !p.inverse;
    cuda::rope(q, ctx_->stream);
  }
  void attention_backward(float* dq, float* dk, float* dv, const float* dout, const AttentionParams& p,
                          int64_t n_seq) override {
    use();
    cuda::attention_backward(dq, dk, dv, dout, p, n_seq, ctx_->stream);
  }
  void moe_gate_backward(Tensor& dlogits, const Tensor& dweights, const Tensor& logits, const Tensor& experts,
                         const MoeGateParams& p) override {
    use();
    cuda_backend::moe_gate_backward(dlogits, dweights, logits, experts, p, ctx_->stream);
  }
  void cross_entropy_backward(Tensor& losses, Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                              float dloss) override {
    use();
    cuda_backend::cross_entropy_backward(losses, dlogits, logits, targets, dloss, ctx_->stream);
  }

  void adamw_step(Tensor& w, Tensor& m, Tensor& v, const Tensor& grad, const AdamWStepParams& p) override {
    use();
    cuda_backend::adamw_step(w, m, v, grad, p, ctx_->stream);
  }
  void adamw_steps(const std::vector<AdamWTensor>& ts) override {
    use();
    cuda_backend::adamw_steps(ts, ctx_->stream);
  }
  double sum_squares(const std::vector<Tensor>& xs) override {
    use();
    std::vector<std::pair<const float*, int64_t>> list;
    list.reserve(xs.size());
    for (const Tensor& x : xs) {
      f32(x, "sum_squares", "a tensor");
      list.emplace_back(x.f32(), x.numel());
    }
    Tensor result = empty({1}, DType::F64);
    cuda::sum_squares_many(result.ptr<double>(), list, ctx_->stream);
    double total = 0;
    check(cudaMemcpyAsync(&total, result.ptr<double>(), sizeof(double), cudaMemcpyDeviceToHost, ctx_->stream),
          "sum_squares (the result)");
    check(cudaStreamSynchronize(ctx_->stream), "sum_squares (or a kernel queued before it)");
    return total;
  }
  void zero(Tensor& t) override {
    use();
    on_gpu(t, "zero", "the tensor");
    if (t.nbytes()) check(cudaMemsetAsync(t.data(), 0, t.nbytes(), ctx_->stream), "zero");
  }
  void zero_many(const std::vector<Tensor*>& ts) override {
    use();
    std::vector<std::pair<void*, size_t>> regions;
    regions.reserve(ts.size());
    for (Tensor* t : ts) {
      FATHOM_CHECK(t != nullptr, "zero_many: a tensor is missing.");
      on_gpu(*t, "zero_many", "a tensor");
      regions.emplace_back(t->data(), t->nbytes());
    }
    cuda::zero_many(regions, ctx_->stream);
  }

  bool set_fp8_activations(bool enabled) override {
    fp8_activations_ = enabled;
    return true;
  }

  bool set_bf16_matmuls(bool enabled) override {
    cuda::set_bf16_gemms(enabled);
    return true;
  }

  void mul_rows(Tensor& x, const Tensor& s) override {
    use();
    cuda_backend::mul_rows(x, s, ctx_->stream);
  }
  void row_dot(Tensor& out, const Tensor& a, const Tensor& b) override {
    use();
    cuda_backend::row_dot(out, a, b, ctx_->stream);
  }

  void sum_heads(const CopyParams& p) override {
    use();
    FATHOM_CHECK(p.out && p.in && p.out_dtype == DType::F32 && !p.out_token_index && p.n_tokens >= 0 &&
                     p.n_heads >= 1 && p.cols >= 0,
                 "sum_heads: F32 out and in pointers, at least one head and no output index are needed.");
    cuda::sum_heads(static_cast<float*>(p.out), p.out_token_stride, p.in, p.in_token_stride, p.in_head_stride,
                    p.n_tokens, p.n_heads, p.cols, ctx_->stream);
  }
  void gather_sum_rows(Tensor& out, const Tensor& in, const Tensor& pos, bool accumulate) override {
    use();
    cuda_backend::gather_sum_rows(out, in, pos, accumulate, ctx_->stream);
  }
  void matmul_stacked(Tensor& out, const Tensor& x, const Tensor& w, int64_t groups) override {
    use();
    f32(out, "matmul_stacked", "the output");
    f32(x, "matmul_stacked", "the input");
    f32(w, "matmul_stacked", "the weights");
    const StackedDims d = stacked_dims("matmul_stacked", out, x, w, groups);
    cuda::matmul_stacked(out.f32(), x.f32(), w.f32(), d.M, d.N, d.K, groups, ctx_->stream);
  }
  void matmul_stacked_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x, const Tensor& w,
                               int64_t groups) override {
    use();
    cuda_backend::matmul_stacked_backward(dx, dw, dout, x, w, groups, ctx_->stream);
  }

  void matmul_per_head(const HeadMatmulParams& p, const Tensor& w) override {
    use();
    on_gpu(w, "matmul_per_head", "the weight");
    FATHOM_CHECK(w.ndim() == 3 && (w.dtype() == DType::F32 || w.dtype() == DType::BF16 || w.dtype() == DType::F16),
                 "matmul_per_head: the weight is ", dtype_name(w.dtype()), " ", shape_str(w.shape()),
                 "; expected (heads, N, K) in F32, BF16 or F16.");
    cuda::MatmulParams m;
    m.out = p.out;
    m.ldo = p.out_token_stride;
    m.out_batch_stride = p.out_head_stride;
    m.x = p.x;
    m.ldx = p.x_token_stride;
    m.x_batch_stride = p.x_head_stride;
    m.w = w.data();
    m.w_dtype = w.dtype();
    m.w_batch_stride = w.dim(1) * w.dim(2);
    m.M = p.n_tokens;
    m.N = w.dim(1);
    m.K = w.dim(2);
    m.batch = int(w.dim(0));
    cuda::GemvSide side;
    side.rope = p.also_rope;
    side.append = p.also_append;
    if (m.batch == 0) {
      m.M = 0;  // nothing to multiply; the side ops still run
      m.batch = 1;
    }
    for (int r = 0; r < cuda::repeats(cuda::kRepeatGemv); ++r) cuda::matmul(m, ctx_->stream, side);
  }

  void silu_mul(Tensor& out, const Tensor& gate, const Tensor& up) override {
    use();
    f32(out, "silu_mul", "the output");
    f32(gate, "silu_mul", "the gate");
    f32(up, "silu_mul", "the up projection");
    FATHOM_ASSERT(gate.numel() == up.numel() && out.numel() == gate.numel(), "silu_mul: gate ",
                  shape_str(gate.shape()), " up ", shape_str(up.shape()), " out ", shape_str(out.shape()));
    cuda::silu_mul(out.f32(), gate.f32(), up.f32(), out.numel(), ctx_->stream);
  }

  void add(Tensor& x, const Tensor& y) override {
    use();
    f32(x, "add", "the accumulator");
    f32(y, "add", "the addend");
    FATHOM_ASSERT(x.numel() == y.numel(), "add: ", shape_str(x.shape()), " += ", shape_str(y.shape()));
    cuda::add(x.f32(), y.f32(), x.numel(), ctx_->stream);
  }

  // moe_gate's outputs for T tokens: weights (T, top_k) F32 and experts (T, top_k) I32 on the GPU.
  static void check_choices(const Tensor& weights, const Tensor& experts, int64_t T, const MoeGateParams& p,
                            const char* op) {
    f32(weights, op, "the routing weights");
    on_gpu(experts, op, "the expert ids");
    FATHOM_ASSERT(experts.dtype() == DType::I32 && weights.numel() == T * p.top_k && experts.numel() == T * p.top_k,
                  op, ": weights ", shape_str(weights.shape()), " experts ", shape_str(experts.shape()), " for ", T,
                  " tokens, top ", p.top_k);
  }

  void moe_gate(Tensor& weights, Tensor& experts, const Tensor& logits, const float* bias,
                const MoeGateParams& p) override {
    use();
    f32(logits, "moe_gate", "the router logits");
    FATHOM_ASSERT(p.n_experts > 0 && logits.numel() % p.n_experts == 0, "moe_gate: logits ",
                  shape_str(logits.shape()), " for ", p.n_experts, " experts");
    const int64_t T = logits.numel() / p.n_experts;
    check_choices(weights, experts, T, p, "moe_gate");
    for (int r = 0; r < cuda::repeats(cuda::kRepeatGate); ++r)
      cuda::moe_gate(weights.f32(), experts.ptr<int32_t>(), logits.f32(), bias, T, p, ctx_->stream);
  }

  bool moe_route(Tensor& weights, Tensor& experts, Tensor* xn, const Tensor& x, const LinearWeight& router,
                 InputNorm norm, const float* bias, const MoeGateParams& p) override {
    use();
    const int64_t D = router.in_features(), T = D > 0 ? x.numel() / D : 0;
    // decode-sized batches and small routers in one kernel; the rest as a matmul and moe_gate
    if (router.out_features() != p.n_experts || x.numel() != T * D ||
        !cuda::moe_router_fits(T, D, router.weight.dtype(), p.n_experts))
      return Ops::moe_route(weights, experts, xn, x, router, norm, bias, p);
    f32(x, "moe_route", "the input");
    on_gpu(router.weight, "moe_route", "the router weight");
    check_choices(weights, experts, T, p, "moe_route");
    float* xn_out = nullptr;
    if (xn && norm) {
      *xn = empty({T, D}, DType::F32);
      xn_out = xn->f32();
    }
    const float* g = norm ? input_norm(norm, D, "moe_route") : nullptr;
    for (int r = 0; r < cuda::repeats(cuda::kRepeatGate); ++r)
      cuda::moe_router_gate(weights.f32(), experts.ptr<int32_t>(), xn_out, x.f32(), router.weight.data(),
                            router.weight.dtype(), g, norm.eps, T, D, bias, p, ctx_->stream);
    return xn_out != nullptr;
  }

  void moe_experts(Tensor& out, const Tensor& x, const Tensor& weights, const Tensor& experts,
                   const ExpertSet& set, const ExpertSet* shared = nullptr, bool accumulate = false, InputNorm norm = {}) override {
    use();
    f32(out, "moe_experts", "the output");
    f32(x, "moe_experts", "the input");
    f32(weights, "moe_experts", "the routing weights");
    on_gpu(experts, "moe_experts", "the expert ids");
    const auto* prep = static_cast<const PreparedExperts*>(set.prepared.get());
    FATHOM_CHECK(prep && prep->tag == PreparedExperts::kTag, "moe_experts: the expert set was not prepared by the "
                 "CUDA backend (call Ops::prepare_experts after placing the weights).");
    const int64_t D = prep->hidden, T = x.numel() / D;
    FATHOM_ASSERT(x.numel() == T * D && out.numel() == T * D, "moe_experts: x ", shape_str(x.shape()), " out ",
                  shape_str(out.shape()), " for hidden size ", D);
    if (T == 0) return;
    const int64_t K = weights.numel() / T;
    FATHOM_ASSERT(K > 0 && weights.numel() == T * K && experts.numel() == T * K && experts.dtype() == DType::I32,
                  "moe_experts: weights ", shape_str(weights.shape()), " experts ", shape_str(experts.shape()));
    cuda::MoeExpertsParams m;
    m.out = out.f32();
    m.x = x.f32();
    m.weights = weights.f32();
    m.experts = experts.ptr<int32_t>();
    m.table = prep->table;
    m.n_tokens = T;
    m.hidden = D;
    m.inter = prep->inter;
    m.block = prep->block;
    m.n_experts = prep->n_experts;
    m.top_k = int(K);
    m.dtype = prep->dtype;
    m.aligned16 = prep->aligned16;
    m.accumulate = accumulate;
    if (norm) {
      m.norm = input_norm(norm, D, "moe_experts");
      m.eps = norm.eps;
    }
    if (shared) {
      const auto* sp = static_cast<const PreparedExperts*>(shared->prepared.get());
      FATHOM_CHECK(sp && sp->tag == PreparedExperts::kTag && sp->n_experts == 1, "moe_experts: the shared expert was not "
                   "prepared by the CUDA backend as one expert (Ops::prepare_experts).");
      FATHOM_CHECK(sp->dtype == prep->dtype && sp->hidden == D && (sp->dtype != DType::F8_E4M3 || sp->block == prep->block),
                   "moe_experts: the shared expert (", dtype_name(sp->dtype), ", hidden ", sp->hidden,
                   ") does not match the routed experts (", dtype_name(prep->dtype), ", hidden ", D, ").");
      m.has_shared = true;
      m.shared = sp->host_table;
      m.shared_table = sp->table;
      m.shared_inter = sp->inter;
      m.aligned16 = m.aligned16 && sp->aligned16;
    }
    for (int r = 0; r < cuda::repeats(cuda::kRepeatExperts); ++r) cuda::moe_experts(m, ctx_->stream);
  }

  bool moe_takes_shared(int64_t n_tokens, int top_k, int n_experts) const override {
    return cuda::moe_small_tiles(n_tokens, top_k, n_experts);
  }

  void swiglu(Tensor& out, const Tensor& x, const ExpertSet& set, bool accumulate, InputNorm norm = {}) override {
    use();
    f32(out, "swiglu", "the output");
    f32(x, "swiglu", "the input");
    const auto* prep = static_cast<const PreparedExperts*>(set.prepared.get());
    FATHOM_CHECK(prep && prep->tag == PreparedExperts::kTag && prep->n_experts == 1, "swiglu: the weights were not "
                 "prepared by the CUDA backend as one expert (Ops::prepare_experts).");
    const int64_t D = prep->hidden, T = x.numel() / D;
    FATHOM_ASSERT(x.numel() == T * D && out.numel() == T * D, "swiglu: x ", shape_str(x.shape()), " out ",
                  shape_str(out.shape()), " for hidden size ", D);
    if (T == 0) return;
    cuda::MoeExpertsParams m;
    m.out = out.f32();
    m.x = x.f32();
    m.table = prep->table;
    m.n_tokens = T;
    m.hidden = D;
    m.inter = prep->inter;
    m.block = prep->block;
    m.n_experts = 1;
    m.top_k = 1;
    m.dtype = prep->dtype;
    m.aligned16 = prep->aligned16;
    m.accumulate = accumulate;
    if (norm) {
      m.norm = input_norm(norm, D, "swiglu");
      m.eps = norm.eps;
    }
    for (int r = 0; r < cuda::repeats(cuda::kRepeatExperts); ++r) cuda::moe_experts(m, ctx_->stream);
  }

  // ---- graphs

  bool capture_begin() override {
    use();
    // thread-local: this thread may not make calls that would synchronize while it records
    check(cudaStreamBeginCapture(ctx_->stream, cudaStreamCaptureModeThreadLocal), "capture_begin");
    return true;
  }

  std::shared_ptr<void> capture_end() override {
    use();
    auto g = std::make_shared<CudaGraph>();
    g->ctx = ctx_;
    const cudaError_t e = cudaStreamEndCapture(ctx_->stream, &g->graph);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw Error(cat("capturing a CUDA graph failed (an op synchronized or touched pageable host memory while "
                      "recording?): ", cudaGetErrorString(e), "."));
    }
    check(cudaGraphInstantiate(&g->exec, g->graph, 0), "capture_end (cudaGraphInstantiate)");
    return std::shared_ptr<void>(g, g.get());
  }

  void replay(const std::shared_ptr<void>& graph) override {
    use();
    const auto* g = static_cast<const CudaGraph*>(graph.get());
    FATHOM_CHECK(g && g->tag == CudaGraph::kTag, "replay: not a graph captured by the CUDA backend.");
    check(cudaGraphLaunch(g->exec, ctx_->stream), "replay (cudaGraphLaunch)");
  }

  Tensor pinned_host(Shape shape, DType dtype) override {
    use();
    const size_t bytes = std::max<size_t>(64, size_t(shape_numel(shape)) * dtype_size(dtype));
    void* ptr = nullptr;
    check(cudaMallocHost(&ptr, bytes), "pinned_host (cudaMallocHost)");
    std::shared_ptr<void> owner(ptr, [](void* q) { cudaFreeHost(q); });
    return Tensor::view(ptr, std::move(shape), dtype, std::move(owner), Device::CPU);
  }

  void copy_from_host(Tensor& dst, const Tensor& pinned_src) override {
    use();
    on_gpu(dst, "copy_from_host", "the destination");
    FATHOM_ASSERT(pinned_src.device() == Device::CPU && pinned_src.nbytes() == dst.nbytes(), "copy_from_host: ",
                  pinned_src.nbytes(), " bytes into ", dst.nbytes());
    if (dst.nbytes())
      check(cudaMemcpyAsync(dst.data(), pinned_src.data(), dst.nbytes(), cudaMemcpyHostToDevice, ctx_->stream),
            "copy_from_host");
  }

  void copy_to_host(Tensor& pinned_dst, const Tensor& src) override {
    use();
    on_gpu(src, "copy_to_host", "the source");
    FATHOM_ASSERT(pinned_dst.device() == Device::CPU && pinned_dst.nbytes() == src.nbytes(), "copy_to_host: ",
                  src.nbytes(), " bytes into ", pinned_dst.nbytes());
    if (src.nbytes())
      check(cudaMemcpyAsync(pinned_dst.data(), src.data(), src.nbytes(), cudaMemcpyDeviceToHost, ctx_->stream),
            "copy_to_host");
  }

  void synchronize() override {
    use();
    check(cudaStreamSynchronize(ctx_->stream), "synchronize (a kernel queued before it failed)");
  }

 private:
  // Kernels go to the stream of this backend's device, whichever device the calling thread had.
  void use() const { cuda::use_device(ctx_->device); }

  cuda::MemoryInfo memory_info_or_zero() const {
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) cudaGetLastError();
    return {int64_t(free), int64_t(total)};
  }

  static void check_scales(const LinearWeight& w, const char* op) {
    FATHOM_CHECK(w.block > 0, op, ": FP8 weight '", w.name, "' has quantization block ", w.block,
                 "; expected a positive size.");
    const Shape expected = {(w.out_features() + w.block - 1) / w.block, (w.in_features() + w.block - 1) / w.block};
    FATHOM_CHECK(w.scale_inv.defined() && w.scale_inv.dtype() == DType::F32 && w.scale_inv.shape() == expected, op,
                 ": FP8 weight '", w.name, "' of shape ", shape_str(w.weight.shape()), " needs an F32 scale_inv of shape ",
                 shape_str(expected), "; found ",
                 w.scale_inv.defined() ? cat(dtype_name(w.scale_inv.dtype()), " ", shape_str(w.scale_inv.shape()))
                                       : std::string("none"),
                 ".");
    on_gpu(w.scale_inv, op, "the FP8 scales");
  }

  // out (M, N) = x (M, K) · Wᵀ over raw device pointers; x_numel / out_numel check the shapes.
  void run_matmul(float* out, const float* x, int64_t x_numel, int64_t out_numel, const LinearWeight& w) {
    for (int r = 0; r < cuda::repeats(cuda::kRepeatGemv); ++r)
      cuda::matmul(matmul_params(out, x, x_numel, out_numel, w), ctx_->stream);
  }

  cuda::MatmulParams matmul_params(float* out, const float* x, int64_t x_numel, int64_t out_numel,
                                   const LinearWeight& w) {
    on_gpu(w.weight, "matmul", w.name.empty() ? "the weight" : w.name.c_str());
    FATHOM_CHECK(w.weight.ndim() == 2, "matmul: weight '", w.name, "' has shape ", shape_str(w.weight.shape()),
                 "; expected 2 dimensions [out_features, in_features].");
    const int64_t N = w.out_features(), K = w.in_features();
    const int64_t M = K > 0 ? x_numel / K : (N > 0 ? out_numel / N : 0);
    FATHOM_ASSERT(x_numel == M * K && out_numel == M * N, "matmul ", w.name, ": ", x_numel, " inputs and ",
                  out_numel, " outputs for weight ", shape_str(w.weight.shape()));
    if (w.quantized()) check_scales(w, "matmul");
    cuda::MatmulParams p;
    p.out = out;
    p.ldo = N;
    p.x = x;
    p.ldx = K;
    p.w = w.weight.data();
    p.w_dtype = w.weight.dtype();
    p.scale_inv = w.quantized() ? w.scale_inv.f32() : nullptr;
    p.block = w.block;
    p.M = M;
    p.N = N;
    p.K = K;
    p.fp8_activations = fp8_activations_ && w.quantized();
    return p;
  }

  std::shared_ptr<CudaContext> ctx_;
  bool fp8_activations_ = false;  // set_fp8_activations
  PinnedStaging staging_;
};

}  // namespace

std::unique_ptr<Ops> make_cuda_ops(int device) {
  const int n = cuda::device_count();
  FATHOM_CHECK(n > 0, "--device cuda was requested but no CUDA GPU is visible (no driver, no device, or "
               "CUDA_VISIBLE_DEVICES hides them); use --device cpu.");
  FATHOM_CHECK(device >= 0 && device < n, "--device cuda: GPU ", device, " was requested but ", n, " CUDA GPU",
               n == 1 ? " is" : "s are", " visible (indices 0 to ", n - 1, ").");
  return std::make_unique<CudaOps>(device);
}

bool cuda_available() {
  try {
    return cuda::device_count() > 0;
  } catch (...) {
    return false;
  }
}

}  // namespace fathom
