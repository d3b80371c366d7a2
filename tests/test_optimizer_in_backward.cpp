// Optimizer in the backward with per-group gradient storage: AdamW applied to each gradient
// group inside the gradient-ready hook gives weights bit-identical to the whole-model step
// after several steps (tied and untied embeddings); gradients exist only inside the hook
// (Parameter::grad valid there, for data-parallel reductions); a second micro-batch without
// zero_grads() is refused; the memory plan counts one group (two with side-stream updates);
// the recipe key resolves auto and rejects true with accumulation or clipping; the trainer's
// run matches the normal path. InBackwardOptimizer (the class the trainer and the bench use)
// gives the same weights and the whole-model gradient norm; with a side stream the model
// rotates the groups through two arenas and orders them with fences (a recording fake side
// stream on the CPU checks the sequence; tests/cuda/test_cuda_optimizer_in_backward.cpp runs
// the real overlap).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <memory>

#include "core/error.h"
#include "model/memory_plan.h"
#include "model/model.h"
#include "test_model_fixtures.h"
#include "test_util.h"
#include "train/adamw.h"
#include "train/metrics.h"
#include "train/optimizer_in_backward.h"
#include "train/recipe.h"
#include "train/trainer.h"

namespace moetune {
namespace {

namespace fs = std::filesystem;

ModelConfig tiny_config(bool tied) {
  return testing::tiny_moe_config({{"num_hidden_layers", 3}, {"tie_word_embeddings", tied}},
                                  "tiny_config");
}

using testing::make_tokens;
using testing::Tokens;

float host_value(Backend& backend, const Tensor& scalar) {
  float value = 0;
  backend.copy(Tensor(&value, DType::F32, {1}), scalar);
  backend.synchronize();
  return value;
}

// The training loop the bit-identity tests share: two copies of the tiny model from one
// seed, `normal` (whole-model gradients, AdamW step after the backward) and `per_group`
// (per-group gradient storage, updated by the hook or optimizer the test installs), each
// with its own AdamW (lr 1e-2, `weight_decay`).
struct TwinModels {
  TwinModels(bool tied, uint64_t seed, double weight_decay) : config(tiny_config(tied)) {
    ModelOptions per_group_options;
    per_group_options.grad_storage = GradientStorage::PerGroup;
    normal = Model::random_init(config, seed, *backend);
    per_group = Model::random_init(config, seed, *backend, per_group_options);
    AdamWConfig adamw_config;
    adamw_config.lr = 1e-2;
    adamw_config.weight_decay = weight_decay;
    normal_adamw = std::make_unique<AdamW>(normal->parameters(), *backend, adamw_config);
    per_group_adamw = std::make_unique<AdamW>(per_group->parameters(), *backend, adamw_config);
  }

  // One step on 2 rows of `seq` tokens drawn from `seed`: the normal model's backward, then
  // its AdamW step at `lr`; the per-group model's zero_grads, `begin_step` (the test's
  // per-step setup, e.g. the optimizer's begin_step), then its backward. Expects equal
  // losses; returns the normal model's gradient norm (before its step).
  double step(unsigned seed, int64_t seq, double lr, const std::function<void()>& begin_step) {
    const Tokens tokens = make_tokens(2 * seq, seed, config.vocab_size);
    const BatchView batch{2, seq, tokens.ids, tokens.labels, {}, {}};
    normal->zero_grads();
    const StepResult a = normal->forward_backward(batch, 0.1f);
    std::vector<Tensor> grads;
    for (const Parameter& parameter : normal->parameters()) grads.push_back(parameter.grad);
    Buffer norm_squared(DType::F32, {1}, backend->device());
    backend->grad_norm_squared(grads, norm_squared);
    const double norm = std::sqrt(host_value(*backend, norm_squared));
    normal_adamw->step(lr);
    per_group->zero_grads();
    begin_step();
    const StepResult b = per_group->forward_backward(batch, 0.1f);
    EXPECT_EQ(a.loss_sum, b.loss_sum) << "step of seed " << seed;
    return norm;
  }

  void expect_same_weights() const {
    for (size_t i = 0; i < normal->parameters().size(); ++i) {
      const Tensor x = normal->parameters()[i].value, y = per_group->parameters()[i].value;
      ASSERT_EQ(x.numel(), y.numel());
      EXPECT_TRUE(std::equal(x.ptr<float>(), x.ptr<float>() + x.numel(), y.ptr<float>()))
          << normal->parameters()[i].name;
    }
  }

