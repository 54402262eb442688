// The CUDA backend's training ops (the backward passes, AdamW, the row helpers of training):
// each checks its tensors and launches its kernel of cuda_ops.h on the backend's stream. CudaOps
// (cuda_backend.cu) forwards to them; the checks both files use: cuda_backend_checks.h.
#include <cuda_runtime.h>

#include <initializer_list>
#include <vector>

#include "core/error.h"
#include "ops/cuda/cuda_backend_checks.h"
#include "ops/cuda/cuda_ops.h"
#include "ops/ops.h"

namespace fathom::cuda_backend {

void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids, cudaStream_t stream) {
  f32(dtable, "embedding_backward", "the table gradient");
  f32(dout, "embedding_backward", "the output gradient");
  on_gpu(ids, "embedding_backward", "the ids");
  FATHOM_CHECK(ids.dtype() == DType::I32 && dtable.ndim() == 2 && dout.numel() == ids.numel() * dtable.dim(1),
               "embedding_backward: I32 ids ", shape_str(ids.shape()), ", table gradient ", shape_str(dtable.shape()),
               " and output gradient ", shape_str(dout.shape()), " do not fit.");
  cuda::embedding_backward(dtable.f32(), dout.f32(), ids.ptr<int32_t>(), ids.numel(), dtable.dim(1), dtable.dim(0),
                           stream);
}

void rmsnorm_backward(Tensor& dx, Tensor& dweight, const Tensor& dout, const Tensor& x, const Tensor& weight, float eps,
                      cudaStream_t stream) {
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dx, &dweight, &dout, &x, &weight})
    f32(*t, "rmsnorm_backward", "an operand");
  const int64_t N = weight.numel();
  FATHOM_CHECK(
      N > 0 && x.numel() % N == 0 && dx.numel() == x.numel() && dout.numel() == x.numel() && dweight.numel() == N,
      "rmsnorm_backward: x ", shape_str(x.shape()), " dx ", shape_str(dx.shape()), " dout ", shape_str(dout.shape()),
      " weight ", shape_str(weight.shape()), " dweight ", shape_str(dweight.shape()));
  cuda::rmsnorm_backward(dx.f32(), dweight.f32(), dout.f32(), x.f32(), weight.f32(), x.numel() / N, N, eps, stream);
}

void matmul_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x, const Tensor& w,
                     cudaStream_t stream) {
  f32(dw, "matmul_backward", "the weight gradient");
  f32(dout, "matmul_backward", "the output gradient");
  f32(x, "matmul_backward", "the input");
  f32(w, "matmul_backward", "the weight (the F32 master)");
  FATHOM_CHECK(w.ndim() == 2 && dw.shape() == w.shape(), "matmul_backward: weight ", shape_str(w.shape()),
               " and its gradient ", shape_str(dw.shape()), " differ.");
  const int64_t N = w.dim(0), K = w.dim(1);
  FATHOM_CHECK(K > 0 && N > 0 && x.numel() % K == 0 && dout.numel() == x.numel() / K * N, "matmul_backward: x ",
               shape_str(x.shape()), " dout ", shape_str(dout.shape()), " for a weight ", shape_str(w.shape()));
  const int64_t M = x.numel() / K;
  if (dx.defined()) {
    f32(dx, "matmul_backward", "the input gradient");
    FATHOM_CHECK(dx.numel() == x.numel(), "matmul_backward: dx ", shape_str(dx.shape()), " for x ",
                 shape_str(x.shape()));
  }
  cuda::matmul_backward(dx.defined() ? dx.f32() : nullptr, dw.f32(), dout.f32(), x.f32(), w.f32(), M, N, K, stream);
}

void silu_mul_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate, const Tensor& up,
                       cudaStream_t stream) {
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dgate, &dup, &dout, &gate, &up})
    f32(*t, "silu_mul_backward", "an operand");
  const int64_t n = gate.numel();
  FATHOM_CHECK(up.numel() == n && dout.numel() == n && dgate.numel() == n && dup.numel() == n,
               "silu_mul_backward: gate ", shape_str(gate.shape()), " up ", shape_str(up.shape()), " dout ",
               shape_str(dout.shape()));
  cuda::silu_mul_backward(dgate.f32(), dup.f32(), dout.f32(), gate.f32(), up.f32(), n, stream);
}

