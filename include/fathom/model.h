// fathom's public model API: load a DeepSeek-V2/V3 checkpoint directory (HuggingFace
// layout) and run it — full forward passes, incremental decoding with the KV cache, the
// multi-token-prediction (MTP) modules.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/moe.h"

namespace fathom {

class Ops;
class WeightLoader;
class KvBlockPool;
struct SampleRow;  // ops/ops.h
struct ModelWeights;

// Where the model runs. The library's default is the CPU; the CLI's `--device` default is
// `auto` (CUDA when a GPU is present).
enum class DeviceKind { Auto, Cpu, Cuda };
// Numbers the weights and KV cache are kept in. fp32: weights as stored (F32/BF16/F16/FP8)
// and an F32 KV cache — the mode fixtures are checked in at 1e-4. bf16: F32/F16 weights are
// rounded to BF16 when placed (FP8 stays FP8) and, on CUDA, the KV cache is BF16; activations
// stay F32 in both. auto: bf16 on CUDA, fp32 on the CPU.
enum class Precision { Auto, Fp32, Bf16 };
const char* device_kind_name(DeviceKind d);
const char* precision_name(Precision p);

struct ModelOptions {
  MlaMode mla_mode = MlaMode::Absorbed;
  bool dequantize_fp8 = false;  // FP8 weights to F32 at load instead of dequantizing in the matmul
  DeviceKind device = DeviceKind::Cpu;
  Precision precision = Precision::Auto;
  // GPU memory the model may use, in bytes: weights, then the KV cache gets what is left after a
  // work-space reserve. 0: all memory free on the device when loading starts.
  int64_t gpu_memory = 0;
  bool progress = true;  // a progress bar on stderr (when it is a terminal) while weights go to the GPU
  // FP8 checkpoints: prefill's matmuls (more than 128 rows) quantize their activations 1x128 and
  // multiply FP8 by FP8 (DeepSeek-V3's recipe, Ops::set_fp8_activations); false: weight-only FP8.
  bool fp8_activations = false;
};

struct ParamCounts {
  int64_t total = 0;             // every parameter of the checkpoint (main model + MTP)
  int64_t main = 0;              // without the MTP modules
  int64_t active_per_token = 0;  // main model, counting only num_experts_per_tok routed experts per MoE layer
  int64_t mtp = 0;
  int64_t active_weight_bytes = 0;  // bytes of the weights one decoded token reads (as stored)
};

struct ForwardOutput {
  Tensor logits;                      // (T, vocab) or (1, vocab) with last_logits_only
  std::vector<Tensor> hidden_states;  // if requested: L+1 tensors (T, hidden); [0] = embeddings, [L] after final norm
  Tensor final_hidden;                // (T, hidden) after the final norm (the input of the LM head and of MTP)
  // if requested: per layer, the experts its router chose ((T, top_k) ids; empty for dense layers)
  std::vector<ExpertChoices> expert_choices;
};

struct ForwardRequest {
  bool hidden_states = false;
  bool last_logits_only = false;
  bool expert_choices = false;
};

class Model {
 public:
  ~Model();
  // Loads config.json and the safetensors weights of `dir`; throws fathom::Error naming
  // the file, tensor or field when anything is missing or malformed.
  static std::unique_ptr<Model> load(const std::string& dir, const ModelOptions& options = {});
  // A model of this config with random weights made by the backend where they live (no files:
  // for benchmarks of models too large to write out). dtype: F32, BF16, F16 or F8_E4M3.
  static std::unique_ptr<Model> random(const ModelConfig& config, const ModelOptions& options, DType dtype,
                                       uint64_t seed = 1234);

  const ModelConfig& config() const;
  const ModelOptions& options() const { return options_; }
  DeviceKind device() const { return device_; }        // resolved: Cpu or Cuda
  Precision precision() const { return precision_; }   // resolved: Fp32 or Bf16
  const char* backend_name() const;
  // The most tokens one KV cache may hold: the memory budget on CUDA (see gpu_memory), the
  // model's max_position_embeddings on the CPU.
  int64_t max_cache_tokens() const { return max_cache_tokens_; }
  int64_t gpu_weight_bytes() const { return gpu_weight_bytes_; }  // bytes of weights placed on the GPU
  const std::string& dir() const { return dir_; }
  ParamCounts param_counts() const;
  bool has_mtp() const;

