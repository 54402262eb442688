// fathom info | logits | generate: run a checkpoint on token ids.
#include <cmath>
#include <cstdlib>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "core/error.h"
#include "core/files.h"
#include "core/safetensors.h"
#include "core/thread_pool.h"
#include "fathom/model.h"
#include "text_common.h"

namespace fathom::cli {

void add_model_options(CLI::App* cmd, ModelArgs& a) {
  cmd->add_option("--model", a.dir, "model directory (config.json + safetensors)")->required();
  cmd->add_option("--mla", a.mla, "MLA mode: absorbed (cache the latent) or naive (cache per-head K/V)")
      ->check(CLI::IsMember({"absorbed", "naive"}));
  cmd->add_flag("--dequantize-fp8", a.dequantize_fp8, "dequantize FP8 weights to F32 at load");
  const char* env = std::getenv("FATHOM_DEVICE");
  a.device = env && *env ? env : "auto";
  cmd->add_option("--device", a.device, "where to run: auto (CUDA when a GPU is present), cpu or cuda")
      ->capture_default_str();
  cmd->add_option("--precision", a.precision,
                  "weights and KV cache: fp32 (as stored), bf16, or auto (bf16 on CUDA, fp32 on the CPU)")
      ->check(CLI::IsMember({"auto", "fp32", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--fp8-gemm", a.fp8_gemm,
                  "FP8 checkpoints in prefill: fp8 (activations quantized 1x128, FP8 x FP8 products as DeepSeek-V3 "
                  "computes them), weight-only (weights dequantized inside the matmul, exact), or auto (fp8 on "
                  "CUDA in bf16 precision, else weight-only)")
      ->check(CLI::IsMember({"auto", "fp8", "weight-only"}))
      ->capture_default_str();
  cmd->add_option("--gpu-memory", a.gpu_memory,
                  "GPU memory the model may use (e.g. 40G, 512M): weights, then the KV cache gets the rest; "
                  "default: all that is free");
}

int64_t parse_size(const std::string& text, const std::string& what) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    throw Error(cat(what, " must be a size such as 40G, 512M or a number of bytes, got '", text, "'"));
  }
  std::string unit = text.substr(used);
  for (char& ch : unit) ch = char(std::toupper(static_cast<unsigned char>(ch)));
  double mult = 0;
  if (unit.empty() || unit == "B") mult = 1;
  else if (unit == "K" || unit == "KB" || unit == "KIB") mult = 1024.0;
  else if (unit == "M" || unit == "MB" || unit == "MIB") mult = 1024.0 * 1024;
  else if (unit == "G" || unit == "GB" || unit == "GIB") mult = 1024.0 * 1024 * 1024;
  else if (unit == "T" || unit == "TB" || unit == "TIB") mult = 1024.0 * 1024 * 1024 * 1024;
  FATHOM_CHECK(mult > 0, what, ": unknown unit '", text.substr(used), "' in '", text, "' (use K, M, G or T)");
  const double bytes = v * mult;
  FATHOM_CHECK(std::isfinite(bytes) && bytes >= 1 && bytes < 9.0e18, what, " must be a positive size, got '", text, "'");
  return int64_t(bytes);
}

std::unique_ptr<Model> open_model(const ModelArgs& a) {
  ModelOptions o;
  o.mla_mode = a.mla == "naive" ? MlaMode::Naive : MlaMode::Absorbed;
  o.dequantize_fp8 = a.dequantize_fp8;
  if (a.device == "auto") o.device = DeviceKind::Auto;
  else if (a.device == "cpu") o.device = DeviceKind::Cpu;
  else if (a.device == "cuda") o.device = DeviceKind::Cuda;
  else throw Error(cat("--device must be auto, cpu or cuda, got '", a.device, "'"));
  o.precision = a.precision == "fp32" ? Precision::Fp32 : a.precision == "bf16" ? Precision::Bf16 : Precision::Auto;
  // auto: FP8 x FP8 where the precision is already reduced (CUDA's bf16 default); the fp32
  // precision keeps the exact weight-only product, as does the CPU, whose FP8 x FP8 product is the
  // slow reference
  const bool cuda = a.device == "cuda" || (a.device == "auto" && cuda_available());
  o.fp8_activations = a.fp8_gemm == "fp8" || (a.fp8_gemm == "auto" && cuda && a.precision != "fp32" &&
                                                !a.dequantize_fp8);
  FATHOM_CHECK(!(a.fp8_gemm == "fp8" && a.dequantize_fp8), "--fp8-gemm fp8 and --dequantize-fp8 contradict: the "
               "first multiplies FP8 weights, the second turns them into F32 at load");
  if (!a.gpu_memory.empty()) {
    o.gpu_memory = parse_size(a.gpu_memory, "--gpu-memory");
    FATHOM_CHECK(a.device != "cpu", "--gpu-memory applies to --device cuda, not to the CPU");
  }
  return Model::load(a.dir, o);
}

namespace {

// input_ids (B, T) I64 (or I32, or a 1-D (T)) from a safetensors file, validated.
std::vector<std::vector<int32_t>> read_input_ids(const std::string& path, const Model& m) {
  auto file = SafetensorsFile::open(path);
  FATHOM_CHECK(file->contains("input_ids"), path, " has no tensor 'input_ids' (expected I64 [batch, tokens])");
  Tensor t = file->tensor("input_ids");
  FATHOM_CHECK(t.dtype() == DType::I64 || t.dtype() == DType::I32, path, ": tensor 'input_ids' has dtype ",
               dtype_name(t.dtype()), ", expected I64");
  FATHOM_CHECK(t.ndim() == 2 || t.ndim() == 1, path, ": tensor 'input_ids' has shape ", shape_str(t.shape()),
               ", expected [batch, tokens]");
  const int64_t B = t.ndim() == 2 ? t.dim(0) : 1, T = t.dim(-1);
  FATHOM_CHECK(B > 0 && T > 0, path, ": tensor 'input_ids' is empty (shape ", shape_str(t.shape()),
               "); at least one token is needed");
  const int64_t V = m.config().vocab_size;
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < T; ++i) {
      int64_t id = t.dtype() == DType::I64 ? t.ptr<int64_t>()[b * T + i] : t.ptr<int32_t>()[b * T + i];
      FATHOM_CHECK(id >= 0 && id < V, path, ": input_ids[", b, "][", i, "] = ", id,
                   " is outside the model's vocabulary [0, ", V, ")");
      rows[size_t(b)].push_back(int32_t(id));
    }
  return rows;
}

void check_output_path(const std::string& out) {
  namespace fs = std::filesystem;
  fs::path parent = fs::path(out).parent_path();
  FATHOM_CHECK(parent.empty() || fs::is_directory(parent), "cannot write ", out, ": directory ", parent.string(),
               " does not exist");
}

}  // namespace

