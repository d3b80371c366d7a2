// The expert-parallel token exchange on one rank (a LocalCommunicator, no forked processes,
// so it also runs under the sanitizers): a MoE layer's forward and backward through
// make_expert_parallel_dispatcher must equal the local dispatcher bit for bit (output, input
// gradient, router and expert gradients: with one rank the sums run in the same order), with
// fixed routing that leaves two experts without rows. Exchanges between real ranks are
// test_expert_parallel's job.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <vector>

#include "dist/communicator.h"
#include "io/model_config.h"
#include "model/expert_parallel_dispatch.h"
#include "model/moe.h"
#include "test_util.h"

namespace moetune {
namespace {

ModelConfig layer_config() {
  nlohmann::json json = {
      {"model_type", "qwen3_moe"}, {"vocab_size", 16},           {"hidden_size", 8},
      {"intermediate_size", 8},    {"moe_intermediate_size", 4}, {"num_hidden_layers", 1},
      {"num_attention_heads", 2},  {"num_key_value_heads", 1},   {"head_dim", 4},
      {"num_experts", 6},          {"num_experts_per_tok", 2},   {"norm_topk_prob", true},
      {"rms_norm_eps", 1e-6},      {"rope_theta", 10000.0},      {"max_position_embeddings", 32}};
  return parse_model_config(json, "layer_config");
}

struct Result {
  std::vector<float> out, dx, drouter, dgate_up, ddown;
  ExpertLoad load;
};

std::vector<float> values(const Buffer& buffer) {
  const float* data = buffer.ptr<float>();
  return std::vector<float>(data, data + buffer.numel());
}

Buffer random_buffer(Shape shape, unsigned seed) {
  Buffer buffer(DType::F32, shape);
  const std::vector<float> v =
      testing::random_floats(static_cast<size_t>(shape.numel()), seed, 0.5f);
  std::copy(v.begin(), v.end(), buffer.ptr<float>());
  return buffer;
}

// The local dispatcher, or the expert-parallel one over one rank.
Result run_layer(bool expert_parallel) {
  const ModelConfig config = layer_config();
  const int64_t N = 9, H = config.hidden_size, I = config.moe_intermediate_size;
  const int64_t E = config.num_experts, k = config.num_experts_per_tok;
  auto backend = make_cpu_backend();
  dist::LocalCommunicator comm;
  auto dispatcher = expert_parallel ? make_expert_parallel_dispatcher(*backend, comm, config)
                                    : make_local_dispatcher(*backend, E, k);
  Buffer x = random_buffer({N, H}, 1), dout = random_buffer({N, H}, 2);
  Buffer router = random_buffer({E, H}, 3), gate_up = random_buffer({E, 2 * I, H}, 4);
  Buffer down = random_buffer({E, H, I}, 5);
  Buffer drouter(DType::F32, {E, H}), dgate_up = random_buffer({E, 2 * I, H}, 6);
  Buffer ddown = random_buffer({E, H, I}, 7);  // garbage: overwritten (accumulate false)
  LayerWeights w, g;
  w.moe = g.moe = true;
  w.router = router;
  w.experts_gate_up = gate_up;
  w.experts_down = down;
  g.router = drouter;
  g.experts_gate_up = dgate_up;
  g.experts_down = ddown;

  MoeSaved saved;
  MoeScratch scratch;
  allocate_moe(config, N, DType::F32, Device::CPU, saved);
  allocate_moe_scratch(config, N, DType::F32, Device::CPU, scratch);
  // Fixed routing: experts 1 and 4 get nothing, the others uneven counts (6, 4, 4, 4).
  const std::vector<int32_t> ids = {0, 2, 2, 3, 3, 5, 5, 0, 0, 3, 2, 5, 0, 2, 3, 0, 0, 5};
  scratch.balanced_ids = Buffer(DType::I32, {N, k});
  std::copy(ids.begin(), ids.end(), scratch.balanced_ids.ptr<int32_t>());

  Buffer out(DType::F32, {N, H}), dx(DType::F32, {N, H});
  moe_forward(*backend, *dispatcher, config, w, x, saved, scratch, out);
  moe_backward(*backend, *dispatcher, config, w, g, x, saved, Tensor(), dout, scratch, dx,
               /*accumulate_grads=*/false);
  return {values(out),      values(dx),    values(drouter),
          values(dgate_up), values(ddown), dispatcher->take_expert_load()};
}

TEST(ExpertParallelOneRank, EqualsTheLocalDispatcherExactly) {
  const Result local = run_layer(false);
  const Result ep = run_layer(true);
  EXPECT_EQ(ep.out, local.out);
  EXPECT_EQ(ep.dx, local.dx);
  EXPECT_EQ(ep.drouter, local.drouter);
  EXPECT_EQ(ep.dgate_up, local.dgate_up);
  EXPECT_EQ(ep.ddown, local.ddown);
  // experts without rows got zero gradients (accumulate false overwrote the garbage)
  const int64_t per_expert = static_cast<int64_t>(local.ddown.size()) / 6;
  for (int64_t i = per_expert; i < 2 * per_expert; ++i) EXPECT_EQ(local.ddown[i], 0.0f);
  // one layer dispatched, all 18 rows on the one rank
  for (const Result* result : {&local, &ep}) {
    EXPECT_EQ(result->load.layers, 1);
    EXPECT_EQ(result->load.max_rows, 18.0);
    EXPECT_EQ(result->load.mean_rows, 18.0);
    EXPECT_EQ(result->load.rows_here, 18.0);
  }
}

}  // namespace
}  // namespace moetune
