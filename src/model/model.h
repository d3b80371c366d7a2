// Model: a decoder-only causal LM (Qwen3-MoE, Mixtral, Qwen3, Llama) with an explicit
// forward that saves what the backward needs and a hand-written backward that accumulates
// parameter gradients (llm.c's pattern), over the ops of a Backend.
//
// What the trainer uses:
//   auto model = Model::from_hf_folder(dir, backend, {});
//   model->zero_grads();
//   for each micro-batch: model->forward_backward(batch, 1.0f / tokens_in_optimizer_step);
//   optimizer step over model->parameters(); model->save_hf_folder(out, {...});
// Loss: Transformers' causal-LM loss (position t predicts labels[t + 1], the last position
// of each row and labels == -100 are ignored), summed and multiplied by loss_scale in the
// gradient (Trainer's num_items_in_batch semantics), plus router_aux_loss_coef * the
// load-balancing loss when the config has output_router_logits (over every token of the
// micro-batch, as Transformers without an attention_mask; padding tokens count too).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/model_config.h"
#include "model/moe.h"
#include "model/weights.h"
#include "ops/backend.h"

namespace moetune {

namespace dist {
class Communicator;
}

// One micro-batch on the host: B rows of T tokens, flattened row-major.
struct BatchView {
  int64_t batch = 0, seq = 0;
  std::span<const int32_t> input_ids;     // (B*T)
  std::span<const int32_t> labels;        // (B*T) unshifted, -100 = not trained
  std::span<const int32_t> position_ids;  // (B*T) or empty: 0..T-1 in every row
  std::span<const int32_t> doc_offsets;   // (docs + 1) into B*T, or empty: one doc per row
};

struct StepResult {
  double loss_sum = 0;         // sum of token cross-entropies over trained tokens (unscaled)
  int64_t trained_tokens = 0;  // labels != -100 after the shift
  bool has_aux_loss = false;
  double aux_loss = 0;  // Transformers' aux_loss (before router_aux_loss_coef)
  double correct = 0;   // trained tokens whose argmax is the label
};

// Where parameter gradients live.
enum class GradientStorage {
  // One buffer per parameter for the model's life (gradient accumulation, clipping, reading
  // the gradients after the step).
  Persistent,
  // Optimizer in the backward: a gradient group's buffers are taken from the device allocator
  // when the backward reaches the group and returned right after the gradient-ready hook for
  // the group (which must consume them: the optimizer update); the peak holds about one or
  // two groups (plus a tied embedding's gradient, alive from the loss to the end) instead of
  // all. Outside the hook Parameter::grad has no data. One micro-batch per optimizer step:
  // every forward_backward must follow a zero_grads().
  PerGroup,
};

struct ModelOptions {
  DType param_dtype = DType::F32;  // storage of the weights on the device
  DType grad_dtype = DType::F32;   // storage of the gradients
  // Activation checkpointing per decoder layer: the forward keeps only each layer's input
  // (the residual stream) and one layer's worth of activations; the backward recomputes each
  // layer's forward before its backward (~1/3 more compute, activations ~1 layer instead of L).
  bool recompute_layers = false;
  // Benchmarks only: every MoE layer sends token n's choice j to expert (n*k + j) % E (each
  // expert gets the same number of rows), keeping the router's top-k weights and their
  // gradient (bench/hf_baseline.py --routing balanced does the same in Transformers).
  bool balanced_routing = false;
  GradientStorage grad_storage = GradientStorage::Persistent;
  // Expert parallelism: the group of ranks the experts are split over (null or size 1: all
  // experts here). With ep ranks (ep divides num_experts), EP rank r holds experts
  // [r*E/ep, (r+1)*E/ep) as experts_gate_up (E/ep, 2I, H) and experts_down (E/ep, H, I);
  // everything else (the router too) is whole on every rank. Every rank of the group must
  // call forward_backward / evaluate together (same layers, any micro-batch of its own);
  // expert gradients are this rank's tokens' and its peers' for its experts, the others
  // only this rank's tokens' (reduce them over data parallel ranks as usual). Must outlive
  // the model.
  dist::Communicator* expert_comm = nullptr;
};

// Parameters whose gradients become final together during the backward: the head (final
// norm and an untied lm_head), then each decoder layer from the last to the first, then the
// embedding (which also holds a tied lm_head's gradient). `begin`/`end` index parameters().
struct GradientGroup {
  std::string name;  // "head", "layer.N", "embedding"
  size_t begin = 0, end = 0;
};

struct SaveOptions {
  DType dtype = DType::F32;                // F32, BF16 or F16 on disk
  int64_t max_shard_bytes = 5LL << 30;     // larger checkpoints are sharded
  std::filesystem::path tokenizer_source;  // copy tokenizer files from here (optional)
};

struct LayerActivations;  // model/decoder.h
struct ModelActivations;

class Model {
 public:
  static std::unique_ptr<Model> from_hf_folder(const std::filesystem::path& folder,
                                               Backend& backend, ModelOptions options = {});
  // normal(0, initializer_range) for linear and embedding weights, norms 1, biases 0.
  static std::unique_ptr<Model> random_init(const ModelConfig& config, uint64_t seed,
                                            Backend& backend, ModelOptions options = {});
  // Weights allocated (zero-filled) but not initialised: the caller fills them (benchmarks).
  static std::unique_ptr<Model> uninitialized(const ModelConfig& config, Backend& backend,
                                              ModelOptions options = {});
  ~Model();

