// Model: construction, random init, the step (embedding -> decoder layers -> final norm ->
// fused LM head + cross-entropy, then the backward in reverse), the load-balancing aux
// loss, RoPE frequencies and parameter counts. Loading and saving HF folders is in
// model_io.cpp.
//
// Activations are allocated for one micro-batch shape (B, T) and reused while the shape
// stays the same. With ModelOptions::recompute_layers only the residual stream (each
// layer's input) is kept for all layers; one LayerActivations per layer kind (MoE, dense)
// is shared, and the backward reruns layer l's forward into it before layer l's backward
// (not for the last layer, whose activations are still there). The aux loss needs every MoE layer's
// routing statistics before any backward, so it is computed between the forward and the backward
// (one small host read).
#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "dist/communicator.h"
#include "model/decoder.h"
#include "model/expert_parallel_dispatch.h"

namespace moetune {

struct ModelActivations {
  int64_t batch = 0, seq = 0;
  Buffer input_ids;              // (N) I32
  Buffer labels;                 // (N) I32 shifted: labels[t + 1], -100 at the end of each row
  Buffer positions;              // (N) I32
  Buffer doc_offsets;            // (docs + 1) I32, reallocated per call when used
  std::vector<Buffer> residual;  // L + 1 of (N, H): input of layer l; [L] the last output
  std::vector<LayerActivations> layers;  // L, or with recompute: [0] MoE, [1] dense
  DecoderScratch scratch;
  Buffer final_norm;                            // (N, H)
  Buffer final_rstd;                            // (N) fp32
  Buffer dresidual;                             // (N, H)
  Buffer loss_sum, correct;                     // (1) fp32
  Buffer aux_counts, aux_prob_sums, aux_dprob;  // (E) fp32
  std::unique_ptr<TokenDispatcher> dispatcher;
};

Model::Model(const ModelConfig& config, Backend& backend, ModelOptions options)
    : config_(config), backend_(backend), options_(options) {
  if (config_.head_dim <= 0 && config_.num_attention_heads > 0)
    config_.head_dim = config_.hidden_size / config_.num_attention_heads;
  if (config_.family == ModelFamily::Mixtral) config_.norm_topk_prob = true;  // always renormalises
  local_experts_ = config_.num_experts;
  if (options.expert_comm && options.expert_comm->size() > 1) {
    const int ep = options.expert_comm->size();
    if (config_.num_experts <= 0)
      fail("expert parallelism over ", ep, " ranks needs a MoE model; ", config_.model_type,
           " has no experts");
    if (config_.num_experts % ep != 0)
      fail("expert parallelism: ", ep, " ranks do not divide the ", config_.num_experts,
           " experts of ", config_.model_type, " (num_experts in config.json)");
    local_experts_ = config_.num_experts / ep;
    first_expert_ = options.expert_comm->rank() * local_experts_;
  }
  weights_ = std::make_unique<ModelWeights>(config_, options.param_dtype, options.grad_dtype,
                                            backend.device(), local_experts_,
                                            options.grad_storage == GradientStorage::Persistent);
  const std::vector<float> inv_freq = rope_inv_freq(config_);
  inv_freq_ = Buffer(DType::F32, {static_cast<int64_t>(inv_freq.size())}, backend.device());
  backend.copy(inv_freq_, Tensor(const_cast<float*>(inv_freq.data()), DType::F32,
                                 {static_cast<int64_t>(inv_freq.size())}));
  backend.synchronize();

  // Gradient groups in backward order: head, layer L-1 .. 0, embedding. The parameters are
  // allocated as embed, layer 0 .. L-1, final norm, lm_head (weights.cpp), so each group is
  // a contiguous range.
  const std::vector<Parameter>& params = weights_->parameters();
  const int64_t L = config_.num_hidden_layers;
  std::vector<GradientGroup> layers(static_cast<size_t>(L));
  GradientGroup head{"head", params.size(), params.size()};
  GradientGroup embedding{"embedding", 0, 0};
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string& name = params[i].name;
    GradientGroup* group = nullptr;
    if (name.starts_with("model.layers.")) {
      const int64_t layer = std::stoll(name.substr(13));
      MOETUNE_CHECK(layer >= 0 && layer < L, "parameter of an unknown layer: " + name);
      group = &layers[static_cast<size_t>(layer)];
      if (group->name.empty()) *group = GradientGroup{"layer." + std::to_string(layer), i, i};
    } else if (name == "model.embed_tokens.weight") {
      group = &embedding;
      group->begin = i;
    } else {
      group = &head;
      if (head.begin == params.size()) head.begin = head.end = i;
    }
    MOETUNE_CHECK(group->end == i, "parameters of a gradient group are not contiguous: " + name);
    group->end = i + 1;
  }
  gradient_groups_.push_back(head);
  for (int64_t l = L - 1; l >= 0; --l) gradient_groups_.push_back(layers[static_cast<size_t>(l)]);
  gradient_groups_.push_back(embedding);
  group_grads_.resize(gradient_groups_.size());
  // The expert weights an expert weight update may take over, found by their storage (each
  // parameter has its own).
  is_expert_weight_.assign(params.size(), false);
  layer_expert_weights_.resize(static_cast<size_t>(L));
  const auto index_of = [&](const Tensor& value) {
    for (size_t i = 0; i < params.size(); ++i)
      if (params[i].value.data == value.data) return i;
    fail("model: an expert weight is not among the parameters");
  };
  for (int64_t l = 0; l < L; ++l) {
    const LayerWeights& layer = weights_->values().layers[static_cast<size_t>(l)];
    if (!layer.moe) continue;
    LayerExpertWeights& experts = layer_expert_weights_[static_cast<size_t>(l)];
    experts.gate_up = index_of(layer.experts_gate_up);
    experts.down = index_of(layer.experts_down);
    is_expert_weight_[experts.gate_up] = is_expert_weight_[experts.down] = true;
  }
  for (size_t i = 0; i < params.size(); ++i)
    if (is_expert_weight_[i]) expert_weight_parameters_.push_back(i);
  // Per-group storage: every group's gradients are carved from one arena of the largest
  // group's size, so that each group reuses the block the previous one returned (the caching
  // allocator keeps blocks per size: groups of different sizes would each keep their own).
  // A tied embedding's gradient lives through the whole backward: it gets its own size.
  group_arena_bytes_ = largest_group_bytes();
}