void moe_gate_backward(Tensor& dlogits, const Tensor& dweights, const Tensor& logits, const Tensor& experts,
                       const MoeGateParams& p, cudaStream_t stream) {
  f32(dlogits, "moe_gate_backward", "the logits' gradient");
  f32(dweights, "moe_gate_backward", "the routing weights' gradient");
  f32(logits, "moe_gate_backward", "the logits");
  on_gpu(experts, "moe_gate_backward", "the expert ids");
  FATHOM_CHECK(p.n_experts > 0 && p.top_k > 0 && logits.numel() % p.n_experts == 0 && experts.dtype() == DType::I32,
               "moe_gate_backward: logits ", shape_str(logits.shape()), " for ", p.n_experts, " experts.");
  const int64_t T = logits.numel() / p.n_experts;
  FATHOM_CHECK(dlogits.numel() == T * p.n_experts && dweights.numel() == T * p.top_k && experts.numel() == T * p.top_k,
               "moe_gate_backward: ", T, " tokens but dlogits ", shape_str(dlogits.shape()), " dweights ",
               shape_str(dweights.shape()), " experts ", shape_str(experts.shape()));
  cuda::moe_gate_backward(dlogits.f32(), dweights.f32(), logits.f32(), experts.ptr<int32_t>(), T, p, stream);
}

void cross_entropy_backward(Tensor& losses, Tensor& dlogits, const Tensor& logits, const Tensor& targets, float dloss,
                            cudaStream_t stream) {
  f32(losses, "cross_entropy_backward", "the losses");
  f32(dlogits, "cross_entropy_backward", "the logits' gradient");
  f32(logits, "cross_entropy_backward", "the logits");
  on_gpu(targets, "cross_entropy_backward", "the targets");
  FATHOM_CHECK(logits.ndim() == 2 && targets.dtype() == DType::I32 && targets.numel() == logits.dim(0) &&
                   losses.numel() == logits.dim(0) && dlogits.numel() == logits.numel(),
               "cross_entropy_backward: logits ", shape_str(logits.shape()), " targets ", shape_str(targets.shape()),
               " losses ", shape_str(losses.shape()), " dlogits ", shape_str(dlogits.shape()));
  cuda::cross_entropy_backward(losses.f32(), dlogits.f32(), logits.f32(), targets.ptr<int32_t>(), logits.dim(0),
                               logits.dim(1), dloss, stream);
}

void adamw_step(Tensor& w, Tensor& m, Tensor& v, const Tensor& grad, const AdamWStepParams& p, cudaStream_t stream) {
  f32(w, "adamw_step", "the parameter");
  f32(m, "adamw_step", "the first moment");
  f32(v, "adamw_step", "the second moment");
  f32(grad, "adamw_step", "the gradient");
  const int64_t n = w.numel();
  FATHOM_CHECK(m.numel() == n && v.numel() == n && grad.numel() == n, "adamw_step: value ", shape_str(w.shape()),
               ", moments ", shape_str(m.shape()), " and ", shape_str(v.shape()), ", gradient ",
               shape_str(grad.shape()), " must all be one size.");
  cuda::adamw_step(w.f32(), m.f32(), v.f32(), grad.f32(), n, p, stream);
}

