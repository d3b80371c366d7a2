// Dense SwiGLU MLP forward and backward (see mlp.h).
#include "model/mlp.h"

namespace moetune {

void allocate_mlp(int64_t tokens, int64_t width, DType dtype, Device device, MlpSaved& saved) {
  saved.gate_up = Buffer(dtype, {tokens, 2 * width}, device);
  saved.hidden = Buffer(dtype, {tokens, width}, device);
}

void allocate_mlp_scratch(int64_t tokens, int64_t width, DType dtype, Device device,
                          MlpScratch& scratch) {
  scratch.dhidden = Buffer(dtype, {tokens, width}, device);
  scratch.dgate_up = Buffer(dtype, {tokens, 2 * width}, device);
}

void mlp_forward(Backend& backend, const LayerWeights& w, const Tensor& x, MlpSaved& saved,
                 const Tensor& out) {
  backend.gemm(x, false, w.mlp_gate_up, true, saved.gate_up);  // (N, 2I)
  backend.swiglu_forward(saved.gate_up, saved.hidden);         // (N, I)
  backend.gemm(saved.hidden, false, w.mlp_down, true, out);    // (N, H)
}

void mlp_backward(Backend& backend, const LayerWeights& w, const LayerWeights& g, const Tensor& x,
                  const MlpSaved& saved, const Tensor& dout, MlpScratch& scratch, const Tensor& dx,
                  bool accumulate_grads) {
  const float beta = accumulate_grads ? 1.0f : 0.0f;                          // gradients: += or =
  backend.gemm(dout, false, w.mlp_down, false, scratch.dhidden);              // (N, I)
  backend.gemm(dout, true, saved.hidden, false, g.mlp_down, 1, beta);         // (H, I)
  backend.swiglu_backward(scratch.dhidden, saved.gate_up, scratch.dgate_up);  // (N, 2I)
  backend.gemm(scratch.dgate_up, false, w.mlp_gate_up, false, dx);            // (N, H)
  backend.gemm(scratch.dgate_up, true, x, false, g.mlp_gate_up, 1, beta);     // (2I, H)
}

}  // namespace moetune
