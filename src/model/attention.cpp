// Self-attention forward and backward (see attention.h). Linear layers are y = x W^T:
// forward gemm(x, W^T); backward dx = dy W, dW += dy^T x.
#include "model/attention.h"

#include <cmath>

namespace moetune {

namespace {
struct Widths {
  int64_t q_heads, kv_heads, head_dim, q_width, kv_width;
};
Widths widths(const ModelConfig& config) {
  const int64_t D = config.head_dim;
  return {config.num_attention_heads, config.num_key_value_heads, D, config.num_attention_heads * D,
          config.num_key_value_heads * D};
}
float attention_scale(const ModelConfig& config) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(config.head_dim)));
}
}  // namespace

void allocate_attention(const ModelConfig& config, int64_t batch, int64_t seq, DType dtype,
                        Device device, AttentionSaved& saved) {
  const Widths s = widths(config);
  const int64_t N = batch * seq;
  if (config.qk_norm) {
    saved.q_proj = Buffer(dtype, {N, s.q_width}, device);
    saved.k_proj = Buffer(dtype, {N, s.kv_width}, device);
    saved.q_rstd = Buffer(DType::F32, {N * s.q_heads}, device);
    saved.k_rstd = Buffer(DType::F32, {N * s.kv_heads}, device);
  }
  saved.q = Buffer(dtype, {N, s.q_width}, device);
  saved.k = Buffer(dtype, {N, s.kv_width}, device);
  saved.v = Buffer(dtype, {N, s.kv_width}, device);
  saved.out = Buffer(dtype, {N, s.q_width}, device);
  saved.lse = Buffer(DType::F32, {batch, s.q_heads, seq}, device);
}

void allocate_attention_scratch(const ModelConfig& config, int64_t tokens, DType dtype,
                                Device device, AttentionScratch& scratch) {
  const Widths s = widths(config);
  scratch.dq = Buffer(dtype, {tokens, s.q_width}, device);
  scratch.dk = Buffer(dtype, {tokens, s.kv_width}, device);
  scratch.dv = Buffer(dtype, {tokens, s.kv_width}, device);
  if (config.qk_norm) {
    scratch.dq_proj = Buffer(dtype, {tokens, s.q_width}, device);
    scratch.dk_proj = Buffer(dtype, {tokens, s.kv_width}, device);
  }
  scratch.dout = Buffer(dtype, {tokens, s.q_width}, device);
}

void attention_forward(Backend& backend, const ModelConfig& config, const LayerWeights& w,
                       const AttentionInputs& inputs, const Tensor& x, AttentionSaved& saved,
                       const Tensor& out) {
  const Widths s = widths(config);
  const int64_t B = inputs.batch, T = inputs.seq, N = B * T, D = s.head_dim;
  const float eps = static_cast<float>(config.rms_norm_eps);

  // Projections; with qk_norm they go to q_proj/k_proj and the per-head norm writes q/k.
  const Tensor q_target = config.qk_norm ? saved.q_proj.tensor() : saved.q.tensor();
  const Tensor k_target = config.qk_norm ? saved.k_proj.tensor() : saved.k.tensor();
  backend.gemm(x, false, w.q, true, q_target);  // (N, Hq*D)
  backend.gemm(x, false, w.k, true, k_target);  // (N, Hkv*D)
  backend.gemm(x, false, w.v, true, saved.v);   // (N, Hkv*D)
  if (w.q_bias.defined()) {
    backend.add_bias(q_target, w.q_bias);
    backend.add_bias(k_target, w.k_bias);
    backend.add_bias(saved.v, w.v_bias);
  }
  if (config.qk_norm) {  // RMSNorm over each head's D values, before RoPE (Qwen3)
    backend.rmsnorm_forward(q_target.view({N * s.q_heads, D}), w.q_norm, eps,
                            saved.q.tensor().view({N * s.q_heads, D}), saved.q_rstd);
    backend.rmsnorm_forward(k_target.view({N * s.kv_heads, D}), w.k_norm, eps,
                            saved.k.tensor().view({N * s.kv_heads, D}), saved.k_rstd);
  }
  const Tensor q = saved.q.tensor().view({N, s.q_heads, D});
  const Tensor k = saved.k.tensor().view({N, s.kv_heads, D});
  backend.rope_forward(q, inputs.positions, inputs.inv_freq);
  backend.rope_forward(k, inputs.positions, inputs.inv_freq);

  backend.attention_forward(q.view({B, T, s.q_heads, D}), k.view({B, T, s.kv_heads, D}),
                            saved.v.tensor().view({B, T, s.kv_heads, D}), attention_scale(config),
                            inputs.doc_offsets, saved.out.tensor().view({B, T, s.q_heads, D}),
                            saved.lse);
  backend.gemm(saved.out, false, w.o, true, out);  // (N, H)
  if (w.o_bias.defined()) backend.add_bias(out, w.o_bias);
}

