// CPU fused LM head + cross-entropy: loss, accuracy and logits against a naive
// log-softmax in double (over several 64-row chunks, with -100 labels, an all-ignored
// chunk and argmax ties), gradients against central differences, and bit-identical
// results run to run.
#include <cmath>

#include "test_ops_helpers.h"

namespace moetune::testing {
namespace {

struct LossCase {
  int64_t tokens = 150, hidden = 5, vocab = 37;
  HostF32 hidden_states, weight;
  HostI32 labels;

  LossCase() {
    hidden_states = HostF32::random({tokens, hidden}, 61, 1.5f);
    weight = HostF32::random({vocab, hidden}, 62);
    labels = HostI32({tokens});
    for (int64_t n = 0; n < tokens; ++n) {
      const bool ignored = n % 7 == 3 || (n >= 64 && n < 128);  // the second chunk: all -100
      labels[n] = ignored ? -100 : static_cast<int32_t>((n * 11) % vocab);
    }
    // Rows of zeros: every logit ties, so argmax is token 0.
    for (int64_t d = 0; d < hidden; ++d) hidden_states[10 * hidden + d] = 0.0f;
    for (int64_t d = 0; d < hidden; ++d) hidden_states[11 * hidden + d] = 0.0f;
    labels[10] = 0;  // correct
    labels[11] = 1;  // wrong
  }

  LinearCrossEntropyArgs args(HostF32& loss_sum) {
    LinearCrossEntropyArgs a;
    a.hidden = hidden_states.tensor();
    a.weight = weight.tensor();
    a.labels = labels.tensor();
    a.loss_sum = loss_sum.tensor();
    return a;
  }
};

TEST(OpsLoss, ForwardMatchesNaiveLogSoftmax) {
  auto backend = make_cpu_backend();
  LossCase c;
  HostF32 loss_sum({1}, 2.0f), correct({1}, 1.0f), logits({c.tokens, c.vocab});
  LinearCrossEntropyArgs args = c.args(loss_sum);
  args.correct = correct.tensor();
  args.logits = logits.tensor();
  backend->linear_cross_entropy(args);

  double expected_loss = 0.0;
  int expected_correct = 0;
  std::vector<float> expected_logits(c.tokens * c.vocab);
  for (int64_t n = 0; n < c.tokens; ++n) {
    std::vector<double> row(c.vocab);
    for (int64_t v = 0; v < c.vocab; ++v) {
      for (int64_t d = 0; d < c.hidden; ++d)
        row[v] +=
            static_cast<double>(c.hidden_states[n * c.hidden + d]) * c.weight[v * c.hidden + d];
      expected_logits[n * c.vocab + v] = static_cast<float>(row[v]);
    }
    if (c.labels[n] == -100) continue;
    double sum = 0.0;
    int64_t argmax = 0;
    for (int64_t v = 0; v < c.vocab; ++v) {
      sum += std::exp(row[v]);
      if (row[v] > row[argmax]) argmax = v;
    }
    expected_loss += std::log(sum) - row[c.labels[n]];
    expected_correct += argmax == c.labels[n];
  }
  EXPECT_NEAR(loss_sum[0], 2.0 + expected_loss, 1e-5 * expected_loss);
  EXPECT_EQ(correct[0], 1.0f + expected_correct);
  expect_close("logits", logits.values, expected_logits);
}

TEST(OpsLoss, GradientsMatchFiniteDifferences) {
  auto backend = make_cpu_backend();
  LossCase c;
  const float grad_scale = 0.37f;
  HostF32 loss_sum({1});
  HostF32 grad_hidden({c.tokens, c.hidden}, 5.0f), grad_weight({c.vocab, c.hidden}, 0.5f);
  LinearCrossEntropyArgs args = c.args(loss_sum);
  args.grad_scale = grad_scale;
  args.grad_hidden = grad_hidden.tensor();
  args.grad_weight = grad_weight.tensor();
  backend->linear_cross_entropy(args);
  for (float& value : grad_weight.values) value -= 0.5f;  // it accumulated onto 0.5

  for (int64_t n = 0; n < c.tokens; ++n) {
    if (c.labels[n] != -100) continue;
    for (int64_t d = 0; d < c.hidden; ++d) EXPECT_EQ(grad_hidden[n * c.hidden + d], 0.0f);
  }

  auto loss = [&] {
    HostF32 sum({1});
    LinearCrossEntropyArgs forward = c.args(sum);
    backend->linear_cross_entropy(forward);
    return grad_scale * static_cast<double>(sum[0]);
  };
  // The loss is a sum over ~100 tokens in fp32: a larger step keeps rounding noise small.
  expect_gradient("ce grad_hidden", c.hidden_states.values, grad_hidden.values, loss, 1e-2f);
  expect_gradient("ce grad_weight", c.weight.values, grad_weight.values, loss, 1e-2f);
}

TEST(OpsLoss, BitIdenticalRunToRunAndBadLabels) {
  auto backend = make_cpu_backend();
  LossCase c;
  std::vector<float> first;
  for (int run = 0; run < 2; ++run) {
    HostF32 loss_sum({1}), grad_hidden({c.tokens, c.hidden}), grad_weight({c.vocab, c.hidden});
    LinearCrossEntropyArgs args = c.args(loss_sum);
    args.grad_scale = 1.0f;
    args.grad_hidden = grad_hidden.tensor();
    args.grad_weight = grad_weight.tensor();
    backend->linear_cross_entropy(args);
    std::vector<float> result = loss_sum.values;
    result.insert(result.end(), grad_hidden.values.begin(), grad_hidden.values.end());
    result.insert(result.end(), grad_weight.values.begin(), grad_weight.values.end());
    if (run == 0)
      first = result;
    else
      EXPECT_EQ(result, first);
  }
  c.labels[5] = c.vocab;  // out of range, not -100
  HostF32 loss_sum({1});
  EXPECT_THROW(backend->linear_cross_entropy(c.args(loss_sum)), Error);
}

}  // namespace
}  // namespace moetune::testing
