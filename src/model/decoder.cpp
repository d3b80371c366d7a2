// Decoder layer forward and backward (see decoder.h).
#include "model/decoder.h"

namespace moetune {

void allocate_layer(const DecoderContext& context, bool moe, DType dtype, LayerActivations& layer) {
  const ModelConfig& config = context.config;
  const int64_t B = context.inputs.batch, T = context.inputs.seq, N = B * T;
  const int64_t H = config.hidden_size;
  const Device device = context.backend.device();
  layer.attn_norm = Buffer(dtype, {N, H}, device);
  layer.attn_rstd = Buffer(DType::F32, {N}, device);
  layer.mid = Buffer(dtype, {N, H}, device);
  layer.mlp_norm = Buffer(dtype, {N, H}, device);
  layer.mlp_rstd = Buffer(DType::F32, {N}, device);
  allocate_attention(config, B, T, dtype, device, layer.attention);
  if (moe) {
    allocate_moe(config, N, dtype, device, layer.moe);
  } else {
    allocate_mlp(N, config.intermediate_size, dtype, device, layer.mlp);
  }
}

void allocate_decoder_scratch(const DecoderContext& context, DType dtype, DecoderScratch& scratch) {
  const ModelConfig& config = context.config;
  const int64_t N = context.inputs.batch * context.inputs.seq, H = config.hidden_size;
  const Device device = context.backend.device();
  scratch.block_out = Buffer(dtype, {N, H}, device);
  scratch.dnormed = Buffer(dtype, {N, H}, device);
  allocate_attention_scratch(config, N, dtype, device, scratch.attention);
  bool any_dense = false, any_moe = false;
  for (int64_t i = 0; i < config.num_hidden_layers; ++i)
    (config.layer_is_moe(i) ? any_moe : any_dense) = true;
  if (any_dense) allocate_mlp_scratch(N, config.intermediate_size, dtype, device, scratch.mlp);
  if (any_moe) allocate_moe_scratch(config, N, dtype, device, scratch.moe);
}

void decoder_layer_forward(const DecoderContext& context, const LayerWeights& w, const Tensor& x_in,
                           LayerActivations& saved, DecoderScratch& scratch, const Tensor& x_out) {
  Backend& backend = context.backend;
  const float eps = static_cast<float>(context.config.rms_norm_eps);
  backend.rmsnorm_forward(x_in, w.input_norm, eps, saved.attn_norm, saved.attn_rstd);
  attention_forward(backend, context.config, w, context.inputs, saved.attn_norm, saved.attention,
                    scratch.block_out);
  backend.add(saved.mid, x_in, scratch.block_out);
  backend.rmsnorm_forward(saved.mid, w.post_norm, eps, saved.mlp_norm, saved.mlp_rstd);
  if (w.moe) {
    moe_forward(backend, context.dispatcher, context.config, w, saved.mlp_norm, saved.moe,
                scratch.moe, scratch.block_out);
  } else {
    mlp_forward(backend, w, saved.mlp_norm, saved.mlp, scratch.block_out);
  }
  backend.add(x_out, saved.mid, scratch.block_out);
}

void decoder_layer_backward(const DecoderContext& context, const LayerWeights& w,
                            const LayerWeights& g, const Tensor& x_in,
                            const LayerActivations& saved, const Tensor& aux_dprob,
                            DecoderScratch& scratch, const Tensor& dresidual,
                            const ExpertGradientConsumer& expert_gradients) {
  Backend& backend = context.backend;
  // MLP: dresidual is d out = d mid (residual path) + d mlp_out
  if (w.moe) {
    moe_backward(backend, context.dispatcher, context.config, w, g, saved.mlp_norm, saved.moe,
                 aux_dprob, dresidual, scratch.moe, scratch.dnormed, context.accumulate_grads,
                 expert_gradients);
  } else {
    mlp_backward(backend, w, g, saved.mlp_norm, saved.mlp, dresidual, scratch.mlp, scratch.dnormed,
                 context.accumulate_grads);
  }
  backend.rmsnorm_backward(scratch.dnormed, saved.mid, w.post_norm, saved.mlp_rstd, dresidual,
                           g.post_norm, /*accumulate_dx=*/true,
                           context.accumulate_grads);  // dresidual = d mid
  attention_backward(backend, context.config, w, g, context.inputs, saved.attn_norm,
                     saved.attention, dresidual, scratch.attention, scratch.dnormed,
                     context.accumulate_grads);
  backend.rmsnorm_backward(scratch.dnormed, x_in, w.input_norm, saved.attn_rstd, dresidual,
                           g.input_norm, /*accumulate_dx=*/true,
                           context.accumulate_grads);  // dresidual = d x_in
}

}  // namespace moetune