void attention_backward(Backend& backend, const ModelConfig& config, const LayerWeights& w,
                        const LayerWeights& g, const AttentionInputs& inputs, const Tensor& x,
                        const AttentionSaved& saved, const Tensor& dout, AttentionScratch& scratch,
                        const Tensor& dx, bool accumulate_grads) {
  const bool acc = accumulate_grads;
  const float beta = acc ? 1.0f : 0.0f;  // parameter gradients: += or =
  const Widths s = widths(config);
  const int64_t B = inputs.batch, T = inputs.seq, N = B * T, D = s.head_dim;
  auto rows = [N](const Buffer& buffer) { return buffer.tensor().slice_rows(0, N); };

  // o_proj
  const Tensor d_attn = rows(scratch.dout);                  // (N, Hq*D)
  backend.gemm(dout, false, w.o, false, d_attn);             // dy W
  backend.gemm(dout, true, saved.out, false, g.o, 1, beta);  // dW += dy^T x
  if (g.o_bias.defined()) backend.bias_backward(dout, g.o_bias, acc);

  const Tensor dq = rows(scratch.dq), dk = rows(scratch.dk), dv = rows(scratch.dv);
  backend.attention_backward(
      d_attn.view({B, T, s.q_heads, D}), saved.q.tensor().view({B, T, s.q_heads, D}),
      saved.k.tensor().view({B, T, s.kv_heads, D}), saved.v.tensor().view({B, T, s.kv_heads, D}),
      saved.out.tensor().view({B, T, s.q_heads, D}), saved.lse, attention_scale(config),
      inputs.doc_offsets, dq.view({B, T, s.q_heads, D}), dk.view({B, T, s.kv_heads, D}),
      dv.view({B, T, s.kv_heads, D}));
  backend.rope_backward(dq.view({N, s.q_heads, D}), inputs.positions, inputs.inv_freq);
  backend.rope_backward(dk.view({N, s.kv_heads, D}), inputs.positions, inputs.inv_freq);

  Tensor dq_proj = dq, dk_proj = dk;
  if (config.qk_norm) {
    dq_proj = rows(scratch.dq_proj);
    dk_proj = rows(scratch.dk_proj);
    backend.rmsnorm_backward(dq.view({N * s.q_heads, D}),
                             saved.q_proj.tensor().view({N * s.q_heads, D}), w.q_norm, saved.q_rstd,
                             dq_proj.view({N * s.q_heads, D}), g.q_norm, false, acc);
    backend.rmsnorm_backward(dk.view({N * s.kv_heads, D}),
                             saved.k_proj.tensor().view({N * s.kv_heads, D}), w.k_norm,
                             saved.k_rstd, dk_proj.view({N * s.kv_heads, D}), g.k_norm, false, acc);
  }
  if (g.q_bias.defined()) {
    backend.bias_backward(dq_proj, g.q_bias, acc);
    backend.bias_backward(dk_proj, g.k_bias, acc);
    backend.bias_backward(dv, g.v_bias, acc);
  }
  backend.gemm(dq_proj, false, w.q, false, dx);        // dx = dq Wq
  backend.gemm(dk_proj, false, w.k, false, dx, 1, 1);  //    + dk Wk
  backend.gemm(dv, false, w.v, false, dx, 1, 1);       //    + dv Wv
  backend.gemm(dq_proj, true, x, false, g.q, 1, beta);
  backend.gemm(dk_proj, true, x, false, g.k, 1, beta);
  backend.gemm(dv, true, x, false, g.v, 1, beta);
}

}  // namespace moetune