Command add_info(CLI::App& app) {
  auto a = std::make_shared<ModelArgs>();
  auto json_out = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("info", "print a model's architecture, parameter counts and KV-cache size");
  add_model_options(cmd, *a);
  cmd->add_flag("--json", *json_out, "print JSON");
  return [a, json_out] {
    auto m = open_model(*a);
    const ModelConfig& c = m->config();
    ParamCounts p = m->param_counts();
    const int L = c.num_hidden_layers;
    const int64_t absorbed = KvCache::bytes_per_token_per_layer(c, MlaMode::Absorbed, 4) * L;
    const int64_t naive = KvCache::bytes_per_token_per_layer(c, MlaMode::Naive, 4) * L;
    nlohmann::json j = {
        {"model_type", c.model_type},
        {"layers", L},
        {"dense_layers", c.first_k_dense_replace},
        {"hidden_size", c.hidden_size},
        {"vocab_size", c.vocab_size},
        {"attention", {{"heads", c.num_attention_heads}, {"q_lora_rank", c.q_lora_rank}, {"kv_lora_rank", c.kv_lora_rank},
                       {"qk_nope_head_dim", c.qk_nope_head_dim}, {"qk_rope_head_dim", c.qk_rope_head_dim},
                       {"v_head_dim", c.v_head_dim}, {"rope", c.rope_scaling.type}, {"rope_theta", c.rope_theta}}},
        {"moe", {{"routed_experts", c.n_routed_experts}, {"experts_per_token", c.num_experts_per_tok},
                 {"shared_experts", c.n_shared_experts}, {"scoring", c.scoring_func}, {"topk_method", c.topk_method},
                 {"n_group", c.n_group}, {"topk_group", c.topk_group}}},
        {"mtp_modules", c.num_nextn_predict_layers},
        {"fp8", c.fp8},
        {"params", {{"total", p.total}, {"main", p.main}, {"mtp", p.mtp}, {"active_per_token", p.active_per_token}}},
        {"active_weight_bytes_per_token", p.active_weight_bytes},
        {"kv_cache_bytes_per_token", {{"absorbed_fp32", absorbed}, {"naive_mha_fp32", naive},
                                      {"absorbed_bf16", absorbed / 2}, {"naive_mha_bf16", naive / 2}}},
        {"device", {{"backend", m->backend_name()}, {"precision", precision_name(m->precision())},
                    {"gpu_weight_bytes", m->gpu_weight_bytes()}, {"max_cache_tokens", m->max_cache_tokens()}}},
    };
    if (*json_out) {
      std::printf("%s\n", j.dump(2).c_str());
      return;
    }
    std::printf("model        %s (%s)\n", m->dir().c_str(), c.model_type.c_str());
    std::printf("layers       %d (%d dense, %d MoE) + %d MTP, hidden %ld, vocab %ld\n", L,
                std::min(c.first_k_dense_replace, L), L - std::min(c.first_k_dense_replace, L),
                c.num_nextn_predict_layers, long(c.hidden_size), long(c.vocab_size));
    std::printf("attention    MLA, %d heads, q_lora_rank %ld, kv_lora_rank %ld, qk %d+%d (nope+rope), v %d, rope %s\n",
                c.num_attention_heads, long(c.q_lora_rank), long(c.kv_lora_rank), c.qk_nope_head_dim,
                c.qk_rope_head_dim, c.v_head_dim, c.rope_scaling.type.c_str());
    if (c.n_routed_experts > 0)
      std::printf("moe          %d routed experts (top-%d, %s, %s, %d groups keep %d) + %d shared\n", c.n_routed_experts,
                  c.num_experts_per_tok, c.scoring_func.c_str(), c.topk_method.c_str(), c.n_group, c.topk_group,
                  c.n_shared_experts);
    std::printf("weights      %s\n", c.fp8 ? "FP8 e4m3, 128x128 block scales" : "unquantized");
    std::printf("parameters   %.2fM total (%.2fM main model + %.2fM MTP), %.2fM active per token\n", p.total / 1e6,
                p.main / 1e6, p.mtp / 1e6, p.active_per_token / 1e6);
    std::printf("weight bytes read per decoded token: %.2f MB\n", p.active_weight_bytes / 1e6);
    std::printf("KV cache per token (all layers, fp32): absorbed MLA %ld bytes (latent %ld + rope %d per layer); "
                "naive MHA %ld bytes — %.1fx smaller\n",
                long(absorbed), long(c.kv_lora_rank), c.qk_rope_head_dim, long(naive), double(naive) / double(absorbed));
    std::printf("device       %s, %s", m->backend_name(), precision_name(m->precision()));
    if (m->device() == DeviceKind::Cuda) std::printf(", %.2f GiB of weights on the GPU", m->gpu_weight_bytes() / 1073741824.0);
    std::printf(", KV cache room for %ld tokens%s\n", long(m->max_cache_tokens()),
                m->device() == DeviceKind::Cuda ? "" : " (the model's context)");
  };
}