size_t Model::group_bytes(size_t index) const {
  const GradientGroup& group = gradient_groups_[index];
  size_t bytes = 0;
  for (size_t i = group.begin; i < group.end; ++i)
    if (!gradient_taken_over(i))
      bytes += (weights_->parameters()[i].grad.bytes() + kGradAlignment - 1) / kGradAlignment *
               kGradAlignment;
  return bytes;
}

size_t Model::largest_group_bytes() const {
  size_t largest = 0;
  for (size_t g = 0; g < gradient_groups_.size(); ++g)
    if (!tied_embedding_group(g)) largest = std::max(largest, group_bytes(g));
  return largest;
}

bool Model::gradient_taken_over(size_t index) const {
  return expert_weight_update_ && is_expert_weight_[index];
}

void Model::set_expert_weight_update(ExpertWeightUpdate update) {
  if (update && options_.grad_storage != GradientStorage::PerGroup)
    fail(
        "Model::set_expert_weight_update: fused expert weight updates need per-group gradient "
        "storage (GradientStorage::PerGroup, the optimizer in the backward)");
  // The arenas change size: nothing may still use the old ones.
  if (grad_side_stream_) grad_side_stream_->join();
  backend_.synchronize();
  expert_weight_update_ = std::move(update);
  arena_ring_.clear();
  next_arena_ = 0;
  group_arena_bytes_ = largest_group_bytes();
}

bool Model::tied_embedding_group(size_t index) const {
  return config_.tie_word_embeddings && index + 1 == gradient_groups_.size();
}

void Model::set_gradient_side_stream(Backend::SideStream* side) {
  if (grad_side_stream_) grad_side_stream_->join();
  backend_.synchronize();  // nothing may still use the old arenas
  grad_side_stream_ = side;
  arena_ring_.clear();
  tied_arena_ = Buffer();
  next_arena_ = 0;
}

