// Training speed on the GPU: tokens/s and model FLOPs utilisation (MFU) of the training step of a
// ~0.5B-parameter V3-shaped MoE (bench/configs/v3-0.5b-train.json: 12 layers, hidden 1024, MLA,
// 32 routed experts of 384 with top-6 and 2 shared) at sequence length 2,048, against the dense
// bf16 matrix rate of the same GPU measured in the same run (cuBLAS GEMM, 8192³).
//
// Model FLOPs per token = 6 × the matrix parameters a token passes through (attention
// projections, the dense or shared + top-k routed experts, the router, the LM head) + the
// attention products, 3 × (d_qk + d_v) × T × heads per layer (QKᵀ and PV over T/2 keys on
// average, forward and the backward's twice that). MFU = model FLOPs per second ÷ that rate.
//
// The step is GradModel's on the CUDA backend (src/train/model_grad.h): every forward and backward
// op on the GPU in F32, the gradients downloaded and AdamW stepped on the host masters. It reports
// the GPU passes alone and the whole step.
//
// usage: bench_train [--config FILE] [--seq 2048] [--batch 1] [--steps 5] [--dir /tmp/fathom-bench-train]
//   --batch B: B sequences of --seq tokens per step, in one pass (GradModel::loss_and_grad_batch)
//   --bf16: bf16 mixed precision (Ops::set_bf16_matmuls: the matrix products on tensor cores from
//     bf16-rounded inputs, F32 accumulation and storage), as "precision": "bf16" trains
//   --attention-gemm / --attention-tiled / --attention-rows: force one of the attention backward's
//     paths (cuda::set_attention_backward_path; by default the GEMM path while its scores fit)
//   --timeline: CUPTI's record of the measured steps (cupti_timeline.h): how much of the time the
//     GPU was busy, the runtime and driver calls the host spent it in, the kernels by time
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/files.h"
#include "model/config.h"
#include "model/random_init.h"
#include "ops/ops.h"
#include "train/model_grad.h"
#include "train/optimizer.h"
#ifdef FATHOM_HAVE_CUDA
#include "cupti_timeline.h"
#include "ops/cuda/bandwidth.h"
#include "ops/cuda/cuda_ops.h"
#endif

using namespace fathom;
using Clock = std::chrono::steady_clock;

#ifdef FATHOM_HAVE_CUDA
namespace {

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// matrix parameters one token passes through (the embedding is a lookup, not a product)
double active_matrix_params(const ModelConfig& c) {
  const double D = c.hidden_size, H = c.num_attention_heads, dqk = c.qk_head_dim(), dv = c.v_head_dim;
  const double q = c.q_lora_rank > 0 ? D * c.q_lora_rank + double(c.q_lora_rank) * H * dqk : D * H * dqk;
  const double attn = q + D * (c.kv_lora_rank + c.qk_rope_head_dim) +
                      double(c.kv_lora_rank) * H * (c.qk_nope_head_dim + dv) + H * dv * D;
  double total = double(c.vocab_size) * D;  // LM head
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    total += attn;
    if (c.is_moe_layer(l))
      total += 3.0 * D * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts) +
               D * c.n_routed_experts;
    else
      total += 3.0 * D * c.intermediate_size;
  }
  return total;
}

