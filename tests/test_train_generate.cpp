// KV-cache generation against the training forward: the logits of the last position after a
// prefill and after each cached decode step must equal Model::evaluate's logits over the
// whole sequence recomputed from scratch (fp32 tolerance), for a MoE and a dense model.
// Also: greedy sampling picks the argmax, top-p sampling stays in the nucleus.
#include <gtest/gtest.h>

#include <random>

#include "core/error.h"
#include "model/generate.h"
#include "model/model.h"
#include "ops/backend.h"
#include "test_util.h"

namespace moetune {
namespace {

ModelConfig demo_config() {
  return load_model_config(testing::source_dir() / "recipes" / "demo" / "config.json");
}

// Logits (V) of the last position of `tokens` by the full (training) forward.
std::vector<float> full_forward_last_logits(Model& model, const std::vector<int32_t>& tokens) {
  const int64_t T = static_cast<int64_t>(tokens.size()), V = model.config().vocab_size;
  std::vector<int32_t> labels(tokens.size(), -100);
  BatchView batch;
  batch.batch = 1;
  batch.seq = T;
  batch.input_ids = tokens;
  batch.labels = labels;
  Buffer logits(DType::F32, {T, V});
  model.evaluate(batch, logits);
  return std::vector<float>(logits.ptr<float>() + (T - 1) * V, logits.ptr<float>() + T * V);
}

void check_cache_matches_full_forward(const ModelConfig& config) {
  auto backend = make_cpu_backend();
  auto model = Model::random_init(config, 7, *backend);
  std::vector<int32_t> tokens = {1, 17, 25, 30, 13, 22, 40, 2};
  KvCache cache(*model, 32);
  std::vector<float> cached = cache.forward(tokens);
  std::mt19937_64 rng(3);
  for (int step = 0; step < 4; ++step) {
    const std::vector<float> full = full_forward_last_logits(*model, tokens);
    ASSERT_EQ(cached.size(), full.size());
    EXPECT_LT(testing::relative_error(cached.data(), full.data(), full.size()), 1e-4)
        << "step " << step;
    const int32_t next = sample_token(cached, 0.0, 1.0, rng);
    EXPECT_EQ(next, sample_token(full, 0.0, 1.0, rng));
    tokens.push_back(next);
    const int32_t one[1] = {next};
    cached = cache.forward(one);
  }
  EXPECT_EQ(cache.length(), static_cast<int64_t>(tokens.size()));
}

TEST(Generate, KvCacheMatchesFullForwardMoe) { check_cache_matches_full_forward(demo_config()); }

TEST(Generate, KvCacheMatchesFullForwardDense) {
  ModelConfig config = demo_config();
  config.num_experts = 0;
  config.model_type = "qwen3";
  config.family = ModelFamily::Qwen3;
  check_cache_matches_full_forward(config);
}

TEST(Generate, Sampling) {
  const std::vector<float> logits = {0.0f, 3.0f, 2.9f, -5.0f};
  std::mt19937_64 rng(1);
  EXPECT_EQ(sample_token(logits, 0.0, 1.0, rng), 1);
  for (int i = 0; i < 200; ++i) {
    const int32_t token = sample_token(logits, 1.0, 0.5, rng);
    EXPECT_TRUE(token == 1 || token == 2) << token;  // the nucleus of mass 0.5 is {1, 2}
  }
  int seen_other = 0;
  for (int i = 0; i < 500; ++i) seen_other += sample_token(logits, 5.0, 1.0, rng) == 0;
  EXPECT_GT(seen_other, 0);  // a hot temperature reaches the unlikely tokens
}

TEST(Generate, GenerateStopsAtEos) {
  auto backend = make_cpu_backend();
  auto model = Model::random_init(demo_config(), 11, *backend);
  const std::vector<int32_t> prompt = {1, 5, 9};
  GenerationOptions options;
  options.max_new_tokens = 6;
  const auto free_run = generate(*model, prompt, options);
  ASSERT_EQ(free_run.size(), 6u);
  options.stop_ids = {free_run[2]};
  const auto stopped = generate(*model, prompt, options);
  EXPECT_LE(stopped.size(), 3u);
  EXPECT_EQ(stopped.back(), free_run[2]);
}

}  // namespace
}  // namespace moetune
