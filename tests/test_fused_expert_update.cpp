// The optimizer in the backward fused into the expert weight gradients, on the CPU:
// - the default Backend::grouped_gemm_weight_grad_adamw equals grouped_gemm_weight_grad +
//   grad_norm_squared + adamw_update run by hand, bit for bit (experts without rows, fp32
//   params, bf16 params with fp32 master weights; the combinations the CPU backend does not
//   compute, bf16 state or no master copy, are refused by both ways alike), and
//   AdamW::fused_expert_update in expert slices equals AdamW::update of the whole gradient;
// - moe_backward hands every chunk's expert weight gradient inputs to the consumer (chunks
//   without rows too, with all-zero offsets) and leaves the gradient tensors alone;
// - the model's gradient arenas shrink and the expert weights get no gradient memory;
// - InBackwardOptimizer with fused expert updates trains the tiny MoE model to the same
//   weights and AdamW state, bit for bit, as with fuse_expert_updates off, and the same
//   gradient norm to rounding;
// - the memory plan with fused_expert_updates counts fewer gradient bytes, agreeing with the
//   model's arena.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "model/memory_plan.h"
#include "model/model.h"
#include "model/moe.h"
#include "test_model_fixtures.h"
#include "test_util.h"
#include "train/adamw.h"
#include "train/optimizer_in_backward.h"

namespace moetune {
namespace {

using testing::make_tokens;
using testing::Tokens;

Buffer random_buffer(Shape shape, unsigned seed, float scale = 0.5f) {
  Buffer buffer(DType::F32, shape);
  const std::vector<float> v =
      testing::random_floats(static_cast<size_t>(shape.numel()), seed, scale);
  std::copy(v.begin(), v.end(), buffer.ptr<float>());
  return buffer;
}

Buffer offsets_buffer(const std::vector<int32_t>& offsets) {
  Buffer buffer(DType::I32, {static_cast<int64_t>(offsets.size())});
  std::copy(offsets.begin(), offsets.end(), buffer.ptr<int32_t>());
  return buffer;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.bytes() == b.bytes() && std::memcmp(a.data, b.data, a.bytes()) == 0;
}

// ---- the default fused op ---------------------------------------------------------------

// One expert weight (E, P, Q) under AdamW in a given storage: the param (F32 or BF16), its
// fp32 master copy (optional) and the state (F32 or BF16).
struct ExpertWeightState {
  Buffer param, master, exp_avg, exp_avg_sq;

