// Sharded data parallelism on the CPU with real processes: N ranks (testing::run_ranks:
// fresh copies of this binary running DataParallelRank.TrainsItsMicroBatches), each with its
// own CPU backend and tiny Qwen3-MoE (router aux loss on), talk through a StoreCommunicator
// and train their micro-batches (m % N == rank) with DataParallelAdamW, reductions started
// by the gradient-ready hook of the last micro-batch. After 2 optimizer steps with active
// clipping, every rank's loss and weights must match one process that accumulates all
// micro-batches with the plain AdamW (fp32, 1e-5 relative), for ZeRO stages 0, 1, 2, and
// with 3 ranks (tensors whose size does not divide: the padded collectives). The optimizer
// in the backward (InBackwardOptimizer over DataParallelAdamW, gradients per group, one
// micro-batch per rank and step, no clipping) must match one process the same way, and give
// the same gradient norms.
// Also: resolve_layout's errors name the key; saved optimizer shards are re-cut for other
// ranges, and a missing rank or a malformed shards.json fail with the file's name.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <numeric>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/store.h"
#include "model/model.h"
#include "test_model_fixtures.h"
#include "test_spawn_ranks.h"
#include "test_util.h"
#include "train/adamw.h"
#include "train/dist_checkpoint.h"
#include "train/optimizer_in_backward.h"
#include "train/parallel_context.h"
#include "train/sharded_adamw.h"