int run(int argc, char** argv) {
  std::string config = std::string(FATHOM_SOURCE_DIR) + "/bench/configs/v3-0.5b-train.json";
  std::string dir = "/tmp/fathom-bench-train";
  int64_t seq = 2048, steps = 5, batch = 1;
  bool bf16 = false, timeline = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      FATHOM_CHECK(i + 1 < argc, "bench_train: ", a, " needs a value.");
      return argv[++i];
    };
    if (a == "--config") config = next();
    else if (a == "--seq") seq = std::stoll(next());
    else if (a == "--steps") steps = std::stoll(next());
    else if (a == "--batch") batch = std::stoll(next());
    else if (a == "--attention-rows") cuda::set_attention_backward_path(cuda::AttentionBackwardPath::Rows);
    else if (a == "--attention-tiled") cuda::set_attention_backward_path(cuda::AttentionBackwardPath::Tiled);
    else if (a == "--attention-gemm") cuda::set_attention_backward_path(cuda::AttentionBackwardPath::Gemm);
    else if (a == "--bf16") bf16 = true;
    else if (a == "--timeline") timeline = true;
    else if (a == "--dir") dir = next();
    else throw Error(cat("bench_train: unknown argument ", a));
  }
  FATHOM_CHECK(seq >= 2 && steps >= 1 && batch >= 1, "bench_train: --seq must be >= 2, --steps and --batch >= 1.");
  const double peak = cuda::bf16_gemm_flops(8192, 5);
  std::printf("bf16 GEMM rate (cuBLAS 8192^3, F32 accumulation): %.1f TFLOP/s\n", peak / 1e12);

  auto t0 = Clock::now();
  RandomInitOptions o;
  o.dtype = DType::F32;
  o.std = 0.02;
  std::filesystem::remove_all(dir);
  write_random_checkpoint(read_file(config), dir, o, config);
  auto model = train::GradModel::load(dir);
  const ModelConfig& c = model->config();
  model->use_backend(make_cuda_ops(0));
  model->backend().set_bf16_matmuls(bf16);
  model->set_balance_alpha(1e-4f);
  train::AdamW opt;
  model->add_to(opt);
  opt.use_backend(model->backend());  // AdamW and the norm on the GPU, as fathom train runs them
  double total_params = 0;
  for (const std::string& n : model->names()) total_params += double(model->value(n).numel());
  const double active = active_matrix_params(c);
  const double attn_flops = 3.0 * c.num_hidden_layers * (c.qk_head_dim() + c.v_head_dim) * double(seq) *
                            c.num_attention_heads;
  const double flops_per_token = 6.0 * active + attn_flops;
  std::printf("model: %.3fB parameters, %.1fM matrix parameters per token; %.2f GFLOP per token at T = %lld "
              "(setup %.1f s)\n",
              total_params / 1e9, active / 1e6, flops_per_token / 1e9, (long long)seq, since(t0));

  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> tok(0, int32_t(c.vocab_size) - 1);
  std::vector<std::vector<int32_t>> tokens(size_t(batch), std::vector<int32_t>(static_cast<size_t>(seq + 1)));
  std::vector<double> pass_v, step_v;
  double loss = 0;
  bench::CuptiTimeline tl;
  for (int64_t s = 0; s <= steps; ++s) {  // step 0 warms up
    if (timeline && s == 1 && !tl.begin()) timeline = false;
    for (auto& seq_tokens : tokens)
      for (int32_t& t : seq_tokens) t = tok(rng);
    const auto a = Clock::now();
    model->zero_grad();
    loss = model->loss_and_grad_batch(tokens);
    model->backend().synchronize();
    const double pass = since(a);
    const auto b = Clock::now();
    opt.clip_grad_norm(1.0);
    opt.step(1e-4f);
    model->backend().synchronize();
    const double host = since(b), step = since(a);
    std::printf("  step %lld: loss %.4f, passes %.3f s, norm + clipping + AdamW on the GPU %.3f s\n", (long long)s,
                loss, pass, host);
    if (s > 0) pass_v.push_back(pass), step_v.push_back(step);
  }
  if (timeline) tl.end(cat("the ", steps, " measured steps").c_str());
  // the median step: a call's host can stall one step by tens of percent (bench/RESULTS.md)
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  };
  const double pass_s = median(pass_v), step_s = median(step_v);
  std::printf("steps (s): fastest %.3f, median %.3f, slowest %.3f of %lld measured\n",
              *std::min_element(step_v.begin(), step_v.end()), step_s,
              *std::max_element(step_v.begin(), step_v.end()), (long long)steps);
  const double tps_pass = double(batch * seq) / pass_s, tps_step = double(batch * seq) / step_s;
  const double mfu_pass = tps_pass * flops_per_token / peak, mfu_step = tps_step * flops_per_token / peak;
  std::printf("\n| measure | seconds | tokens/s | MFU (vs %.0f TFLOP/s) |\n|---|---|---|---|\n", peak / 1e12);
  std::printf("| GPU passes (forward + backward, %s; median) | %.3f | %.0f | %.3f%% |\n",
              bf16 ? "bf16 matmuls" : "F32", pass_s, tps_pass, 100 * mfu_pass);
  std::printf("| whole step (+ the norm, clipping and AdamW on the GPU; median) | %.3f | %.0f | %.3f%% |\n", step_s, tps_step,
              100 * mfu_step);
  std::printf("| target | | | 35%% |\n");
  std::filesystem::remove_all(dir);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (!cuda_available()) {
      std::fprintf(stderr, "bench_train: no CUDA GPU here; this benchmark runs on the GPU machine\n");
      return 1;
    }
    return run(argc, argv);
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_train: %s\n", e.what());
    return 1;
  }
}
#else
int main() {
  std::fprintf(stderr, "bench_train: built without CUDA\n");
  return 1;
}
#endif
