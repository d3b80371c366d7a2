// KV-cache generation (see generate.h). One forward pass over n new tokens:
//   x (n, H) = embed[ids]
//   per layer: h = rmsnorm(x); q, k, v = h Wq^T, h Wk^T, h Wv^T (+ biases; per-head q/k norm);
//              RoPE at the absolute positions; k, v appended to the cache;
//              attention of each new query over cache[0 .. its position] (causal, GQA);
//              x += o_proj; h = rmsnorm(x); x += MLP(h) or MoE(h)
//   logits (V) = lm_head(rmsnorm(x[last]))
// MoE runs as in training: route, sort the n*k (token, expert) slots by expert on the device,
// gather, two grouped GEMMs around SwiGLU, weighted combine.
#include "model/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace moetune {

KvCache::KvCache(const Model& model, int64_t max_tokens)
    : model_(model), config_(model.config()), capacity_(max_tokens) {
  if (max_tokens <= 0) fail("generate: the KV cache needs room for at least one token");
  Backend& backend = model.backend();
  const Device device = backend.device();
  dtype_ = model.weights().values().embed.dtype;
  if (device == Device::CPU && dtype_ != DType::F32)
    fail("generate: the CPU backend computes in fp32; load the model with fp32 weights");
  const std::vector<float> inv_freq = rope_inv_freq(config_);
  const int64_t half = static_cast<int64_t>(inv_freq.size());
  inv_freq_ = Buffer(DType::F32, {half}, device);
  backend.copy(inv_freq_, Tensor(const_cast<float*>(inv_freq.data()), DType::F32, {half}));
  const int64_t Hkv = config_.num_key_value_heads, D = config_.head_dim;
  for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
    keys_.emplace_back(dtype_, Shape{capacity_, Hkv, D}, device);
    values_.emplace_back(dtype_, Shape{capacity_, Hkv, D}, device);
  }
}

std::vector<float> KvCache::forward(std::span<const int32_t> tokens) {
  Backend& backend = model_.backend();
  const Device device = backend.device();
  const DType dt = dtype_;
  const ModelConfig& c = config_;
  const WeightTensors& w = model_.weights().values();
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) fail("generate: no tokens to run");
  if (length_ + n > capacity_)
    fail("generate: the sequence would reach ", length_ + n, " tokens, more than the cache holds (",
         capacity_, ")");
  const int64_t H = c.hidden_size, D = c.head_dim, Hq = c.num_attention_heads,
                Hkv = c.num_key_value_heads, V = c.vocab_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));

  std::vector<int32_t> host_ids(tokens.begin(), tokens.end()), host_positions(n);
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= V)
      fail("generate: token id ", tokens[i], " is outside the vocabulary (", V, ")");
    host_positions[i] = static_cast<int32_t>(length_ + i);
  }
  Buffer ids(DType::I32, {n}, device), positions(DType::I32, {n}, device);
  backend.copy(ids, Tensor(host_ids.data(), DType::I32, {n}));
  backend.copy(positions, Tensor(host_positions.data(), DType::I32, {n}));

  Buffer x(dt, {n, H}, device), normed(dt, {n, H}, device),
      rstd(DType::F32, {n * std::max(Hq, int64_t{1})}, device);
  Buffer q(dt, {n, Hq * D}, device), k(dt, {n, Hkv * D}, device), v(dt, {n, Hkv * D}, device);
  Buffer q_proj(dt, {n, Hq * D}, device), k_proj(dt, {n, Hkv * D}, device);
  Buffer attention(dt, {n, Hq * D}, device), delta(dt, {n, H}, device);
  backend.embedding_forward(ids, w.embed, x);  // (n, H)

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    // ---- attention ----
    backend.rmsnorm_forward(x, lw.input_norm, eps, normed, rstd.tensor().slice_rows(0, n));
    const Tensor q_target = c.qk_norm ? q_proj.tensor() : q.tensor();
    const Tensor k_target = c.qk_norm ? k_proj.tensor() : k.tensor();
    backend.gemm(normed, false, lw.q, true, q_target);  // (n, Hq*D)
    backend.gemm(normed, false, lw.k, true, k_target);  // (n, Hkv*D)
    backend.gemm(normed, false, lw.v, true, v);         // (n, Hkv*D)
    if (lw.q_bias.defined() && lw.q_bias.data) {
      backend.add_bias(q_target, lw.q_bias);
      backend.add_bias(k_target, lw.k_bias);
      backend.add_bias(v, lw.v_bias);
    }
    if (c.qk_norm) {
      backend.rmsnorm_forward(q_proj.tensor().view({n * Hq, D}), lw.q_norm, eps,
                              q.tensor().view({n * Hq, D}), rstd.tensor().slice_rows(0, n * Hq));
      backend.rmsnorm_forward(k_proj.tensor().view({n * Hkv, D}), lw.k_norm, eps,
                              k.tensor().view({n * Hkv, D}), rstd.tensor().slice_rows(0, n * Hkv));
    }
    backend.rope_forward(q.tensor().view({n, Hq, D}), positions, inv_freq_);
    backend.rope_forward(k.tensor().view({n, Hkv, D}), positions, inv_freq_);
    const Tensor cache_k = keys_[static_cast<size_t>(l)].tensor();    // (capacity, Hkv, D)
    const Tensor cache_v = values_[static_cast<size_t>(l)].tensor();  // (capacity, Hkv, D)
    backend.copy(cache_k.slice_rows(length_, length_ + n), k);
    backend.copy(cache_v.slice_rows(length_, length_ + n), v);
    backend.attention_cached_forward(q.tensor().view({n, Hq, D}), cache_k, cache_v, length_, scale,
                                     attention.tensor().view({n, Hq, D}));
    backend.gemm(attention, false, lw.o, true, delta);  // (n, H)
    if (lw.o_bias.defined() && lw.o_bias.data) backend.add_bias(delta, lw.o_bias);
    backend.add(x, x, delta);

    // ---- MLP or MoE ----
    backend.rmsnorm_forward(x, lw.post_norm, eps, normed, rstd.tensor().slice_rows(0, n));
    if (!lw.moe) {
      const int64_t I = lw.mlp_down.shape[1];
      Buffer gate_up(dt, {n, 2 * I}, device), act(dt, {n, I}, device);
      backend.gemm(normed, false, lw.mlp_gate_up, true, gate_up);  // (n, 2I)
      backend.swiglu_forward(gate_up, act);                        // (n, I)
      backend.gemm(act, false, lw.mlp_down, true, delta);          // (n, H)
    } else {
      const int64_t E = c.num_experts, top_k = c.num_experts_per_tok, I = lw.experts_down.shape[2];
      const int64_t slots = n * top_k;
      Buffer router_logits(dt, {n, E}, device), probs(DType::F32, {n, E}, device);
      Buffer topk_ids(DType::I32, {n, top_k}, device), topk_weights(DType::F32, {n, top_k}, device);
      backend.gemm(normed, false, lw.router, true, router_logits);  // (n, E)
      backend.router_forward(router_logits, static_cast<int>(top_k), c.norm_topk_prob, probs,
                             topk_ids, topk_weights);
      Buffer expert_offsets(DType::I32, {E + 1}, device), sorted_slots(DType::I32, {slots}, device),
          slot_rows(DType::I32, {slots}, device);
      backend.moe_sort_by_expert(topk_ids, static_cast<int>(E), expert_offsets, sorted_slots,
                                 slot_rows);
      Buffer rows(dt, {slots, H}, device), gate_up(dt, {slots, 2 * I}, device),
          act(dt, {slots, I}, device), expert_out(dt, {slots, H}, device);
      backend.moe_gather(normed, sorted_slots, static_cast<int>(top_k), rows);        // (n*k, H)
      backend.grouped_gemm(rows, lw.experts_gate_up, true, expert_offsets, gate_up);  // (n*k, 2I)
      backend.swiglu_forward(gate_up, act);                                           // (n*k, I)
      backend.grouped_gemm(act, lw.experts_down, true, expert_offsets, expert_out);   // (n*k, H)
      backend.moe_combine(expert_out, topk_weights, slot_rows, delta);                // (n, H)
    }
    backend.add(x, x, delta);
  }
  length_ += n;

  // ---- the last position's logits ----
  Buffer last(dt, {1, H}, device), last_rstd(DType::F32, {1}, device),
      logits(DType::F32, {1, V}, device);
  backend.rmsnorm_forward(x.tensor().slice_rows(n - 1, n), w.final_norm, eps, last, last_rstd);
  backend.gemm(last, false, w.lm_head, true, logits);  // (1, V)
  std::vector<float> host_logits(static_cast<size_t>(V));
  backend.copy(Tensor(host_logits.data(), DType::F32, {1, V}), logits);
  backend.synchronize();
  return host_logits;
}