void Model::bind_group_grads(size_t index) {
  if (options_.grad_storage != GradientStorage::PerGroup) return;
  release_group_grads(index);
  const GradientGroup& group = gradient_groups_[index];
  // Uninitialised: the backward overwrites every gradient (zero_grads() semantics).
  const bool tied = tied_embedding_group(index);
  const size_t bytes = tied ? group_bytes(index) : group_arena_bytes_;
  const auto arena = [&] {
    return Buffer::uninitialized(DType::U8, {static_cast<int64_t>(bytes)}, backend_.device());
  };
  char* next = nullptr;
  group_slot_.resize(gradient_groups_.size(), -1);
  group_slot_[index] = -1;
  if (!grad_side_stream_) {
    group_grads_[index] = arena();
    next = static_cast<char*>(group_grads_[index].data());
  } else if (tied) {
    if (!tied_arena_.data()) tied_arena_ = arena();
    next = static_cast<char*>(tied_arena_.data());
  } else {
    const int slot = static_cast<int>(next_arena_++ % kGradientArenas);
    if (arena_ring_.empty()) arena_ring_.resize(kGradientArenas);
    if (!arena_ring_[slot].data()) arena_ring_[slot] = arena();
    grad_side_stream_->join_fence(slot);  // the side work that last read this arena is done
    group_slot_[index] = slot;
    next = static_cast<char*>(arena_ring_[slot].data());
  }
  for (size_t i = group.begin; i < group.end; ++i) {
    if (gradient_taken_over(i)) continue;  // stays unbound: the fused update consumes it
    weights_->bind_grad(i, next);
    const size_t bytes = weights_->parameters()[i].grad.bytes();
    next += (bytes + kGradAlignment - 1) / kGradAlignment * kGradAlignment;
  }
}

void Model::release_group_grads(size_t index) {
  if (options_.grad_storage != GradientStorage::PerGroup) return;
  const GradientGroup& group = gradient_groups_[index];
  for (size_t i = group.begin; i < group.end; ++i) weights_->bind_grad(i, nullptr);
  group_grads_[index] = Buffer();  // back to the allocator's cache, reused by the next group
}

void Model::finish_group(size_t index) {
  if (gradient_ready_hook_) gradient_ready_hook_(index);
  if (grad_side_stream_ && index < group_slot_.size() && group_slot_[index] >= 0)
    grad_side_stream_->record_fence(group_slot_[index]);  // after the hook's side work
  release_group_grads(index);
}

Model::~Model() = default;

std::unique_ptr<Model> Model::uninitialized(const ModelConfig& config, Backend& backend,
                                            ModelOptions options) {
  return std::unique_ptr<Model>(new Model(config, backend, options));
}

std::unique_ptr<Model> Model::random_init(const ModelConfig& config, uint64_t seed,
                                          Backend& backend, ModelOptions options) {
  std::unique_ptr<Model> model(new Model(config, backend, options));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, static_cast<float>(config.initializer_range));
  for (const Parameter& parameter : model->parameters()) {
    // With expert parallelism, draw every expert's values (the same numbers as one process)
    // and keep this rank's.
    const int64_t numel = parameter.value.numel();
    const bool sharded = parameter.expert && model->local_experts_ < config.num_experts;
    const int64_t per_expert = sharded ? numel / model->local_experts_ : 0;
    std::vector<float> values(
        static_cast<size_t>(sharded ? per_expert * config.num_experts : numel));
    const bool is_norm = parameter.name.ends_with("norm.weight");
    const bool is_bias = parameter.name.ends_with(".bias");
    for (float& value : values) value = is_norm ? 1.0f : is_bias ? 0.0f : normal(rng);
    const float* local = values.data() + (sharded ? model->first_expert_ * per_expert : 0);
    backend.copy(parameter.value,
                 Tensor(const_cast<float*>(local), DType::F32, parameter.value.shape));
    backend.synchronize();
  }
  model->zero_grads();
  return model;
}

void Model::zero_grads() { overwrite_grads_ = true; }

std::vector<float> rope_inv_freq(const ModelConfig& config) {
  // In float32, as Transformers: 1 / base ** (arange(0, D, 2) / D)
  const int64_t D =
      config.head_dim > 0 ? config.head_dim : config.hidden_size / config.num_attention_heads;
  const float base = static_cast<float>(config.rope.theta);
  std::vector<float> inv_freq(static_cast<size_t>(D / 2));
  for (int64_t i = 0; i < D / 2; ++i)
    inv_freq[i] = 1.0f / std::pow(base, static_cast<float>(2 * i) / static_cast<float>(D));
  if (config.rope.type == "llama3") {  // _compute_llama3_parameters
    const float factor = static_cast<float>(config.rope.factor);
    const float low = static_cast<float>(config.rope.low_freq_factor);
    const float high = static_cast<float>(config.rope.high_freq_factor);
    const float old_context = static_cast<float>(config.rope.original_max_position_embeddings);
    const float low_freq_wavelen = old_context / low, high_freq_wavelen = old_context / high;
    for (float& freq : inv_freq) {
      const float wavelen = 2.0f * static_cast<float>(M_PI) / freq;
      float scaled = wavelen > low_freq_wavelen ? freq / factor : freq;
      if (!(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen)) {
        const float smooth = (old_context / wavelen - low) / (high - low);
        scaled = (1 - smooth) * scaled / factor + smooth * scaled;
      }
      freq = scaled;
    }
  } else if (config.rope.type != "default") {
    fail("rope type '", config.rope.type, "' is not supported (default, llama3)");
  }
  return inv_freq;
}

