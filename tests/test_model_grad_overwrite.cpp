// Gradients written, not accumulated, by the first micro-batch after zero_grads() (which is
// O(1) and zeroes nothing): the gradients then equal the old "zero, then accumulate" path
// bit for bit, whatever the buffers held before (NaN garbage here, so that a read of the old
// contents shows); later micro-batches still accumulate; experts that received no rows end
// with exactly zero gradients; and the ops' accumulate flags on their own.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "model/model.h"
#include "test_model_fixtures.h"
#include "test_util.h"

namespace moetune {
namespace {

ModelConfig tiny_config(bool tied, bool bias, int64_t experts) {
  return testing::tiny_moe_config(
      {{"num_experts", experts}, {"attention_bias", bias}, {"tie_word_embeddings", tied}},
      "tiny_config");
}

using testing::make_tokens;
using testing::Tokens;

void fill_grads(Model& model, float value) {
  for (const Parameter& parameter : model.parameters())
    std::fill_n(parameter.grad.ptr<float>(), parameter.grad.numel(), value);
}

std::vector<std::vector<float>> grads_of(const Model& model) {
  std::vector<std::vector<float>> grads;
  for (const Parameter& parameter : model.parameters())
    grads.emplace_back(parameter.grad.ptr<float>(),
                       parameter.grad.ptr<float>() + parameter.grad.numel());
  return grads;
}

// Bitwise equal up to the sign of zero (0 + x is x except for x = -0).
void expect_same(const Model& model, const std::vector<std::vector<float>>& actual,
                 const std::vector<std::vector<float>>& expected) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    ASSERT_EQ(actual[i].size(), expected[i].size());
    size_t different = 0;
    for (size_t j = 0; j < actual[i].size(); ++j)
      different += actual[i][j] == expected[i][j] ? 0 : 1;
    EXPECT_EQ(different, 0u) << model.parameters()[i].name;
  }
}

// The old path: zeroed gradients, accumulated into (a backward that accumulates).
std::vector<std::vector<float>> zero_then_accumulate(Model& model,
                                                     const std::vector<BatchView>& batches,
                                                     float scale) {
  model.zero_grads();
  model.forward_backward(batches.front(), scale);  // leaves the model accumulating
  fill_grads(model, 0.0f);
  for (const BatchView& batch : batches) model.forward_backward(batch, scale);
  return grads_of(model);
}

class GradOverwrite : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

TEST_P(GradOverwrite, FirstMicroBatchOverwritesExactlyAsZeroThenAccumulate) {
  const auto [tied, bias] = GetParam();
  auto backend = make_cpu_backend();
  const ModelConfig config = tiny_config(tied, bias, 4);
  auto model = Model::random_init(config, 17, *backend);
  const Tokens tokens = make_tokens(4 * 6, 3, config.vocab_size);
  const std::span<const int32_t> ids(tokens.ids), labels(tokens.labels);
  const BatchView first{2, 6, ids.first(12), labels.first(12), {}, {}};
  const BatchView second{2, 6, ids.last(12), labels.last(12), {}, {}};

  // One micro-batch.
  const auto expected_one = zero_then_accumulate(*model, {first}, 0.05f);
  fill_grads(*model, std::numeric_limits<float>::quiet_NaN());
  model->zero_grads();
  model->forward_backward(first, 0.05f);
  expect_same(*model, grads_of(*model), expected_one);

  // Two micro-batches: the second accumulates onto the first.
  const auto expected_two = zero_then_accumulate(*model, {first, second}, 0.05f);
  fill_grads(*model, std::numeric_limits<float>::quiet_NaN());
  model->zero_grads();
  model->forward_backward(first, 0.05f);
  model->forward_backward(second, 0.05f);
  expect_same(*model, grads_of(*model), expected_two);

  // A micro-batch without a loss gradient (loss_scale 0) still overwrites every gradient.
  const auto expected_zero_scale = zero_then_accumulate(*model, {first}, 0.0f);
  fill_grads(*model, std::numeric_limits<float>::quiet_NaN());
  model->zero_grads();
  model->forward_backward(first, 0.0f);
  expect_same(*model, grads_of(*model), expected_zero_scale);
}

INSTANTIATE_TEST_SUITE_P(TiedAndBias, GradOverwrite,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()));

