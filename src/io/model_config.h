// ModelConfig: what the engine needs from an HF config.json, for the model_types
// qwen3_moe, mixtral, qwen3 and llama. Both the older and the newer Transformers spellings
// are accepted (num_experts / num_local_experts, rope_theta / rope_parameters,
// torch_dtype / dtype). An unknown model_type, a missing required key or an option we do
// not support is an Error naming the file and the key.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moetune {

enum class ModelFamily { Qwen3Moe, Mixtral, Qwen3, Llama };

struct RopeConfig {
  double theta = 10000.0;
  std::string type = "default";  // "default" or "llama3"
  // llama3 scaling (type == "llama3")
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string model_type;  // as in config.json
  ModelFamily family = ModelFamily::Llama;

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;  // dense MLP width
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  // defaults to hidden_size / num_attention_heads
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool attention_bias = false;
  bool qk_norm = false;  // per-head RMSNorm on q and k (Qwen3, Qwen3-MoE)
  bool tie_word_embeddings = false;
  double initializer_range = 0.02;
  std::string dtype = "float32";  // torch_dtype / dtype of the checkpoint

  // Mixture of experts (num_experts == 0: dense model)
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;  // expert width (Mixtral: intermediate_size)
  bool norm_topk_prob = true;         // Mixtral always renormalises
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  bool output_router_logits = false;
  double router_aux_loss_coef = 0.001;

  nlohmann::json raw;  // the file as read; saving writes it back unchanged

  bool is_moe() const { return num_experts > 0; }
  // True when decoder layer `layer` has a sparse MoE block (Qwen3-MoE's rule:
  // not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0).
  bool layer_is_moe(int64_t layer) const;
};

// Parses config.json; `source` names the file in error messages.
ModelConfig parse_model_config(const nlohmann::json& json, const std::string& source);
ModelConfig load_model_config(const std::filesystem::path& config_json);

}  // namespace moetune
