// Absorbed-MLA decode attention on the GPU: one token's 16 (or 128) query heads against a BF16
// latent cache of n keys ([c_kv 512 | k_pe 64] per key, 1,152 bytes), the shape every DeepSeek
// decode step runs once per layer. Reports the time per call inside a CUDA graph (as the decode
// step replays it) and the cache bytes read per second against the device copy bandwidth of the
// same run; the peer is fathom's general SIMT attention kernel on the same inputs.
//
// usage: bench_cuda_attention [--heads 16] [--keys 196,1024,4096,16384,65536] [--calls 50]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "ops/ops.h"
#ifdef FATHOM_HAVE_CUDA
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/cuda_ops.h"
#endif

using namespace fathom;

#ifdef FATHOM_HAVE_CUDA
namespace {

std::vector<int64_t> split(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  for (std::string x; std::getline(ss, x, ',');)
    if (!x.empty()) out.push_back(std::atol(x.c_str()));
  return out;
}

// Seconds per attention call: `calls` calls captured in one graph, replayed `reps` times (or,
// with eager, launched from the host each time).
double time_calls(Ops& ops, const AttentionParams& p, int calls, int reps, bool eager = false) {
  ops.attention(p);  // warm-up, outside the capture
  ops.synchronize();
  const bool graph = !eager && ops.capture_begin();
  for (int i = 0; i < calls; ++i) ops.attention(p);
  std::shared_ptr<void> g = graph ? ops.capture_end() : nullptr;
  ops.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) {
    if (g) {
      ops.replay(g);
    } else {
      for (int i = 0; i < calls; ++i) ops.attention(p);
    }
  }
  ops.synchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / (double(calls) * reps);
}

}  // namespace

int main(int argc, char** argv) {
  int heads = 16, calls = 50;
  std::string keys = "196,1024,4096,16384,65536";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "usage: bench_cuda_attention [--heads N] [--keys LIST] [--calls N]\n");
      return 2;
    }
    if (a == "--heads") heads = std::atoi(argv[++i]);
    else if (a == "--keys") keys = argv[++i];
    else if (a == "--calls") calls = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "bench_cuda_attention: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  try {
    FATHOM_CHECK(heads >= 1 && heads <= 1024 && calls >= 1 && calls <= 10000, "--heads must be in [1, 1024] and --calls in [1, 10000]");
    if (!cuda_available()) {
      std::printf("bench_cuda_attention: no CUDA GPU here; nothing to measure\n");
      return 0;
    }
    auto ops = make_cuda_ops(0);
    const double bw = cuda::copy_bandwidth(size_t(1) << 30, 3);
    constexpr int R = 512, rd = 64, d = R + rd;
    std::printf("latent decode attention, %d heads, BF16 cache (%d B/key); copy bandwidth %.3f TB/s\n", heads, d * 2,
                bw / 1e12);
    std::printf("%8s %12s %10s %12s %10s %8s %14s\n", "keys", "latent us", "GB/s", "general us", "GB/s", "speedup",
                "latent eager us");
    for (int64_t n : split(keys)) {
      FATHOM_CHECK(n >= 1 && n <= (int64_t(1) << 24), "--keys entries must be in [1, 2^24], got ", n);
      Tensor q = ops->empty({1, heads, d}), out = ops->empty({1, heads, R});
      Tensor cache = ops->empty({n, d}, DType::BF16);
      Tensor len = ops->empty({1}, DType::I32);
      ops->fill_random(q, 1, 1.0f);
      ops->fill_random(cache, 2, 1.0f);
      const int32_t n32 = int32_t(n);
      Tensor len_host = Tensor::empty({1}, DType::I32);
      *len_host.ptr<int32_t>() = n32;
      Tensor len_up = ops->upload(len_host);
      AttentionParams p;
      p.q = q.f32();
      p.q_token_stride = int64_t(heads) * d;
      p.q_head_stride = d;
      p.k = p.v = cache.data();
      p.kv_dtype = DType::BF16;
      p.k_token_stride = p.v_token_stride = d;
      p.out = out.f32();
      p.out_token_stride = int64_t(heads) * R;
      p.out_head_stride = R;
      p.n_q = 1;
      p.n_kv = n;
      p.kv_len = len_up.ptr<int32_t>();  // as the graph-replayed decode step passes it
      p.n_q_heads = heads;
      p.n_kv_heads = 1;
      p.d_qk = d;
      p.d_v = R;
      p.scale = 0.07f;
      const int reps = n > 16384 ? 4 : 20;
      cuda::set_latent_attention(true);
      const double t_latent = time_calls(*ops, p, calls, reps);
      const double t_eager = time_calls(*ops, p, calls, reps, /*eager=*/true);
      cuda::set_latent_attention(false);
      const double t_general = time_calls(*ops, p, calls, reps);
      cuda::set_latent_attention(true);
      const double bytes = double(n) * d * 2;
      std::printf("%8lld %12.2f %10.1f %12.2f %10.1f %7.1fx %14.2f\n", static_cast<long long>(n), t_latent * 1e6,
                  bytes / t_latent / 1e9, t_general * 1e6, bytes / t_general / 1e9, t_general / t_latent, t_eager * 1e6);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_attention: %s\n", e.what());
    return 1;
  }
  return 0;
}
#else
int main() {
  std::printf("bench_cuda_attention: built without CUDA; nothing to measure\n");
  return 0;
}
#endif
