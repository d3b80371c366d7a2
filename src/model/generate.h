// Text generation with a KV cache, on the model's backend (CPU or CUDA) and in its weights'
// dtype: an inference-only forward over a Model's weights that keeps every layer's keys and
// values on the device, so each new token costs one position instead of the whole sequence.
// The prompt goes through in one pass (prefill), then one token at a time (decode). Every
// step is a Backend op (the training forward's projections, norms, RoPE, routing, expert
// dispatch and grouped GEMMs; attention_cached_forward for queries at the end of the cache);
// the host only uploads token ids and reads back the last position's logits (backend.copy).
// Sampling: greedy at temperature 0, else softmax(logits / T) restricted to the top-p
// nucleus, from a seeded RNG (reproducible).
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <span>
#include <vector>

#include "core/tensor.h"
#include "model/model.h"

namespace moetune {

class KvCache {
 public:
  // Room for max_tokens positions, on the model's device, in its weights' dtype.
  KvCache(const Model& model, int64_t max_tokens);

  // Runs `tokens` at positions [length(), length() + n), appends their keys and values, and
  // returns the logits of the last position (vocab_size values).
  std::vector<float> forward(std::span<const int32_t> tokens);
  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }
  void clear() { length_ = 0; }

 private:
  const Model& model_;
  const ModelConfig& config_;
  int64_t capacity_;
  int64_t length_ = 0;
  DType dtype_;                        // activations and cache: the weights' dtype
  Buffer inv_freq_;                    // (D/2) fp32 on the device
  std::vector<Buffer> keys_, values_;  // per layer (capacity, Hkv, D), after norm and RoPE
};

struct GenerationOptions {
  int64_t max_new_tokens = 64;
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;
  uint64_t seed = 0;
  std::vector<int32_t> stop_ids;  // generation ends after emitting one of these (eos)
};

// Picks the next token from logits (greedy, or temperature + top-p sampling with `rng`).
int32_t sample_token(std::span<const float> logits, double temperature, double top_p,
                     std::mt19937_64& rng);

// The new tokens after `prompt` (the stop token included when one was produced).
// on_token, when given, sees each token as it is produced.
std::vector<int32_t> generate(const Model& model, std::span<const int32_t> prompt,
                              const GenerationOptions& options,
                              const std::function<void(int32_t)>& on_token = {});

}  // namespace moetune
