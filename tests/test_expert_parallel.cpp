// Expert parallelism on the CPU with real processes: each test starts one process per rank
// (testing::run_ranks: a fresh copy of this binary running the matching ExpertParallelRank.*
// body test), all talking through a StoreCommunicator (the store served by the test
// process). Each rank runs its OWN micro-batch through a model whose experts are split over
// the ranks, and compares (check_expert_parallel) with a one-process model running every
// micro-batch with gradient accumulation: loss, aux loss, expert gradients (this rank's
// slice) and the other gradients (summed over the ranks) within 1e-5 relative. Also: experts
// (and a whole rank) receiving zero rows, EP=4 over 8 experts with layer recomputation, ep
// not dividing the experts, and an expert-parallel save that loads back with one process
// bit-exactly.
#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <numeric>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/store.h"
#include "io/model_config.h"
#include "model/expert_parallel_check.h"
#include "model/model.h"
#include "test_model_fixtures.h"
#include "test_spawn_ranks.h"
#include "test_util.h"

namespace moetune {
namespace {

namespace fs = std::filesystem;

fs::path fixture(const std::string& name) {
  return testing::source_dir() / "tests/fixtures/parity" / name;
}

std::string read_text(const fs::path& path) {
  std::ifstream file(path);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

// In a rank body: runs body(rank, comm) with a StoreCommunicator over all the ranks, then
// waits for the others. A rank fails by throwing (gtest reports it in the rank's output).
void on_this_rank(const testing::SpawnedRank& rank,
                  const std::function<void(int, dist::Communicator&)>& body) {
  const auto store = rank.connect();
  std::vector<int> everyone(rank.world());
  std::iota(everyone.begin(), everyone.end(), 0);
  dist::StoreCommunicator comm(*store, everyone);
  body(rank.rank(), comm);
  comm.barrier(nullptr);
}

// Runs the body test ExpertParallelRank.<body> on `world` ranks; expects every rank to pass.
void on_ranks(int world, const std::string& body, const testing::RankOptions& options = {}) {
  EXPECT_TRUE(
      testing::ranks_passed(testing::run_ranks(world, "ExpertParallelRank." + body, options)));
}

void expect(bool condition, const std::string& what) {
  if (!condition) fail(what);
}

// Fails (in the child) unless expert parallelism matched the reference within 1e-5.
void expect_match(const ExpertParallelCheck& check, int rank) {
  expect(check.max_error() <= 1e-5,
         "rank " + std::to_string(rank) + ": loss " + std::to_string(check.loss_error) + ", aux " +
             std::to_string(check.aux_error) + ", expert grads " +
             std::to_string(check.expert_grad_error) + ", other grads " +
             std::to_string(check.other_grad_error) + " (worst " + check.worst_tensor + ")");
  expect(check.local_expert_grad_sum > 0 || rank > 0, "no expert gradient on rank 0");
}

// The parity fixtures: Qwen3-MoE with 4 experts, top-2 and aux loss (layer 0 dense) on 2
// ranks; Mixtral (4 experts, top-2, its own HF names) on 2; Qwen3-MoE with 6 experts,
// top-3 on 3 ranks.
struct FixtureOnRanks {
  std::string fixture;
  int ep;
};
class ExpertParallelFixtures : public ::testing::TestWithParam<FixtureOnRanks> {};

TEST_P(ExpertParallelFixtures, MatchOneProcessWithAccumulation) {
  on_ranks(GetParam().ep, "FixtureMatchesOneProcess", {.args = {{"FIXTURE", GetParam().fixture}}});
}

TEST(ExpertParallelRank, FixtureMatchesOneProcess) {
  const auto spawned = testing::spawned_rank();
  if (!spawned) GTEST_SKIP() << testing::kRankBodyOnly;
  const std::string fixture_name = spawned->arg("FIXTURE");
  on_this_rank(*spawned, [&](int rank, dist::Communicator& comm) {
    auto backend = make_cpu_backend();
    auto make = [&](const ModelOptions& options) {
      return Model::from_hf_folder(fixture(fixture_name), *backend, options);
    };
    const ExpertParallelCheck check = check_expert_parallel(*backend, comm, make, 2, 8, 11);
    expect_match(check, rank);
    expect(check.local_expert_grad_sum > 0, "this rank's experts got no gradient");
  });
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ExpertParallelFixtures,
                         ::testing::Values(FixtureOnRanks{"qwen3_moe_aux", 2},
                                           FixtureOnRanks{"mixtral_top2", 2},
                                           FixtureOnRanks{"qwen3_moe_top3", 3}),
                         [](const auto& info) {
                           return info.param.fixture + "_ep" + std::to_string(info.param.ep);
                         });

// A zero router makes every token choose experts 0 and 1 (top-k ties go to the lower
// index): rank 1's experts receive no rows from any rank (M = 0), and their gradients stay 0.
TEST(ExpertParallel, ExpertsWithoutRowsAndARankWithNone) {
  on_ranks(2, "ExpertsWithoutRowsAndARankWithNone");
}

TEST(ExpertParallelRank, ExpertsWithoutRowsAndARankWithNone) {
  const auto spawned = testing::spawned_rank();
  if (!spawned) GTEST_SKIP() << testing::kRankBodyOnly;
  on_this_rank(*spawned, [](int rank, dist::Communicator& comm) {
    auto backend = make_cpu_backend();
    auto make = [&](const ModelOptions& options) {
      auto model = Model::from_hf_folder(fixture("qwen3_moe_aux"), *backend, options);
      for (const Parameter& parameter : model->parameters())
        if (parameter.name.ends_with("mlp.gate.weight")) backend->fill(parameter.value, 0.0f);
      return model;
    };
    const ExpertParallelCheck check = check_expert_parallel(*backend, comm, make, 1, 12, 5);
    expect_match(check, rank);
    expect((check.local_expert_grad_sum == 0) == (rank == 1),
           "expert gradients: " + std::to_string(check.local_expert_grad_sum));
    // The load report: every row on rank 0, so the busiest rank has twice the mean.
    ModelOptions options;
    options.expert_comm = &comm;
    auto model = make(options);
    std::vector<int32_t> ids(12);
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 7 + rank) % 16);
    model->evaluate(BatchView{1, 12, ids, ids, {}, {}});
    const ExpertLoad load = model->take_expert_load();
    expect(load.layers >= 1 && load.max_rows == 2 * load.mean_rows &&
               load.rows_here == (rank == 0 ? load.max_rows : 0.0),
           "expert load: layers " + std::to_string(load.layers) + " max " +
               std::to_string(load.max_rows) + " mean " + std::to_string(load.mean_rows) +
               " here " + std::to_string(load.rows_here));
    expect(model->take_expert_load().layers == 0, "the load starts over after a take");
  });
}

// Wider than the fixture's tiny MoE: 3 layers (layer 1 dense), 4 heads, `experts` experts.
ModelConfig tiny_moe_config(int experts) {
  return testing::tiny_moe_config({{"vocab_size", 96},
                                   {"hidden_size", 32},
                                   {"intermediate_size", 40},
                                   {"moe_intermediate_size", 16},
                                   {"num_hidden_layers", 3},
                                   {"num_attention_heads", 4},
                                   {"num_key_value_heads", 2},
                                   {"num_experts", experts},
                                   {"decoder_sparse_step", 1},
                                   {"mlp_only_layers", nlohmann::json::array({1})},
                                   {"router_aux_loss_coef", 0.01},
                                   {"initializer_range", 0.2}},
                                  "tiny");
}

// Four ranks, two experts each, two MoE layers, activation recomputation on the EP side
// (each recomputed layer exchanges again).
TEST(ExpertParallel, FourRanksEightExpertsWithRecompute) {
  on_ranks(4, "FourRanksEightExpertsWithRecompute");
}

TEST(ExpertParallelRank, FourRanksEightExpertsWithRecompute) {
  const auto spawned = testing::spawned_rank();
  if (!spawned) GTEST_SKIP() << testing::kRankBodyOnly;
  on_this_rank(*spawned, [](int rank, dist::Communicator& comm) {
    auto backend = make_cpu_backend();
    const ModelConfig config = tiny_moe_config(8);
    auto make = [&](const ModelOptions& options) {
      return Model::random_init(config, 1234, *backend, options);
    };
    ModelOptions options;
    options.recompute_layers = true;
    const ExpertParallelCheck check =
        check_expert_parallel(*backend, comm, make, 2, 6, 77, options);
    expect_match(check, rank);
  });
}

// A communicator of `size` ranks that is never used (the model fails before).
class IdleCommunicator final : public dist::Communicator {
 public:
  explicit IdleCommunicator(int size) : size_(size) {}
  int rank() const override { return 0; }
  int size() const override { return size_; }
  std::string name() const override { return "idle"; }
  void all_reduce_sum(const Tensor&, const Tensor&, dist::StreamHandle) override { unused(); }
  void reduce_scatter_sum(const Tensor&, const Tensor&, dist::StreamHandle) override { unused(); }
  void all_gather(const Tensor&, const Tensor&, dist::StreamHandle) override { unused(); }
  void all_to_all_v(const Tensor&, std::span<const int64_t>, const Tensor&,
                    std::span<const int64_t>, dist::StreamHandle) override {
    unused();
  }
  void all_to_all_v_blocks(const Tensor&, std::span<const dist::RowBlock>, const Tensor&,
                           std::span<const dist::RowBlock>, dist::StreamHandle) override {
    unused();
  }
  void barrier(dist::StreamHandle) override { unused(); }
  std::unique_ptr<Communicator> split(int, int) override {
    unused();
    return nullptr;
  }

