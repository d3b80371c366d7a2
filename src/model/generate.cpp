// KV-cache generation (see generate.h). One forward pass over n new tokens:
//   x (n, H) = embed[ids]
//   per layer: h = rmsnorm(x); q, k, v = h Wq^T, h Wk^T, h Wv^T (+ biases; per-head q/k norm);
//              RoPE at the absolute positions; k, v appended to the cache;
//              attention of each new query over cache[0 .. its position] (causal, GQA);
//              x += o_proj; h = rmsnorm(x); x += MLP(h) or MoE(h)
//   logits (V) = lm_head(rmsnorm(x[last]))
// MoE runs token by token over its top-k experts (slices of the fused expert weights).
#include "model/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace moetune {

namespace {

Tensor row_of(const Tensor& matrix, int64_t row) { return matrix.slice_rows(row, row + 1); }

}  // namespace

KvCache::KvCache(const Model& model, int64_t max_tokens)
    : model_(model), config_(model.config()), capacity_(max_tokens) {
  if (model.backend().device() != Device::CPU)
    fail("generate: the KV-cache generator runs on the CPU only for now");
  for (const Parameter& parameter : model.parameters())
    if (parameter.value.dtype != DType::F32)
      fail("generate: parameter ", parameter.name, " is ", dtype_name(parameter.value.dtype),
           "; load the model with fp32 weights for generation");
  if (max_tokens <= 0) fail("generate: the KV cache needs room for at least one token");
  const std::vector<float> inv_freq = rope_inv_freq(config_);
  inv_freq_ = Buffer(DType::F32, {static_cast<int64_t>(inv_freq.size())});
  std::copy(inv_freq.begin(), inv_freq.end(), inv_freq_.ptr<float>());
  const int64_t kv_width = config_.num_key_value_heads * config_.head_dim;
  for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
    keys_.emplace_back(DType::F32, Shape{capacity_, kv_width});
    values_.emplace_back(DType::F32, Shape{capacity_, kv_width});
  }
}

