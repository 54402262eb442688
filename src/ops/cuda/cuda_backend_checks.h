// What the CUDA backend's two files share (cuda_backend.cu: CudaOps, the Ops of make_cuda_ops;
// cuda_backend_train.cu: its training ops): the operand checks, and the training ops CudaOps
// forwards to (each checks its tensors and launches on `stream`).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "core/error.h"
#include "ops/ops.h"

namespace fathom::cuda_backend {

// A clear error unless t holds data in this backend's (device) memory; f32: and is F32.
inline void on_gpu(const Tensor& t, const char* op, const char* what) {
  FATHOM_CHECK(t.defined() && t.device() == Device::CUDA, op, ": ", what,
               t.defined() ? " is in host memory; the CUDA backend computes on tensors it allocated or uploaded."
                           : " has no data.");
}
inline void f32(const Tensor& t, const char* op, const char* what) {
  on_gpu(t, op, what);
  FATHOM_CHECK(t.dtype() == DType::F32, op, ": ", what, " is ", dtype_name(t.dtype()), "; expected F32.");
}

// The Ops methods of the same names (ops.h), on the backend's stream.
void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids, cudaStream_t stream);
void rmsnorm_backward(Tensor& dx, Tensor& dweight, const Tensor& dout, const Tensor& x, const Tensor& weight, float eps,
                      cudaStream_t stream);
void matmul_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x, const Tensor& w, cudaStream_t stream);
void silu_mul_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate, const Tensor& up,
                       cudaStream_t stream);
void moe_gate_backward(Tensor& dlogits, const Tensor& dweights, const Tensor& logits, const Tensor& experts,
                       const MoeGateParams& p, cudaStream_t stream);
void cross_entropy_backward(Tensor& losses, Tensor& dlogits, const Tensor& logits, const Tensor& targets, float dloss,
                            cudaStream_t stream);
void adamw_step(Tensor& w, Tensor& m, Tensor& v, const Tensor& grad, const AdamWStepParams& p, cudaStream_t stream);
void adamw_steps(const std::vector<AdamWTensor>& ts, cudaStream_t stream);
void mul_rows(Tensor& x, const Tensor& s, cudaStream_t stream);
void row_dot(Tensor& out, const Tensor& a, const Tensor& b, cudaStream_t stream);
void gather_sum_rows(Tensor& out, const Tensor& in, const Tensor& pos, bool accumulate, cudaStream_t stream);
void matmul_stacked_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x, const Tensor& w,
                             int64_t groups, cudaStream_t stream);

}  // namespace fathom::cuda_backend