TEST(GradOverwriteExperts, ExpertsWithoutRowsEndWithZeroGradients) {
  auto backend = make_cpu_backend();
  const ModelConfig config = tiny_config(false, false, 16);
  auto model = Model::random_init(config, 29, *backend);
  // 2 tokens x top-2: at most 4 of the 16 experts receive rows.
  const Tokens tokens = make_tokens(2, 7, config.vocab_size);
  const BatchView batch{1, 2, tokens.ids, tokens.labels, {}, {}};
  fill_grads(*model, std::numeric_limits<float>::quiet_NaN());
  model->zero_grads();
  model->forward_backward(batch, 0.5f);
  int empty_experts = 0, busy_experts = 0;
  for (const Parameter& parameter : model->parameters()) {
    const float* grad = parameter.grad.ptr<float>();
    for (int64_t i = 0; i < parameter.grad.numel(); ++i)
      ASSERT_TRUE(std::isfinite(grad[i])) << parameter.name << "[" << i << "]";
    if (!parameter.expert) continue;
    const int64_t expert_size = parameter.grad.numel() / parameter.grad.size(0);
    for (int64_t e = 0; e < parameter.grad.size(0); ++e) {
      const bool zero = std::all_of(grad + e * expert_size, grad + (e + 1) * expert_size,
                                    [](float g) { return g == 0.0f; });
      (zero ? empty_experts : busy_experts) += 1;
    }
  }
  EXPECT_GE(empty_experts, 2 * 12);  // gate_up and down of >= 12 experts
  EXPECT_GE(busy_experts, 2);
}

TEST(GradOverwriteOps, AccumulateFalseOverwritesWithoutReading) {
  auto backend = make_cpu_backend();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // bias_backward: dbias = column sums
  std::vector<float> dy = {1, 2, 3, 4, 5, 6}, dbias = {nan, nan, nan};
  backend->bias_backward(Tensor(dy.data(), DType::F32, {2, 3}),
                         Tensor(dbias.data(), DType::F32, {3}), false);
  EXPECT_EQ(dbias, (std::vector<float>{5, 7, 9}));
  backend->bias_backward(Tensor(dy.data(), DType::F32, {2, 3}),
                         Tensor(dbias.data(), DType::F32, {3}), true);
  EXPECT_EQ(dbias, (std::vector<float>{10, 14, 18}));

  // rmsnorm_backward: dweight overwritten equals zero + accumulated
  std::vector<float> x = testing::random_floats(8, 1), dout = testing::random_floats(8, 2);
  std::vector<float> weight = {1.0f, 0.5f, -1.0f, 2.0f}, rstd(2), out(8), dx(8);
  backend->rmsnorm_forward(
      Tensor(x.data(), DType::F32, {2, 4}), Tensor(weight.data(), DType::F32, {4}), 1e-6f,
      Tensor(out.data(), DType::F32, {2, 4}), Tensor(rstd.data(), DType::F32, {2}));
  std::vector<float> dweight_zeroed(4, 0.0f), dweight_garbage(4, nan);
  for (auto* dweight : {&dweight_zeroed, &dweight_garbage})
    backend->rmsnorm_backward(
        Tensor(dout.data(), DType::F32, {2, 4}), Tensor(x.data(), DType::F32, {2, 4}),
        Tensor(weight.data(), DType::F32, {4}), Tensor(rstd.data(), DType::F32, {2}),
        Tensor(dx.data(), DType::F32, {2, 4}), Tensor(dweight->data(), DType::F32, {4}), false,
        dweight == &dweight_zeroed);
  EXPECT_EQ(dweight_garbage, dweight_zeroed);

  // grouped_gemm_weight_grad: experts 0 and 2 have no rows and end at zero.
  const int64_t P = 3, Q = 2, rows = 4;
  std::vector<float> gdy = testing::random_floats(rows * P, 3),
                     gx = testing::random_floats(rows * Q, 4);
  std::vector<int32_t> offsets = {0, 0, 4, 4};
  std::vector<float> dw_zeroed(3 * P * Q, 0.0f), dw_garbage(3 * P * Q, nan);
  for (auto* dw : {&dw_zeroed, &dw_garbage})
    backend->grouped_gemm_weight_grad(Tensor(gdy.data(), DType::F32, {rows, P}),
                                      Tensor(gx.data(), DType::F32, {rows, Q}),
                                      Tensor(offsets.data(), DType::I32, {4}),
                                      Tensor(dw->data(), DType::F32, {3, P, Q}), dw == &dw_zeroed);
  EXPECT_EQ(dw_garbage, dw_zeroed);
  for (int64_t i = 0; i < P * Q; ++i) {
    EXPECT_EQ(dw_garbage[i], 0.0f);
    EXPECT_EQ(dw_garbage[2 * P * Q + i], 0.0f);
  }
}

}  // namespace
}  // namespace moetune
