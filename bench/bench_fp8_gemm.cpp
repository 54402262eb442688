// The FP8 block-scaled GEMM on the GPU (src/ops/cuda/fp8_gemm.cu): TFLOP/s of out (M, N) BF16 =
// A (M, K) e4m3 (1x128 scales) · B (N, K)ᵀ e4m3 (128x128 scales) at the shapes of DeepSeek-V3's
// projections (the FP8 issue's list) and 8192³, the grouped layouts at V3's expert shapes, and
// the 1x128 activation quantization's bandwidth. The peer, PyTorch's blockwise scaled_mm on the
// same shapes, runs in the same device script (bench/fp8_gemm_peer.py; scripts/device-fp8.sh
// joins the two into one table).
//
// The inputs are drawn as the peer draws its own (--inputs normal, the default): codes e4m3(100 ·
// N(0, 1)), scales uniform in [0.5, 1.5). The bit patterns a GEMM multiplies change its power
// draw, and both kernels run at the H200's power cap, so the two sides must multiply alike data
// (bench/RESULTS.md, bench_fp8_gemm: PyTorch ran 5% faster on these than on uniform codes).
// --inputs uniform: codes uniform in ±200 and scales in ±0.01, generated on the GPU (what this
// bench used before 2026-12-02).
//
// usage: bench_fp8_gemm [--kernel wgmma|simt] [--quick] [--shape M,N,K] [--min-ms 200] [--inputs normal|uniform]
// --shape: that dense product alone (for a profiler). --no-promote: one tensor-core accumulator
// over all of K (the contrast mode; what the promotion costs). --wgmma: instead, the e4m3 wgmma
// rate of the tile patterns the kernel could take, operands resident in shared memory
// (src/ops/cuda/wgmma_bench.cu): "wgmma <pattern>: <TFLOP/s> (<ratio to the best raw rate>)".
// Prints one line per case: "fp8_gemm <case> M N K groups <TFLOP/s>".
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "ops/ops.h"
#ifdef FATHOM_HAVE_CUDA
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/cuda_ops.h"
#include "cuda_timing.h"
#endif

using namespace fathom;

#ifdef FATHOM_HAVE_CUDA
namespace {

int64_t tiles(int64_t n) { return (n + 127) / 128; }

struct Case {
  std::string name;
  int64_t M, N, K;
  int groups = 1;
  cuda::Fp8Layout layout = cuda::Fp8Layout::Dense;
};

// The peer's distribution, made on the host: e4m3 codes of 100 · N(0, 1) (a pool of 2^24 codes,
// read from a different offset for each tensor: 0.5 s to draw instead of seconds per tensor)
// and scales uniform in [0.5, 1.5).
class NormalInputs {
 public:
  NormalInputs() : pool_(size_t(1) << 24) {
    std::mt19937 rng(20261202);
    std::normal_distribution<float> d(0.f, 100.f);
    for (uint8_t& c : pool_) c = f32_to_fp8e4m3(d(rng));
  }
  Tensor codes(Ops& ops, int64_t rows, int64_t cols, uint64_t seed) const {
    Tensor h = Tensor::empty({rows, cols}, DType::F8_E4M3);
    uint8_t* p = h.ptr<uint8_t>();
    const size_t n = size_t(rows * cols), pool = pool_.size();
    size_t at = size_t(seed * 7919u) % pool;
    for (size_t i = 0; i < n;) {
      const size_t take = std::min(n - i, pool - at);
      std::memcpy(p + i, pool_.data() + at, take);
      i += take, at = 0;
    }
    return ops.upload(h);
  }
  static Tensor scales(Ops& ops, int64_t rows, int64_t cols, uint64_t seed) {
    Tensor h = Tensor::empty({rows, cols});
    std::mt19937 rng{static_cast<uint32_t>(seed)};
    std::uniform_real_distribution<float> d(0.5f, 1.5f);
    for (int64_t i = 0; i < rows * cols; ++i) h.f32()[i] = d(rng);
    return ops.upload(h);
  }

 private:
  std::vector<uint8_t> pool_;
};

}  // namespace

