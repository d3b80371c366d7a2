// HF on-disk names per model family (see hf_names.h). Parameter names here must match
// the ones weights.cpp gives; tests check that every parameter is covered exactly once.
#include "model/hf_names.h"

namespace moetune {

namespace {
std::string layer_name(int64_t layer, const std::string& suffix) {
  return "model.layers." + std::to_string(layer) + "." + suffix;
}
}  // namespace

std::vector<HfTensor> hf_checkpoint_tensors(const ModelConfig& config, int64_t first_expert,
                                            int64_t expert_count) {
  const int64_t H = config.hidden_size, V = config.vocab_size, D = config.head_dim;
  const int64_t q_width = config.num_attention_heads * D;
  const int64_t kv_width = config.num_key_value_heads * D;
  const bool mixtral = config.family == ModelFamily::Mixtral;
  const bool attention_bias = config.attention_bias && !mixtral;

  std::vector<HfTensor> tensors;
  auto same = [&](const std::string& name, Shape shape) {
    tensors.push_back(HfTensor{name, shape, name, 0});
  };
  same("model.embed_tokens.weight", {V, H});
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    same(layer_name(i, "self_attn.q_proj.weight"), {q_width, H});
    if (attention_bias) same(layer_name(i, "self_attn.q_proj.bias"), {q_width});
    same(layer_name(i, "self_attn.k_proj.weight"), {kv_width, H});
    if (attention_bias) same(layer_name(i, "self_attn.k_proj.bias"), {kv_width});
    same(layer_name(i, "self_attn.v_proj.weight"), {kv_width, H});
    if (attention_bias) same(layer_name(i, "self_attn.v_proj.bias"), {kv_width});
    same(layer_name(i, "self_attn.o_proj.weight"), {H, q_width});
    if (attention_bias) same(layer_name(i, "self_attn.o_proj.bias"), {H});
    if (config.qk_norm) {
      same(layer_name(i, "self_attn.q_norm.weight"), {D});
      same(layer_name(i, "self_attn.k_norm.weight"), {D});
    }
    if (config.layer_is_moe(i)) {
      const int64_t I = config.moe_intermediate_size, E = config.num_experts;
      const std::string gate_up = layer_name(i, "mlp.experts.gate_up_proj");
      const std::string down = layer_name(i, "mlp.experts.down_proj");
      const std::string block = mixtral ? "block_sparse_moe." : "mlp.";
      const int64_t first = expert_count < 0 ? 0 : first_expert;
      const int64_t count = expert_count < 0 ? E : expert_count;
      for (int64_t e = first; e < first + count; ++e) {
        const int64_t local = e - first;  // index inside this rank's expert parameters
        const std::string expert = layer_name(i, block + "experts." + std::to_string(e) + ".");
        const std::string gate_name = expert + (mixtral ? "w1.weight" : "gate_proj.weight");
        const std::string up_name = expert + (mixtral ? "w3.weight" : "up_proj.weight");
        const std::string down_name = expert + (mixtral ? "w2.weight" : "down_proj.weight");
        tensors.push_back(HfTensor{gate_name, {I, H}, gate_up, local * 2 * I * H, true});
        tensors.push_back(HfTensor{up_name, {I, H}, gate_up, local * 2 * I * H + I * H, true});
        tensors.push_back(HfTensor{down_name, {H, I}, down, local * H * I, true});
      }
      tensors.push_back(HfTensor{
          layer_name(i, block + "gate.weight"), {E, H}, layer_name(i, "mlp.gate.weight"), 0});
    } else {
      const int64_t I = config.intermediate_size;
      const std::string gate_up = layer_name(i, "mlp.gate_up_proj.weight");
      tensors.push_back(HfTensor{layer_name(i, "mlp.gate_proj.weight"), {I, H}, gate_up, 0});
      tensors.push_back(HfTensor{layer_name(i, "mlp.up_proj.weight"), {I, H}, gate_up, I * H});
      same(layer_name(i, "mlp.down_proj.weight"), {H, I});
    }
    same(layer_name(i, "input_layernorm.weight"), {H});
    same(layer_name(i, "post_attention_layernorm.weight"), {H});
  }
  same("model.norm.weight", {H});
  if (!config.tie_word_embeddings) same("lm_head.weight", {V, H});
  return tensors;
}

}  // namespace moetune