namespace moetune {
namespace {

ModelConfig tiny_moe_config() { return testing::tiny_moe_config({{"vocab_size", 31}}); }

constexpr int kMicroBatches = 6;  // per optimizer step, divisible by 2 and 3
constexpr int kSteps = 2;
constexpr int64_t kRows = 2, kSeq = 6;
constexpr double kMaxNorm = 0.05;  // small: clipping is active

// How a run steps: kMicroBatches per step with clipping, or (the optimizer in the backward)
// one micro-batch per rank and no clipping.
struct StepShape {
  int micro_batches = kMicroBatches;
  double max_norm = kMaxNorm;  // 0: no clipping
};
StepShape in_backward_shape(int world) { return {world, 0.0}; }

struct MicroBatch {
  std::vector<int32_t> ids, labels;
  int64_t trained = 0;  // labels after the shift
  BatchView view() const { return {kRows, kSeq, ids, labels, {}, {}}; }
};

MicroBatch make_micro_batch(int step, int index, int64_t vocab) {
  testing::Tokens tokens =
      testing::make_tokens(kRows * kSeq, static_cast<unsigned>(100 * step + index), vocab, 0.6f);
  MicroBatch batch{std::move(tokens.ids), std::move(tokens.labels)};
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t t = 1; t < kSeq; ++t) batch.trained += batch.labels[r * kSeq + t] != -100;
  return batch;
}

AdamWConfig adamw_config() {
  AdamWConfig config;
  config.lr = 1e-2;
  config.weight_decay = 0.1;
  return config;
}

struct RunResult {
  std::vector<double> losses;  // per step: summed loss / trained tokens (all ranks)
  std::vector<double> norms;   // per step: the global gradient norm
  std::vector<float> weights;  // every parameter, flattened, in order
  std::vector<size_t> sizes;   // of each parameter
};

void keep_weights(Model& model, RunResult& result) {
  for (const Parameter& parameter : model.parameters()) {
    result.weights.insert(result.weights.end(), parameter.value.ptr<float>(),
                          parameter.value.ptr<float>() + parameter.value.numel());
    result.sizes.push_back(static_cast<size_t>(parameter.value.numel()));
  }
}

// One process, every micro-batch, the plain AdamW: the reference.
RunResult train_alone(const StepShape& shape = {}) {
  auto backend = make_cpu_backend();
  const ModelConfig config = tiny_moe_config();
  auto model = Model::random_init(config, 5, *backend);
  for (Parameter& parameter : model->parameters())
    parameter.decay = parameter.name.find("norm") == std::string::npos;
  AdamW optimizer(model->parameters(), *backend, adamw_config());
  std::vector<Tensor> grads;
  for (const Parameter& parameter : model->parameters()) grads.push_back(parameter.grad);
  Buffer norm_squared(DType::F32, {1});
  RunResult result;
  for (int step = 0; step < kSteps; ++step) {
    std::vector<MicroBatch> batches;
    int64_t trained = 0;
    for (int m = 0; m < shape.micro_batches; ++m) {
      batches.push_back(make_micro_batch(step, m, config.vocab_size));
      trained += batches.back().trained;
    }
    model->zero_grads();
    double loss_sum = 0;
    for (const MicroBatch& batch : batches)
      loss_sum += model->forward_backward(batch.view(), 1.0f / float(trained)).loss_sum;
    backend->grad_norm_squared(grads, norm_squared);
    const double norm = std::sqrt(norm_squared.tensor().ptr<float>()[0]);
    const double clip = shape.max_norm > 0 ? std::min(1.0, shape.max_norm / (norm + 1e-6)) : 1.0;
    optimizer.step(adamw_config().lr, float(clip));
    result.losses.push_back(loss_sum / double(trained));
    result.norms.push_back(norm);
  }
  keep_weights(*model, result);
  return result;
}

// This rank's micro-batches, DataParallelAdamW at `stage` (with `in_backward`: driven by
// InBackwardOptimizer, one micro-batch per rank and step, no clipping).
RunResult train_rank(const testing::SpawnedRank& spawned, int stage, bool in_backward) {
  const int rank = spawned.rank(), world = spawned.world();
  const auto store = spawned.connect();
  std::vector<int> everyone(static_cast<size_t>(world));
  std::iota(everyone.begin(), everyone.end(), 0);
  auto groups =
      dist::make_parallel_groups(std::make_unique<dist::StoreCommunicator>(*store, everyone), 1);
  auto backend = make_cpu_backend();
  const ModelConfig config = tiny_moe_config();
  ModelOptions model_options;
  if (in_backward) model_options.grad_storage = GradientStorage::PerGroup;
  auto model = Model::random_init(config, 5, *backend, model_options);
  for (Parameter& parameter : model->parameters())
    parameter.decay = parameter.name.find("norm") == std::string::npos;
  DataParallelOptions options;
  options.zero_stage = stage;
  DataParallelAdamW optimizer(model->parameters(), model->gradient_groups(), *backend,
                              adamw_config(), *groups.world, *groups.expert_dp, options);
  const StepShape shape = in_backward ? in_backward_shape(world) : StepShape{};
  std::unique_ptr<InBackwardOptimizer> updater;
  bool last = false;
  size_t hooked = 0;
  if (in_backward)
    updater = std::make_unique<InBackwardOptimizer>(*model, optimizer);
  else
    model->set_gradient_ready_hook([&](size_t group) {
      if (!last) return;
      optimizer.reduce_group(group);
      ++hooked;
    });
  RunResult result;
  for (int step = 0; step < kSteps; ++step) {
    std::vector<MicroBatch> batches;
    int64_t trained = 0;
    for (int m = 0; m < shape.micro_batches; ++m) {
      batches.push_back(make_micro_batch(step, m, config.vocab_size));
      trained += batches.back().trained;
    }
    model->zero_grads();
    if (updater) updater->begin_step(adamw_config().lr);
    double loss_sum = 0;
    for (int m = rank; m < shape.micro_batches; m += world) {
      last = m + world >= shape.micro_batches;
      loss_sum += model->forward_backward(batches[m].view(), 1.0f / float(trained)).loss_sum;
    }
    last = false;
    all_reduce_host(*groups.world, *backend, std::span<double>(&loss_sum, 1));
    double norm = 0;
    if (updater) {
      norm = updater->grad_norm();
    } else {
      optimizer.finish_reduction();
      norm = std::sqrt(optimizer.grad_norm_squared());
      optimizer.step(adamw_config().lr, float(std::min(1.0, shape.max_norm / (norm + 1e-6))));
    }
    result.losses.push_back(loss_sum / double(trained));
    result.norms.push_back(norm);
  }
  if (!in_backward && hooked != kSteps * model->gradient_groups().size())
    fail("the hook reduced ", hooked, " groups");
  if (in_backward && optimizer.step_count() != kSteps)
    fail("the optimizer counted ", optimizer.step_count(), " steps");
  keep_weights(*model, result);
  return result;
}

void write_result(const std::filesystem::path& file, const RunResult& result) {
  std::ofstream out(file, std::ios::binary);
  const size_t losses = result.losses.size(), weights = result.weights.size();
  out.write(reinterpret_cast<const char*>(&losses), sizeof(losses));
  out.write(reinterpret_cast<const char*>(result.losses.data()), losses * sizeof(double));
  out.write(reinterpret_cast<const char*>(result.norms.data()), losses * sizeof(double));
  out.write(reinterpret_cast<const char*>(&weights), sizeof(weights));
  out.write(reinterpret_cast<const char*>(result.weights.data()), weights * sizeof(float));
  const size_t sizes = result.sizes.size();
  out.write(reinterpret_cast<const char*>(&sizes), sizeof(sizes));
  out.write(reinterpret_cast<const char*>(result.sizes.data()), sizes * sizeof(size_t));
}

RunResult read_result(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  RunResult result;
  size_t count = 0;
  in.read(reinterpret_cast<char*>(&count), sizeof(count));
  result.losses.resize(count);
  in.read(reinterpret_cast<char*>(result.losses.data()), count * sizeof(double));
  result.norms.resize(count);
  in.read(reinterpret_cast<char*>(result.norms.data()), count * sizeof(double));
  in.read(reinterpret_cast<char*>(&count), sizeof(count));
  result.weights.resize(count);
  in.read(reinterpret_cast<char*>(result.weights.data()), count * sizeof(float));
  in.read(reinterpret_cast<char*>(&count), sizeof(count));
  result.sizes.resize(count);
  in.read(reinterpret_cast<char*>(result.sizes.data()), count * sizeof(size_t));
  if (!in) fail("cannot read ", file.string());
  return result;
}

// Trains on `world` ranks; returns each rank's result (fails if a rank fails).
std::vector<RunResult> train_on_ranks(int world, int stage, bool in_backward = false) {
  testing::TempDir dir;
  const auto runs = testing::run_ranks(world, "DataParallelRank.TrainsItsMicroBatches",
                                       {.args = {{"STAGE", std::to_string(stage)},
                                                 {"IN_BACKWARD", in_backward ? "1" : "0"},
                                                 {"OUT", dir.path().string()}}});
  if (const auto passed = testing::ranks_passed(runs); !passed) fail(passed.message());
  std::vector<RunResult> results;
  for (int rank = 0; rank < world; ++rank)
    results.push_back(read_result(dir / ("rank" + std::to_string(rank))));
  return results;
}

// One rank of RanksMatchOneProcess: trains at ZeRO stage STAGE, writes OUT/rank<r>.
TEST(DataParallelRank, TrainsItsMicroBatches) {
  const auto spawned = testing::spawned_rank();
  if (!spawned) GTEST_SKIP() << testing::kRankBodyOnly;
  write_result(
      std::filesystem::path(spawned->arg("OUT")) / ("rank" + std::to_string(spawned->rank())),
      train_rank(*spawned, std::stoi(spawned->arg("STAGE")), spawned->arg("IN_BACKWARD") == "1"));
}

void expect_same_run(const RunResult& ranks_result, const RunResult& alone,
                     const std::string& what) {
  ASSERT_EQ(ranks_result.losses.size(), alone.losses.size());
  for (size_t i = 0; i < alone.losses.size(); ++i) {
    EXPECT_NEAR(ranks_result.losses[i], alone.losses[i], 1e-5 * std::abs(alone.losses[i])) << what;
    EXPECT_NEAR(ranks_result.norms[i], alone.norms[i], 1e-5 * alone.norms[i]) << what;
  }
  ASSERT_EQ(ranks_result.weights.size(), alone.weights.size());
  // Per tensor: max |difference| / max |value| (testing::relative_error). Per element would
  // be too strict: AdamW's m / sqrt(v) turns the rounding noise of a gradient that nearly
  // cancels into a visible difference of that one element.
  size_t offset = 0;
  for (size_t p = 0; p < alone.sizes.size(); offset += alone.sizes[p], ++p)
    EXPECT_LT(testing::relative_error(ranks_result.weights.data() + offset,
                                      alone.weights.data() + offset, alone.sizes[p]),
              1e-5)
        << what << ": parameter " << p << " differs from one process";
}

class DataParallelStages : public ::testing::TestWithParam<std::pair<int, int>> {};

TEST_P(DataParallelStages, RanksMatchOneProcess) {
  const auto [world, stage] = GetParam();
  const std::vector<RunResult> ranks = train_on_ranks(world, stage);
  const RunResult alone = train_alone();
  for (int rank = 0; rank < world; ++rank)
    expect_same_run(ranks[rank], alone,
                    "world " + std::to_string(world) + ", stage " + std::to_string(stage) +
                        ", rank " + std::to_string(rank));
  // Every rank holds the very same weights (the gathered shards).
  for (int rank = 1; rank < world; ++rank) EXPECT_EQ(ranks[rank].weights, ranks[0].weights);
}

INSTANTIATE_TEST_SUITE_P(ZeroStages, DataParallelStages,
                         ::testing::Values(std::pair{2, 0}, std::pair{2, 1}, std::pair{2, 2},
                                           std::pair{3, 2}, std::pair{3, 1}));

class DataParallelInBackward : public ::testing::TestWithParam<std::pair<int, int>> {};

TEST_P(DataParallelInBackward, RanksMatchOneProcess) {
  const auto [world, stage] = GetParam();
  const std::vector<RunResult> ranks = train_on_ranks(world, stage, /*in_backward=*/true);
  const RunResult alone = train_alone(in_backward_shape(world));
  for (int rank = 0; rank < world; ++rank)
    expect_same_run(ranks[rank], alone,
                    "optimizer in the backward, world " + std::to_string(world) + ", stage " +
                        std::to_string(stage) + ", rank " + std::to_string(rank));
  for (int rank = 1; rank < world; ++rank) EXPECT_EQ(ranks[rank].weights, ranks[0].weights);
}

// Stage 0 (replicated state), 1, 2 (reduce-scattered shards), and 3 ranks (padded).
INSTANTIATE_TEST_SUITE_P(ZeroStages, DataParallelInBackward,
                         ::testing::Values(std::pair{2, 0}, std::pair{2, 1}, std::pair{2, 2},
                                           std::pair{3, 2}));

TEST(DataParallel, LayoutErrorsNameTheKey) {
  auto message = [](int world, int64_t ep, int64_t dp, int64_t experts) {
    try {
      resolve_layout(world, ep, dp, experts);
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string();
  };
  EXPECT_EQ(message(4, 1, 0, 8), "");
  EXPECT_EQ(message(4, 1, 4, 8), "");
  const std::string ep = message(4, 3, 0, 6);
  EXPECT_NE(ep.find("parallel.expert_parallel: 3 does not divide the 4 ranks"), std::string::npos)
      << ep;
  const std::string experts = message(4, 4, 0, 6);
  EXPECT_NE(experts.find("does not divide the model's 6 experts"), std::string::npos) << experts;
  const std::string dp = message(4, 1, 2, 8);
  EXPECT_NE(dp.find("parallel.data_parallel: 2 does not match"), std::string::npos) << dp;
  const std::string dense = message(2, 2, 0, 0);
  EXPECT_NE(dense.find("needs a MoE model"), std::string::npos) << dense;
  LayoutKeys flags{"--expert-parallel", "--data-parallel", "--device"};
  EXPECT_NE(std::string([&] {
              try {
                resolve_layout(2, 3, 0, 6, flags);
              } catch (const Error& error) {
                return std::string(error.what());
              }
              return std::string();
            }())
                .find("--expert-parallel"),
            std::string::npos);
}

TEST(DataParallel, OptimizerShardsAreRecutAndCheckedOnLoad) {
  testing::TempDir dir;
  auto backend = make_cpu_backend();
  // Parameter "w" of 10 elements saved by two ranks: [0, 5) and [5, 10), value = index.
  std::vector<float> values(10);
  std::iota(values.begin(), values.end(), 0.0f);
  for (int rank = 0; rank < 2; ++rank) {
    OptimizerShard shard{"w", 10, 5 * rank, 5 * rank + 5, false, {}};
    shard.tensors.emplace_back("exp_avg.w", Tensor(values.data() + 5 * rank, DType::F32, {5}));
    write_optimizer_shards(dir.path(), rank, 0, std::span(&shard, 1), *backend);
  }
  auto load = [&](int64_t begin, int64_t end) {
    std::vector<float> out(static_cast<size_t>(end - begin), -1.0f);
    OptimizerShard target{"w", 10, begin, end, false, {}};
    target.tensors.emplace_back("exp_avg.w", Tensor(out.data(), DType::F32, {end - begin}));
    load_optimizer_shards(dir.path(), std::span(&target, 1), 0, *backend);
    return out;
  };
  EXPECT_EQ(load(0, 10), values);  // one process: both shards joined
  EXPECT_EQ(load(3, 8), std::vector<float>(values.begin() + 3, values.begin() + 8));  // re-cut
  EXPECT_TRUE(is_distributed_checkpoint(dir.path()));

  std::filesystem::remove_all(dir / "rank-1");
  try {
    load(0, 10);
    ADD_FAILURE() << "a missing rank must fail";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("covers 5 of the 10 elements"), std::string::npos)
        << error.what();
  }
  std::ofstream(dir / "rank-0" / "shards.json") << "{\"rank\": 0, \"params\": [";
  try {
    load(0, 5);
    ADD_FAILURE() << "a malformed shards.json must fail";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("shards.json"), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace moetune
