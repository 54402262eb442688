// The op interface's own code: the reference compositions of ops.h's grouped ops, loops over the
// plain ops on views of the operands (and the shape check they share with the backends). The CPU
// backend runs them as they are; the CUDA backend overrides them with one launch each and is
// tested against them (tests/test_cuda_backward.cpp). Its own library (fathom_ops_api), below
// both backends.
#include <initializer_list>

#include "core/error.h"
#include "ops/ops.h"

namespace fathom {
namespace {

void check_f32(const Tensor& t, const char* op, const char* what) {
  FATHOM_CHECK(t.defined() && t.dtype() == DType::F32, op, ": ", what, " must be an F32 tensor",
               t.defined() ? cat(", got ", dtype_name(t.dtype())) : std::string(), ".");
}

}  // namespace

StackedDims stacked_dims(const char* op, const Tensor& out, const Tensor& x, const Tensor& w, int64_t groups) {
  FATHOM_CHECK(groups > 0 && w.ndim() == 2 && w.dim(0) % groups == 0 && w.dim(1) > 0, op, ": a stack of ", groups,
               " weights needs a 2-D weight of groups · N rows, got ", shape_str(w.shape()), ".");
  StackedDims d;
  d.N = w.dim(0) / groups;
  d.K = w.dim(1);
  FATHOM_CHECK(x.numel() % (d.K * groups) == 0, op, ": x ", shape_str(x.shape()), " is not ", groups,
               " groups of rows of ", d.K, ".");
  d.M = x.numel() / d.K / groups;
  FATHOM_CHECK(out.numel() == groups * d.M * d.N, op, ": ", shape_str(out.shape()), " does not hold ", groups,
               " groups of ", d.M, " x ", d.N, ".");
  return d;
}

void Ops::sum_heads(const CopyParams& p) {
  FATHOM_CHECK(p.out && p.in && p.out_dtype == DType::F32 && !p.out_token_index && p.n_tokens >= 0 && p.n_heads >= 1 &&
                   p.cols >= 0,
               "sum_heads: F32 out and in pointers, at least one head and no output index are needed.");
  FATHOM_CHECK(device() == Device::CPU, "sum_heads: the ", name(), " backend has no implementation.");
  for (int64_t t = 0; t < p.n_tokens; ++t)
    for (int c = 0; c < p.cols; ++c) {
      float acc = 0.f;
      for (int h = 0; h < p.n_heads; ++h) acc += p.in[t * p.in_token_stride + h * p.in_head_stride + c];
      static_cast<float*>(p.out)[t * p.out_token_stride + c] = acc;
    }
}

void Ops::gather_sum_rows(Tensor& out, const Tensor& in, const Tensor& pos, bool accumulate) {
  check_f32(out, "gather_sum_rows", "out");
  check_f32(in, "gather_sum_rows", "in");
  FATHOM_CHECK(pos.defined() && pos.dtype() == DType::I32 && pos.ndim() == 2 && out.ndim() == 2 &&
                   pos.dim(0) == out.dim(0) && in.ndim() == 2 && in.dim(1) == out.dim(1),
               "gather_sum_rows: out ", shape_str(out.shape()), ", in ", shape_str(in.shape()), " and I32 positions ",
               shape_str(pos.shape()), " do not fit (out (T, N), in (P, N), pos (T, K)).");
  FATHOM_CHECK(device() == Device::CPU, "gather_sum_rows: the ", name(), " backend has no implementation.");
  const int64_t T = out.dim(0), N = out.dim(1), K = pos.dim(1), P = in.dim(0);
  const int32_t* ps = pos.ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    float* o = out.f32() + t * N;
    if (!accumulate)
      for (int64_t j = 0; j < N; ++j) o[j] = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t r = ps[t * K + k];
      if (r < 0) continue;
      FATHOM_CHECK(r < P, "gather_sum_rows: position ", r, " of token ", t, " is past the ", P, " rows of in.");
      const float* row = in.f32() + int64_t(r) * N;
      for (int64_t j = 0; j < N; ++j) o[j] += row[j];
    }
  }
}

void Ops::matmul_stacked(Tensor& out, const Tensor& x, const Tensor& w, int64_t groups) {
  for (const Tensor* t : std::initializer_list<const Tensor*>{&out, &x, &w})
    check_f32(*t, "matmul_stacked", "an operand");
  const StackedDims d = stacked_dims("matmul_stacked", out, x, w, groups);
  const Tensor x2 = x.reshape({groups * d.M, d.K});
  Tensor out2 = out.reshape({groups * d.M, d.N});
  for (int64_t g = 0; g < groups; ++g) {
    LinearWeight lw;
    lw.weight = w.slice_rows(g * d.N, (g + 1) * d.N);
    Tensor o = out2.slice_rows(g * d.M, (g + 1) * d.M);
    matmul(o, x2.slice_rows(g * d.M, (g + 1) * d.M), lw);
  }
}

void Ops::matmul_stacked_backward(Tensor& dx, Tensor& dw, const Tensor& dout, const Tensor& x, const Tensor& w,
                                  int64_t groups) {
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dw, &dout, &x, &w})
    check_f32(*t, "matmul_stacked_backward", "an operand");
  const StackedDims d = stacked_dims("matmul_stacked_backward", dout, x, w, groups);
  FATHOM_CHECK(dw.shape() == w.shape(), "matmul_stacked_backward: weight ", shape_str(w.shape()), " and its gradient ",
               shape_str(dw.shape()), " differ.");
  if (dx.defined())
    FATHOM_CHECK(dx.numel() == x.numel(), "matmul_stacked_backward: dx ", shape_str(dx.shape()), " for x ",
                 shape_str(x.shape()), ".");
  const Tensor x2 = x.reshape({groups * d.M, d.K}), dout2 = dout.reshape({groups * d.M, d.N});
  Tensor dx2 = dx.defined() ? dx.reshape({groups * d.M, d.K}) : Tensor();
  for (int64_t g = 0; g < groups; ++g) {
    Tensor dxg = dx2.defined() ? dx2.slice_rows(g * d.M, (g + 1) * d.M) : Tensor();
    Tensor dwg = dw.slice_rows(g * d.N, (g + 1) * d.N);
    matmul_backward(dxg, dwg, dout2.slice_rows(g * d.M, (g + 1) * d.M), x2.slice_rows(g * d.M, (g + 1) * d.M),
                    w.slice_rows(g * d.N, (g + 1) * d.N));
  }
}

}  // namespace fathom