  // A cache for `capacity` tokens (0: a small start that grows); throws when capacity exceeds
  // max_cache_tokens().
  KvCache new_cache(int64_t capacity = 0) const;
  // A pool of KV blocks (tokens / block_size of them) for paged caches, KvCache(pool): the
  // serving engine's shared cache. On CUDA it must fit kv_budget_tokens(). mtp: blocks of the
  // MTP module's one layer (paged MTP caches for mtp_step).
  std::shared_ptr<KvBlockPool> new_block_pool(int64_t tokens, int block_size, bool mtp = false) const;
  // KV-cache tokens the GPU memory budget leaves room for after the weights and a work-space
  // reserve, for all sequences together; 0 on the CPU (host memory is not budgeted).
  int64_t kv_budget_tokens() const { return kv_budget_tokens_; }
  // Prefill's FP8 products from now on: the FP8 x FP8 recipe (true) or weight-only FP8
  // (ModelOptions::fp8_activations).
  void set_fp8_activations(bool enabled);
  // Runs `ids` (all within the vocabulary) after what `cache` holds and appends them to it.
  ForwardOutput forward(const std::vector<int32_t>& ids, KvCache& cache, const ForwardRequest& request = {});

  // One step for several sequences at once (batched decode): sequence b appends tokens[b] to
  // *caches[b]. The projections, MoE and LM head run over all rows together; attention runs per
  // sequence over its own cache. Returns the logits of each sequence's last token (B, vocab).
  Tensor forward_batch(const std::vector<std::vector<int32_t>>& tokens, const std::vector<KvCache*>& caches);
  // forward_batch whose next tokens are chosen where the logits are (Ops::sample: on the GPU for
  // CUDA) by rows[b] (temperature, top-k, top-p, min-p, u; no penalties), only the B ids coming
  // back — the serving engine's decode steps when no request asks for logprobs or penalties.
  // Throws fathom::Error for a row out of range (as decode_sample).
  std::vector<int32_t> forward_batch_sample(const std::vector<std::vector<int32_t>>& tokens,
                                            const std::vector<KvCache*>& caches, const std::vector<SampleRow>& rows);

  // The serving engine's chained decode steps: decode_launch starts forward_batch_sample's step
  // for one token a sequence (tokens[b] after *caches[b]) and, where that step is a recorded
  // CUDA graph, returns while the device runs it, so the host can hand out the previous step's
  // tokens meanwhile; elsewhere (the CPU, a shape seen for the first time) it runs the step
  // before returning. decode_wait ends it — the caches advance — and returns the ids. Nothing else
  // may run on the model in between (a fathom::Error says so).
  void decode_launch(const std::vector<int32_t>& tokens, const std::vector<KvCache*>& caches,
                     const std::vector<SampleRow>& rows);
  std::vector<int32_t> decode_wait();

  // On CUDA, forward_batch_sample runs a step of one token per sequence over paged caches of one
  // pool (the serving engine's decode steps) as a replayed CUDA graph (decode_step); false runs
  // those steps eagerly like any other (for comparisons and benchmarks).
  void set_graph_steps(bool on) { graph_steps_ = on; }
  // Forgets the recorded decode graphs (the next steps record anew): after a change that a
  // replayed graph would not see, such as cuda::set_repeat's.
  void drop_graphs();

  // forward_batch that keeps, for sequence b, its last want[b] rows (1 <= want[b] <= its token
  // count): their logits (sum of want, vocab) and final-normed hidden states (sum of want,
  // hidden) — the MTP module's input — in sequence order, on the host. The head is forward()'s
  // (the final norm, then the LM head). Speculative decoding verifies drafts with it.
  struct BatchRows {
    Tensor logits, hidden;
  };
  BatchRows forward_batch_rows(const std::vector<std::vector<int32_t>>& tokens, const std::vector<KvCache*>& caches,
                               const std::vector<int64_t>& want);