Command add_logits(CLI::App& app) {
  auto a = std::make_shared<ModelArgs>();
  auto input = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto mtp = std::make_shared<bool>(false);
  auto hidden = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("logits", "run a full forward pass on input_ids and write the logits");
  add_model_options(cmd, *a);
  cmd->add_option("--input-ids", *input, "safetensors file with tensor input_ids, I64 [batch, tokens]")->required();
  cmd->add_option("--out", *out, "output safetensors file (logits F32 [batch, tokens, vocab])")->required();
  cmd->add_flag("--mtp", *mtp, "also write mtp_logits F32 [batch, tokens-1, vocab] from the first MTP module");
  cmd->add_flag("--hidden-states", *hidden, "also write hidden_states.{i} F32 [batch, tokens, hidden]");
  return [a, input, out, mtp, hidden] {
    check_output_path(*out);
    auto m = open_model(*a);
    FATHOM_CHECK(!*mtp || m->has_mtp(), "--mtp: model ", a->dir, " has no MTP module (num_nextn_predict_layers is 0)");
    auto rows = read_input_ids(*input, *m);
    const ModelConfig& c = m->config();
    const int64_t B = int64_t(rows.size()), T = int64_t(rows[0].size()), V = c.vocab_size, D = c.hidden_size;
    FATHOM_CHECK(!*mtp || T >= 2, "--mtp needs at least 2 tokens per row, ", *input, " has ", T);
    Tensor logits = Tensor::empty({B, T, V});
    Tensor mtp_logits = *mtp ? Tensor::empty({B, T - 1, V}) : Tensor();
    std::vector<Tensor> hs;
    for (int64_t b = 0; b < B; ++b) {
      KvCache cache = m->new_cache(T);
      ForwardRequest req;
      req.hidden_states = *hidden;
      ForwardOutput o = m->forward(rows[size_t(b)], cache, req);
      std::memcpy(logits.f32() + b * T * V, o.logits.data(), o.logits.nbytes());
      if (*hidden) {
        if (hs.empty())
          for (size_t i = 0; i < o.hidden_states.size(); ++i) hs.push_back(Tensor::empty({B, T, D}));
        for (size_t i = 0; i < o.hidden_states.size(); ++i)
          std::memcpy(hs[i].f32() + b * T * D, o.hidden_states[i].data(), o.hidden_states[i].nbytes());
      }
      if (*mtp) {
        Tensor ml = m->mtp_logits(rows[size_t(b)], o.final_hidden, 0);
        std::memcpy(mtp_logits.f32() + b * (T - 1) * V, ml.data(), ml.nbytes());
      }
    }
    SafetensorsWriter w;
    w.add("logits", logits);
    if (*mtp) w.add("mtp_logits", mtp_logits);
    for (size_t i = 0; i < hs.size(); ++i) w.add(cat("hidden_states.", i), hs[i]);
    w.write(*out);
  };
}

