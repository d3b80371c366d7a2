// The tiny model and token fixtures shared by the model, optimizer and parallel tests: one
// small Qwen3-MoE config written as HF config.json keys (2 layers, layer 1 dense, 4 experts
// top-2, router aux loss on), which a test varies by merging in the keys it changes, and
// deterministic random token ids with some labels masked (-100).
// Header-only (inline) so that any test binary can use it without a build change.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/model_config.h"
#include "test_util.h"

namespace moetune::testing {

// The base tiny Qwen3-MoE with `changes` merged over it (keys replaced or added).
inline nlohmann::json tiny_moe_json(const nlohmann::json& changes = nlohmann::json::object()) {
  nlohmann::json json = {{"model_type", "qwen3_moe"},
                         {"vocab_size", 32},
                         {"hidden_size", 16},
                         {"intermediate_size", 24},
                         {"moe_intermediate_size", 8},
                         {"num_hidden_layers", 2},
                         {"num_attention_heads", 2},
                         {"num_key_value_heads", 1},
                         {"head_dim", 8},
                         {"num_experts", 4},
                         {"num_experts_per_tok", 2},
                         {"norm_topk_prob", true},
                         {"mlp_only_layers", {1}},
                         {"output_router_logits", true},
                         {"router_aux_loss_coef", 0.1},
                         {"rms_norm_eps", 1e-6},
                         {"rope_theta", 10000.0},
                         {"max_position_embeddings", 64},
                         {"initializer_range", 0.3},
                         {"tie_word_embeddings", false}};
  json.update(changes);
  return json;
}

// tiny_moe_json(changes) parsed; `name` is what parse errors call it.
inline ModelConfig tiny_moe_config(const nlohmann::json& changes = nlohmann::json::object(),
                                   const std::string& name = "tiny_moe_config") {
  return parse_model_config(tiny_moe_json(changes), name);
}

struct Tokens {
  std::vector<int32_t> ids, labels;
};

// `count` token ids in [0, vocab) drawn from `seed`; each label is its token's id, or -100
// (not trained) where a second uniform [-1, 1) draw exceeds `masked_above`.
inline Tokens make_tokens(int64_t count, unsigned seed, int64_t vocab, float masked_above = 0.7f) {
  Tokens tokens;
  const auto noise = random_floats(static_cast<size_t>(2 * count), seed, 1.0f);
  for (int64_t i = 0; i < count; ++i) {
    tokens.ids.push_back(static_cast<int32_t>((noise[i] + 1.0f) * 0.5f * (vocab - 1)));
    tokens.labels.push_back(noise[count + i] > masked_above ? -100 : tokens.ids.back());
  }
  return tokens;
}

}  // namespace moetune::testing