  std::unique_ptr<Backend> backend = make_cpu_backend();
  ModelConfig config;
  std::unique_ptr<Model> normal, per_group;
  std::unique_ptr<AdamW> normal_adamw, per_group_adamw;
};

class OptimizerInBackward : public ::testing::TestWithParam<bool> {};

TEST_P(OptimizerInBackward, WeightsBitIdenticalToTheWholeModelStep) {
  TwinModels twins(/*tied=*/GetParam(), /*seed=*/41, /*weight_decay=*/0.1);
  Model& in_backward = *twins.per_group;
  const double lr = 3e-2;
  std::vector<size_t> reported;
  in_backward.set_gradient_ready_hook([&](size_t index) {
    const GradientGroup& group = in_backward.gradient_groups()[index];
    for (size_t i = group.begin; i < group.end; ++i)
      ASSERT_NE(in_backward.parameters()[i].grad.data, nullptr) << in_backward.parameters()[i].name;
    reported.push_back(index);
    twins.per_group_adamw->update(group.begin, group.end, lr);
  });
  for (unsigned step = 0; step < 4; ++step)
    twins.step(100 + step, 7, lr, [&] { twins.per_group_adamw->begin_step(); });
  EXPECT_EQ(reported.size(), 4 * in_backward.gradient_groups().size());
  EXPECT_EQ(twins.normal_adamw->step_count(), twins.per_group_adamw->step_count());
  twins.expect_same_weights();
  // Outside the hook the per-group gradients are returned.
  for (const Parameter& parameter : in_backward.parameters())
    EXPECT_EQ(parameter.grad.data, nullptr) << parameter.name;
  EXPECT_THROW(in_backward.hf_tensors_to_host(true), Error);
}

INSTANTIATE_TEST_SUITE_P(Tied, OptimizerInBackward, ::testing::Bool());

TEST(OptimizerInBackwardModel, OneMicroBatchPerStep) {
  auto backend = make_cpu_backend();
  const ModelConfig config = tiny_config(false);
  ModelOptions options;
  options.grad_storage = GradientStorage::PerGroup;
  auto model = Model::random_init(config, 3, *backend, options);
  const Tokens tokens = make_tokens(6, 5, config.vocab_size);
  const BatchView batch{1, 6, tokens.ids, tokens.labels, {}, {}};
  model->zero_grads();
  model->forward_backward(batch, 0.2f);
  try {
    model->forward_backward(batch, 0.2f);
    FAIL() << "a second micro-batch was accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("zero_grads"), std::string::npos) << error.what();
  }
  model->evaluate(batch);  // forward only: fine
}

TEST(OptimizerInBackwardPlan, GradientsOfOneGroup) {
  for (const bool tied : {false, true}) {
    const ModelConfig config = tiny_config(tied);
    MemoryPlanOptions options;
    options.batch = 1;
    options.seq = 16;
    const MemoryPlan all = plan_memory(config, options);
    options.per_group_grads = true;
    const MemoryPlan per_group = plan_memory(config, options);
    EXPECT_EQ(all.weights, per_group.weights);
    EXPECT_EQ(all.activations, per_group.activations);
    // The largest group: the untied head / embedding (V*H + H, V*H) or a MoE layer.
    const int64_t V = config.vocab_size, H = config.hidden_size;
    int64_t largest = tied ? H : V * H + H;
    for (int64_t l = 0; l < config.num_hidden_layers; ++l)
      largest = std::max(largest, layer_parameters(config, l));
    EXPECT_EQ(per_group.grads, (largest + (tied ? V * H : 0)) * 4) << tied;
    EXPECT_LT(per_group.grads, all.grads);
    options.gradient_arenas = 2;  // updates on a side stream: a ring of two arenas
    EXPECT_EQ(plan_memory(config, options).grads, (2 * largest + (tied ? V * H : 0)) * 4) << tied;
  }
}

// ---- InBackwardOptimizer ----------------------------------------------------------------

class InBackwardOptimizerTest : public ::testing::TestWithParam<bool> {};

TEST_P(InBackwardOptimizerTest, SameWeightsAndGradNormAsTheWholeModelStep) {
  TwinModels twins(/*tied=*/GetParam(), /*seed=*/7, /*weight_decay=*/0.1);
  Model& in_backward = *twins.per_group;
  {
    InBackwardOptimizer optimizer(in_backward, *twins.per_group_adamw, InBackwardOptions{});
    EXPECT_FALSE(optimizer.overlapping());  // the CPU has no streams: inline in the hook
    EXPECT_EQ(in_backward.gradient_arenas(), 1);
    for (unsigned step = 0; step < 3; ++step) {
      const double lr = 2e-2 * (step + 1);  // a schedule
      const double normal_norm = twins.step(300 + step, 7, lr, [&] { optimizer.begin_step(lr); });
      EXPECT_GT(normal_norm, 0.0);
      EXPECT_NEAR(optimizer.grad_norm(), normal_norm, 1e-5 * normal_norm) << "step " << step;
    }
  }
  EXPECT_EQ(twins.per_group_adamw->step_count(), 3);
  twins.expect_same_weights();
  // The destructor removed the hook: a step now leaves the weights alone.
  std::vector<std::vector<float>> before;
  for (const Parameter& parameter : in_backward.parameters())
    before.emplace_back(parameter.value.ptr<float>(),
                        parameter.value.ptr<float>() + parameter.value.numel());
  const Tokens tokens = make_tokens(7, 9, twins.config.vocab_size);
  in_backward.zero_grads();
  in_backward.forward_backward({1, 7, tokens.ids, tokens.labels, {}, {}}, 0.1f);
  for (size_t i = 0; i < before.size(); ++i) {
    const Tensor y = in_backward.parameters()[i].value;
    EXPECT_TRUE(std::equal(before[i].begin(), before[i].end(), y.ptr<float>()));
  }
}

TEST(InBackwardOptimizerNorms, OffRefusesGradNorm) {
  auto backend = make_cpu_backend();
  ModelOptions options;
  options.grad_storage = GradientStorage::PerGroup;
  auto model = Model::random_init(tiny_config(false), 7, *backend, options);
  AdamW adamw(model->parameters(), *backend, AdamWConfig{});
  InBackwardOptions in_backward_options;
  in_backward_options.grad_norm = false;
  InBackwardOptimizer optimizer(*model, adamw, in_backward_options);
  EXPECT_THROW(optimizer.grad_norm(), Error);
}

// A side stream that only records what the model asks of it (the CPU runs everything in
// order, so the ops stay correct): checks the ring of arenas and the fences around it.
class RecordingSideStream final : public Backend::SideStream {
 public:
  std::vector<std::string> calls;
  void* handle() const override { return nullptr; }
  void wait_for_ops() override { calls.push_back("wait"); }
  void join() override { calls.push_back("join"); }
  void record_fence(int fence) override { calls.push_back("record " + std::to_string(fence)); }
  void join_fence(int fence) override { calls.push_back("join " + std::to_string(fence)); }
  void begin_ops() override { calls.push_back("begin"); }
  void end_ops() override { calls.push_back("end"); }
};

TEST_P(InBackwardOptimizerTest, SideStreamRingOfTwoArenasWithFences) {
  const bool tied = GetParam();
  TwinModels twins(tied, /*seed=*/11, /*weight_decay=*/0.0);
  Model& model = *twins.per_group;
  RecordingSideStream side;
  model.set_gradient_side_stream(&side);
  EXPECT_EQ(model.gradient_arenas(), 2);
  std::vector<const void*> arena_of_group;  // the group's first gradient's address
  const double lr = 3e-2;
  model.set_gradient_ready_hook([&](size_t index) {
    const GradientGroup& group = model.gradient_groups()[index];
    arena_of_group.push_back(model.parameters()[group.begin].grad.data);
    side.calls.push_back("hook " + group.name);
    SideStreamOps on_side(&side);
    twins.per_group_adamw->update(group.begin, group.end, lr);
  });
  for (unsigned step = 0; step < 2; ++step) {
    twins.step(500 + step, 6, lr, [&] {
      side.calls.clear();
      arena_of_group.clear();
      twins.per_group_adamw->begin_step();
    });

    // head, layer.2, layer.1, layer.0, embedding: the ring alternates 0, 1, 0, 1 (, 0); each
    // bind joins its slot's fence, each hook's side work is followed by the slot's record;
    // a tied embedding has its own arena (no fence); the step ends with a join.
    std::vector<std::string> expected = {"join 0"};
    const auto& groups = model.gradient_groups();
    int slot = 0;
    for (size_t g = 0; g < groups.size(); ++g) {
      const bool tied_group = tied && groups[g].name == "embedding";
      if (g > 0 && !tied_group) expected.push_back("join " + std::to_string(slot));
      expected.insert(expected.end(), {"hook " + groups[g].name, "begin", "end"});
      if (!tied_group) expected.push_back("record " + std::to_string(slot));
      if (!tied_group) slot = 1 - slot;
    }
    expected.push_back("join");
    EXPECT_EQ(side.calls, expected) << "step " << step;

    ASSERT_EQ(arena_of_group.size(), groups.size());
    for (size_t g = 2; g < groups.size(); ++g) {
      if (tied && g + 1 == groups.size()) continue;
      EXPECT_EQ(arena_of_group[g], arena_of_group[g - 2]) << groups[g].name;
      EXPECT_NE(arena_of_group[g], arena_of_group[g - 1]) << groups[g].name;
    }
    if (tied) {
      for (size_t g = 0; g + 1 < groups.size(); ++g)
        EXPECT_NE(arena_of_group.back(), arena_of_group[g]);
    }
  }
  twins.expect_same_weights();
  model.set_gradient_side_stream(nullptr);
  EXPECT_EQ(model.gradient_arenas(), 1);
}

INSTANTIATE_TEST_SUITE_P(Tied, InBackwardOptimizerTest, ::testing::Bool());

// ---- recipe and trainer -----------------------------------------------------------------

std::vector<RecipeOverride> overrides_of(const std::vector<std::string>& arguments) {
  std::vector<RecipeOverride> overrides;
  for (const auto& argument : arguments) overrides.push_back(parse_override(argument));
  return overrides;
}

Recipe demo_recipe(const std::vector<std::string>& extra) {
  std::vector<std::string> arguments = {
      "--training.max_steps=3",   "--training.seq_len=48",
      "--training.micro_batch=2", "--training.global_batch_sequences=2",
      "--training.eval_every=0",  "--training.eval_batches=1",
      "--checkpoint.every=0",     "--checkpoint.save_final_hf=false",
      "--logging.every=1",        "--logging.progress=none",
      "--optimizer.grad_clip=0"};
  arguments.insert(arguments.end(), extra.begin(), extra.end());
  return load_recipe(testing::source_dir() / "recipes" / "demo.yaml", overrides_of(arguments));
}

TEST(OptimizerInBackwardRecipe, AutoTrueFalse) {
  EXPECT_TRUE(demo_recipe({}).optimizer_in_backward());  // auto: 1 micro-batch, no clipping
  EXPECT_FALSE(demo_recipe({"--training.optimizer_in_backward=false"}).optimizer_in_backward());
  EXPECT_FALSE(demo_recipe({"--optimizer.grad_clip=1.0"}).optimizer_in_backward());
  EXPECT_FALSE(demo_recipe({"--training.global_batch_sequences=4"}).optimizer_in_backward());
  // Several ranks: one micro-batch (of 2 rows) per rank.
  EXPECT_TRUE(demo_recipe({"--training.global_batch_sequences=4"}).optimizer_in_backward(2));
  EXPECT_FALSE(demo_recipe({"--training.global_batch_sequences=8"}).optimizer_in_backward(2));
  EXPECT_TRUE(
      demo_recipe({"--training.global_batch_sequences=4", "--training.optimizer_in_backward=true"})
          .optimizer_in_backward(2));
  for (const std::string bad :
       {"--optimizer.grad_clip=1.0", "--training.global_batch_sequences=4"}) {
    try {
      demo_recipe({"--training.optimizer_in_backward=true", bad}).optimizer_in_backward(1);
      FAIL() << "accepted with " << bad;
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find("training.optimizer_in_backward"), std::string::npos)
          << error.what();
    }
  }
  EXPECT_THROW(demo_recipe({"--training.optimizer_in_backward=maybe"}), Error);
}

TEST(OptimizerInBackwardTrain, SameRunAsTheNormalPath) {
  testing::TempDir dir;
  auto backend = make_cpu_backend();
  train(demo_recipe({"--training.optimizer_in_backward=false"}), TrainOptions{dir / "normal"},
        *backend);
  train(demo_recipe({"--training.optimizer_in_backward=true"}), TrainOptions{dir / "in_backward"},
        *backend);
  const auto normal = read_metrics(dir / "normal" / "metrics.jsonl");
  const auto in_backward = read_metrics(dir / "in_backward" / "metrics.jsonl");
  ASSERT_EQ(normal.size(), in_backward.size());
  ASSERT_GE(normal.size(), 3u);
  for (size_t i = 0; i < normal.size(); ++i) {
    if (normal[i].value("eval", false)) {
      EXPECT_EQ(normal[i].at("eval_loss"), in_backward[i].at("eval_loss")) << "row " << i;
      continue;
    }
    EXPECT_EQ(normal[i].at("loss"), in_backward[i].at("loss")) << "row " << i;
    // Summed per group instead of over all tensors at once: equal to rounding.
    EXPECT_NEAR(normal[i].at("grad_norm").get<double>(),
                in_backward[i].at("grad_norm").get<double>(),
                1e-5 * normal[i].at("grad_norm").get<double>())
        << "row " << i;
  }
}

}  // namespace
}  // namespace moetune
