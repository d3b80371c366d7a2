// The memory plan per rank (model/memory_plan.h) against what the code really allocates:
// the expert parameters it splits are the model's Parameter::expert tensors, expert
// parallelism divides only them, ZeRO shards the AdamW state and master weights over the
// ranks holding each parameter, the state dtype and master-weight switches count as the
// bench uses them, and `moetune plan --ranks N` prints the per-rank layout (bad --ranks is
// an error naming the flag).
#include <gtest/gtest.h>

#include <algorithm>

#include "model/memory_plan.h"
#include "model/model.h"
#include "ops/backend.h"
#include "test_model_fixtures.h"
#include "test_util.h"

namespace moetune {
namespace {

ModelConfig plan_config() {
  // Two MoE layers and one dense, 8 experts: the expert share is most of the model.
  return testing::tiny_moe_config({{"num_hidden_layers", 3},
                                   {"num_experts", 8},
                                   {"mlp_only_layers", {1}},
                                   {"moe_intermediate_size", 16}});
}

TEST(MemoryPlan, ExpertParametersAreTheModelsExpertTensors) {
  const ModelConfig config = plan_config();
  auto backend = make_cpu_backend();
  auto model = Model::uninitialized(config, *backend);
  int64_t experts = 0, all = 0;
  for (const Parameter& parameter : model->parameters()) {
    all += parameter.value.numel();
    if (parameter.expert) experts += parameter.value.numel();
  }
  EXPECT_GT(experts, 0);
  EXPECT_EQ(count_expert_parameters(config), experts);
  EXPECT_EQ(count_parameters(config, false), all);
}

TEST(MemoryPlan, ExpertParallelSplitsOnlyTheExperts) {
  const ModelConfig config = plan_config();
  const int64_t all = count_parameters(config, false), experts = count_expert_parameters(config);
  MemoryPlanOptions one{DType::BF16, DType::BF16, 1, 64};
  MemoryPlanOptions ep4 = one;
  ep4.expert_parallel = 4;
  const MemoryPlan alone = plan_memory(config, one), split = plan_memory(config, ep4);
  EXPECT_EQ(alone.weights, all * 2);
  EXPECT_EQ(split.weights, (all - experts + experts / 4) * 2);
  EXPECT_EQ(split.grads, split.weights);
  // Without ZeRO each rank keeps the state of what it holds (fp32: 8 bytes per element).
  EXPECT_EQ(split.optimizer_state, (all - experts + experts / 4) * 8);
  // The token exchange's scratch: the rank-sorted tokens to send (a tokens * top-k row
  // buffer), the tokens received (at most tokens * min(ep, top-k)) and the router weight
  // gradients of those (4 bytes per token and choice, going and coming back).
  const int64_t k = config.num_experts_per_tok, slots = 64 * k;
  const int64_t received = 64 * std::min<int64_t>(4, k);
  EXPECT_EQ(
      split.scratch - alone.scratch,
      slots * config.hidden_size * 2 + received * config.hidden_size * 2 + 2 * received * k * 4);
  EXPECT_GT(split.activations, alone.activations);  // the saved exchange plans
}

TEST(MemoryPlan, ZeroShardsStateOverTheRanksHoldingEachParameter) {
  const ModelConfig config = plan_config();
  const int64_t all = count_parameters(config, false), experts = count_expert_parameters(config);
  MemoryPlanOptions options{DType::BF16, DType::BF16, 1, 64};
  options.expert_parallel = 2;
  options.data_parallel = 3;
  options.zero_stage = 1;
  const MemoryPlan stage1 = plan_memory(config, options);
  // Non-expert parameters over all 6 ranks, this rank's half of the experts over 3 replicas.
  const int64_t updated = (all - experts) / 6 + experts / 2 / 3;
  EXPECT_EQ(stage1.optimizer_state, updated * 8);
  EXPECT_EQ(stage1.master_weights, updated * 4);
  EXPECT_EQ(stage1.grads, (all - experts + experts / 2) * 2);
  options.zero_stage = 2;  // + the reduced gradients' shards
  EXPECT_EQ(plan_memory(config, options).grads, stage1.grads + updated * 2);
  // The bench's storage: state in bf16, no master weights.
  options.state_dtype = DType::BF16;
  options.master_weights = false;
  const MemoryPlan bench = plan_memory(config, options);
  EXPECT_EQ(bench.optimizer_state, updated * 4);
  EXPECT_EQ(bench.master_weights, 0);
}

TEST(MemoryPlan, LogitsChunkIsCapped) {
  const ModelConfig config = plan_config();
  MemoryPlanOptions options{DType::BF16, DType::BF16, 2, 64};
  const int64_t base = plan_memory(config, options).scratch;
  const int64_t row = config.vocab_size * 2;
  options.logits_chunk_limit = 1 << 30;  // every row fits
  EXPECT_EQ(plan_memory(config, options).scratch - base, 128 * row);
  options.logits_chunk_limit = 10 * row + 1;  // 10 rows
  EXPECT_EQ(plan_memory(config, options).scratch - base, 10 * row);
}

TEST(MemoryPlanCommand, RanksGivePerRankLayoutAndBadRanksFail) {
  const std::string plan = testing::moetune_binary().string() + " plan '" +
                           (testing::source_dir() / "recipes" / "demo.yaml").string() + "'";
  const auto one = testing::run_command(plan + " 2>&1");
  ASSERT_EQ(one.exit_code, 0) << one.output;
  EXPECT_EQ(one.output.find("per rank"), std::string::npos) << one.output;
  const auto four = testing::run_command(plan + " --ranks 4 --parallel.expert_parallel=2 2>&1");
  ASSERT_EQ(four.exit_code, 0) << four.output;
  EXPECT_NE(four.output.find("per rank of 4: data_parallel 2 x expert_parallel 2"),
            std::string::npos)
      << four.output;
  for (const std::string bad : {"0", "two", "3x"}) {
    const auto run = testing::run_command(plan + " --ranks " + bad + " 2>&1");
    EXPECT_NE(run.exit_code, 0) << bad;
    EXPECT_NE(run.output.find("--ranks"), std::string::npos) << run.output;
  }
  const auto uneven = testing::run_command(plan + " --ranks 3 --parallel.expert_parallel=2 2>&1");
  EXPECT_NE(uneven.exit_code, 0);
  EXPECT_NE(uneven.output.find("parallel.expert_parallel"), std::string::npos) << uneven.output;
}

}  // namespace
}  // namespace moetune
