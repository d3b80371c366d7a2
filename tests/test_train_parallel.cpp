// `moetune train` on several CPU processes (`moetune launch --nproc-per-node 2`, the store
// communicator) against one process, on the demo's tiny MoE (shrunk):
// - 2 ranks give one process's losses and final HF weights (fp32, 1e-5), rank 0 alone
//   writes metrics.jsonl and one hf/ folder, the checkpoint holds both ranks' shards;
// - resume with the same layout continues bit-identically (every logged loss equal);
// - a 2-rank checkpoint resumes in one process (the shards re-cut), close to the 2-rank run;
// - a layout that does not fit the job fails with the key's name.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "ops/backend.h"
#include "test_util.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/recipe.h"
#include "train/trainer.h"

namespace moetune {
namespace {

namespace fs = std::filesystem;

std::vector<std::string> small_run(int64_t steps, std::vector<std::string> extra = {}) {
  std::vector<std::string> arguments = {"--training.max_steps=" + std::to_string(steps),
                                        "--training.seq_len=48",
                                        "--training.micro_batch=2",
                                        "--training.global_batch_sequences=4",
                                        "--training.eval_every=0",
                                        "--training.eval_batches=2",
                                        "--checkpoint.every=0",
                                        "--checkpoint.keep_last=5",
                                        "--logging.every=1",
                                        "--logging.progress=none",
                                        "--scheduler.warmup_steps=2"};
  arguments.insert(arguments.end(), extra.begin(), extra.end());
  return arguments;
}

fs::path demo_yaml() { return testing::source_dir() / "recipes" / "demo.yaml"; }

Backend& cpu() {
  static const std::unique_ptr<Backend> backend = make_cpu_backend();
  return *backend;
}

// One process, in this test process.
TrainSummary train_alone(const std::vector<std::string>& arguments, const TrainOptions& options) {
  std::vector<RecipeOverride> overrides;
  for (const auto& argument : arguments) overrides.push_back(parse_override(argument));
  return train(load_recipe(demo_yaml(), overrides), options, cpu());
}

// `moetune launch --nproc-per-node N -- train demo.yaml ARGUMENTS -o OUT [MORE]`.
testing::CommandResult launch_train(int ranks, const std::vector<std::string>& arguments,
                                    const fs::path& out, const std::string& more = "") {
  std::string command = "timeout 120 " + testing::moetune_binary().string() +
                        " launch --nproc-per-node " + std::to_string(ranks) + " -- train '" +
                        demo_yaml().string() + "'";
  for (const auto& argument : arguments) command += " '" + argument + "'";
  command += " -o '" + out.string() + "' " + more + " 2>&1";
  return testing::run_command(command);
}

std::vector<double> losses_of(const fs::path& metrics) {
  std::vector<double> losses;
  for (const auto& row : read_metrics(metrics))
    if (!row.value("eval", false)) losses.push_back(row.at("loss").get<double>());
  return losses;
}

std::vector<float> tensor_values(const SafetensorsFile& file, const std::string& name) {
  std::vector<float> values(static_cast<size_t>(file.info(name).shape.numel()));
  file.read_as_f32(name, values);
  return values;
}

void expect_same_weights(const fs::path& a_file, const fs::path& b_file, double tolerance) {
  const SafetensorsFile a(a_file), b(b_file);
  ASSERT_EQ(a.names(), b.names());
  for (const auto& name : a.names()) {
    const auto va = tensor_values(a, name), vb = tensor_values(b, name);
    EXPECT_LT(testing::relative_error(vb.data(), va.data(), va.size()), tolerance) << name;
  }
}

void expect_near_losses(const std::vector<double>& a, const std::vector<double>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-5 * std::abs(b[i])) << i;
}

TEST(TrainParallel, TwoRanksMatchOneProcess) {
  testing::TempDir dir;
  const auto arguments = small_run(3);
  TrainOptions one;
  one.output_dir = dir / "one";
  train_alone(arguments, one);
  const auto run = launch_train(2, arguments, dir / "two", "--parallel.zero_stage=2");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("parallel: 2 ranks (data_parallel 2 x expert_parallel 1)"),
            std::string::npos)
      << run.output;