  const ModelConfig& config() const { return config_; }
  Backend& backend() const { return backend_; }

  // Forward and backward of one micro-batch; gradients are ACCUMULATED into the parameters'
  // grads (call zero_grads() at the start of an optimizer step: the first backward after it
  // overwrites the gradients instead, so no pass ever zeroes them). loss_scale multiplies the
  // cross-entropy sum in the gradient (1 / trained tokens of the whole optimizer step);
  // aux_loss_scale multiplies router_aux_loss_coef * aux_loss in the gradient (1: as
  // Transformers, which adds the aux loss to every micro-batch's loss).
  // logits: optional (B*T, V) fp32 tensor on the device, written when defined.
  StepResult forward_backward(const BatchView& batch, float loss_scale, float aux_loss_scale = 1.0f,
                              const Tensor& logits = Tensor());
  // Forward only (no gradient).
  StepResult evaluate(const BatchView& batch, const Tensor& logits = Tensor());

  // O(1): marks the gradients "to be overwritten" by the next forward_backward (their contents
  // are undefined until it has run).
  void zero_grads();

  // The gradient groups in the order the backward finishes them.
  const std::vector<GradientGroup>& gradient_groups() const { return gradient_groups_; }
  // Called by forward_backward on the host right after the device work that finishes group
  // `index` of gradient_groups() has been enqueued on the backend's stream (it may still be
  // running): gradient reduce-scatters or optimizer updates can start there, per group,
  // instead of after the whole backward. Inside the hook, Parameter::grad of the group's
  // parameters is valid (with GradientStorage::PerGroup only then: the memory is returned
  // right after the hook, so work the hook enqueues on the backend's stream may use it, and
  // work on another stream must be ordered before the next allocation; the expert weights an
  // expert weight update takes over have no data there). Empty function = none.
  using GradientReadyHook = std::function<void(size_t index)>;
  void set_gradient_ready_hook(GradientReadyHook hook) { gradient_ready_hook_ = std::move(hook); }
  // A hook that hands each group's gradients to work on a side
  // stream (optimizer updates beside the backward: InBackwardOptimizer), which may still read
  // them after the hook returns. The groups' gradients then rotate through a ring of
  // kGradientArenas arenas kept for the model's life (instead of returning to the allocator
  // after each hook): after a group's hook the model records fence `slot` on `side`, and
  // before binding a later group to the same arena the ops' stream joins that fence, so the
  // backward overwrites an arena only once the side work that read it has finished (the
  // side work of the group before may still run: that is the overlap). A tied embedding's
  // gradient (alive from the loss to the end of the backward) gets an arena of its own.
  // forward_backward joins `side` before it returns, so every later op (the next forward,
  // reading the optimizer state, saving) sees the updates (Persistent storage: only this
  // join). nullptr: one arena, released after each hook (the default). Call between steps;
  // `side` must outlive its use.
  void set_gradient_side_stream(Backend::SideStream* side);
  static constexpr int kGradientArenas = 2;
  // Optimizer in the backward fused into the expert weight gradients (GradientStorage::PerGroup
  // only; InBackwardOptimizer installs it): when set, the MoE backward does not compute the
  // experts_gate_up / experts_down gradients (expert_weight_parameters()); for each it calls
  // update(parameter index in parameters(), expert_begin, expert_end, dy, x, offsets) with what
  // grouped_gemm_weight_grad(dy, x, offsets, dw, accumulate = false) would have been given for
  // the local experts [expert_begin, expert_end) of that weight (one call per dispatcher chunk
  // and weight, chunks without rows included: their offsets are all zero), on the host while
  // the backward is enqueued, and the callee applies the optimizer step there, on the ops'
  // stream (Backend::grouped_gemm_weight_grad_adamw), before the backward goes on. Those
  // parameters get no gradient memory (the group arenas shrink: gradient_arena_bytes()); their
  // Parameter::grad has no data in the gradient-ready hook. The backward must overwrite the
  // gradients (zero_grads() before each forward_backward, which PerGroup enforces). Empty
  // function: off (the default). Call between steps.
  using ExpertWeightUpdate =
      std::function<void(size_t parameter, int64_t expert_begin, int64_t expert_end,
                         const Tensor& dy, const Tensor& x, const Tensor& offsets)>;
  void set_expert_weight_update(ExpertWeightUpdate update);
  bool has_expert_weight_update() const { return static_cast<bool>(expert_weight_update_); }
  // The parameters an expert weight update takes over: each MoE layer's experts_gate_up and
  // experts_down, as indices into parameters() (ascending).
  const std::vector<size_t>& expert_weight_parameters() const { return expert_weight_parameters_; }
  // PerGroup: bytes of one gradient arena (the largest non-tied group, less the expert weights
  // an expert weight update takes over), and how many the model holds (kGradientArenas with a
  // side stream, else 1: the allocator caches it).
  size_t gradient_arena_bytes() const { return group_arena_bytes_; }
  int gradient_arenas() const { return grad_side_stream_ ? kGradientArenas : 1; }
  std::span<Parameter> parameters() { return weights_->parameters(); }
  std::span<const Parameter> parameters() const { return weights_->parameters(); }
  const ModelWeights& weights() const { return *weights_; }