std::vector<float> KvCache::forward(std::span<const int32_t> tokens) {
  Backend& backend = model_.backend();
  const ModelConfig& c = config_;
  const WeightTensors& w = model_.weights().values();
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) fail("generate: no tokens to run");
  if (length_ + n > capacity_)
    fail("generate: the sequence would reach ", length_ + n, " tokens, more than the cache holds (",
         capacity_, ")");
  const int64_t H = c.hidden_size, D = c.head_dim, Hq = c.num_attention_heads,
                Hkv = c.num_key_value_heads;
  const int64_t group = Hq / Hkv, V = c.vocab_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));

  Buffer ids(DType::I32, {n}), positions(DType::I32, {n});
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= V)
      fail("generate: token id ", tokens[i], " is outside the vocabulary (", V, ")");
    ids.ptr<int32_t>()[i] = tokens[i];
    positions.ptr<int32_t>()[i] = static_cast<int32_t>(length_ + i);
  }
  Buffer x(DType::F32, {n, H}), normed(DType::F32, {n, H}),
      rstd(DType::F32, {n * std::max(Hq, int64_t{1})});
  Buffer q(DType::F32, {n, Hq * D}), k(DType::F32, {n, Hkv * D}), v(DType::F32, {n, Hkv * D});
  Buffer q_proj(DType::F32, {n, Hq * D}), k_proj(DType::F32, {n, Hkv * D});
  Buffer attention(DType::F32, {n, Hq * D}), delta(DType::F32, {n, H});
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
    float* cache_k = keys_[static_cast<size_t>(l)].ptr<float>();
    float* cache_v = values_[static_cast<size_t>(l)].ptr<float>();
    std::copy_n(k.ptr<float>(), n * Hkv * D, cache_k + length_ * Hkv * D);
    std::copy_n(v.ptr<float>(), n * Hkv * D, cache_v + length_ * Hkv * D);

    // Each new query i (absolute position length_ + i) attends to cached positions 0..that.
    std::vector<float> scores(static_cast<size_t>(length_ + n));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t visible = length_ + i + 1;
      for (int64_t h = 0; h < Hq; ++h) {
        const float* query = q.ptr<float>() + (i * Hq + h) * D;
        const int64_t kv_head = h / group;
        float max_score = -INFINITY;
        for (int64_t j = 0; j < visible; ++j) {
          const float* key = cache_k + (j * Hkv + kv_head) * D;
          float dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += query[d] * key[d];
          scores[static_cast<size_t>(j)] = dot * scale;
          max_score = std::max(max_score, scores[static_cast<size_t>(j)]);
        }
        double total = 0;
        for (int64_t j = 0; j < visible; ++j) {
          scores[static_cast<size_t>(j)] = std::exp(scores[static_cast<size_t>(j)] - max_score);
          total += scores[static_cast<size_t>(j)];
        }
        float* out = attention.ptr<float>() + (i * Hq + h) * D;
        std::fill_n(out, D, 0.0f);
        for (int64_t j = 0; j < visible; ++j) {
          const float p = static_cast<float>(scores[static_cast<size_t>(j)] / total);
          const float* value = cache_v + (j * Hkv + kv_head) * D;
          for (int64_t d = 0; d < D; ++d) out[d] += p * value[d];
        }
      }
    }
    backend.gemm(attention, false, lw.o, true, delta);  // (n, H)
    if (lw.o_bias.defined() && lw.o_bias.data) backend.add_bias(delta, lw.o_bias);
    backend.add(x, x, delta);

    // ---- MLP or MoE ----
    backend.rmsnorm_forward(x, lw.post_norm, eps, normed, rstd.tensor().slice_rows(0, n));
    if (!lw.moe) {
      const int64_t I = lw.mlp_down.shape[1];
      Buffer gate_up(DType::F32, {n, 2 * I}), act(DType::F32, {n, I});
      backend.gemm(normed, false, lw.mlp_gate_up, true, gate_up);  // (n, 2I)
      backend.swiglu_forward(gate_up, act);                        // (n, I)
      backend.gemm(act, false, lw.mlp_down, true, delta);          // (n, H)
    } else {
      const int64_t E = c.num_experts, top_k = c.num_experts_per_tok, I = lw.experts_down.shape[2];
      Buffer router_logits(DType::F32, {n, E}), probs(DType::F32, {n, E});
      Buffer topk_ids(DType::I32, {n, top_k}), topk_weights(DType::F32, {n, top_k});
      backend.gemm(normed, false, lw.router, true, router_logits);  // (n, E)
      backend.router_forward(router_logits, static_cast<int>(top_k),
                             c.norm_topk_prob || c.family == ModelFamily::Mixtral, probs, topk_ids,
                             topk_weights);
      Buffer gate_up(DType::F32, {1, 2 * I}), act(DType::F32, {1, I}),
          expert_out(DType::F32, {1, H});
      backend.fill(delta, 0.0f);
      for (int64_t i = 0; i < n; ++i) {
        float* out = delta.ptr<float>() + i * H;
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t expert = topk_ids.ptr<int32_t>()[i * top_k + j];
          const float weight = topk_weights.ptr<float>()[i * top_k + j];
          backend.gemm(row_of(normed, i), false, lw.experts_gate_up.select(expert), true,
                       gate_up);                                                       // (1, 2I)
          backend.swiglu_forward(gate_up, act);                                        // (1, I)
          backend.gemm(act, false, lw.experts_down.select(expert), true, expert_out);  // (1, H)
          for (int64_t h = 0; h < H; ++h) out[h] += weight * expert_out.ptr<float>()[h];
        }
      }
    }
    backend.add(x, x, delta);
  }
  length_ += n;

  // ---- the last position's logits ----
  Buffer last(DType::F32, {1, H}), last_rstd(DType::F32, {1}), logits(DType::F32, {1, V});
  backend.rmsnorm_forward(row_of(x, n - 1), w.final_norm, eps, last, last_rstd);
  backend.gemm(last, false, w.lm_head, true, logits);  // (1, V)
  backend.synchronize();
  return std::vector<float>(logits.ptr<float>(), logits.ptr<float>() + V);
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