  ExpertWeightState(Backend& backend, Shape shape, DType param_dtype, bool master_weights,
                    DType state_dtype, unsigned seed) {
    const Buffer values = random_buffer(shape, seed);
    param = Buffer(param_dtype, shape);
    backend.copy(param, values);
    if (master_weights) {
      master = Buffer(DType::F32, shape);
      backend.copy(master, param);  // as AdamW: the master starts from the stored weight
    }
    exp_avg = Buffer(state_dtype, shape);
    exp_avg_sq = Buffer(state_dtype, shape);
  }
  // An AdamWParam over it; `grad` gives the gradient (by hand) or only its dtype (fused).
  AdamWParam adamw_param(const Tensor& grad) const {
    AdamWParam entry;
    entry.param = param;
    entry.grad = grad;
    entry.exp_avg = exp_avg;
    entry.exp_avg_sq = exp_avg_sq;
    if (master.data()) entry.master = master;
    entry.weight_decay = 0.1f;
    return entry;
  }
  void expect_same(const ExpertWeightState& other, const std::string& what) const {
    EXPECT_TRUE(same_bytes(param, other.param)) << what << ": param";
    EXPECT_TRUE(same_bytes(exp_avg, other.exp_avg)) << what << ": exp_avg";
    EXPECT_TRUE(same_bytes(exp_avg_sq, other.exp_avg_sq)) << what << ": exp_avg_sq";
    if (master.data()) {
      EXPECT_TRUE(same_bytes(master, other.master)) << what << ": master";
    }
  }
};

struct StorageCase {
  const char* name;
  DType param_dtype;
  bool master_weights;
  DType state_dtype;
  bool cpu_computes;  // the CPU backend's adamw_update computes fp32 state and weights only
};

const StorageCase kStorageCases[] = {
    {"fp32 params", DType::F32, false, DType::F32, true},
    {"bf16 params, fp32 master weights", DType::BF16, true, DType::F32, true},
    {"bf16 params without master weights", DType::BF16, false, DType::F32, false},
    {"bf16 params, bf16 state", DType::BF16, true, DType::BF16, false},
    {"bf16 params, bf16 state, no master weights", DType::BF16, false, DType::BF16, false},
};

TEST(FusedExpertUpdateOp, DefaultEqualsTheThreeOpsByHand) {
  auto backend = make_cpu_backend();
  const int64_t E = 3, P = 4, Q = 5, M = 7;
  const Shape shape{E, P, Q};
  // Per step: the rows of each expert (an expert without rows in each, the first after it
  // has momentum), dy (M, P) and x (M, Q).
  const std::vector<std::vector<int32_t>> step_offsets = {{0, 3, 3, 7}, {0, 0, 4, 7}, {0, 2, 5, 7}};
  for (const StorageCase& storage : kStorageCases) {
    ExpertWeightState fused(*backend, shape, storage.param_dtype, storage.master_weights,
                            storage.state_dtype, 11);
    ExpertWeightState by_hand(*backend, shape, storage.param_dtype, storage.master_weights,
                              storage.state_dtype, 11);
    ExpertWeightState without_norm(*backend, shape, storage.param_dtype, storage.master_weights,
                                   storage.state_dtype, 11);
    // The fp32 values AdamW steps: the master copy when there is one (bf16 rounding may
    // hide a small step).
    const auto stepped = [](const ExpertWeightState& state) -> Tensor {
      return state.master.data() ? state.master.tensor() : state.param.tensor();
    };
    const std::vector<float> initial = [&] {
      Buffer values(DType::F32, shape);
      backend->copy(values, stepped(fused));
      return std::vector<float>(values.ptr<float>(), values.ptr<float>() + values.numel());
    }();
    for (size_t step = 0; step < step_offsets.size(); ++step) {
      const std::string what = std::string(storage.name) + ", step " + std::to_string(step + 1);
      const Buffer dy = random_buffer({M, P}, 20 + static_cast<unsigned>(step));
      const Buffer x = random_buffer({M, Q}, 30 + static_cast<unsigned>(step));
      const Buffer offsets = offsets_buffer(step_offsets[step]);
      AdamWHyper hyper;
      hyper.lr = 1e-2 * static_cast<double>(step + 1);
      hyper.step = static_cast<int64_t>(step + 1);
      Buffer fused_norm(DType::F32, {1}), hand_norm(DType::F32, {1});
      fused_norm.ptr<float>()[0] = 123.0f;  // overwritten
      // By hand: the gradient grouped_gemm_weight_grad overwrites, its norm, the step.
      Buffer grad(DType::F32, shape);
      backend->grouped_gemm_weight_grad(dy, x, offsets, grad, /*accumulate=*/false);
      const Tensor grads[] = {grad.tensor()};
      backend->grad_norm_squared(grads, hand_norm);
      const AdamWParam hand_param = by_hand.adamw_param(grad);
      const Tensor no_data(nullptr, DType::F32, shape);  // the gradient's dtype, no data
      if (!storage.cpu_computes) {
        EXPECT_THROW(
            backend->adamw_update(std::span<const AdamWParam>(&hand_param, 1), hyper, 1.0f), Error)
            << what;
        EXPECT_THROW(backend->grouped_gemm_weight_grad_adamw(
                         dy, x, offsets, fused.adamw_param(no_data), hyper, fused_norm),
                     Error)
            << what;
        break;
      }
      backend->adamw_update(std::span<const AdamWParam>(&hand_param, 1), hyper, 1.0f);
      backend->grouped_gemm_weight_grad_adamw(dy, x, offsets, fused.adamw_param(no_data), hyper,
                                              fused_norm);
      backend->grouped_gemm_weight_grad_adamw(dy, x, offsets, without_norm.adamw_param(no_data),
                                              hyper, Tensor());
      EXPECT_EQ(fused_norm.ptr<float>()[0], hand_norm.ptr<float>()[0]) << what;
      EXPECT_GT(hand_norm.ptr<float>()[0], 0.0f) << what;
      fused.expect_same(by_hand, what);
      without_norm.expect_same(by_hand, what + " (no norm)");
    }
    if (!storage.cpu_computes) continue;
    // Expert 1 had no rows in step 1 and expert 0 none in step 2: they were stepped anyway
    // (weight decay, momentum), every value moved.
    Buffer values(DType::F32, shape);
    backend->copy(values, stepped(fused));
    for (int64_t i = 0; i < values.numel(); ++i)
      EXPECT_NE(values.ptr<float>()[i], initial[static_cast<size_t>(i)])
          << storage.name << " " << i;
  }
}

// AdamW's fused path over expert slices [0, 1) and [1, 3) (each with its chunk's offsets,
// relative to the chunk's first row) equals AdamW::update of the whole gradient.
TEST(FusedExpertUpdateOp, AdamWSlicesEqualTheWholeUpdate) {
  auto backend = make_cpu_backend();
  const int64_t E = 3, P = 4, Q = 2, M = 6;
  const std::vector<int32_t> whole_offsets = {0, 2, 2, 6};  // expert 1: no rows
  const Buffer dy = random_buffer({M, P}, 40), x = random_buffer({M, Q}, 41);
  const auto make = [&](DType param_dtype) {
    auto weight = std::make_unique<Buffer>(param_dtype, Shape{E, P, Q});
    backend->copy(*weight, random_buffer({E, P, Q}, 42));
    return weight;
  };
  for (const DType param_dtype : {DType::F32, DType::BF16}) {
    const auto whole_weight = make(param_dtype), sliced_weight = make(param_dtype);
    Buffer grad(DType::F32, {E, P, Q});
    std::vector<Parameter> whole_params = {{"w", *whole_weight, grad, true, true}};
    std::vector<Parameter> sliced_params = {
        {"w", *sliced_weight, Tensor(nullptr, DType::F32, {E, P, Q}), true, true}};
    AdamWConfig config;
    config.weight_decay = 0.1;
    AdamW whole(whole_params, *backend, config), sliced(sliced_params, *backend, config);
    sliced.set_fused(0, true);
    EXPECT_THROW(whole.fused_expert_update(0, 0, 1, dy, x, offsets_buffer({0, 2}), 1e-2), Error);
    for (int step = 1; step <= 2; ++step) {
      const double lr = 1e-2 * step;
      whole.begin_step();
      backend->grouped_gemm_weight_grad(dy, x, offsets_buffer(whole_offsets), grad, false);
      whole.update(0, 1, lr);
      sliced.begin_step();
      const Tensor dy_all = dy, x_all = x;
      sliced.fused_expert_update(0, 0, 1, dy_all.slice_rows(0, 2), x_all.slice_rows(0, 2),
                                 offsets_buffer({0, 2}), lr);
      sliced.fused_expert_update(0, 1, 3, dy_all.slice_rows(2, 6), x_all.slice_rows(2, 6),
                                 offsets_buffer({0, 0, 4}), lr);
      sliced.update(0, 1, lr);  // skips the fused parameter: no gradient to read
    }
    const auto whole_state = whole.state_tensors(), sliced_state = sliced.state_tensors();
    ASSERT_EQ(whole_state.size(), sliced_state.size());
    ASSERT_EQ(whole_state.size(), param_dtype == DType::F32 ? 2u : 3u);  // + the master copy
    for (size_t i = 0; i < whole_state.size(); ++i)
      EXPECT_TRUE(same_bytes(whole_state[i].tensor, sliced_state[i].tensor)) << whole_state[i].name;
    EXPECT_TRUE(same_bytes(*whole_weight, *sliced_weight));
  }
}

// ---- moe_backward hands the expert gradients over ------------------------------------------

ModelConfig layer_config() {
  nlohmann::json json = {
      {"model_type", "qwen3_moe"}, {"vocab_size", 16},           {"hidden_size", 8},
      {"intermediate_size", 8},    {"moe_intermediate_size", 4}, {"num_hidden_layers", 1},
      {"num_attention_heads", 2},  {"num_key_value_heads", 1},   {"head_dim", 4},
      {"num_experts", 6},          {"num_experts_per_tok", 2},   {"norm_topk_prob", true},
      {"rms_norm_eps", 1e-6},      {"rope_theta", 10000.0},      {"max_position_embeddings", 32}};
  return parse_model_config(json, "layer_config");
}

// The local dispatcher with its expert work cut into chunks at the given expert boundaries
// (the chunks' offsets made on the host from the sort's: CPU only), as the expert-parallel
// dispatcher might, so that one chunk can have no rows.
class ChunkedLocalDispatcher final : public TokenDispatcher {
 public:
  ChunkedLocalDispatcher(Backend& backend, int64_t experts, int64_t top_k,
                         std::vector<int64_t> boundaries)
      : local_(make_local_dispatcher(backend, experts, top_k)),
        boundaries_(std::move(boundaries)) {}