int64_t layer_parameters(const ModelConfig& config, int64_t layer, bool active_per_token) {
  const int64_t H = config.hidden_size;
  const int64_t D = config.head_dim > 0 ? config.head_dim : H / config.num_attention_heads;
  const int64_t q_width = config.num_attention_heads * D, kv_width = config.num_key_value_heads * D;
  const bool bias = config.attention_bias && config.family != ModelFamily::Mixtral;
  int64_t total = 2 * H + 2 * q_width * H + 2 * kv_width * H;
  if (bias) total += q_width + 2 * kv_width + H;
  if (config.qk_norm) total += 2 * D;
  if (config.layer_is_moe(layer)) {
    const int64_t expert = 3 * H * config.moe_intermediate_size;
    const int64_t experts_used = active_per_token ? config.num_experts_per_tok : config.num_experts;
    total += config.num_experts * H + experts_used * expert;
  } else {
    total += 3 * H * config.intermediate_size;
  }
  return total;
}

int64_t count_parameters(const ModelConfig& config, bool active_per_token) {
  const int64_t H = config.hidden_size, V = config.vocab_size;
  int64_t total = V * H + H + (config.tie_word_embeddings ? 0 : V * H);
  for (int64_t i = 0; i < config.num_hidden_layers; ++i)
    total += layer_parameters(config, i, active_per_token);
  return total;
}

ExpertLoad Model::take_expert_load() {
  return activations_ && activations_->dispatcher ? activations_->dispatcher->take_expert_load()
                                                  : ExpertLoad{};
}

int64_t Model::num_parameters(bool active_per_token) const {
  return count_parameters(config_, active_per_token);
}

namespace {
void validate_batch(const BatchView& batch, const ModelConfig& config) {
  const int64_t N = batch.batch * batch.seq;
  if (batch.batch <= 0 || batch.seq <= 0)
    fail("batch: empty (", batch.batch, " x ", batch.seq, ")");
  if (static_cast<int64_t>(batch.input_ids.size()) != N)
    fail("batch: input_ids has ", batch.input_ids.size(), " tokens, expected ", N);
  if (!batch.labels.empty() && static_cast<int64_t>(batch.labels.size()) != N)
    fail("batch: labels has ", batch.labels.size(), " tokens, expected ", N);
  if (!batch.position_ids.empty() && static_cast<int64_t>(batch.position_ids.size()) != N)
    fail("batch: position_ids has ", batch.position_ids.size(), " entries, expected ", N);
  for (int64_t i = 0; i < N; ++i) {
    const int32_t id = batch.input_ids[i];
    if (id < 0 || id >= config.vocab_size)
      fail("batch: input_ids[", i, "] = ", id, " is outside the vocabulary [0, ", config.vocab_size,
           ")");
    if (!batch.labels.empty()) {
      const int32_t label = batch.labels[i];
      if (label != -100 && (label < 0 || label >= config.vocab_size))
        fail("batch: labels[", i, "] = ", label, " is neither -100 nor a token id < ",
             config.vocab_size);
    }
    if (!batch.position_ids.empty() && batch.position_ids[i] < 0)
      fail("batch: position_ids[", i, "] = ", batch.position_ids[i], " is negative");
  }
  if (!batch.doc_offsets.empty()) {
    const auto& offsets = batch.doc_offsets;
    if (offsets.size() < 2 || offsets.front() != 0 || offsets.back() != N)
      fail("batch: doc_offsets must run from 0 to ", N);
    for (size_t d = 0; d + 1 < offsets.size(); ++d) {
      const int64_t begin = offsets[d], end = offsets[d + 1];
      if (end < begin) fail("batch: doc_offsets decrease at ", d + 1);
      if (end > begin && begin / batch.seq != (end - 1) / batch.seq)
        fail("batch: document ", d, " [", begin, ", ", end, ") crosses a row boundary");
    }
  }
}

template <typename T>
Tensor host_tensor(std::vector<T>& values, DType dtype) {
  return Tensor(values.data(), dtype, {static_cast<int64_t>(values.size())});
}
}  // namespace

