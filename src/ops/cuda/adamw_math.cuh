// One element of torch.optim.AdamW's update, shared by the multi-tensor AdamW kernels
// (adamw.cu) and the expert weight-gradient GEMM whose epilogue applies the update
// (grouped_gemm_sm90.cu): both call adamw_element, whose rounding steps are spelled out with
// intrinsics (no contraction left to the compiler), so the fused and the separate update give
// bit-identical weights and moments.
#pragma once

#include <cmath>

#include "ops/backend.h"

namespace moetune::cuda {

// The step's scalars, formed in double (as Python floats are in torch), used in fp32: the CPU
// reference's order.
struct AdamWScalars {
  double lr;
  float lerp_weight, beta2, one_minus_beta2, eps, neg_step_size, bias_correction2_sqrt, grad_scale;
};

inline AdamWScalars make_adamw_scalars(const AdamWHyper& hyper, float grad_scale) {
  AdamWScalars h{};
  const double step = static_cast<double>(hyper.step);
  h.lr = hyper.lr;
  h.lerp_weight = static_cast<float>(1.0 - hyper.beta1);
  h.beta2 = static_cast<float>(hyper.beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - hyper.beta2);
  h.eps = static_cast<float>(hyper.eps);
  h.neg_step_size = static_cast<float>(-(hyper.lr / (1.0 - std::pow(hyper.beta1, step))));
  h.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(hyper.beta2, step)));
  h.grad_scale = grad_scale;
  return h;
}

// The weight decay factor of a parameter: 1 - lr * weight_decay (fp32 of the double).
inline float adamw_decay(const AdamWHyper& hyper, float weight_decay) {
  return static_cast<float>(1.0 - hyper.lr * static_cast<double>(weight_decay));
}

#if defined(__CUDACC__)
// p (weight or master), m, v updated in place from the gradient g (already times grad_scale):
//   p *= decay (decays only); m += (1 - beta1) (g - m); v = beta2 v + (1 - beta2) g^2;
//   p += -step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// The last division is __fdividef (2 ulp): IEEE division takes a slow path on some values.
__device__ __forceinline__ void adamw_element(float& p, float& m, float& v, float g,
                                              const AdamWScalars& h, bool decays, float decay) {
  if (decays) p = __fmul_rn(p, decay);
  m = __fmaf_rn(h.lerp_weight, __fsub_rn(g, m), m);
  v = __fmaf_rn(__fmul_rn(h.one_minus_beta2, g), g, __fmul_rn(v, h.beta2));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), h.bias_correction2_sqrt), h.eps);
  p = __fmaf_rn(h.neg_step_size, __fdividef(m, denom), p);
}
#endif

}  // namespace moetune::cuda
