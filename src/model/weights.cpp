// Allocation of the parameter tensors (values and gradients) in the engine's layout.
// Each parameter gets two Buffers; a Parameter entry points at both, and the
// WeightTensors structs give the model code named access to the same memory.
#include "model/weights.h"

namespace moetune {

namespace {
std::string layer_name(int64_t layer, const std::string& suffix) {
  return "model.layers." + std::to_string(layer) + "." + suffix;
}
bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

bool is_norm_or_bias(const std::string& name) {
  return ends_with(name, ".bias") || ends_with(name, "norm.weight");
}

ModelWeights::ModelWeights(const ModelConfig& config, DType value_dtype, DType grad_dtype,
                           Device device, int64_t local_experts, bool allocate_grads) {
  const int64_t H = config.hidden_size, V = config.vocab_size, D = config.head_dim;
  const int64_t q_width = config.num_attention_heads * D;
  const int64_t kv_width = config.num_key_value_heads * D;
  const int64_t E = config.num_experts;
  const bool attention_bias = config.attention_bias && config.family != ModelFamily::Mixtral;
  MOETUNE_CHECK(H > 0 && V > 0 && D > 0 && config.num_hidden_layers > 0, "bad model config");

  // Reserve so that Parameter/Buffer addresses never move while we hand out Tensors.
  parameters_.reserve(static_cast<size_t>(16 * config.num_hidden_layers + 4));
  auto add = [&](const std::string& name, Shape shape, Tensor& value, Tensor& grad) {
    storage_.emplace_back(value_dtype, shape, device);
    value = storage_.back().tensor();
    if (allocate_grads) {
      storage_.emplace_back(grad_dtype, shape, device);
      grad = storage_.back().tensor();
    } else {
      grad = Tensor(nullptr, grad_dtype, shape, device);
    }
    grad_fields_.push_back(&grad);
    parameters_.push_back(Parameter{name, value, grad, !is_norm_or_bias(name),
                                    name.find(".mlp.experts.") != std::string::npos});
  };

  add("model.embed_tokens.weight", {V, H}, values_.embed, grads_.embed);
  values_.layers.resize(config.num_hidden_layers);
  grads_.layers.resize(config.num_hidden_layers);
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    LayerWeights& w = values_.layers[i];
    LayerWeights& g = grads_.layers[i];
    w.moe = g.moe = config.layer_is_moe(i);
    add(layer_name(i, "input_layernorm.weight"), {H}, w.input_norm, g.input_norm);
    add(layer_name(i, "self_attn.q_proj.weight"), {q_width, H}, w.q, g.q);
    if (attention_bias) add(layer_name(i, "self_attn.q_proj.bias"), {q_width}, w.q_bias, g.q_bias);
    add(layer_name(i, "self_attn.k_proj.weight"), {kv_width, H}, w.k, g.k);
    if (attention_bias) add(layer_name(i, "self_attn.k_proj.bias"), {kv_width}, w.k_bias, g.k_bias);
    add(layer_name(i, "self_attn.v_proj.weight"), {kv_width, H}, w.v, g.v);
    if (attention_bias) add(layer_name(i, "self_attn.v_proj.bias"), {kv_width}, w.v_bias, g.v_bias);
    add(layer_name(i, "self_attn.o_proj.weight"), {H, q_width}, w.o, g.o);
    if (attention_bias) add(layer_name(i, "self_attn.o_proj.bias"), {H}, w.o_bias, g.o_bias);
    if (config.qk_norm) {
      add(layer_name(i, "self_attn.q_norm.weight"), {D}, w.q_norm, g.q_norm);
      add(layer_name(i, "self_attn.k_norm.weight"), {D}, w.k_norm, g.k_norm);
    }
    add(layer_name(i, "post_attention_layernorm.weight"), {H}, w.post_norm, g.post_norm);
    if (w.moe) {
      const int64_t I = config.moe_intermediate_size;
      add(layer_name(i, "mlp.gate.weight"), {E, H}, w.router, g.router);
      const int64_t El = local_experts < 0 ? E : local_experts;
      add(layer_name(i, "mlp.experts.gate_up_proj"), {El, 2 * I, H}, w.experts_gate_up,
          g.experts_gate_up);
      add(layer_name(i, "mlp.experts.down_proj"), {El, H, I}, w.experts_down, g.experts_down);
    } else {
      const int64_t I = config.intermediate_size;
      add(layer_name(i, "mlp.gate_up_proj.weight"), {2 * I, H}, w.mlp_gate_up, g.mlp_gate_up);
      add(layer_name(i, "mlp.down_proj.weight"), {H, I}, w.mlp_down, g.mlp_down);
    }
  }
  add("model.norm.weight", {H}, values_.final_norm, grads_.final_norm);
  tied_ = config.tie_word_embeddings;
  if (config.tie_word_embeddings) {
    values_.lm_head = values_.embed;
    grads_.lm_head = grads_.embed;
  } else {
    add("lm_head.weight", {V, H}, values_.lm_head, grads_.lm_head);
  }
}

void ModelWeights::bind_grad(size_t index, void* data) {
  MOETUNE_CHECK(index < parameters_.size(), "bind_grad: no parameter " + std::to_string(index));
  Tensor& field = *grad_fields_[index];
  field.data = data;
  parameters_[index].grad.data = data;
  if (tied_ && &field == &grads_.embed) grads_.lm_head.data = data;
}

const Parameter* ModelWeights::find(const std::string& name) const {
  for (const auto& parameter : parameters_)
    if (parameter.name == name) return &parameter;
  return nullptr;
}

}  // namespace moetune
