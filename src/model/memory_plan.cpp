// Byte counts for MemoryPlan, mirroring the allocations in weights.cpp, model.cpp,
// decoder.cpp, attention.cpp, mlp.cpp and moe.cpp.
#include "model/memory_plan.h"

#include <algorithm>

#include "model/model.h"

namespace moetune {

namespace {
// The routed experts of layer l (gate, up and down of each), 0 for a dense layer.
int64_t layer_expert_parameters(const ModelConfig& config, int64_t l) {
  return config.layer_is_moe(l)
             ? config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size
             : 0;
}
}  // namespace

int64_t count_expert_parameters(const ModelConfig& config) {
  int64_t experts = 0;
  for (int64_t l = 0; l < config.num_hidden_layers; ++l)
    experts += layer_expert_parameters(config, l);
  return experts;
}

MemoryPlan plan_memory(const ModelConfig& config, const MemoryPlanOptions& options) {
  MemoryPlan plan;
  const int64_t ep = std::max<int64_t>(1, options.expert_parallel);
  const int64_t dp = std::max<int64_t>(1, options.data_parallel);
  // This rank's parameters: all but the experts, and 1/ep of the experts.
  const int64_t experts = count_expert_parameters(config);
  const int64_t shared = count_parameters(config, false) - experts;
  const int64_t parameters = shared + experts / ep;
  const int64_t act = static_cast<int64_t>(dtype_size(options.param_dtype));
  const int64_t grad_size = static_cast<int64_t>(dtype_size(options.grad_dtype));
  plan.weights = parameters * act;
  plan.grads = parameters * grad_size;
  if (options.per_group_grads) {
    // The groups of Model::gradient_groups(): head (final norm + untied lm_head), each layer,
    // the embedding. One group lives at a time in an arena of the largest group's size (it
    // returns to the allocator after the group's update and the next group reuses it), plus a
    // tied embedding's arena from the loss to the end of the backward (256-byte alignment of
    // each tensor not counted). Updates on a side stream: a ring of gradient_arenas of them.
    // Fused expert updates: a layer's group holds no routed-expert gradients.
    const int64_t H = config.hidden_size, V = config.vocab_size;
    const int64_t embed = V * H;
    const int64_t head = H + (config.tie_word_embeddings ? 0 : V * H);
    int64_t largest = std::max(head, config.tie_word_embeddings ? 0 : embed);
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
      const int64_t layer_experts = layer_expert_parameters(config, l);
      const int64_t held_experts = options.fused_expert_updates ? 0 : layer_experts / ep;
      largest = std::max(largest, layer_parameters(config, l) - layer_experts + held_experts);
    }
    const int64_t held = largest * std::max<int64_t>(1, options.gradient_arenas) +
                         (config.tie_word_embeddings ? embed : 0);
    plan.grads = held * grad_size;
  }
  // The elements this rank's AdamW updates: with ZeRO its shard of every parameter.
  const int64_t updated =
      options.zero_stage >= 1 ? shared / (dp * ep) + experts / ep / dp : parameters;
  if (options.zero_stage == 2 && dp * ep > 1) plan.grads += updated * grad_size;
  plan.master_weights =
      options.param_dtype == DType::F32 || !options.master_weights ? 0 : updated * 4;
  plan.optimizer_state = updated * 2 * static_cast<int64_t>(dtype_size(options.state_dtype));

  const int64_t N = options.batch * options.seq, H = config.hidden_size;
  const int64_t D = config.head_dim > 0 ? config.head_dim : H / config.num_attention_heads;
  const int64_t q_width = config.num_attention_heads * D, kv_width = config.num_key_value_heads * D;
  const int64_t k = config.num_experts_per_tok, E = config.num_experts;
  const int64_t I_moe = config.moe_intermediate_size, I = config.intermediate_size;

  // Attention, per layer: q, k, v, out (+ the projections before q/k norm), lse, rstds
  int64_t attention = N * (2 * q_width + 2 * kv_width) * act +
                      options.batch * config.num_attention_heads * options.seq * 4;
  if (config.qk_norm)
    attention += N * (q_width + kv_width) * act +
                 N * (config.num_attention_heads + config.num_key_value_heads) * 4;
  const int64_t norms = 3 * N * H * act + 2 * N * 4;  // attn_norm, mid, mlp_norm, 2 rstd
  const int64_t dense = N * 3 * I * act;
  // MoE, per layer: probs, top-k ids and weights, offsets, sorted slots and slot rows, each
  // expert row's input, gate_up and router weight
  const int64_t moe =
      N * E * 4 + N * k * 8 + (E + 1) * 4 + N * k * 8 + N * k * (H + 2 * I_moe) * act + N * k * 4;
  bool any_dense = false, any_moe = false;
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    const bool is_moe = config.layer_is_moe(l);
    // with recompute_layers one layer's activations per kind, shared by all layers
    if (!options.recompute_layers || !(is_moe ? any_moe : any_dense))
      plan.activations += attention + norms + (is_moe ? moe : dense);
    plan.activations += N * H * act;  // the residual stream (the layer's input)
    (is_moe ? any_moe : any_dense) = true;
  }
  plan.activations += N * H * act + N * H * act + N * 4 + N * 12;  // last residual, final norm, ids
  plan.scratch = 3 * N * H * act + N * (2 * q_width + 2 * kv_width) * act;
  if (config.qk_norm) plan.scratch += N * (q_width + kv_width) * act;
  if (any_dense) plan.scratch += N * 3 * I * act;
  // MoE scratch (moe.h): router logits and their gradient; the SwiGLU output, the experts'
  // result, dexpert_out, dhidden, dgate_up, drows; drow_weights and dtopk_weights
  if (any_moe) plan.scratch += N * E * act * 2 + N * k * (3 * H + 4 * I_moe) * act + N * k * 8;
  if (any_moe && ep > 1) {
    // The token exchange (expert_parallel_dispatch.cpp): this rank's tokens sorted for
    // sending (an N*k-row buffer) and the tokens as received (at most N*min(ep, k)); per MoE
    // layer the saved plan: the rank-sorted pairs (N*ep), and per received token its k slots'
    // sort, their rows and its router weights (4 bytes each).
    const int64_t received = N * std::min(ep, k);
    plan.scratch += N * k * H * act + received * H * act + 2 * received * k * 4;
    for (int64_t l = 0; l < config.num_hidden_layers; ++l)
      if (config.layer_is_moe(l)) plan.activations += N * ep * 4 + received * k * 12;
  }
  if (options.logits_chunk_limit > 0) {
    const int64_t row = config.vocab_size * act;
    plan.scratch +=
        std::max<int64_t>(1, std::min<int64_t>(N, options.logits_chunk_limit / row)) * row;
  }
  return plan;
}

}  // namespace moetune
