// Dense SwiGLU MLP: gate_up = x W_gu^T (N, 2I) [gate | up], h = silu(gate) * up (N, I),
// y = h W_down^T (N, H). Gate and up run as one GEMM over the fused (2I, H) weight.
#pragma once

#include "core/tensor.h"
#include "model/weights.h"
#include "ops/backend.h"

namespace moetune {

struct MlpSaved {
  Buffer gate_up;  // (N, 2I)
  Buffer hidden;   // (N, I)
};
struct MlpScratch {
  Buffer dhidden;   // (N, I)
  Buffer dgate_up;  // (N, 2I)
};

void allocate_mlp(int64_t tokens, int64_t width, DType dtype, Device device, MlpSaved& saved);
void allocate_mlp_scratch(int64_t tokens, int64_t width, DType dtype, Device device,
                          MlpScratch& scratch);

// out (N, H) = mlp(x (N, H))
void mlp_forward(Backend& backend, const LayerWeights& w, const Tensor& x, MlpSaved& saved,
                 const Tensor& out);
// dx (N, H) overwritten; gradients accumulated into g (overwritten with accumulate_grads false).
void mlp_backward(Backend& backend, const LayerWeights& w, const LayerWeights& g, const Tensor& x,
                  const MlpSaved& saved, const Tensor& dout, MlpScratch& scratch, const Tensor& dx,
                  bool accumulate_grads);

}  // namespace moetune
