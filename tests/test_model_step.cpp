// The model's step on its own terms: a finite-difference check of the whole loss
// (cross-entropy + aux loss) of a tiny Qwen3-MoE with a dense layer w.r.t. entries of
// every kind of parameter; packed rows (doc_offsets + position_ids) giving the same loss
// and gradients as the documents in separate rows; gradient accumulation over two
// micro-batches equal to one batch; and bad batches rejected with a message.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "model/model.h"
#include "test_model_fixtures.h"
#include "test_util.h"

namespace moetune {
namespace {

ModelConfig tiny_moe_config(bool aux) {
  return testing::tiny_moe_config({{"output_router_logits", aux}});
}

using testing::make_tokens;
using testing::Tokens;

double total_loss(const StepResult& result, const ModelConfig& config, double scale) {
  return result.loss_sum * scale +
         (result.has_aux_loss ? config.router_aux_loss_coef * result.aux_loss : 0.0);
}

TEST(ModelStep, FiniteDifferencesMatchTheBackward) {
  auto backend = make_cpu_backend();
  const ModelConfig config = tiny_moe_config(true);
  auto model = Model::random_init(config, 11, *backend);
  const Tokens tokens = make_tokens(2 * 6, 5, config.vocab_size);
  BatchView batch{2, 6, tokens.ids, tokens.labels, {}, {}};

  model->zero_grads();
  StepResult first = model->forward_backward(batch, 1.0f, 1.0f);
  ASSERT_TRUE(first.has_aux_loss);
  const double scale = 1.0 / static_cast<double>(first.trained_tokens);
  model->zero_grads();
  model->forward_backward(batch, static_cast<float>(scale), 1.0f);

  int checked = 0;
  for (const Parameter& parameter : model->parameters()) {
    float* values = parameter.value.ptr<float>();
    const float* grads = parameter.grad.ptr<float>();
    // The two entries with the largest gradient of every parameter.
    std::vector<int64_t> order(parameter.value.numel());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
    std::partial_sort(order.begin(), order.begin() + 2, order.end(), [&](int64_t a, int64_t b) {
      return std::abs(grads[a]) > std::abs(grads[b]);
    });
    for (int pick = 0; pick < 2; ++pick) {
      const int64_t index = order[pick];
      const float original = values[index];
      const float step = 1e-3f * std::max(1.0f, std::abs(original));
      const double center = total_loss(model->evaluate(batch), config, scale);
      values[index] = original + step;
      const double plus = total_loss(model->evaluate(batch), config, scale);
      values[index] = original - step;
      const double minus = total_loss(model->evaluate(batch), config, scale);
      values[index] = original;
      // A perturbation may flip a top-k choice (the loss jumps there): accept the central
      // difference or, when a flip spoils one side, the one-sided difference of the other.
      const double h = static_cast<double>(step), grad = grads[index];
      const double tolerance = 3e-2 * std::abs(grad) + 2e-3;
      const double central = (plus - minus) / (2 * h), forward = (plus - center) / h,
                   backward = (center - minus) / h;
      const bool matches = std::abs(central - grad) <= tolerance ||
                           std::abs(forward - grad) <= tolerance ||
                           std::abs(backward - grad) <= tolerance;
      EXPECT_TRUE(matches) << parameter.name << "[" << index << "]: backward " << grad
                           << ", finite differences " << central << " / " << forward << " / "
                           << backward;
      ++checked;
    }
  }
  EXPECT_GT(checked, 20);
}

TEST(ModelStep, PackedRowsEqualSeparateRows) {
  auto backend = make_cpu_backend();
  const ModelConfig config = tiny_moe_config(false);  // aux loss counts all rows: off here
  auto model = Model::random_init(config, 3, *backend);
  // Two documents of 5 and 7 tokens: packed in one row of 12 vs. padded in two rows.
  const Tokens doc = make_tokens(12, 9, config.vocab_size);
  std::vector<int32_t> packed_labels = doc.labels;
  packed_labels[5] = -100;  // the first token of the second document predicts nothing
  std::vector<int32_t> positions = {0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6};
  std::vector<int32_t> offsets = {0, 5, 12};
  BatchView packed{1, 12, doc.ids, packed_labels, positions, offsets};

  std::vector<int32_t> ids(14, 0), labels(14, -100);
  for (int i = 0; i < 5; ++i) ids[i] = doc.ids[i], labels[i] = doc.labels[i];
  for (int i = 0; i < 7; ++i) ids[7 + i] = doc.ids[5 + i], labels[7 + i] = doc.labels[5 + i];
  labels[7] = -100;
  // Row 0 holds document 1 then padding (never attended to by earlier tokens, not trained).
  BatchView separate{2, 7, ids, labels, {}, {}};

  model->zero_grads();
  const StepResult a = model->forward_backward(packed, 1.0f);
  std::vector<std::vector<float>> packed_grads;
  for (const auto& tensor : model->hf_tensors_to_host(true)) packed_grads.push_back(tensor.values);
  model->zero_grads();
  const StepResult b = model->forward_backward(separate, 1.0f);
  EXPECT_EQ(a.trained_tokens, b.trained_tokens);
  EXPECT_NEAR(a.loss_sum, b.loss_sum, 1e-4 * std::abs(b.loss_sum));
  const auto separate_grads = model->hf_tensors_to_host(true);
  for (size_t i = 0; i < separate_grads.size(); ++i) {
    // Padding tokens change nothing but the embedding rows of id 0 and the routing of
    // padding (which MoE experts see): compare only attention/norm/head parameters.
    const std::string& name = separate_grads[i].name;
    if (name.find("mlp") != std::string::npos || name.find("embed") != std::string::npos) continue;
    EXPECT_LE(testing::relative_error(packed_grads[i].data(), separate_grads[i].values.data(),
                                      packed_grads[i].size()),
              1e-4)
        << name;
  }
}

TEST(ModelStep, AccumulatingMicroBatchesEqualsOneBatch) {
  auto backend = make_cpu_backend();
  const ModelConfig config = tiny_moe_config(false);
  auto model = Model::random_init(config, 5, *backend);
  const Tokens tokens = make_tokens(4 * 6, 21, config.vocab_size);
  BatchView whole{4, 6, tokens.ids, tokens.labels, {}, {}};
  model->zero_grads();
  const StepResult one = model->forward_backward(whole, 0.01f);
  std::vector<std::vector<float>> expected;
  for (const auto& tensor : model->hf_tensors_to_host(true)) expected.push_back(tensor.values);

  model->zero_grads();
  const std::span<const int32_t> ids(tokens.ids), labels(tokens.labels);
  const StepResult first =
      model->forward_backward({2, 6, ids.first(12), labels.first(12), {}, {}}, 0.01f);
  const StepResult second =
      model->forward_backward({2, 6, ids.last(12), labels.last(12), {}, {}}, 0.01f);
  EXPECT_EQ(first.trained_tokens + second.trained_tokens, one.trained_tokens);
  EXPECT_NEAR(first.loss_sum + second.loss_sum, one.loss_sum, 1e-4 * one.loss_sum);
  const auto accumulated = model->hf_tensors_to_host(true);
  for (size_t i = 0; i < accumulated.size(); ++i)
    EXPECT_LE(testing::relative_error(accumulated[i].values.data(), expected[i].data(),
                                      expected[i].size()),
              1e-4)
        << accumulated[i].name;
}

// The gradient-ready hook: every group reported once, in backward order (head, last layer ..
// first, embedding), and each group's gradients are final (equal to the end-of-step values)
// when it is reported; the groups cover every parameter exactly once.
TEST(ModelStep, GradientReadyHookReportsFinalGroupsInBackwardOrder) {
  auto backend = make_cpu_backend();
  const ModelConfig config = tiny_moe_config(true);
  auto model = Model::random_init(config, 9, *backend);
  const auto& groups = model->gradient_groups();
  ASSERT_EQ(groups.size(), static_cast<size_t>(config.num_hidden_layers + 2));
  EXPECT_EQ(groups.front().name, "head");
  EXPECT_EQ(groups[1].name, "layer." + std::to_string(config.num_hidden_layers - 1));
  EXPECT_EQ(groups.back().name, "embedding");
  std::vector<int> covered(model->parameters().size(), 0);
  for (const auto& group : groups)
    for (size_t i = group.begin; i < group.end; ++i) ++covered[i];
  EXPECT_TRUE(std::all_of(covered.begin(), covered.end(), [](int c) { return c == 1; }));

  const Tokens tokens = make_tokens(2 * 6, 23, config.vocab_size);
  const BatchView batch{2, 6, tokens.ids, tokens.labels, {}, {}};
  std::vector<size_t> order;
  std::vector<std::vector<float>> at_hook(model->parameters().size());
  model->set_gradient_ready_hook([&](size_t index) {
    order.push_back(index);
    for (size_t i = groups[index].begin; i < groups[index].end; ++i) {
      const Tensor grad = model->parameters()[i].grad;
      at_hook[i].assign(grad.ptr<float>(), grad.ptr<float>() + grad.numel());
    }
  });
  model->zero_grads();
  model->forward_backward(batch, 0.05f);
  ASSERT_EQ(order.size(), groups.size());
  for (size_t i = 0; i < order.size(); ++i) EXPECT_EQ(order[i], i);
  for (size_t i = 0; i < at_hook.size(); ++i) {
    const Tensor grad = model->parameters()[i].grad;
    ASSERT_EQ(at_hook[i].size(), static_cast<size_t>(grad.numel()));
    EXPECT_TRUE(std::equal(at_hook[i].begin(), at_hook[i].end(), grad.ptr<float>()))
        << model->parameters()[i].name;
  }
}

TEST(ModelStep, BadBatchesAreRejected) {
  auto backend = make_cpu_backend();
  const ModelConfig config = tiny_moe_config(false);
  auto model = Model::random_init(config, 1, *backend);
  std::vector<int32_t> ids = {1, 2, 3, 4}, labels = {1, 2, -100, 77};
  EXPECT_THROW(model->evaluate({1, 4, ids, labels, {}, {}}), Error);  // label 77 >= vocab
  labels[3] = 4;
  std::vector<int32_t> negative_ids = {1, -2, 3, 4};
  EXPECT_THROW(model->evaluate({1, 4, negative_ids, labels, {}, {}}), Error);
  EXPECT_THROW(model->evaluate({2, 4, ids, labels, {}, {}}), Error);  // size mismatch
  std::vector<int32_t> offsets = {0, 3, 2, 4};
  EXPECT_THROW(model->evaluate({1, 4, ids, labels, {}, offsets}), Error);
  std::vector<int32_t> crossing = {0, 3, 8}, ids8(8, 1), labels8(8, 1);
  EXPECT_THROW(model->evaluate({2, 4, ids8, labels8, {}, crossing}), Error);
  EXPECT_NO_THROW(model->evaluate({1, 4, ids, labels, {}, {}}));
}

}  // namespace
}  // namespace moetune