  // A KV cache for MTP module `depth`'s own attention layer, for mtp_step.
  KvCache new_mtp_cache(int64_t capacity, int depth = 0) const;
  // MTP module `depth` incrementally (the drafting half of speculative decoding): sequence b
  // appends next_ids[b].size() positions to *mtp_caches[b], position i combining its row of `h`
  // (the main model's final-normed hidden state there, rows in sequence order, host F32) with
  // the embedding of next_ids[b][i], the token that followed it. Returns each sequence's last
  // position's logits (B, vocab): the prediction of the token after that one. Over a whole
  // sequence at once it computes what mtp_logits does.
  Tensor mtp_step(const std::vector<std::vector<int32_t>>& next_ids, const Tensor& h,
                  const std::vector<KvCache*>& mtp_caches, int depth = 0);

  // One greedy decoding step for several sequences: appends tokens[b] (one each) to *caches[b]
  // and returns each sequence's argmax next token. On CUDA the step is a CUDA graph captured on
  // first use and replayed after (captured again when the batch or a cache's storage changes);
  // the argmax runs on the device and only the B ids come back.
  std::vector<int32_t> decode_greedy(const std::vector<int32_t>& tokens, const std::vector<KvCache*>& caches);
  // decode_greedy with a sampled next token instead of the argmax: rows[b] (temperature, top-k,
  // top-p, min-p and the uniform number u; no penalties) chooses sequence b's token with
  // Ops::sample, on the device like the argmax (the same graph machinery; the rows travel through
  // pinned memory into the replayed graph). Throws fathom::Error for a row out of range.
  std::vector<int32_t> decode_sample(const std::vector<int32_t>& tokens, const std::vector<KvCache*>& caches,
                                     const std::vector<SampleRow>& rows);

  // MTP module `depth` (0-based) over a sequence: position i combines the main model's
  // final-normed hidden state h[i] with the embedding of ids[i+1]; returns logits
  // (T-1-depth, vocab) predicting ids[i+2+depth]. `h` is (T, hidden) from forward().
  // For depth > 0, `h` must be the previous module's output (see mtp_hidden).
  Tensor mtp_logits(const std::vector<int32_t>& ids, const Tensor& h, int depth = 0, Tensor* mtp_hidden = nullptr);

  // Greedy continuation: prefill `prompt`, then n_new tokens one at a time with the cache.
  std::vector<int32_t> generate_greedy(const std::vector<int32_t>& prompt, int64_t n_new);

  // Checks that every id is in [0, vocab); throws fathom::Error naming `what` and the position.
  void check_ids(const std::vector<int32_t>& ids, const std::string& what) const;

