// CPU matmul throughput against limits measured in the same run.
//
// Decode (M = 1) reads every weight byte once, so its figure is GB/s of weight streamed and
// the limit is the read bandwidth measured by cpu::measure_read_bandwidth. Two cases:
//   cold: cycling through enough copies of the weight (>= 256 MiB) that each call finds it in
//         DRAM, as a decode step does when it walks through a model's layers;
//   hot:  the same weight again and again, so small matrices sit in L2/L3 (ratio may pass 1).
// A few rows of x at once (MTP verification, small batches) still read the weight once: GB/s.
// Prefill (M = 128, 512) is compute bound: GFLOP/s of fathom's packed panel kernel, next to
// OpenBLAS sgemm on panels dequantized the same way and split over threads the same way.
//
// Usage: bench_matmul [--quick]   (threads: FATHOM_THREADS, default all hardware threads)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/thread_pool.h"
#include "ops/cpu/matmul.h"
#include "ops/cpu/membw.h"

using namespace fathom;

namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

LinearWeight make_weight(DType d, int64_t N, int64_t K, std::mt19937& rng) {
  LinearWeight w;
  w.name = "bench";
  w.weight = Tensor::empty({N, K}, d);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  auto* bytes = static_cast<uint8_t*>(w.weight.data());
  const int64_t n = N * K;
  switch (d) {
    case DType::F32:
    case DType::BF16:
    case DType::F16: {
      std::vector<float> values(static_cast<size_t>(n));
      for (float& v : values) v = normal(rng);
      w.weight = from_f32(values.data(), {N, K}, d);
      break;
    }
    default: {
      // Random finite codes; quantizing real values would only slow the setup down.
      std::uniform_int_distribution<int> code(0, 0x7E);
      for (int64_t i = 0; i < n; ++i) bytes[i] = uint8_t(code(rng) | (rng() & 0x80));
      w.scale_inv = Tensor::empty({(N + 127) / 128, (K + 127) / 128});
      for (int64_t i = 0; i < w.scale_inv.numel(); ++i) w.scale_inv.f32()[i] = 1e-3f;
    }
  }
  return w;
}

// Copies sharing nothing with the original, for the cold case.
LinearWeight clone(const LinearWeight& w) {
  LinearWeight c = w;
  c.weight = Tensor::empty(w.weight.shape(), w.weight.dtype());
  std::memcpy(c.weight.data(), w.weight.data(), w.weight.nbytes());
  return c;
}

// Best seconds per call over `batches` batches; each batch calls fn(i) for i in [0, calls).
template <typename Fn>
double best_seconds_per_call(Fn&& fn, int calls, int batches) {
  fn(0);  // warm up: page tables, thread-local buffers
  double best = 1e30;
  for (int b = 0; b < batches; ++b) {
    const double t0 = now_s();
    for (int i = 0; i < calls; ++i) fn(i);
    best = std::min(best, (now_s() - t0) / calls);
  }
  return best;
}