  void dispatch(const Tensor& x, const Tensor& topk_ids, MoeSaved& saved,
                MoeScratch& scratch) override {
    local_->dispatch(x, topk_ids, saved, scratch);
    const int32_t* offsets = saved.expert_offsets.ptr<int32_t>();
    chunks_.clear();
    chunk_offsets_.clear();
    for (size_t c = 0; c + 1 < boundaries_.size(); ++c) {
      const int64_t begin = boundaries_[c], end = boundaries_[c + 1];
      std::vector<int32_t> relative;
      for (int64_t e = begin; e <= end; ++e) relative.push_back(offsets[e] - offsets[begin]);
      chunk_offsets_.push_back(offsets_buffer(relative));
      chunks_.push_back(
          ExpertChunk{offsets[begin], offsets[end], begin, end, chunk_offsets_.back()});
    }
  }
  std::vector<ExpertChunk> chunks(const MoeSaved&) const override { return chunks_; }
  Tensor expert_output(MoeSaved& saved, MoeScratch& scratch) override {
    return local_->expert_output(saved, scratch);
  }
  void combine(MoeSaved& saved, MoeScratch& scratch, const Tensor& out) override {
    local_->combine(saved, scratch, out);
  }
  void combine_backward(const Tensor& dout, const MoeSaved& saved, MoeScratch& scratch) override {
    local_->combine_backward(dout, saved, scratch);
  }
  void dispatch_backward(const MoeSaved& saved, MoeScratch& scratch, const Tensor& dx) override {
    local_->dispatch_backward(saved, scratch, dx);
  }

