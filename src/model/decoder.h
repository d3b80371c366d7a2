// One decoder layer (pre-norm): h = x + attention(rmsnorm(x)); out = h + mlp(rmsnorm(h)),
// the MLP being dense SwiGLU or a sparse MoE block. The activations a layer saves for its
// backward live in LayerActivations; buffers only needed during one layer's forward or
// backward live in DecoderScratch, shared by all layers.
#pragma once

#include "model/attention.h"
#include "model/mlp.h"
#include "model/moe.h"

namespace moetune {

struct LayerActivations {
  Buffer attn_norm;  // (N, H) input_layernorm output
  Buffer attn_rstd;  // (N) fp32
  Buffer mid;        // (N, H) residual after attention
  Buffer mlp_norm;   // (N, H) post_attention_layernorm output
  Buffer mlp_rstd;   // (N) fp32
  AttentionSaved attention;
  MlpSaved mlp;  // dense layers
  MoeSaved moe;  // MoE layers
};

struct DecoderScratch {
  Buffer block_out;  // (N, H) output of attention or MLP before the residual add
  Buffer dnormed;    // (N, H) gradient w.r.t. a norm's output
  AttentionScratch attention;
  MlpScratch mlp;
  MoeScratch moe;
};

struct DecoderContext {
  Backend& backend;
  const ModelConfig& config;
  const AttentionInputs& inputs;
  TokenDispatcher& dispatcher;
  // Backward: parameter gradients are added to (true) or overwrite (false: the first
  // micro-batch after Model::zero_grads(), no zeroing pass) the gradient tensors.
  bool accumulate_grads = true;
};

void allocate_layer(const DecoderContext& context, bool moe, DType dtype, LayerActivations& layer);
void allocate_decoder_scratch(const DecoderContext& context, DType dtype, DecoderScratch& scratch);

// x_out (N, H) = layer(x_in (N, H))
void decoder_layer_forward(const DecoderContext& context, const LayerWeights& w, const Tensor& x_in,
                           LayerActivations& saved, DecoderScratch& scratch, const Tensor& x_out);
// dresidual (N, H): d/d x_out on entry, d/d x_in on return (in place).
// expert_gradients (MoE layers, optional): takes over the expert weights' gradients (see
// moe_backward; the optimizer in the backward fused into them).
void decoder_layer_backward(const DecoderContext& context, const LayerWeights& w,
                            const LayerWeights& g, const Tensor& x_in,
                            const LayerActivations& saved, const Tensor& aux_dprob,
                            DecoderScratch& scratch, const Tensor& dresidual,
                            const ExpertGradientConsumer& expert_gradients = {});

}  // namespace moetune