Command add_generate(CLI::App& app) {
  auto a = std::make_shared<ModelArgs>();
  auto input = std::make_shared<std::string>();
  auto prompt = std::make_shared<std::string>();
  auto tokenizer = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto chat = std::make_shared<bool>(false);
  auto system = std::make_shared<std::string>();
  auto s = std::make_shared<SamplingArgs>();
  CLI::App* cmd = app.add_subcommand("generate", "continue a text prompt (streamed to stdout) or token ids (to a JSON file)");
  add_model_options(cmd, *a);
  auto* p_opt = cmd->add_option("--prompt", *prompt, "text to continue; the new text streams to standard output");
  auto* i_opt = cmd->add_option("--input-ids", *input, "safetensors file with tensor input_ids, I64 [batch, tokens]: continue row 0 greedily");
  p_opt->excludes(i_opt);
  cmd->add_option("--tokenizer", *tokenizer, "tokenizer directory or tokenizer.json (default: the model directory's)");
  cmd->add_flag("--chat", *chat, "wrap --prompt as a user message with the chat template");
  cmd->add_option("--system", *system, "with --chat: a system message first");
  cmd->add_option("--out", *out, "with --input-ids: output JSON file {\"ids\": [new token ids]}");
  add_sampling_options(cmd, *s);
  s->max_tokens = 256;
  return [=] {
    FATHOM_CHECK(!prompt->empty() || !input->empty(), "generate needs --prompt TEXT or --input-ids FILE");
    if (!input->empty()) {
      FATHOM_CHECK(!out->empty(), "--input-ids needs --out FILE");
      FATHOM_CHECK(s->temperature == 0.0, "--temperature ", s->temperature,
                   ": token-id input is continued greedily (--temperature 0); use --prompt to sample");
      FATHOM_CHECK(s->max_tokens >= 0 && s->max_tokens <= (int64_t(1) << 20), "--max-new-tokens ", s->max_tokens,
                   " is out of range (expected 0 to 1048576)");
      check_output_path(*out);
      auto m = open_model(*a);
      auto rows = read_input_ids(*input, *m);
      auto t0 = std::chrono::steady_clock::now();
      std::vector<int32_t> ids = m->generate_greedy(rows[0], s->max_tokens);
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      nlohmann::json j = {{"ids", ids}};
      write_file_atomic(*out, j.dump() + "\n");
      std::fprintf(stderr, "generated %zu tokens after a %zu-token prompt in %.2f s\n", ids.size(), rows[0].size(), secs);
      return;
    }
    FATHOM_CHECK(out->empty(), "--out goes with --input-ids; --prompt streams to standard output");
    FATHOM_CHECK(utf8_invalid_offset(*prompt) == std::string::npos, "--prompt is not valid UTF-8 at byte ",
                 utf8_invalid_offset(*prompt));
    SamplingArgs sampling = *s;
    apply_generation_config(cmd, a->dir, sampling);
    GenerateOptions options = to_generate_options(sampling);
    auto tok = load_tokenizer(a->dir, *tokenizer);
    auto m = open_model(*a);
    check_tokenizer_fits(*tok, *m);
    std::vector<int32_t> ids;
    if (*chat) {
      nlohmann::ordered_json msgs = nlohmann::ordered_json::array();
      if (!system->empty()) msgs.push_back({{"role", "system"}, {"content", *system}});
      msgs.push_back({{"role", "user"}, {"content", *prompt}});
      ids = tok->encode(render_chat(*tok, msgs, true));
    } else {
      ids = tok->encode(*prompt, /*add_special=*/true);
    }
    Generator gen(*m, *tok);
    GenerateResult r = gen.generate(ids, options, [](std::string_view piece) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    });
    std::fprintf(stderr, "\n[%zu tokens after a %lld-token prompt: prefill %.2f s, %.1f tokens/s; finish: %s]\n",
                 r.ids.size(), (long long)r.prompt_tokens, r.prefill_seconds, r.decode_tokens_per_second(),
                 r.finish_reason.c_str());
  };
}

}  // namespace fathom::cli
