// Default implementations of Backend ops that are compositions of other ops (backends with a
// fused kernel override them).
#include "ops/backend.h"

#include "core/error.h"

namespace moetune {

void Backend::grouped_gemm_weight_grad_adamw(const Tensor& dy, const Tensor& x,
                                             const Tensor& offsets, const AdamWParam& param,
                                             const AdamWHyper& hyper, const Tensor& norm_squared) {
  MOETUNE_CHECK(param.param.rank() == 3,
                "grouped_gemm_weight_grad_adamw: expert weights are (E, P, Q), got ",
                param.param.shape.str());
  Buffer grad = Buffer::uninitialized(param.grad.dtype, param.param.shape, device());
  grouped_gemm_weight_grad(dy, x, offsets, grad, /*accumulate=*/false);
  if (norm_squared.data != nullptr) {
    const Tensor grads[] = {grad.tensor()};
    grad_norm_squared(grads, norm_squared);
  }
  AdamWParam with_grad = param;
  with_grad.grad = grad.tensor();
  adamw_update(std::span<const AdamWParam>(&with_grad, 1), hyper, 1.0f);
}

}  // namespace moetune
