// Self-attention block: q/k/v projections (+ biases), optional per-head q/k RMSNorm
// (Qwen3: applied BEFORE RoPE), RoPE, causal GQA attention, output projection.
// Forward saves the projections, the attention inputs/outputs and the softmax LSE;
// backward recomputes nothing and accumulates into the parameter gradients.
#pragma once

#include "core/tensor.h"
#include "io/model_config.h"
#include "model/weights.h"
#include "ops/backend.h"

namespace moetune {

// Per-call inputs shared by every layer.
struct AttentionInputs {
  int64_t batch = 0, seq = 0;
  Tensor positions;    // (N) I32
  Tensor inv_freq;     // (D/2) fp32
  Tensor doc_offsets;  // optional (docs + 1) I32
};

// What one layer's forward saves for its backward.
struct AttentionSaved {
  Buffer q_proj, k_proj;  // (N, Hq*D), (N, Hkv*D): projections before q/k norm (qk_norm only)
  Buffer q_rstd, k_rstd;  // (N*Hq), (N*Hkv) fp32 (qk_norm only)
  Buffer q, k, v;         // (N, Hq*D), (N, Hkv*D), (N, Hkv*D): attention inputs (after RoPE)
  Buffer out;             // (N, Hq*D) attention output before o_proj
  Buffer lse;             // (B, Hq, T) fp32
};

// Scratch for the backward, shared by all layers.
struct AttentionScratch {
  Buffer dq, dk, dv;        // like q, k, v
  Buffer dq_proj, dk_proj;  // (qk_norm only)
  Buffer dout;              // (N, Hq*D)
};

void allocate_attention(const ModelConfig& config, int64_t batch, int64_t seq, DType dtype,
                        Device device, AttentionSaved& saved);
void allocate_attention_scratch(const ModelConfig& config, int64_t tokens, DType dtype,
                                Device device, AttentionScratch& scratch);

// out (N, H) = attention(x (N, H)), x being the input_layernorm output.
void attention_forward(Backend& backend, const ModelConfig& config, const LayerWeights& w,
                       const AttentionInputs& inputs, const Tensor& x, AttentionSaved& saved,
                       const Tensor& out);
// dx (N, H) overwritten with d/dx; parameter gradients accumulated into g (overwritten with
// accumulate_grads false).
void attention_backward(Backend& backend, const ModelConfig& config, const LayerWeights& w,
                        const LayerWeights& g, const AttentionInputs& inputs, const Tensor& x,
                        const AttentionSaved& saved, const Tensor& dout, AttentionScratch& scratch,
                        const Tensor& dx, bool accumulate_grads);

}  // namespace moetune