 private:
  [[noreturn]] static void unused() { fail("IdleCommunicator used"); }
  int size_;
};

TEST(ExpertParallel, EpMustDivideTheExperts) {
  auto backend = make_cpu_backend();
  IdleCommunicator three(3);
  ModelOptions options;
  options.expert_comm = &three;
  try {
    Model::random_init(tiny_moe_config(8), 1, *backend, options);
    FAIL() << "no error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("3 ranks do not divide the 8 experts"),
              std::string::npos)
        << error.what();
  }
  try {
    Model::from_hf_folder(fixture("qwen3_dense"), *backend, options);
    FAIL() << "no error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("needs a MoE model"), std::string::npos)
        << error.what();
  }
  IdleCommunicator one(1);  // size 1: all experts local, the communicator is never used
  options.expert_comm = &one;
  auto model = Model::from_hf_folder(fixture("qwen3_moe_aux"), *backend, options);
  EXPECT_EQ(model->local_experts(), 4);
}

// Each rank loads only its experts, the group saves one HF folder (sharded across ranks,
// and also with tiny shards), which one process loads back bit-exactly.
TEST(ExpertParallel, SaveAndLoadRoundTrip) {
  testing::TempDir dir;
  for (const auto& [fixture_name, shard_size] : std::vector<std::pair<std::string, int64_t>>{
           {"qwen3_moe_aux", int64_t{5} << 30}, {"qwen3_moe_aux", 6000}, {"mixtral_top2", 9000}}) {
    const std::string name = fixture_name;
    const int64_t shard_bytes = shard_size;
    const fs::path out = dir / (name + "-" + std::to_string(shard_bytes));
    testing::RankOptions options;
    options.args = {
        {"FIXTURE", name}, {"SHARD_BYTES", std::to_string(shard_bytes)}, {"OUT", out.string()}};
    ASSERT_TRUE(testing::ranks_passed(
        testing::run_ranks(2, "ExpertParallelRank.SavesItsExperts", options)));
    auto backend = make_cpu_backend();
    auto original = Model::from_hf_folder(fixture(name), *backend);
    auto reloaded = Model::from_hf_folder(out, *backend);
    const auto left = original->hf_tensors_to_host(false),
               right = reloaded->hf_tensors_to_host(false);
    ASSERT_EQ(left.size(), right.size());
    for (size_t i = 0; i < left.size(); ++i) {
      EXPECT_EQ(left[i].name, right[i].name);
      EXPECT_EQ(left[i].values, right[i].values) << left[i].name;
    }
    EXPECT_TRUE(fs::exists(out / "model.safetensors.index.json"));
    EXPECT_FALSE(fs::exists(out / "model.safetensors"));
    EXPECT_TRUE(fs::exists(out / "config.json"));
    const auto index = nlohmann::json::parse(read_text(out / "model.safetensors.index.json"));
    EXPECT_EQ(index.at("weight_map").size(), left.size());
  }
}