  // Writes config.json, model.safetensors (or shards + index) and the tokenizer files.
  // With expert parallelism, call it on every rank of ONE expert-parallel group (e.g. the
  // first data-parallel replica's; the other replicas hold the same values and must not
  // write): each rank writes the shard file(s) of its own experts, EP rank 0 also the other
  // tensors, config.json, the tokenizer files and the index naming every tensor, so the
  // folder is one standard HF checkpoint. Starts and ends with a barrier on the group: EP
  // rank 0 may prepare the folder before the call (e.g. clear a FOLDER.tmp) and rename it
  // after; every rank returns once all files are written.
  void save_hf_folder(const std::filesystem::path& folder, const SaveOptions& options) const;
  // Copies every on-disk tensor's value (or gradient) to host fp32, under its HF name
  // (with expert parallelism: only this rank's experts, under their global names).
  struct NamedHostTensor {
    std::string name;
    Shape shape;
    std::vector<float> values;
  };
  std::vector<NamedHostTensor> hf_tensors_to_host(bool gradients) const;

  // How evenly the expert rows fell on the expert-parallel ranks over the MoE layers
  // dispatched since the last call (forward passes and recomputes); then starts over.
  ExpertLoad take_expert_load();

  int64_t num_parameters(bool active_per_token) const;
  // Experts held here: [first_expert(), first_expert() + local_experts()).
  int64_t first_expert() const { return first_expert_; }
  int64_t local_experts() const { return local_experts_; }

 private:
  Model(const ModelConfig& config, Backend& backend, ModelOptions options);
  StepResult run(const BatchView& batch, bool backward, float loss_scale, float aux_loss_scale,
                 const Tensor& logits);
  // GradientStorage::PerGroup: gives group `index`'s gradients memory / takes it back.
  void bind_group_grads(size_t index);
  void release_group_grads(size_t index);
  // Its gradients, each 256-byte aligned (without those an expert weight update takes over).
  size_t group_bytes(size_t index) const;
  bool tied_embedding_group(size_t index) const;  // the embedding group of a tied model
  // The largest non-tied group's group_bytes (group_arena_bytes_).
  size_t largest_group_bytes() const;
  // True when parameter `index`'s gradient is consumed by the expert weight update (it then
  // gets no gradient memory).
  bool gradient_taken_over(size_t index) const;
  // Calls the hook for group `index`, then releases its per-group gradients.
  void finish_group(size_t index);
  void write_config_and_tokenizer(const std::filesystem::path& folder, const SaveOptions& options,
                                  const std::string& dtype_string) const;

  ModelConfig config_;
  Backend& backend_;
  ModelOptions options_;
  int64_t first_expert_ = 0, local_experts_ = 0;
  std::unique_ptr<ModelWeights> weights_;
  Buffer inv_freq_;  // (D/2) fp32 on the device
  std::unique_ptr<ModelActivations> activations_;
  std::vector<GradientGroup> gradient_groups_;
  GradientReadyHook gradient_ready_hook_;
  bool overwrite_grads_ = true;      // set by zero_grads(), cleared by a backward
  std::vector<Buffer> group_grads_;  // PerGroup: each group's live gradients (one arena)
  size_t group_arena_bytes_ = 0;     // the largest group's gradients, each 256-byte aligned
  // The fused expert weight update (set_expert_weight_update); per parameter whether it is an
  // expert weight it would take over; per layer the indices of experts_gate_up and
  // experts_down (MoE layers only).
  ExpertWeightUpdate expert_weight_update_;
  std::vector<size_t> expert_weight_parameters_;
  std::vector<bool> is_expert_weight_;
  struct LayerExpertWeights {
    size_t gate_up = 0, down = 0;
  };
  std::vector<LayerExpertWeights> layer_expert_weights_;
  // PerGroup with a side-stream consumer (set_gradient_side_stream): the ring of arenas, the
  // tied embedding's arena, the ring position of the next bind, each bound group's slot.
  Backend::SideStream* grad_side_stream_ = nullptr;
  std::vector<Buffer> arena_ring_;
  Buffer tied_arena_;
  size_t next_arena_ = 0;
  std::vector<int> group_slot_;  // -1: not in the ring
  static constexpr size_t kGradAlignment = 256;
};

// Parameters of the whole model and active per token (top-k of the experts), from a config;
// of one decoder layer.
int64_t count_parameters(const ModelConfig& config, bool active_per_token);
int64_t layer_parameters(const ModelConfig& config, int64_t layer, bool active_per_token = false);

// RoPE inverse frequencies (D/2) as Transformers computes them (default and llama3).
std::vector<float> rope_inv_freq(const ModelConfig& config);

}  // namespace moetune