int32_t sample_token(std::span<const float> logits, double temperature, double top_p,
                     std::mt19937_64& rng) {
  if (logits.empty()) fail("generate: empty logits");
  if (temperature <= 0.0) {  // greedy; ties to the lower id, as torch.argmax
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  std::vector<double> probs(logits.size());
  double total = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    probs[i] = std::exp((static_cast<double>(logits[i]) - max_logit) / temperature);
    total += probs[i];
  }
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return probs[a] > probs[b]; });
  // The nucleus: the most likely tokens until their mass reaches top_p (at least one).
  size_t keep = 0;
  double mass = 0;
  while (keep < order.size() && (keep == 0 || mass < top_p * total)) mass += probs[order[keep++]];
  std::uniform_real_distribution<double> uniform(0.0, mass);
  double target = uniform(rng), running = 0;
  for (size_t i = 0; i < keep; ++i) {
    running += probs[order[i]];
    if (target < running) return order[i];
  }
  return order[keep - 1];
}

std::vector<int32_t> generate(const Model& model, std::span<const int32_t> prompt,
                              const GenerationOptions& options,
                              const std::function<void(int32_t)>& on_token) {
  if (prompt.empty()) fail("generate: the prompt is empty");
  if (options.max_new_tokens < 0) fail("generate: --max-new-tokens must be >= 0");
  KvCache cache(model, static_cast<int64_t>(prompt.size()) + options.max_new_tokens);
  std::mt19937_64 rng(options.seed);
  std::vector<int32_t> produced;
  if (options.max_new_tokens == 0) return produced;
  std::vector<float> logits = cache.forward(prompt);  // prefill
  while (true) {
    const int32_t token = sample_token(logits, options.temperature, options.top_p, rng);
    produced.push_back(token);
    if (on_token) on_token(token);
    const bool stop = std::find(options.stop_ids.begin(), options.stop_ids.end(), token) !=
                      options.stop_ids.end();
    if (stop || static_cast<int64_t>(produced.size()) >= options.max_new_tokens) break;
    const int32_t next[1] = {token};
    logits = cache.forward(next);  // decode one position
  }
  return produced;
}

}  // namespace moetune