StepResult Model::forward_backward(const BatchView& batch, float loss_scale, float aux_loss_scale,
                                   const Tensor& logits) {
  return run(batch, true, loss_scale, aux_loss_scale, logits);
}

StepResult Model::evaluate(const BatchView& batch, const Tensor& logits) {
  return run(batch, false, 0.0f, 0.0f, logits);
}

StepResult Model::run(const BatchView& batch, bool backward, float loss_scale, float aux_loss_scale,
                      const Tensor& logits) {
  validate_batch(batch, config_);
  const bool per_group = options_.grad_storage == GradientStorage::PerGroup;
  if (backward && per_group && !overwrite_grads_)
    fail(
        "per-group gradient storage (optimizer in the backward) takes one micro-batch per "
        "optimizer step: call zero_grads() before every forward_backward");
  const int64_t B = batch.batch, T = batch.seq, N = B * T, H = config_.hidden_size;
  const int64_t L = config_.num_hidden_layers, E = config_.num_experts;
  const DType dtype = options_.param_dtype;
  const Device device = backend_.device();
  const float eps = static_cast<float>(config_.rms_norm_eps);
  if (logits.defined() && (logits.dtype != DType::F32 || logits.numel() != N * config_.vocab_size))
    fail("logits output must be fp32 with ", N, " x ", config_.vocab_size, " elements");

  // ---- activations for this shape -------------------------------------------------------
  if (!activations_ || activations_->batch != B || activations_->seq != T) {
    activations_.reset();  // free the old shape's buffers first
    auto a = std::make_unique<ModelActivations>();
    a->batch = B;
    a->seq = T;
    a->input_ids = Buffer(DType::I32, {N}, device);
    a->labels = Buffer(DType::I32, {N}, device);
    a->positions = Buffer(DType::I32, {N}, device);
    if (local_experts_ < E)
      a->dispatcher = make_expert_parallel_dispatcher(backend_, *options_.expert_comm, config_);
    else
      a->dispatcher = make_local_dispatcher(backend_, std::max<int64_t>(E, 1),
                                            std::max<int64_t>(config_.num_experts_per_tok, 1));
    AttentionInputs shape_inputs{B, T, Tensor(), Tensor(), Tensor()};
    DecoderContext context{backend_, config_, shape_inputs, *a->dispatcher};
    for (int64_t l = 0; l <= L; ++l) a->residual.emplace_back(dtype, Shape{N, H}, device);
    if (options_.recompute_layers) {
      a->layers.resize(2);
      bool allocated[2] = {false, false};
      for (int64_t l = 0; l < L; ++l) {
        const bool moe = config_.layer_is_moe(l);
        if (!allocated[moe ? 0 : 1]) allocate_layer(context, moe, dtype, a->layers[moe ? 0 : 1]);
        allocated[moe ? 0 : 1] = true;
      }
    } else {
      a->layers.resize(L);
      for (int64_t l = 0; l < L; ++l)
        allocate_layer(context, config_.layer_is_moe(l), dtype, a->layers[l]);
    }
    allocate_decoder_scratch(context, dtype, a->scratch);
    if (options_.balanced_routing && E > 0) {
      const int64_t k = config_.num_experts_per_tok;
      std::vector<int32_t> ids(static_cast<size_t>(N * k));
      for (int64_t slot = 0; slot < N * k; ++slot) ids[slot] = static_cast<int32_t>(slot % E);
      a->scratch.moe.balanced_ids = Buffer(DType::I32, {N, k}, device);
      backend_.copy(a->scratch.moe.balanced_ids, host_tensor(ids, DType::I32));
      backend_.synchronize();
    }
    a->final_norm = Buffer(dtype, {N, H}, device);
    a->final_rstd = Buffer(DType::F32, {N}, device);
    a->dresidual = Buffer(dtype, {N, H}, device);
    a->loss_sum = Buffer(DType::F32, {1}, device);
    a->correct = Buffer(DType::F32, {1}, device);
    if (E > 0) {
      a->aux_counts = Buffer(DType::F32, {E}, device);
      a->aux_prob_sums = Buffer(DType::F32, {E}, device);
      a->aux_dprob = Buffer(DType::F32, {E}, device);
    }
    activations_ = std::move(a);
  }
  ModelActivations& a = *activations_;

  // ---- inputs to the device -------------------------------------------------------------
  StepResult result;
  std::vector<int32_t> ids(batch.input_ids.begin(), batch.input_ids.end());
  std::vector<int32_t> shifted(static_cast<size_t>(N), -100);
  std::vector<int32_t> positions(static_cast<size_t>(N));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t n = b * T + t;
      if (!batch.labels.empty() && t + 1 < T) shifted[n] = batch.labels[n + 1];
      if (shifted[n] != -100) ++result.trained_tokens;
      positions[n] = batch.position_ids.empty() ? static_cast<int32_t>(t) : batch.position_ids[n];
    }
  }
  backend_.copy(a.input_ids, host_tensor(ids, DType::I32));
  backend_.copy(a.labels, host_tensor(shifted, DType::I32));
  backend_.copy(a.positions, host_tensor(positions, DType::I32));
  Tensor doc_offsets;
  std::vector<int32_t> offsets(batch.doc_offsets.begin(), batch.doc_offsets.end());
  if (!offsets.empty()) {
    a.doc_offsets = Buffer(DType::I32, {static_cast<int64_t>(offsets.size())}, device);
    backend_.copy(a.doc_offsets, host_tensor(offsets, DType::I32));
    doc_offsets = a.doc_offsets.tensor();
  }
  const AttentionInputs inputs{B, T, a.positions.tensor(), inv_freq_.tensor(), doc_offsets};
  // The first backward after zero_grads() writes the gradients instead of adding to them.
  const bool accumulate = !overwrite_grads_;
  const DecoderContext context{backend_, config_, inputs, *a.dispatcher, accumulate};
  const WeightTensors& w = weights_->values();
  const WeightTensors& g = weights_->grads();

  // Layer l's saved activations (shared per layer kind when recomputing).
  const auto saved = [&](int64_t l) -> LayerActivations& {
    if (!options_.recompute_layers) return a.layers[l];
    return a.layers[config_.layer_is_moe(l) ? 0 : 1];
  };

  // ---- forward --------------------------------------------------------------------------
  // The load-balancing aux loss covers all MoE layers (Transformers' load_balancing_loss_func:
  // the router logits of every MoE layer concatenated, so every (layer, token) row counts);
  // its statistics are gathered right after each layer's forward (recomputing overwrites them).
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < L; ++l) moe_layers += config_.layer_is_moe(l) ? 1 : 0;
  const bool aux_loss = config_.output_router_logits && moe_layers > 0;
  if (aux_loss) {
    backend_.fill(a.aux_counts, 0.0f);
    backend_.fill(a.aux_prob_sums, 0.0f);
  }
  backend_.embedding_forward(a.input_ids, w.embed, a.residual[0]);
  for (int64_t l = 0; l < L; ++l) {
    decoder_layer_forward(context, w.layers[l], a.residual[l], saved(l), a.scratch,
                          a.residual[l + 1]);
    if (aux_loss && config_.layer_is_moe(l))
      backend_.router_aux_stats(saved(l).moe.probs, saved(l).moe.topk_ids, a.aux_counts,
                                a.aux_prob_sums);
  }

  // ---- load-balancing aux loss and its gradient w.r.t. the router probabilities
  Tensor aux_dprob;
  if (aux_loss) {
    std::vector<float> counts(static_cast<size_t>(E)), prob_sums(static_cast<size_t>(E));
    backend_.copy(host_tensor(counts, DType::F32), a.aux_counts);
    backend_.copy(host_tensor(prob_sums, DType::F32), a.aux_prob_sums);
    backend_.synchronize();
    // aux = E * sum_e (count_e / rows) * (prob_sum_e / rows), rows = moe_layers * N
    const double rows = static_cast<double>(moe_layers * N);
    double aux = 0;
    for (int64_t e = 0; e < E; ++e) aux += (counts[e] / rows) * (prob_sums[e] / rows);
    result.has_aux_loss = true;
    result.aux_loss = aux * static_cast<double>(E);
    if (backward) {
      // d(coef * aux)/d probs[row, e] = coef * E * count_e / rows^2 (the counts are constant)
      std::vector<float> dprob(static_cast<size_t>(E));
      const double coef = config_.router_aux_loss_coef * aux_loss_scale;
      for (int64_t e = 0; e < E; ++e)
        dprob[e] = static_cast<float>(coef * static_cast<double>(E) * counts[e] / (rows * rows));
      backend_.copy(a.aux_dprob, host_tensor(dprob, DType::F32));
      aux_dprob = a.aux_dprob.tensor();
    }
  }

  // ---- final norm, LM head and cross-entropy (+ its backward, fused) --------------------
  backend_.rmsnorm_forward(a.residual[L], w.final_norm, eps, a.final_norm, a.final_rstd);
  backend_.fill(a.loss_sum, 0.0f);
  backend_.fill(a.correct, 0.0f);
  LinearCrossEntropyArgs loss_args;
  loss_args.hidden = a.final_norm;
  loss_args.weight = w.lm_head;
  loss_args.labels = a.labels;
  loss_args.loss_sum = a.loss_sum;
  loss_args.correct = a.correct;
  loss_args.logits = logits;
  const Tensor dnormed = a.scratch.dnormed;
  if (backward) {
    next_arena_ = 0;
    bind_group_grads(0);                                                            // head
    if (config_.tie_word_embeddings) bind_group_grads(static_cast<size_t>(L + 1));  // embedding
  }
  if (backward && loss_scale != 0.0f) {
    loss_args.grad_scale = loss_scale;
    loss_args.grad_hidden = dnormed;
    loss_args.grad_weight = g.lm_head;
    loss_args.accumulate_grad_weight = accumulate;
  }
  backend_.linear_cross_entropy(loss_args);

  // ---- backward -------------------------------------------------------------------------
  if (backward) {
    if (loss_scale == 0.0f) {
      backend_.fill(dnormed, 0.0f);
      if (!accumulate) backend_.fill(g.lm_head, 0.0f);  // the loss wrote no gradient
    }
    backend_.rmsnorm_backward(dnormed, a.residual[L], w.final_norm, a.final_rstd, a.dresidual,
                              g.final_norm, false, accumulate);
    finish_group(0);  // head
    for (int64_t l = L - 1; l >= 0; --l) {
      const Tensor layer_aux = config_.layer_is_moe(l) ? aux_dprob : Tensor();
      if (options_.recompute_layers && l + 1 < L)  // rewrites residual[l + 1] with equal values
        decoder_layer_forward(context, w.layers[l], a.residual[l], saved(l), a.scratch,
                              a.residual[l + 1]);
      bind_group_grads(static_cast<size_t>(L - l));  // layer.l
      // The fused expert weight update: the layer's expert gradients go to it, not to g.
      ExpertGradientConsumer expert_gradients;
      if (expert_weight_update_ && config_.layer_is_moe(l)) {
        const LayerExpertWeights experts = layer_expert_weights_[static_cast<size_t>(l)];
        expert_gradients = [this, experts](ExpertWeight weight, int64_t expert_begin,
                                           int64_t expert_end, const Tensor& dy, const Tensor& x,
                                           const Tensor& offsets) {
          expert_weight_update_(weight == ExpertWeight::GateUp ? experts.gate_up : experts.down,
                                expert_begin, expert_end, dy, x, offsets);
        };
      }
      decoder_layer_backward(context, w.layers[l], g.layers[l], a.residual[l], saved(l), layer_aux,
                             a.scratch, a.dresidual, expert_gradients);
      finish_group(static_cast<size_t>(L - l));
    }
    // The scatter-add always accumulates: overwriting starts from zeros, except for a tied
    // embedding, whose gradient the LM head has just written.
    if (!config_.tie_word_embeddings) bind_group_grads(static_cast<size_t>(L + 1));
    if (!accumulate && !config_.tie_word_embeddings) backend_.fill(g.embed, 0.0f);
    backend_.embedding_backward(a.input_ids, a.dresidual, g.embed);
    overwrite_grads_ = false;
    finish_group(static_cast<size_t>(L + 1));          // embedding
    if (grad_side_stream_) grad_side_stream_->join();  // the hooks' side work (the updates)
  }

  float loss_sum = 0, correct = 0;
  backend_.copy(Tensor(&loss_sum, DType::F32, {1}), a.loss_sum);
  backend_.copy(Tensor(&correct, DType::F32, {1}), a.correct);
  backend_.synchronize();
  result.loss_sum = loss_sum;
  result.correct = correct;
  return result;
}

}  // namespace moetune