 private:
  Model();  // defined where DecodeGraph is complete (src/model/decode_graph.cpp), as ~Model
  struct DecodeGraph;
  void decode_body(DecodeGraph& g);
  // Whether decode_step takes these caches: all contiguous, or all paged from one pool (in
  // absorbed MLA mode), and the model's.
  bool graph_step_takes(const std::vector<KvCache*>& caches) const;
  // decode_greedy (rows null) and decode_sample: one step, replayed from the graph when it fits.
  // wait_to_capture: a step whose (B, W, sampling) no kept graph fits is recorded only when the
  // step before it missed with the same key; else it returns {} (having reserved the caches'
  // room) and the caller runs the step eagerly — the serving engine's batch changes every step
  // while requests finish one by one, and a capture per step would cost more than it saves.
  // launch_only: the step is left running (launched_graph_) for decode_wait.
  std::vector<int32_t> decode_step(const std::vector<int32_t>& tokens, const std::vector<KvCache*>& caches,
                                   const std::vector<SampleRow>* rows, const char* what,
                                   bool wait_to_capture = false, bool launch_only = false);
  // forward_batch_sample's step as a replayed decode graph (decode_step) where it is one — one
  // token a sequence of paged caches on CUDA, graph steps on — its ids; {} where it is not, for a
  // batch seen for the first time (the caller runs the step eagerly), or with launch_only (the
  // step left running: launched_graph_).
  std::vector<int32_t> graph_sample_step(const std::vector<std::vector<int32_t>>& tokens,
                                         const std::vector<KvCache*>& caches, const std::vector<SampleRow>& rows,
                                         const char* what, bool launch_only);
  // forward_batch_sample's step without a graph: the logits, then Ops::sample over them.
  std::vector<int32_t> sample_eagerly(const std::vector<std::vector<int32_t>>& tokens,
                                      const std::vector<KvCache*>& caches, const std::vector<SampleRow>& rows);
  // decode_step's end: the caches advance, g's chosen tokens come back.
  std::vector<int32_t> decode_finish(DecodeGraph& g, const std::vector<KvCache*>& caches);
  void init_backend(const ModelOptions& options);
  // forward_batch's logits (B, vocab) on the backend's device.
  Tensor batch_logits(const std::vector<std::vector<int32_t>>& tokens, const std::vector<KvCache*>& caches,
                      const char* what);
  // One row for each of n sequences, every row's parameters in range, else a fathom::Error
  // naming `what` (and the row).
  static void check_sample_rows(const std::vector<SampleRow>& rows, size_t n, const char* what);
  // The layers of a batched step (forward_batch, forward_batch_rows): returns the residual
  // stream on the device, sequence b's rows from starts[b]; the caches advance.
  Tensor batch_layers(const std::vector<std::vector<int32_t>>& tokens, const std::vector<KvCache*>& caches,
                      std::vector<int64_t>& starts);
  // cos/sin (T, rope/2) for these positions, on the backend's device.
  void rope_tables(const std::vector<int64_t>& positions, Tensor& cos, Tensor& sin) const;
  // Every cache is of the model's MLA mode and none repeats (for the batched steps).
  void check_caches(const std::vector<KvCache*>& caches, const char* what) const;
  // The rows of a batched step (batch_layers, mtp_step): sequence b's tokens after what caches[b]
  // (of `layers` layers) holds, room reserved there; every sequence's ids and positions in order,
  // where each starts and how many it adds. A fathom::Error naming `what` for bad ids or caches.
  struct StagedBatch {
    std::vector<int32_t> ids;
    std::vector<int64_t> positions, starts, n_new;
  };
  StagedBatch stage_batch(const std::vector<std::vector<int32_t>>& tokens, const std::vector<KvCache*>& caches,
                          int layers, const char* what) const;
  void build(const WeightLoader& loader);
  void place_weights();
  // F32, or BF16 for bf16 precision on CUDA
  DType kv_dtype() const {
    return device_ == DeviceKind::Cuda && precision_ == Precision::Bf16 ? DType::BF16 : DType::F32;
  }
  std::string dir_;
  ModelOptions options_;
  DeviceKind device_ = DeviceKind::Cpu;
  Precision precision_ = Precision::Fp32;
  int64_t max_cache_tokens_ = 0, gpu_weight_bytes_ = 0, kv_budget_tokens_ = 0;
  std::unique_ptr<Ops> ops_;
  std::unique_ptr<ModelWeights> w_;
  // the decode steps' graphs, the most recently used first (decode_step)
  static constexpr size_t kMaxDecodeGraphs = 8;
  std::vector<std::unique_ptr<DecodeGraph>> graphs_;
  bool graph_steps_ = true;
  std::vector<int64_t> last_graph_miss_;  // (B, W, sampling) of the last step no graph fitted
  // decode_launch's step: running from a graph (launched_graph_, its caches), or run already
  // (its ids); launched_ until decode_wait
  bool launched_ = false;
  DecodeGraph* launched_graph_ = nullptr;
  std::vector<KvCache*> launched_caches_;
  std::vector<int32_t> launched_ids_;
};

}  // namespace fathom