struct Row {
  std::string name;
  double bytes, us_cold, gbps_cold, us_hot, gbps_hot;
};

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  ThreadPool& pool = ThreadPool::global();
  std::mt19937 rng(1234);

  // The bandwidth of a shared machine drifts: measured before and after the decode table, and
  // the higher figure (the more demanding limit) is the one ratios are taken against.
  const size_t bw_bytes = size_t(quick ? 256 : 512) << 20;
  const double bw_before = cpu::measure_read_bandwidth(pool, bw_bytes, quick ? 3 : 5);
  std::printf("threads %d, read bandwidth %.2f GB/s (best of passes over %zu MiB)\n\n", pool.size(), bw_before,
              bw_bytes >> 20);

  // ---- decode: GEMV GB/s
  const size_t cold_bytes = size_t(256) << 20;
  std::printf("decode, M = 1: weight GB/s; cold = weight in DRAM (cycling copies), hot = same weight every call\n");
  std::printf("%-8s %-11s %9s | %9s %8s %6s | %9s %8s %6s\n", "dtype", "N x K", "MiB", "us cold", "GB/s", "ratio",
              "us hot", "GB/s", "ratio");
  const int64_t shapes[][2] = {{32000, 512}, {1536, 512}, {256, 512}, {512, 256}};
  std::vector<Row> rows;
  for (DType d : {DType::BF16, DType::F8_E4M3, DType::F16, DType::F32}) {
    for (const auto& s : shapes) {
      const int64_t N = s[0], K = s[1];
      LinearWeight w = make_weight(d, N, K, rng);
      const double bytes = double(w.nbytes());
      std::vector<LinearWeight> copies = {w};
      while (double(copies.size()) * bytes < double(cold_bytes)) copies.push_back(clone(w));
      std::vector<float> x(static_cast<size_t>(K), 0.5f), out(static_cast<size_t>(N));
      const int n_copies = int(copies.size());
      const double cold = best_seconds_per_call(
          [&](int i) { cpu::matmul(out.data(), x.data(), 1, copies[size_t(i % n_copies)], pool); }, n_copies,
          quick ? 3 : 8);
      const int hot_calls = int(std::clamp(2e8 / bytes, 10.0, 20000.0));
      const double hot = best_seconds_per_call([&](int) { cpu::matmul(out.data(), x.data(), 1, w, pool); },
                                               hot_calls, quick ? 3 : 8);
      char name[64];
      std::snprintf(name, sizeof name, "%-8s %5lldx%-5lld", dtype_name(d), (long long)N, (long long)K);
      rows.push_back({name, bytes, cold * 1e6, bytes / cold / 1e9, hot * 1e6, bytes / hot / 1e9});
    }
  }
  const double bw_after = cpu::measure_read_bandwidth(pool, bw_bytes, quick ? 3 : 5);
  const double bw = std::max(bw_before, bw_after);
  for (const Row& r : rows)
    std::printf("%s %9.2f | %9.1f %8.2f %6.2f | %9.1f %8.2f %6.2f\n", r.name.c_str(), r.bytes / (1 << 20), r.us_cold,
                r.gbps_cold, r.gbps_cold / bw, r.us_hot, r.gbps_hot, r.gbps_hot / bw);
  std::printf("read bandwidth after: %.2f GB/s; ratios are to %.2f GB/s\n", bw_after, bw);

  // ---- a few rows at once (MTP verification, small batches): still one pass over the weight
  std::printf("\nsmall M, 1536x512 BF16 cold: weight GB/s (M < 16 streams rows, M >= 16 packs panels)\n");
  std::printf("%-4s %9s %8s %6s\n", "M", "us", "GB/s", "ratio");
  {
    const int64_t N = 1536, K = 512;
    LinearWeight w = make_weight(DType::BF16, N, K, rng);
    std::vector<LinearWeight> copies = {w};
    while (double(copies.size()) * double(w.nbytes()) < double(cold_bytes)) copies.push_back(clone(w));
    const int n_copies = int(copies.size());
    for (int64_t M : {1, 2, 4, 8, 15, 16, 32}) {
      std::vector<float> x(size_t(M * K), 0.5f), out(size_t(M * N));
      const double t = best_seconds_per_call(
          [&](int i) { cpu::matmul(out.data(), x.data(), M, copies[size_t(i % n_copies)], pool); }, n_copies,
          quick ? 3 : 6);
      const double g = double(w.nbytes()) / t / 1e9;
      std::printf("%-4lld %9.1f %8.2f %6.2f\n", (long long)M, t * 1e6, g, g / bw);
    }
  }

  // ---- prefill: GFLOP/s
  std::printf("\nprefill: GFLOP/s (weight hot), fathom panel kernel vs OpenBLAS sgemm on the same panels\n");
  std::printf("%-8s %4s %-11s | %9s %8s | %9s %8s | %6s\n", "dtype", "M", "N x K", "us", "GFLOP/s", "us blas",
              "GFLOP/s", "own/blas");
  struct PrefillCase {
    DType d;
    int64_t M, N, K;
  };
  const PrefillCase cases[] = {{DType::BF16, 128, 1536, 512}, {DType::F8_E4M3, 128, 1536, 512},
                               {DType::F32, 128, 1536, 512},  {DType::BF16, 512, 1536, 512},
                               {DType::BF16, 128, 512, 7168}, {DType::BF16, 16, 1536, 512},
                               {DType::BF16, 8, 1536, 512}};
  for (const PrefillCase& c : cases) {
    LinearWeight w = make_weight(c.d, c.N, c.K, rng);
    std::vector<float> x(size_t(c.M * c.K)), out(size_t(c.M * c.N));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& v : x) v = normal(rng);
    const double flops = 2.0 * double(c.M) * double(c.N) * double(c.K);
    const int calls = int(std::clamp(2e9 / flops, 3.0, 1000.0));
    const double own = best_seconds_per_call([&](int) { cpu::matmul(out.data(), x.data(), c.M, w, pool); }, calls,
                                             quick ? 3 : 6);
    const double blas = best_seconds_per_call(
        [&](int) { cpu::matmul_prefill_blas(out.data(), x.data(), c.M, w, pool); }, calls, quick ? 3 : 6);
    std::printf("%-8s %4lld %5lldx%-5lld | %9.1f %8.1f | %9.1f %8.1f | %6.2f\n", dtype_name(c.d), (long long)c.M,
                (long long)c.N, (long long)c.K, own * 1e6, flops / own / 1e9, blas * 1e6, flops / blas / 1e9,
                blas / own);
  }
  return 0;
}