 private:
  std::unique_ptr<TokenDispatcher> local_;
  std::vector<int64_t> boundaries_;
  std::vector<ExpertChunk> chunks_;
  std::vector<Buffer> chunk_offsets_;
};

struct LayerRun {
  std::vector<float> dx, drouter, dgate_up, ddown;  // ddown / dgate_up: as left in g
  // With the consumer: each call's weight, experts, rows and offsets, and the gradient the
  // consumer computed from its arguments (into its own (E, ...) tensors).
  std::vector<std::string> calls;
  std::vector<float> consumed_gate_up, consumed_down;
};

std::vector<float> values_of(const Buffer& buffer) {
  return std::vector<float>(buffer.ptr<float>(), buffer.ptr<float>() + buffer.numel());
}

LayerRun run_layer(bool take_over) {
  const ModelConfig config = layer_config();
  const int64_t N = 9, H = config.hidden_size, I = config.moe_intermediate_size;
  const int64_t E = config.num_experts, k = config.num_experts_per_tok;
  auto backend = make_cpu_backend();
  // Chunks [0, 1), [1, 2) (expert 1: no rows) and [2, 6) (expert 4 without rows inside).
  ChunkedLocalDispatcher dispatcher(*backend, E, k, {0, 1, 2, 6});
  Buffer x = random_buffer({N, H}, 1), dout = random_buffer({N, H}, 2);
  Buffer router = random_buffer({E, H}, 3), gate_up = random_buffer({E, 2 * I, H}, 4);
  Buffer down = random_buffer({E, H, I}, 5);
  Buffer drouter(DType::F32, {E, H});
  Buffer dgate_up = random_buffer({E, 2 * I, H}, 6), ddown = random_buffer({E, H, I}, 7);
  LayerWeights w, g;
  w.moe = g.moe = true;
  w.router = router;
  w.experts_gate_up = gate_up;
  w.experts_down = down;
  g.router = drouter;
  g.experts_gate_up = dgate_up;
  g.experts_down = ddown;
  MoeSaved saved;
  MoeScratch scratch;
  allocate_moe(config, N, DType::F32, Device::CPU, saved);
  allocate_moe_scratch(config, N, DType::F32, Device::CPU, scratch);
  const std::vector<int32_t> ids = {0, 2, 2, 3, 3, 5, 5, 0, 0, 3, 2, 5, 0, 2, 3, 0, 0, 5};
  scratch.balanced_ids = Buffer(DType::I32, {N, k});
  std::copy(ids.begin(), ids.end(), scratch.balanced_ids.ptr<int32_t>());

  LayerRun run;
  Buffer consumed_gate_up(DType::F32, {E, 2 * I, H}), consumed_down(DType::F32, {E, H, I});
  ExpertGradientConsumer consumer;
  if (take_over)
    consumer = [&](ExpertWeight weight, int64_t expert_begin, int64_t expert_end, const Tensor& dy,
                   const Tensor& xs, const Tensor& offsets) {
      std::string call = weight == ExpertWeight::Down ? "down" : "gate_up";
      call += " [" + std::to_string(expert_begin) + ", " + std::to_string(expert_end) + ") rows " +
              std::to_string(dy.size(0)) + " offsets";
      for (int64_t i = 0; i < offsets.numel(); ++i)
        call += " " + std::to_string(offsets.ptr<int32_t>()[i]);
      run.calls.push_back(call);
      const Tensor into =
          weight == ExpertWeight::Down ? consumed_down.tensor() : consumed_gate_up.tensor();
      backend->grouped_gemm_weight_grad(dy, xs, offsets, into.slice_rows(expert_begin, expert_end),
                                        false);
    };
  Buffer out(DType::F32, {N, H}), dx(DType::F32, {N, H});
  moe_forward(*backend, dispatcher, config, w, x, saved, scratch, out);
  if (take_over) {  // the consumer gets whole gradients only: accumulating is refused
    EXPECT_THROW(moe_backward(*backend, dispatcher, config, w, g, x, saved, Tensor(), dout, scratch,
                              dx, /*accumulate_grads=*/true, consumer),
                 Error);
  }
  moe_backward(*backend, dispatcher, config, w, g, x, saved, Tensor(), dout, scratch, dx,
               /*accumulate_grads=*/false, consumer);
  run.dx = values_of(dx);
  run.drouter = values_of(drouter);
  run.dgate_up = values_of(dgate_up);
  run.ddown = values_of(ddown);
  run.consumed_gate_up = values_of(consumed_gate_up);
  run.consumed_down = values_of(consumed_down);
  return run;
}

TEST(FusedExpertUpdateMoe, EveryChunkHandedOverChunksWithoutRowsToo) {
  const LayerRun computed = run_layer(false);
  const LayerRun taken = run_layer(true);
  // Expert rows: 0: 6, 1: none, 2: 4, 3: 4, 4: none, 5: 4.
  const std::vector<std::string> expected = {
      "down [0, 1) rows 6 offsets 0 6",         "gate_up [0, 1) rows 6 offsets 0 6",
      "down [1, 2) rows 0 offsets 0 0",         "gate_up [1, 2) rows 0 offsets 0 0",
      "down [2, 6) rows 12 offsets 0 4 8 8 12", "gate_up [2, 6) rows 12 offsets 0 4 8 8 12"};
  EXPECT_EQ(taken.calls, expected);
  // What the consumer was given makes the gradients the backward computes.
  EXPECT_EQ(taken.consumed_down, computed.ddown);
  EXPECT_EQ(taken.consumed_gate_up, computed.dgate_up);
  // The rest of the backward is unchanged; the gradient tensors were not touched.
  EXPECT_EQ(taken.dx, computed.dx);
  EXPECT_EQ(taken.drouter, computed.drouter);
  EXPECT_EQ(taken.ddown, values_of(random_buffer({6, 8, 4}, 7)));
  EXPECT_EQ(taken.dgate_up, values_of(random_buffer({6, 8, 8}, 6)));
}

// ---- the model: arenas and the calls --------------------------------------------------------

ModelConfig tiny_config(bool tied) {
  // Layers 0 and 2 MoE, layer 1 dense (the fixture's mlp_only_layers).
  return testing::tiny_moe_config({{"num_hidden_layers", 3}, {"tie_word_embeddings", tied}},
                                  "tiny_config");
}

size_t aligned(size_t bytes) { return (bytes + 255) / 256 * 256; }

// The largest non-tied group's gradient bytes, each tensor 256-byte aligned, without the
// expert weights when `without_experts`.
size_t largest_group_bytes(const Model& model, bool without_experts) {
  const auto& experts = model.expert_weight_parameters();
  size_t largest = 0;
  for (size_t g = 0; g < model.gradient_groups().size(); ++g) {
    const GradientGroup& group = model.gradient_groups()[g];
    if (model.config().tie_word_embeddings && group.name == "embedding") continue;
    size_t bytes = 0;
    for (size_t i = group.begin; i < group.end; ++i)
      if (!without_experts || std::find(experts.begin(), experts.end(), i) == experts.end())
        bytes += aligned(model.parameters()[i].grad.bytes());
    largest = std::max(largest, bytes);
  }
  return largest;
}

TEST(FusedExpertUpdateModel, ArenaShrinksAndExpertWeightsGetNoGradient) {
  auto backend = make_cpu_backend();
  ModelOptions options;
  options.grad_storage = GradientStorage::PerGroup;
  auto model = Model::random_init(tiny_config(false), 5, *backend, options);
  std::vector<std::string> expert_names;
  for (size_t i : model->expert_weight_parameters())
    expert_names.push_back(model->parameters()[i].name);
  const std::vector<std::string> expected_names = {
      "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
      "model.layers.2.mlp.experts.gate_up_proj", "model.layers.2.mlp.experts.down_proj"};
  EXPECT_EQ(expert_names, expected_names);

  const size_t unfused_arena = model->gradient_arena_bytes();
  EXPECT_EQ(unfused_arena, largest_group_bytes(*model, false));
  std::vector<std::string> calls;
  model->set_expert_weight_update([&](size_t parameter, int64_t expert_begin, int64_t expert_end,
                                      const Tensor& dy, const Tensor& x, const Tensor& offsets) {
    calls.push_back(model->parameters()[parameter].name + " [" + std::to_string(expert_begin) +
                    ", " + std::to_string(expert_end) + ")");
    EXPECT_EQ(dy.size(0), x.size(0));
    EXPECT_EQ(offsets.numel(), expert_end - expert_begin + 1);
  });
  EXPECT_TRUE(model->has_expert_weight_update());
  const size_t fused_arena = model->gradient_arena_bytes();
  EXPECT_EQ(fused_arena, largest_group_bytes(*model, true));
  EXPECT_LT(fused_arena, unfused_arena);

  // In the hook: the expert weights have no gradient, the others theirs, inside one arena.
  size_t hooks = 0;
  model->set_gradient_ready_hook([&](size_t index) {
    const GradientGroup& group = model->gradient_groups()[index];
    const auto& experts = model->expert_weight_parameters();
    const char* lowest = nullptr;
    const char* highest = nullptr;
    for (size_t i = group.begin; i < group.end; ++i) {
      const Tensor grad = model->parameters()[i].grad;
      if (std::find(experts.begin(), experts.end(), i) != experts.end()) {
        EXPECT_EQ(grad.data, nullptr) << model->parameters()[i].name;
        continue;
      }
      ASSERT_NE(grad.data, nullptr) << model->parameters()[i].name;
      const char* begin = static_cast<const char*>(grad.data);
      lowest = lowest ? std::min(lowest, begin) : begin;
      highest = std::max(highest ? highest : begin, begin + grad.bytes());
    }
    EXPECT_LE(static_cast<size_t>(highest - lowest), fused_arena) << group.name;
    ++hooks;
  });
  const Tokens tokens = make_tokens(14, 3, model->config().vocab_size);
  model->zero_grads();
  model->forward_backward({2, 7, tokens.ids, tokens.labels, {}, {}}, 0.1f);
  EXPECT_EQ(hooks, model->gradient_groups().size());
  // Backward order: layer 2, then layer 0; down before gate_up; one chunk of all experts.
  const std::vector<std::string> expected_calls = {
      "model.layers.2.mlp.experts.down_proj [0, 4)",
      "model.layers.2.mlp.experts.gate_up_proj [0, 4)",
      "model.layers.0.mlp.experts.down_proj [0, 4)",
      "model.layers.0.mlp.experts.gate_up_proj [0, 4)"};
  EXPECT_EQ(calls, expected_calls);

  model->set_expert_weight_update({});
  EXPECT_FALSE(model->has_expert_weight_update());
  EXPECT_EQ(model->gradient_arena_bytes(), unfused_arena);

  // Whole-model gradients (accumulation) cannot be handed over.
  auto persistent = Model::random_init(tiny_config(false), 5, *backend);
  EXPECT_THROW(persistent->set_expert_weight_update(
                   [](size_t, int64_t, int64_t, const Tensor&, const Tensor&, const Tensor&) {}),
               Error);
  persistent->set_expert_weight_update({});  // off is always fine
}

// ---- InBackwardOptimizer: fused vs not ------------------------------------------------------

struct FusedCase {
  bool tied, recompute;
};

class FusedExpertUpdateTraining : public ::testing::TestWithParam<FusedCase> {};

TEST_P(FusedExpertUpdateTraining, SameWeightsStateAndNormAsUnfused) {
  const FusedCase param = GetParam();
  auto backend = make_cpu_backend();
  const ModelConfig config = tiny_config(param.tied);
  ModelOptions options;
  options.grad_storage = GradientStorage::PerGroup;
  options.recompute_layers = param.recompute;
  auto fused_model = Model::random_init(config, 17, *backend, options);
  auto unfused_model = Model::random_init(config, 17, *backend, options);
  AdamWConfig adamw_config;
  adamw_config.lr = 1e-2;
  adamw_config.weight_decay = 0.1;
  AdamW fused_adamw(fused_model->parameters(), *backend, adamw_config);
  AdamW unfused_adamw(unfused_model->parameters(), *backend, adamw_config);
  InBackwardOptions off, on;
  off.fuse_expert_updates = false;
  on.fuse_expert_updates = true;
  {
    InBackwardOptimizer fused(*fused_model, fused_adamw, on);
    InBackwardOptimizer unfused(*unfused_model, unfused_adamw, off);
    EXPECT_TRUE(fused.fuses_expert_updates());
    EXPECT_FALSE(unfused.fuses_expert_updates());
    EXPECT_TRUE(fused_model->has_expert_weight_update());
    EXPECT_FALSE(unfused_model->has_expert_weight_update());
    EXPECT_LT(fused_model->gradient_arena_bytes(), unfused_model->gradient_arena_bytes());
    for (unsigned step = 0; step < 4; ++step) {
      const double lr = 2e-2 * (step + 1);  // a schedule
      const Tokens tokens = make_tokens(2 * 7, 700 + step, config.vocab_size);
      const BatchView batch{2, 7, tokens.ids, tokens.labels, {}, {}};
      fused_model->zero_grads();
      fused.begin_step(lr);
      const StepResult a = fused_model->forward_backward(batch, 0.1f);
      unfused_model->zero_grads();
      unfused.begin_step(lr);
      const StepResult b = unfused_model->forward_backward(batch, 0.1f);
      EXPECT_EQ(a.loss_sum, b.loss_sum) << "step " << step;  // same weights so far
      const double fused_norm = fused.grad_norm(), unfused_norm = unfused.grad_norm();
      EXPECT_GT(unfused_norm, 0.0);
      EXPECT_NEAR(fused_norm, unfused_norm, 1e-6 * unfused_norm) << "step " << step;
    }
  }
  // The destructor gave the expert weights back to the group updates.
  EXPECT_FALSE(fused_model->has_expert_weight_update());
  for (size_t i : fused_model->expert_weight_parameters()) EXPECT_FALSE(fused_adamw.fused(i));
  EXPECT_EQ(fused_adamw.step_count(), 4);
  for (size_t i = 0; i < fused_model->parameters().size(); ++i)
    EXPECT_TRUE(
        same_bytes(fused_model->parameters()[i].value, unfused_model->parameters()[i].value))
        << fused_model->parameters()[i].name;
  const auto fused_state = fused_adamw.state_tensors(),
             unfused_state = unfused_adamw.state_tensors();
  ASSERT_EQ(fused_state.size(), unfused_state.size());
  for (size_t i = 0; i < fused_state.size(); ++i)
    EXPECT_TRUE(same_bytes(fused_state[i].tensor, unfused_state[i].tensor)) << fused_state[i].name;
}

INSTANTIATE_TEST_SUITE_P(Variants, FusedExpertUpdateTraining,
                         ::testing::Values(FusedCase{false, false}, FusedCase{true, false},
                                           FusedCase{false, true}),
                         [](const ::testing::TestParamInfo<FusedCase>& info) {
                           return std::string(info.param.tied ? "Tied" : "Untied") +
                                  (info.param.recompute ? "Recompute" : "");
                         });

// ---- the memory plan --------------------------------------------------------------------------

TEST(FusedExpertUpdatePlan, FewerGradientBytesAsTheModelHolds) {
  for (const bool tied : {false, true}) {
    const ModelConfig config = tiny_config(tied);
    MemoryPlanOptions options;
    options.batch = 1;
    options.seq = 16;
    options.fused_expert_updates = true;  // alone (whole-model gradients): nothing changes
    const MemoryPlan all = plan_memory(config, options);
    options.fused_expert_updates = false;
    EXPECT_EQ(all.grads, plan_memory(config, options).grads);
    options.per_group_grads = true;
    const MemoryPlan per_group = plan_memory(config, options);
    options.fused_expert_updates = true;
    const MemoryPlan fused = plan_memory(config, options);
    EXPECT_LT(fused.grads, per_group.grads) << tied;
    EXPECT_EQ(fused.weights, per_group.weights);
    EXPECT_EQ(fused.optimizer_state, per_group.optimizer_state);
    EXPECT_EQ(fused.activations, per_group.activations);
    EXPECT_EQ(fused.scratch, per_group.scratch);
    // The largest group without the routed experts (the layers' experts: E * 3 * H * I).
    const int64_t V = config.vocab_size, H = config.hidden_size;
    const int64_t experts = config.num_experts * 3 * H * config.moe_intermediate_size;
    int64_t largest = tied ? H : V * H + H;
    for (int64_t l = 0; l < config.num_hidden_layers; ++l)
      largest =
          std::max(largest, layer_parameters(config, l) - (config.layer_is_moe(l) ? experts : 0));
    EXPECT_EQ(fused.grads, (largest + (tied ? V * H : 0)) * 4) << tied;
    options.gradient_arenas = 2;
    EXPECT_EQ(plan_memory(config, options).grads, (2 * largest + (tied ? V * H : 0)) * 4) << tied;

    // The model's arena with the update set: the plan's group, up to each tensor's alignment.
    auto backend = make_cpu_backend();
    ModelOptions model_options;
    model_options.grad_storage = GradientStorage::PerGroup;
    auto model = Model::random_init(config, 1, *backend, model_options);
    model->set_expert_weight_update(
        [](size_t, int64_t, int64_t, const Tensor&, const Tensor&, const Tensor&) {});
    const auto arena = static_cast<int64_t>(model->gradient_arena_bytes());
    EXPECT_GE(arena, largest * 4) << tied;
    EXPECT_LT(arena, largest * 4 + 256 * 20) << tied;  // < 20 tensors per group
  }
}

}  // namespace
}  // namespace moetune