int main(int argc, char** argv) {
  cuda::Fp8GemmKernel kernel = cuda::Fp8GemmKernel::Auto;
  bool quick = false;
  double min_ms = 200;
  int64_t only[3] = {0, 0, 0};
  bool promote = true, wgmma_rates = false, normal = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--kernel" && i + 1 < argc) {
      const std::string k = argv[++i];
      if (k != "wgmma" && k != "simt") {
        std::fprintf(stderr, "bench_fp8_gemm: --kernel is '%s'; expected wgmma or simt\n", k.c_str());
        return 2;
      }
      kernel = k == "wgmma" ? cuda::Fp8GemmKernel::Wgmma : cuda::Fp8GemmKernel::Simt;
    } else if (a == "--no-promote") {
      promote = false;
    } else if (a == "--quick") {
      quick = true;
    } else if (a == "--wgmma") {
      wgmma_rates = true;
    } else if (a == "--shape" && i + 1 < argc) {
      if (std::sscanf(argv[++i], "%ld,%ld,%ld", &only[0], &only[1], &only[2]) != 3 || only[0] <= 0 || only[1] <= 0 ||
          only[2] <= 0) {
        std::fprintf(stderr, "bench_fp8_gemm: --shape is '%s'; expected M,N,K (positive)\n", argv[i]);
        return 2;
      }
    } else if (a == "--min-ms" && i + 1 < argc) {
      min_ms = std::atof(argv[++i]);
    } else if (a == "--inputs" && i + 1 < argc) {
      const std::string v = argv[++i];
      if (v != "normal" && v != "uniform") {
        std::fprintf(stderr, "bench_fp8_gemm: --inputs is '%s'; expected normal or uniform\n", v.c_str());
        return 2;
      }
      normal = v == "normal";
    } else {
      std::fprintf(stderr, "usage: bench_fp8_gemm [--kernel wgmma|simt] [--quick] [--shape M,N,K] [--no-promote] [--min-ms 200] "
                   "[--wgmma] [--inputs normal|uniform]\n");
      return 2;
    }
  }
  try {
    if (cuda::device_count() == 0) {
      std::printf("bench_fp8_gemm: no CUDA device; nothing measured\n");
      return 0;
    }
    std::unique_ptr<Ops> ops = make_cuda_ops(0);
    if (wgmma_rates) {
      const std::vector<cuda::StageBenchRow> rows = cuda::wgmma_rate_bench(5);
      double best = 0;
      for (const auto& r : rows)
        if (r.variant.find("raw") != std::string::npos) best = std::max(best, r.weight_bytes / r.seconds);
      for (const auto& r : rows)
        std::printf("wgmma %-44s %8.1f TFLOP/s  %.2f of the best raw rate\n", (r.variant + ":").c_str(),
                    r.weight_bytes / r.seconds / 1e12, r.weight_bytes / r.seconds / best);
      return 0;
    }
    std::printf("# %s; wgmma kernel %s\n", cuda::device_name(0).c_str(),
                cuda::fp8_gemm_wgmma_available() ? "available" : "NOT available (SIMT fallback)");
    std::printf("# inputs: %s\n", normal ? "normal (codes e4m3(100 N(0,1)), scales U[0.5, 1.5): the peer's)"
                                             : "uniform (codes in +-200, scales in +-0.01)");
    const std::unique_ptr<NormalInputs> inputs = normal ? std::make_unique<NormalInputs>() : nullptr;
    std::vector<Case> cases;
    const std::vector<std::pair<int64_t, int64_t>> nk = {{2112, 7168}, {24576, 1536}, {32768, 512},
                                                         {7168, 16384}, {4096, 7168}, {7168, 2048}};
    for (const int64_t M : {int64_t(128), int64_t(4096)})
      for (const auto& [N, K] : nk) cases.push_back({"dense", M, N, K});
    cases.push_back({"dense", 8192, 8192, 8192});
    // DeepSeek-V3's routed experts (gate and up fused: N 4096 of K 7168; down: N 7168 of K 2048),
    // 8 experts: 512 rows each in the contiguous layout, 128 each in the masked one
    for (const auto& [N, K] : std::vector<std::pair<int64_t, int64_t>>{{4096, 7168}, {7168, 2048}}) {
      cases.push_back({"grouped-contiguous", 8 * 512, N, K, 8, cuda::Fp8Layout::Contiguous});
      cases.push_back({"grouped-masked", 128, N, K, 8, cuda::Fp8Layout::Masked});
    }
    if (quick) cases = {cases[4], cases[10], cases[12]};
    if (only[0]) cases = {Case{"dense", only[0], only[1], only[2]}};

    for (const Case& c : cases) {
      const int64_t a_rows = c.layout == cuda::Fp8Layout::Masked ? c.groups * c.M : c.M;
      Tensor a, sa, b, sb, out = ops->empty({a_rows, c.N}, DType::BF16);
      if (normal) {
        a = inputs->codes(*ops, a_rows, c.K, 1), sa = NormalInputs::scales(*ops, a_rows, tiles(c.K), 3);
        b = inputs->codes(*ops, c.groups * c.N, c.K, 2);
        sb = NormalInputs::scales(*ops, c.groups * tiles(c.N), tiles(c.K), 4);
      } else {
        a = ops->empty({a_rows, c.K}, DType::F8_E4M3), sa = ops->empty({a_rows, tiles(c.K)});
        b = ops->empty({c.groups * c.N, c.K}, DType::F8_E4M3), sb = ops->empty({c.groups * tiles(c.N), tiles(c.K)});
        ops->fill_random(a, 1, 200.f);
        ops->fill_random(b, 2, 200.f);
        ops->fill_random(sa, 3, 0.01f);
        ops->fill_random(sb, 4, 0.01f);
      }
      Tensor ids;
      cuda::Fp8GemmParams p;
      p.out = out.data(), p.out_dtype = DType::BF16;
      p.a = a.ptr<uint8_t>(), p.a_scale = sa.f32(), p.b = b.ptr<uint8_t>(), p.b_scale = sb.f32();
      p.M = c.M, p.N = c.N, p.K = c.K, p.groups = c.groups, p.layout = c.layout, p.kernel = kernel;
      p.promote = promote;
      if (c.layout == cuda::Fp8Layout::Contiguous) {
        Tensor h = Tensor::empty({c.M}, DType::I32);
        for (int64_t m = 0; m < c.M; ++m) h.ptr<int32_t>()[m] = int32_t(m / (c.M / c.groups));
        ids = ops->upload(h);
        p.expert = ids.ptr<int32_t>();
      } else if (c.layout == cuda::Fp8Layout::Masked) {
        Tensor h = Tensor::empty({c.groups}, DType::I32);
        for (int g = 0; g < c.groups; ++g) h.ptr<int32_t>()[g] = int32_t(c.M);
        ids = ops->upload(h);
        p.count = ids.ptr<int32_t>();
      }
      const double s = bench::seconds_per_call([&] { cuda::fp8_gemm(p, nullptr); }, min_ms);
      const double flops = 2.0 * double(a_rows) * double(c.N) * double(c.K);
      std::printf("fp8_gemm %s %lld %lld %lld %d %.1f\n", c.name.c_str(), (long long)c.M, (long long)c.N,
                  (long long)c.K, c.groups, flops / s / 1e12);
      std::fflush(stdout);
    }
    // the 1x128 activation quantization: bytes read and written per second
    if (!only[0]) {
      const int64_t M = 4096, K = 7168;
      Tensor x = ops->empty({M, K}), q = ops->empty({M, K}, DType::F8_E4M3), s = ops->empty({M, tiles(K)});
      ops->fill_random(x, 5, 4.f);
      const double t = bench::seconds_per_call(
          [&] { cuda::quantize_1x128(q.ptr<uint8_t>(), s.f32(), x.f32(), M, K, nullptr); }, min_ms);
      std::printf("quantize_1x128 %lld %lld %.1f GB/s\n", (long long)M, (long long)K,
                  double(M * K * 5 + M * tiles(K) * 4) / t / 1e9);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_fp8_gemm: %s\n", e.what());
    return 1;
  }
  return 0;
}

#else
int main() {
  std::printf("bench_fp8_gemm: built without CUDA; nothing measured\n");
  return 0;
}
#endif
