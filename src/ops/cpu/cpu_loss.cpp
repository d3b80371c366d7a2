// CPU fused LM head + cross-entropy. Tokens are processed in chunks of kChunkRows rows:
// one GEMM makes the chunk's logits (rows, V), the loss and the logit gradient are
// computed in place, and two more GEMMs push the gradient into grad_hidden (overwritten)
// and grad_weight (accumulated, or overwritten with accumulate_grad_weight false). So the full (N,
// V) logits exist only when the caller asks for them (args.logits, for parity tests). Per trained
// token: loss = logsumexp(logits) - logits[label]; correct when the first maximum is the label;
// dlogits = (softmax - onehot(label)) * grad_scale. Label -100 contributes nothing (its dlogits row
// is zero).
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/cpu/cpu_backend.h"

namespace moetune::cpu {

namespace {
constexpr int64_t kChunkRows = 64;
constexpr int32_t kIgnoreIndex = -100;
}  // namespace

void CpuBackend::linear_cross_entropy(const LinearCrossEntropyArgs& args) {
  const char* op = "linear_cross_entropy";
  const float* hidden = f32(args.hidden, op, "hidden");
  const float* weight = f32(args.weight, op, "weight");
  const int32_t* labels = i32(args.labels, op, "labels");
  float* loss_sum = f32(args.loss_sum, op, "loss_sum");
  if (args.hidden.rank() != 2 || args.weight.rank() != 2)
    fail(op, ": hidden must be (N, H) and weight (V, H), got ", args.hidden.shape.str(), " and ",
         args.weight.shape.str());
  const int64_t tokens = args.hidden.size(0), width = args.hidden.size(1);
  const int64_t vocab = args.weight.size(0);
  expect_shape(args.weight, Shape{vocab, width}, op, "weight");
  expect_shape(args.labels, Shape{tokens}, op, "labels");
  expect_shape(args.loss_sum, Shape{1}, op, "loss_sum");
  float* correct = nullptr;
  if (args.correct.defined()) {
    correct = f32(args.correct, op, "correct");
    expect_shape(args.correct, Shape{1}, op, "correct");
  }
  float* logits_out = nullptr;
  if (args.logits.defined()) {
    logits_out = f32(args.logits, op, "logits");
    expect_shape(args.logits, Shape{tokens, vocab}, op, "logits");
  }
  const bool backward = args.grad_scale != 0.0f;
  float* grad_hidden = nullptr;
  float* grad_weight = nullptr;
  if (backward) {
    grad_hidden = f32(args.grad_hidden, op, "grad_hidden");
    grad_weight = f32(args.grad_weight, op, "grad_weight");
    expect_shape(args.grad_hidden, args.hidden.shape, op, "grad_hidden");
    expect_shape(args.grad_weight, args.weight.shape, op, "grad_weight");
    // Overwriting = zeroing first, then the chunks accumulate.
    if (!args.accumulate_grad_weight)
      std::fill(grad_weight, grad_weight + args.grad_weight.numel(), 0.0f);
  }
  for (int64_t n = 0; n < tokens; ++n)
    if (labels[n] != kIgnoreIndex && (labels[n] < 0 || labels[n] >= vocab))
      fail(op, ": label ", labels[n], " at token ", n, " is outside [0, ", vocab,
           ") and is not -100");

  double total_loss = 0.0;
  int64_t total_correct = 0;
  std::vector<float> logits(std::min(kChunkRows, tokens) * vocab);  // (rows, V) -> dlogits
  for (int64_t first = 0; first < tokens; first += kChunkRows) {
    const int64_t rows = std::min(kChunkRows, tokens - first);
    const float* hidden_chunk = hidden + first * width;  // (rows, H)
    if (vocab == 0) break;
    if (width == 0) {
      std::fill(logits.begin(), logits.begin() + rows * vocab, 0.0f);
    } else {
      // logits (rows, V) = hidden_chunk (rows, H) @ weight^T (H, V)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(rows),
                  static_cast<blasint>(vocab), static_cast<blasint>(width), 1.0f, hidden_chunk,
                  static_cast<blasint>(width), weight, static_cast<blasint>(width), 0.0f,
                  logits.data(), static_cast<blasint>(vocab));
    }
    if (logits_out)
      std::copy(logits.begin(), logits.begin() + rows * vocab, logits_out + first * vocab);

    bool any_trained = false;
    for (int64_t r = 0; r < rows; ++r) {
      float* row = logits.data() + r * vocab;  // (V)
      const int32_t label = labels[first + r];
      if (label == kIgnoreIndex) {
        std::fill(row, row + vocab, 0.0f);
        continue;
      }
      any_trained = true;
      int64_t argmax = 0;  // first maximum, as torch.argmax
      for (int64_t v = 1; v < vocab; ++v)
        if (row[v] > row[argmax]) argmax = v;
      const float max_logit = row[argmax];
      const float label_logit = row[label];
      double sum = 0.0;  // of exp(logit - max), each exp kept in the row for the backward
      for (int64_t v = 0; v < vocab; ++v) {
        row[v] = std::exp(row[v] - max_logit);
        sum += row[v];
      }
      total_loss += max_logit + std::log(sum) - label_logit;
      if (argmax == label) ++total_correct;
      if (!backward) continue;
      // dlogits = (softmax - onehot(label)) * grad_scale
      const float prob_scale = static_cast<float>(args.grad_scale / sum);
      for (int64_t v = 0; v < vocab; ++v) row[v] *= prob_scale;
      row[label] -= args.grad_scale;
    }
    if (!backward) continue;
    float* grad_hidden_chunk = grad_hidden + first * width;  // (rows, H)
    if (!any_trained || width == 0) {
      std::fill(grad_hidden_chunk, grad_hidden_chunk + rows * width, 0.0f);
      continue;
    }
    // grad_hidden (rows, H) = dlogits (rows, V) @ weight (V, H)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<blasint>(rows),
                static_cast<blasint>(width), static_cast<blasint>(vocab), 1.0f, logits.data(),
                static_cast<blasint>(vocab), weight, static_cast<blasint>(width), 0.0f,
                grad_hidden_chunk, static_cast<blasint>(width));
    // grad_weight (V, H) += dlogits^T (V, rows) @ hidden_chunk (rows, H)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<blasint>(vocab),
                static_cast<blasint>(width), static_cast<blasint>(rows), 1.0f, logits.data(),
                static_cast<blasint>(vocab), hidden_chunk, static_cast<blasint>(width), 1.0f,
                grad_weight, static_cast<blasint>(width));
  }
  if (backward && vocab == 0) std::fill(grad_hidden, grad_hidden + tokens * width, 0.0f);
  loss_sum[0] += static_cast<float>(total_loss);
  if (correct) correct[0] += static_cast<float>(total_correct);
}

}  // namespace moetune::cpu