  expect_near_losses(losses_of(dir / "two" / "metrics.jsonl"),
                     losses_of(dir / "one" / "metrics.jsonl"));
  expect_same_weights(dir / "two" / "hf" / "model.safetensors",
                      dir / "one" / "hf" / "model.safetensors", 1e-5);
  // One output folder: one hf/, both ranks' optimizer shards in the checkpoint.
  const fs::path checkpoint = checkpoint_path(dir / "two" / "checkpoints", 3);
  for (const char* file :
       {"model.safetensors", "trainer_state.json", "rank-0/shards.json", "rank-1/shards.json",
        "rank-0/optimizer.safetensors", "rank-1/optimizer.safetensors"})
    EXPECT_TRUE(fs::exists(checkpoint / file)) << file;
  EXPECT_FALSE(fs::exists(checkpoint / "optimizer.safetensors"));
  int hf_folders = 0;
  for (const auto& entry : fs::directory_iterator(dir / "two"))
    hf_folders += entry.path().filename().string().rfind("hf", 0) == 0;
  EXPECT_EQ(hf_folders, 1);
}

// Expert parallelism over 2 ranks (each holds 2 of the demo's 4 experts, tokens exchanged
// by all-to-all): the losses, the eval (3 batches over 2 ranks: one rank runs a discarded
// forward to keep the exchanges paired) and the exported HF folder (each rank writes its
// experts' shards, one index) match one process holding every expert.
TEST(TrainParallel, ExpertParallelTwoRanksMatchOneProcess) {
  testing::TempDir dir;
  const auto arguments = small_run(3, {"--training.eval_every=3", "--training.eval_batches=3"});
  TrainOptions one;
  one.output_dir = dir / "one";
  train_alone(arguments, one);
  const auto run = launch_train(2, arguments, dir / "ep", "--parallel.expert_parallel=2");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_NE(run.output.find("data_parallel 1 x expert_parallel 2"), std::string::npos)
      << run.output;
  expect_near_losses(losses_of(dir / "ep" / "metrics.jsonl"),
                     losses_of(dir / "one" / "metrics.jsonl"));
  std::vector<double> eval_losses[2];
  for (int i = 0; i < 2; ++i)
    for (const auto& row : read_metrics(dir / (i ? "ep" : "one") / "metrics.jsonl"))
      if (row.value("eval", false)) eval_losses[i].push_back(row.at("eval_loss").get<double>());
  ASSERT_FALSE(eval_losses[1].empty());
  expect_near_losses(eval_losses[1], eval_losses[0]);

  const CheckpointReader expected(dir / "one" / "hf"), exported(dir / "ep" / "hf");
  std::vector<std::string> expected_names = expected.names(), exported_names = exported.names();
  std::sort(expected_names.begin(), expected_names.end());
  std::sort(exported_names.begin(), exported_names.end());
  ASSERT_EQ(exported_names, expected_names);
  for (const auto& name : expected_names) {
    std::vector<float> a(static_cast<size_t>(expected.info(name).shape.numel()));
    std::vector<float> b(static_cast<size_t>(exported.info(name).shape.numel()));
    ASSERT_EQ(a.size(), b.size()) << name;
    expected.read_as_f32(name, a);
    exported.read_as_f32(name, b);
    EXPECT_LT(testing::relative_error(b.data(), a.data(), a.size()), 1e-5) << name;
  }
}

