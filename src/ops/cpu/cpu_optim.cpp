// CPU optimizer ops: the global gradient norm (sum of squares, accumulated in double) and
// torch.optim.AdamW, following torch's single-tensor math order in fp32 (scalars are
// formed in double, as Python floats are, then used as fp32 like torch's CPU kernels):
//   g = grad * grad_scale
//   p *= 1 - lr * wd                      (only when wd != 0)
//   m = m + (1 - beta1) * (g - m)         (lerp_, one fused multiply-add as torch's kernel)
//   v = v * beta2 + (1 - beta2) * g * g   (mul_ then addcmul_, the last step fused)
//   denom = sqrt(v) / sqrt(1 - beta2^step) + eps
//   p = p + (-lr / (1 - beta1^step)) * m / denom   (addcdiv_)
// With a master copy the update runs on master and param gets its rounded copy.
// The two std::fma calls reproduce torch's vectorised CPU kernels (checked offline: three
// steps bit-identical to torch.optim.AdamW on CPU).
#include <cmath>

#include "ops/cpu/cpu_backend.h"

namespace moetune::cpu {

void CpuBackend::grad_norm_squared(std::span<const Tensor> grads, const Tensor& out) {
  const char* op = "grad_norm_squared";
  float* out_data = f32(out, op, "out");
  expect_shape(out, Shape{1}, op, "out");
  double sum = 0.0;
  for (const Tensor& grad : grads) {
    const float* data = f32(grad, op, "grads[i]");
    for (int64_t i = 0; i < grad.numel(); ++i) sum += static_cast<double>(data[i]) * data[i];
  }
  out_data[0] = static_cast<float>(sum);
}

void CpuBackend::adamw_update(std::span<const AdamWParam> params, const AdamWHyper& hyper,
                              float grad_scale) {
  const char* op = "adamw_update";
  if (hyper.step < 1) fail(op, ": step must be >= 1 (1-based), got ", hyper.step);
  const double lr = hyper.lr, beta1 = hyper.beta1, beta2 = hyper.beta2;
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(hyper.step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(hyper.step));
  const float neg_step_size = static_cast<float>(-(lr / bias_correction1));
  const float bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  const float lerp_weight = static_cast<float>(1.0 - beta1);
  const float beta2_f = static_cast<float>(beta2);
  const float one_minus_beta2 = static_cast<float>(1.0 - beta2);
  const float eps = static_cast<float>(hyper.eps);

  for (const AdamWParam& entry : params) {
    const bool has_master = entry.master.defined();
    float* p = has_master ? f32(entry.master, op, "master") : f32(entry.param, op, "param");
    const float* grad = f32(entry.grad, op, "grad");
    float* exp_avg = f32(entry.exp_avg, op, "exp_avg");
    float* exp_avg_sq = f32(entry.exp_avg_sq, op, "exp_avg_sq");
    const Shape& shape = entry.param.shape;
    if (has_master) {
      if (!entry.param.defined() || entry.param.device != Device::CPU)
        fail(op, ": param with a master copy must be a defined host tensor");
      expect_shape(entry.master, shape, op, "master");
    }
    expect_shape(entry.grad, shape, op, "grad");
    expect_shape(entry.exp_avg, shape, op, "exp_avg");
    expect_shape(entry.exp_avg_sq, shape, op, "exp_avg_sq");

    const float decay = static_cast<float>(1.0 - lr * static_cast<double>(entry.weight_decay));
    const int64_t count = entry.param.numel();
    for (int64_t i = 0; i < count; ++i) {
      const float g = grad[i] * grad_scale;
      float value = p[i];
      if (entry.weight_decay != 0.0f) value = value * decay;
      const float m = std::fma(lerp_weight, g - exp_avg[i], exp_avg[i]);
      const float v = std::fma(one_minus_beta2 * g, g, exp_avg_sq[i] * beta2_f);
      const float denom = std::sqrt(v) / bias_correction2_sqrt + eps;
      value = value + neg_step_size * m / denom;
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
      p[i] = value;
    }
    if (has_master) copy(entry.param, entry.master);
  }
}

}  // namespace moetune::cpu