void adamw_steps(const std::vector<AdamWTensor>& ts, cudaStream_t stream) {
  std::vector<cuda::AdamWSlab> slabs;
  slabs.reserve(ts.size());
  for (const AdamWTensor& t : ts) {
    FATHOM_CHECK(t.w && t.m && t.v && t.grad, "adamw_steps: a tensor is missing.");
    f32(*t.w, "adamw_steps", "a parameter");
    f32(*t.m, "adamw_steps", "a first moment");
    f32(*t.v, "adamw_steps", "a second moment");
    f32(*t.grad, "adamw_steps", "a gradient");
    const int64_t n = t.w->numel();
    FATHOM_CHECK(t.m->numel() == n && t.v->numel() == n && t.grad->numel() == n, "adamw_steps: value ",
                 shape_str(t.w->shape()), ", moments ", shape_str(t.m->shape()), " and ", shape_str(t.v->shape()),
                 ", gradient ", shape_str(t.grad->shape()), " must all be one size.");
    slabs.push_back({t.w->f32(), t.m->f32(), t.v->f32(), t.grad->f32(), n, t.p});
  }
  cuda::adamw_steps(slabs, stream);
}

void mul_rows(Tensor& x, const Tensor& s, cudaStream_t stream) {
  f32(x, "mul_rows", "the rows");
  f32(s, "mul_rows", "the factors");
  const int64_t M = s.numel();
  FATHOM_CHECK(M > 0 && x.numel() % M == 0, "mul_rows: x ", shape_str(x.shape()), " for ", M, " factors.");
  cuda::mul_rows(x.f32(), s.f32(), M, x.numel() / M, stream);
}

void row_dot(Tensor& out, const Tensor& a, const Tensor& b, cudaStream_t stream) {
  f32(out, "row_dot", "the output");
  f32(a, "row_dot", "the first rows");
  f32(b, "row_dot", "the second rows");
  const int64_t M = out.numel();
  FATHOM_CHECK(M > 0 && a.numel() == b.numel() && a.numel() % M == 0, "row_dot: a ", shape_str(a.shape()), " b ",
               shape_str(b.shape()), " out ", shape_str(out.shape()));
  cuda::row_dot(out.f32(), a.f32(), b.f32(), M, a.numel() / M, stream);
}

void gather_sum_rows(Tensor& out, const Tensor& in, const Tensor& pos, bool accumulate, cudaStream_t stream) {
  f32(out, "gather_sum_rows", "out");
  f32(in, "gather_sum_rows", "in");
  on_gpu(pos, "gather_sum_rows", "the positions");
  FATHOM_CHECK(pos.dtype() == DType::I32 && pos.ndim() == 2 && out.ndim() == 2 && pos.dim(0) == out.dim(0) &&
                   in.ndim() == 2 && in.dim(1) == out.dim(1) && pos.dim(1) < (int64_t(1) << 31),
               "gather_sum_rows: out ", shape_str(out.shape()), ", in ", shape_str(in.shape()), " and I32 positions ",
               shape_str(pos.shape()), " do not fit (out (T, N), in (P, N), pos (T, K)).");
  cuda::gather_sum_rows(out.f32(), in.f32(), pos.ptr<int32_t>(), out.dim(0), out.dim(1), int(pos.dim(1)), in.dim(0),
                        accumulate, stream);
}

void matmul_stacked_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x, const Tensor& w,
                             int64_t groups, cudaStream_t stream) {
  f32(dw, "matmul_stacked_backward", "the weights' gradient");
  f32(dout, "matmul_stacked_backward", "the output gradient");
  f32(x, "matmul_stacked_backward", "the input");
  f32(w, "matmul_stacked_backward", "the weights");
  const StackedDims d = stacked_dims("matmul_stacked_backward", dout, x, w, groups);
  FATHOM_CHECK(dw.shape() == w.shape(), "matmul_stacked_backward: weights ", shape_str(w.shape()),
               " and their gradient ", shape_str(dw.shape()), " differ.");
  if (dx.defined()) {
    f32(dx, "matmul_stacked_backward", "the input gradient");
    FATHOM_CHECK(dx.numel() == x.numel(), "matmul_stacked_backward: dx ", shape_str(dx.shape()), " for x ",
                 shape_str(x.shape()), ".");
  }
  cuda::matmul_backward(dx.defined() ? dx.f32() : nullptr, dw.f32(), dout.f32(), x.f32(), w.f32(), d.M, d.N, d.K,
                        stream, groups);
}

}  // namespace fathom::cuda_backend
