// Expert parallelism on the CPU with real processes: each test forks one process per rank,
// all talking through a StoreCommunicator (the store served by the test process). Each rank
// runs its OWN micro-batch through a model whose experts are split over the ranks, and
// compares (check_expert_parallel) with a one-process model running every micro-batch with
// gradient accumulation: loss, aux loss, expert gradients (this rank's slice) and the other
// gradients (summed over the ranks) within 1e-5 relative. Also: experts (and a whole rank)
// receiving zero rows, EP=4 over 8 experts with layer recomputation, ep not dividing the
// experts, and an expert-parallel save that loads back with one process bit-exactly.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

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

// Runs body(rank, comm) in `world` forked processes, each with its own store connection and a
// StoreCommunicator over all of them; a rank fails by throwing. Expects every rank to succeed.
void on_processes(int world, const std::function<void(int, dist::Communicator&)>& body) {
  testing::TempDir errors;
  dist::StoreServer server(0, world, 30.0);
  server.set_linger_timeout(5.0);
  std::vector<pid_t> children;
  for (int rank = 0; rank < world; ++rank) {
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      int status = 0;
      try {
        dist::Store store("127.0.0.1", server.port(), rank, world, 30.0);
        std::vector<int> everyone(world);
        std::iota(everyone.begin(), everyone.end(), 0);
        dist::StoreCommunicator comm(store, everyone);
        body(rank, comm);
        comm.barrier(nullptr);
      } catch (const std::exception& error) {
        std::ofstream(errors / std::to_string(rank)) << error.what();
        status = 1;
      }
      std::_Exit(status);  // no atexit handlers, no gtest teardown in the child
    }
    children.push_back(child);
  }
  for (int rank = 0; rank < world; ++rank) {
    int status = 0;
    ASSERT_EQ(waitpid(children[rank], &status, 0), children[rank]);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "rank " << rank << ": " << read_text(errors / std::to_string(rank));
  }
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
  MOETUNE_SKIP_FORKED_RANKS_UNDER_ASAN();
  const FixtureOnRanks param = GetParam();
  on_processes(param.ep, [&](int rank, dist::Communicator& comm) {
    auto backend = make_cpu_backend();
    auto make = [&](const ModelOptions& options) {
      return Model::from_hf_folder(fixture(param.fixture), *backend, options);
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
  MOETUNE_SKIP_FORKED_RANKS_UNDER_ASAN();
  on_processes(2, [](int rank, dist::Communicator& comm) {
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
  });
}

nlohmann::json tiny_moe_config(int experts) {
  return {{"model_type", "qwen3_moe"},
          {"vocab_size", 96},
          {"hidden_size", 32},
          {"intermediate_size", 40},
          {"moe_intermediate_size", 16},
          {"num_hidden_layers", 3},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 2},
          {"head_dim", 8},
          {"num_experts", experts},
          {"num_experts_per_tok", 2},
          {"norm_topk_prob", true},
          {"decoder_sparse_step", 1},
          {"mlp_only_layers", nlohmann::json::array({1})},
          {"output_router_logits", true},
          {"router_aux_loss_coef", 0.01},
          {"rms_norm_eps", 1e-6},
          {"rope_theta", 10000.0},
          {"max_position_embeddings", 64},
          {"tie_word_embeddings", false},
          {"initializer_range", 0.2}};
}

// Four ranks, two experts each, two MoE layers, activation recomputation on the EP side
// (each recomputed layer exchanges again).
TEST(ExpertParallel, FourRanksEightExpertsWithRecompute) {
  MOETUNE_SKIP_FORKED_RANKS_UNDER_ASAN();
  on_processes(4, [](int rank, dist::Communicator& comm) {
    auto backend = make_cpu_backend();
    const ModelConfig config = parse_model_config(tiny_moe_config(8), "tiny");
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
  MOETUNE_SKIP_FORKED_RANKS_UNDER_ASAN();
  auto backend = make_cpu_backend();
  IdleCommunicator three(3);
  ModelOptions options;
  options.expert_comm = &three;
  try {
    Model::random_init(parse_model_config(tiny_moe_config(8), "tiny"), 1, *backend, options);
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
  MOETUNE_SKIP_FORKED_RANKS_UNDER_ASAN();
  testing::TempDir dir;
  for (const auto& [fixture_name, shard_size] : std::vector<std::pair<std::string, int64_t>>{
           {"qwen3_moe_aux", int64_t{5} << 30}, {"qwen3_moe_aux", 6000}, {"mixtral_top2", 9000}}) {
    const std::string name = fixture_name;
    const int64_t shard_bytes = shard_size;
    const fs::path out = dir / (name + "-" + std::to_string(shard_bytes));
    on_processes(2, [&](int rank, dist::Communicator& comm) {
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

}  // namespace
}  // namespace moetune