// The optimizer in the backward on 2 ranks (one micro-batch each, no clipping), data
// parallel (ZeRO 1 and 2) and expert parallel: each gradient group is reduced and updated
// inside the backward; losses and weights match one process accumulating both micro-batches
// with the optimizer after the backward.
TEST(TrainParallel, OptimizerInBackwardMatchesOneProcess) {
  testing::TempDir dir;
  const auto arguments = small_run(3, {"--optimizer.grad_clip=0"});
  TrainOptions one;
  one.output_dir = dir / "one";
  train_alone(arguments, one);
  for (const std::string layout :
       {"--parallel.zero_stage=1", "--parallel.zero_stage=2", "--parallel.expert_parallel=2"}) {
    const fs::path out = dir / ("run" + layout.substr(layout.find('=')));
    auto in_backward = arguments;
    in_backward.push_back("--training.optimizer_in_backward=true");
    const auto run = launch_train(2, in_backward, out, layout);
    ASSERT_EQ(run.exit_code, 0) << layout << "\n" << run.output;
    EXPECT_NE(run.output.find("optimizer in the backward: each gradient group is reduced"),
              std::string::npos)
        << run.output;
    expect_near_losses(losses_of(out / "metrics.jsonl"), losses_of(dir / "one" / "metrics.jsonl"));
    const CheckpointReader expected(dir / "one" / "hf"), exported(out / "hf");
    for (const auto& name : expected.names()) {
      std::vector<float> a(static_cast<size_t>(expected.info(name).shape.numel()));
      std::vector<float> b(static_cast<size_t>(exported.info(name).shape.numel()));
      ASSERT_EQ(a.size(), b.size()) << name;
      expected.read_as_f32(name, a);
      exported.read_as_f32(name, b);
      EXPECT_LT(testing::relative_error(b.data(), a.data(), a.size()), 1e-5)
          << layout << ": " << name;
    }
  }
}

TEST(TrainParallel, ResumeSameLayoutIsBitIdenticalAndOneProcessCanContinue) {
  testing::TempDir dir;
  const auto arguments = small_run(4);
  const auto full = launch_train(2, arguments, dir / "full", "--parallel.zero_stage=1");
  ASSERT_EQ(full.exit_code, 0) << full.output;
  const auto reference = losses_of(dir / "full" / "metrics.jsonl");
  ASSERT_EQ(reference.size(), 4u);

  const auto first =
      launch_train(2, arguments, dir / "split", "--parallel.zero_stage=1 --stop-after-steps 2");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  fs::copy(dir / "split", dir / "alone", fs::copy_options::recursive);
  const auto second = launch_train(2, arguments, dir / "split", "--parallel.zero_stage=1 --resume");
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_EQ(losses_of(dir / "split" / "metrics.jsonl"), reference);  // bit-identical

  // The 2-rank checkpoint of step 2 in one process: the optimizer shards are joined.
  TrainOptions alone;
  alone.output_dir = dir / "alone";
  alone.resume_latest = true;
  const TrainSummary summary = train_alone(arguments, alone);
  EXPECT_EQ(summary.start_step, 2);
  expect_near_losses(losses_of(dir / "alone" / "metrics.jsonl"), reference);
  expect_same_weights(dir / "alone" / "hf" / "model.safetensors",
                      dir / "full" / "hf" / "model.safetensors", 1e-5);
}

TEST(TrainParallel, LayoutsThatDoNotFitFailWithTheKey) {
  testing::TempDir dir;
  const auto mismatch = launch_train(2, small_run(1), dir / "a", "--parallel.data_parallel=4");
  EXPECT_NE(mismatch.exit_code, 0);
  EXPECT_NE(mismatch.output.find("parallel.data_parallel: 4 does not match"), std::string::npos)
      << mismatch.output;
  const auto ep = launch_train(2, small_run(1), dir / "b", "--parallel.expert_parallel=3");
  EXPECT_NE(ep.exit_code, 0);
  EXPECT_NE(ep.output.find("parallel.expert_parallel: 3 does not divide the 2 ranks"),
            std::string::npos)
      << ep.output;
  const auto batch =
      launch_train(2, small_run(1, {"--training.global_batch_sequences=2"}), dir / "c");
  EXPECT_NE(batch.exit_code, 0);
  EXPECT_NE(batch.output.find("not a multiple of the 2 ranks"), std::string::npos) << batch.output;
}

}  // namespace
}  // namespace moetune
