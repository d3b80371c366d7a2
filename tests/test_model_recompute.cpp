// Model options for training at scale and benchmarking, on the CPU backend:
// recompute_layers (activation checkpointing per layer) gives the same loss, aux loss and
// gradients as keeping every layer's activations, and the memory plan shrinks accordingly;
// balanced_routing sends every expert the same number of rows while the router still learns
// through its top-k weights (finite differences of the loss match the router's gradient).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "model/memory_plan.h"
#include "model/model.h"
#include "test_model_fixtures.h"
#include "test_util.h"

namespace moetune {
namespace {

ModelConfig three_layer_config() {  // MoE, dense, MoE: both shared activation kinds in use
  return testing::tiny_moe_config({{"num_hidden_layers", 3}}, "three_layer_config");
}

using testing::Tokens;

// Labels masked less often than the fixture's default.
Tokens make_tokens(int64_t count, unsigned seed, int64_t vocab) {
  return testing::make_tokens(count, seed, vocab, 0.8f);
}

TEST(ModelRecompute, SameLossAndGradientsAsSavingEveryLayer) {
  auto backend = make_cpu_backend();
  const ModelConfig config = three_layer_config();
  ModelOptions recompute;
  recompute.recompute_layers = true;
  auto plain_model = Model::random_init(config, 17, *backend);
  auto recompute_model = Model::random_init(config, 17, *backend, recompute);
  const Tokens tokens = make_tokens(2 * 7, 3, config.vocab_size);
  const BatchView batch{2, 7, tokens.ids, tokens.labels, {}, {}};
  // Two steps each (activations reused across calls), gradients accumulated.
  StepResult plain, again;
  for (int step = 0; step < 2; ++step) {
    plain = plain_model->forward_backward(batch, 0.05f);
    again = recompute_model->forward_backward(batch, 0.05f);
  }
  EXPECT_EQ(plain.trained_tokens, again.trained_tokens);
  EXPECT_DOUBLE_EQ(plain.loss_sum, again.loss_sum);
  ASSERT_TRUE(again.has_aux_loss);
  EXPECT_DOUBLE_EQ(plain.aux_loss, again.aux_loss);
  const auto expected = plain_model->hf_tensors_to_host(true);
  const auto actual = recompute_model->hf_tensors_to_host(true);
  ASSERT_EQ(expected.size(), actual.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    double norm = 0;
    for (float value : expected[i].values) norm += double(value) * value;
    EXPECT_GT(norm, 0.0) << expected[i].name;  // every parameter gets a gradient
    EXPECT_LE(testing::relative_error(actual[i].values.data(), expected[i].values.data(),
                                      expected[i].values.size()),
              1e-6)
        << expected[i].name;
  }
  // Evaluation (forward only) agrees too.
  EXPECT_DOUBLE_EQ(plain_model->evaluate(batch).loss_sum,
                   recompute_model->evaluate(batch).loss_sum);
}

TEST(ModelRecompute, MemoryPlanKeepsOneLayerPerKind) {
  ModelConfig config = three_layer_config();
  MemoryPlanOptions options{DType::BF16, DType::BF16, 2, 512};
  const MemoryPlan saved = plan_memory(config, options);
  options.recompute_layers = true;
  const MemoryPlan recomputed = plan_memory(config, options);
  EXPECT_EQ(saved.weights, recomputed.weights);
  EXPECT_EQ(saved.scratch, recomputed.scratch);
  // Layers 0 and 2 are both MoE: recomputing drops exactly one MoE layer's activations
  // (all but its residual stream input), so the difference equals layer 2's share.
  config.num_hidden_layers = 2;  // MoE + dense
  options.recompute_layers = false;
  const MemoryPlan two_layers = plan_memory(config, options);
  const int64_t residual = int64_t(2) * 512 * config.hidden_size * 2;
  EXPECT_EQ(recomputed.activations, two_layers.activations + residual);
  EXPECT_LT(recomputed.activations, saved.activations);
}

TEST(ModelBalancedRouting, RouterStillLearnsThroughTheWeights) {
  auto backend = make_cpu_backend();
  ModelConfig config = three_layer_config();
  config.output_router_logits = false;
  ModelOptions balanced;
  balanced.balanced_routing = true;
  auto real_model = Model::random_init(config, 23, *backend);
  auto model = Model::random_init(config, 23, *backend, balanced);
  const Tokens tokens = make_tokens(2 * 6, 8, config.vocab_size);
  const BatchView batch{2, 6, tokens.ids, tokens.labels, {}, {}};
  // Balanced dispatch changes the experts each token sees, hence the loss.
  const double real_loss = real_model->evaluate(batch).loss_sum;
  model->zero_grads();
  const StepResult result = model->forward_backward(batch, 1.0f);
  EXPECT_GT(std::abs(result.loss_sum - real_loss), 1e-6);

  int checked = 0;
  for (const Parameter& parameter : model->parameters()) {
    const bool router = parameter.name.find("mlp.gate.weight") != std::string::npos;
    const bool experts = parameter.name.find("experts") != std::string::npos;
    if (!router && !experts) continue;
    float* values = parameter.value.ptr<float>();
    const float* grads = parameter.grad.ptr<float>();
    std::vector<int64_t> order(parameter.value.numel());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
    std::partial_sort(order.begin(), order.begin() + 3, order.end(), [&](int64_t a, int64_t b) {
      return std::abs(grads[a]) > std::abs(grads[b]);
    });
    for (int pick = 0; pick < 3; ++pick) {
      const int64_t index = order[pick];
      const float original = values[index];
      const float step = 1e-3f * std::max(1.0f, std::abs(original));
      const double center = model->evaluate(batch).loss_sum;
      values[index] = original + step;
      const double plus = model->evaluate(batch).loss_sum;
      values[index] = original - step;
      const double minus = model->evaluate(batch).loss_sum;
      values[index] = original;
      // A top-k flip changes which weights are used: accept a one-sided difference then.
      const double h = step, grad = grads[index], tolerance = 3e-2 * std::abs(grad) + 2e-3;
      const bool matches = std::abs((plus - minus) / (2 * h) - grad) <= tolerance ||
                           std::abs((plus - center) / h - grad) <= tolerance ||
                           std::abs((center - minus) / h - grad) <= tolerance;
      EXPECT_TRUE(matches) << parameter.name << "[" << index << "]: backward " << grad
                           << ", finite difference " << (plus - minus) / (2 * h);
      EXPECT_NE(grad, 0.0) << parameter.name;
      ++checked;
    }
  }
  EXPECT_GE(checked, 12);
}

}  // namespace
}  // namespace moetune
