// Flash attention on the GPU (src/ops/cuda/flash_attention.cu, flash_attention_backward.cu): TFLOP/s
// of the causal forward and of forward + backward at
// the FlashAttention issue's shapes (B, H, S, D) = (4, 16, 4096, 128), (1, 16, 16384, 128),
// (8, 16, 2048, 64), (4, 16, 4096, 192/128), bf16 q/k/v generated on the GPU, packed as varlen
// batches of equal lengths. FLOPs counted as FlashAttention's benchmarks count them: 2·S²·(d_qk
// + d_v) per (batch, head) for the forward, 3.5 times that for forward + backward (the backward's
// five products), halved when causal. The peers, PyTorch's scaled_dot_product_attention
// with the cuDNN and FlashAttention backends on the same shapes, run in the same device script
// (bench/attention_peer.py; scripts/device-attention.sh joins the lines into one table).
//
// usage: bench_flash_attention [--kernel wgmma|simt] [--shape B,H,S,Dqk,Dv] [--full] [--fwd] [--min-ms 200]
// --full: non-causal as well; --fwd: the forward alone. Prints one line per case:
//   "fathom <fwd|fwdbwd> <causal|full> B H S Dqk Dv <TFLOP/s>"
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "ops/ops.h"
#ifdef FATHOM_HAVE_CUDA
#include "ops/cuda/cuda_ops.h"
#include "cuda_timing.h"
#endif

using namespace fathom;

#ifdef FATHOM_HAVE_CUDA
namespace {

struct BenchShape {
  int B, H, S, dqk, dv;
};

}  // namespace

int main(int argc, char** argv) {
  cuda::FlashKernel kernel = cuda::FlashKernel::Auto;
  double min_ms = 200;
  bool full = false, fwd_only = false;
  std::vector<BenchShape> shapes = {{4, 16, 4096, 128, 128}, {1, 16, 16384, 128, 128}, {8, 16, 2048, 64, 64},
                               {4, 16, 4096, 192, 128}};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kernel" && i + 1 < argc) {
      const std::string k = argv[++i];
      if (k != "wgmma" && k != "simt") {
        std::fprintf(stderr, "bench_flash_attention: --kernel is '%s'; expected wgmma or simt\n", k.c_str());
        return 2;
      }
      kernel = k == "wgmma" ? cuda::FlashKernel::Wgmma : cuda::FlashKernel::Simt;
    } else if (a == "--shape" && i + 1 < argc) {
      BenchShape s{};
      if (std::sscanf(argv[++i], "%d,%d,%d,%d,%d", &s.B, &s.H, &s.S, &s.dqk, &s.dv) != 5 || s.B <= 0 || s.H <= 0 ||
          s.S <= 0 || s.dqk <= 0 || s.dv <= 0) {
        std::fprintf(stderr, "bench_flash_attention: --shape is '%s'; expected B,H,S,Dqk,Dv (positive)\n", argv[i]);
        return 2;
      }
      shapes = {s};
    } else if (a == "--full") {
      full = true;
    } else if (a == "--fwd") {
      fwd_only = true;
    } else if (a == "--min-ms" && i + 1 < argc) {
      min_ms = std::atof(argv[++i]);
    } else {
      std::fprintf(stderr,
                   "usage: bench_flash_attention [--kernel wgmma|simt] [--shape B,H,S,Dqk,Dv] [--full] [--fwd] [--min-ms 200]\n");
      return 2;
    }
  }
  try {
    if (cuda::device_count() == 0) {
      std::printf("bench_flash_attention: no CUDA device; nothing measured\n");
      return 0;
    }
    std::unique_ptr<Ops> ops = make_cuda_ops(0);
    cuda::flash_attention_setup();
    for (const BenchShape& sh : shapes) {
      const int64_t T = int64_t(sh.B) * sh.S;
      Tensor q = ops->empty({T, sh.H, sh.dqk}, DType::BF16), k = ops->empty({T, sh.H, sh.dqk}, DType::BF16);
      Tensor v = ops->empty({T, sh.H, sh.dv}, DType::BF16), out = ops->empty({T, sh.H, sh.dv}, DType::BF16);
      Tensor lse = ops->empty({sh.H, T});
      Tensor dout = ops->empty({T, sh.H, sh.dv}, DType::BF16), dq = ops->empty({T, sh.H, sh.dqk});
      Tensor dk = ops->empty({T, sh.H, sh.dqk}), dv = ops->empty({T, sh.H, sh.dv});
      ops->fill_random(dout, 4, 1.f);
      FlashAttentionGrads g;
      g.dout = dout.ptr<uint16_t>(), g.dout_token_stride = int64_t(sh.H) * sh.dv, g.dout_head_stride = sh.dv;
      g.dq = dq.f32(), g.dk = dk.f32(), g.dv = dv.f32();
      ops->fill_random(q, 1, 1.f);
      ops->fill_random(k, 2, 1.f);
      ops->fill_random(v, 3, 1.f);
      Tensor cu_h = Tensor::empty({sh.B + 1}, DType::I32);
      for (int b = 0; b <= sh.B; ++b) cu_h.ptr<int32_t>()[b] = b * sh.S;
      Tensor cu = ops->upload(cu_h);
      FlashAttentionParams p;
      p.q = q.ptr<uint16_t>(), p.k = k.ptr<uint16_t>(), p.v = v.ptr<uint16_t>(), p.out = out.ptr<uint16_t>();
      p.lse = lse.f32();
      p.q_head_stride = p.k_head_stride = sh.dqk, p.v_head_stride = p.out_head_stride = sh.dv;
      p.q_token_stride = p.k_token_stride = int64_t(sh.H) * sh.dqk;
      p.v_token_stride = p.out_token_stride = int64_t(sh.H) * sh.dv;
      p.cu_seqlens_q = p.cu_seqlens_k = cu.ptr<int32_t>();
      p.batch = sh.B, p.total_q = p.total_k = T, p.max_seqlen_q = p.max_seqlen_k = sh.S;
      p.n_heads = p.n_kv_heads = sh.H, p.d_qk = sh.dqk, p.d_v = sh.dv, p.scale = 1.0f / std::sqrt(float(sh.dqk));
      for (const bool causal : {true, false}) {
        if (!causal && !full) continue;
        p.causal = causal;
        const double s = bench::seconds_per_call([&] { cuda::flash_attention_forward(p, nullptr, kernel); }, min_ms);
        const double flops = 2.0 * sh.B * sh.H * double(sh.S) * sh.S * (sh.dqk + sh.dv) / (causal ? 2 : 1);
        std::printf("fathom fwd %s %d %d %d %d %d %.1f\n", causal ? "causal" : "full", sh.B, sh.H, sh.S, sh.dqk, sh.dv,
                    flops / s / 1e12);
        std::fflush(stdout);
        if (fwd_only) continue;
        const double s2 = bench::seconds_per_call(
            [&] {
              cuda::flash_attention_forward(p, nullptr, kernel);
              cuda::flash_attention_backward(p, g, nullptr, kernel);
            },
            min_ms);
        std::printf("fathom fwdbwd %s %d %d %d %d %d %.1f\n", causal ? "causal" : "full", sh.B, sh.H, sh.S, sh.dqk,
                    sh.dv, 3.5 * flops / s2 / 1e12);
        std::fflush(stdout);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_flash_attention: %s\n", e.what());
    return 1;
  }
  return 0;
}

#else

int main() {
  std::printf("bench_flash_attention: built without CUDA; nothing to measure\n");
  return 0;
}

#endif