// One rank of SaveAndLoadRoundTrip: loads its experts of FIXTURE, checks them against the
// full model's, and saves its part of the HF folder OUT (shards of SHARD_BYTES).
TEST(ExpertParallelRank, SavesItsExperts) {
  const auto spawned = testing::spawned_rank();
  if (!spawned) GTEST_SKIP() << testing::kRankBodyOnly;
  const std::string name = spawned->arg("FIXTURE");
  const int64_t shard_bytes = std::stoll(spawned->arg("SHARD_BYTES"));
  const fs::path out = spawned->arg("OUT");
  on_this_rank(*spawned, [&](int rank, dist::Communicator& comm) {
    auto backend = make_cpu_backend();
    ModelOptions options;
    options.expert_comm = &comm;
    auto model = Model::from_hf_folder(fixture(name), *backend, options);
    expect(model->first_expert() == 2 * rank && model->local_experts() == 2, "expert range");
    // This rank's tensors equal the full model's under the same names.
    auto full = Model::from_hf_folder(fixture(name), *backend);
    std::map<std::string, std::vector<float>> reference;
    for (auto& tensor : full->hf_tensors_to_host(false))
      reference[tensor.name] = std::move(tensor.values);
    const auto mine = model->hf_tensors_to_host(false);
    size_t expert_tensors = 0;  // of all 4 experts; this rank holds half of them
    for (const auto& [tensor_name, values] : reference)
      expert_tensors += tensor_name.find(".experts.") != std::string::npos ? 1 : 0;
    expect(expert_tensors > 0 && mine.size() + expert_tensors / 2 == reference.size(),
           "tensor count");
    for (const auto& tensor : mine)
      expect(reference.at(tensor.name) == tensor.values, "loaded " + tensor.name);
    model->save_hf_folder(out, {DType::F32, shard_bytes, fixture(name)});
  });
}

}  // namespace
}  // namespace moetune
