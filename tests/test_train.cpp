// The trainer end to end on the demo's tiny MoE and data (shrunk: short sequences, few steps):
// - gradient accumulation: 4 micro-batches of 1 row equal 1 micro-batch of 4 rows (loss and
//   weights within fp32 tolerance), since the loss is normalised by the step's token count;
// - resume: stop after step N, resume, and every logged loss equals an uninterrupted run's
//   exactly (bit-identical on CPU);
// - a kill while a checkpoint is written leaves the previous checkpoint loadable;
// - SIGTERM: the binary finishes its step, writes a checkpoint and exits 0;
// - the non-finite guard stops a diverging run with a clear message;
// - the output folder: metrics.jsonl, checkpoints/, hf/, recipe.yaml, loss.svg.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <thread>

#include "core/error.h"
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

// The demo recipe, made small and quiet for tests.
std::vector<RecipeOverride> small_run(int64_t steps, std::vector<std::string> extra = {}) {
  std::vector<std::string> arguments = {"--training.max_steps=" + std::to_string(steps),
                                        "--training.seq_len=48",
                                        "--training.micro_batch=2",
                                        "--training.global_batch_sequences=4",
                                        "--training.eval_every=0",
                                        "--training.eval_batches=2",
                                        "--checkpoint.every=0",
                                        "--logging.every=1",
                                        "--logging.progress=none",
                                        "--scheduler.warmup_steps=2"};
  arguments.insert(arguments.end(), extra.begin(), extra.end());
  std::vector<RecipeOverride> overrides;
  for (const auto& argument : arguments) overrides.push_back(parse_override(argument));
  return overrides;
}

Backend& cpu() {
  static const std::unique_ptr<Backend> backend = make_cpu_backend();
  return *backend;
}

Recipe demo_recipe(const std::vector<RecipeOverride>& overrides) {
  return load_recipe(testing::source_dir() / "recipes" / "demo.yaml", overrides);
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

TEST(Train, AccumulationFourByOneEqualsOneByFour) {
  testing::TempDir dir;
  TrainOptions one_by_four{dir / "1x4"}, four_by_one{dir / "4x1"};
  train(demo_recipe(small_run(3, {"--training.micro_batch=4", "--checkpoint.save_final_hf=false"})),
        one_by_four, cpu());
  train(demo_recipe(small_run(3, {"--training.micro_batch=1", "--checkpoint.save_final_hf=false"})),
        four_by_one, cpu());

  const auto losses_a = losses_of(dir / "1x4" / "metrics.jsonl");
  const auto losses_b = losses_of(dir / "4x1" / "metrics.jsonl");
  ASSERT_EQ(losses_a.size(), 3u);
  ASSERT_EQ(losses_b.size(), 3u);
  for (size_t i = 0; i < losses_a.size(); ++i)
    EXPECT_NEAR(losses_a[i], losses_b[i], 1e-5 * std::abs(losses_a[i]));

  const SafetensorsFile a(checkpoint_path(dir / "1x4" / "checkpoints", 3) / "model.safetensors");
  const SafetensorsFile b(checkpoint_path(dir / "4x1" / "checkpoints", 3) / "model.safetensors");
  ASSERT_EQ(a.names(), b.names());
  for (const auto& name : a.names()) {
    const auto va = tensor_values(a, name), vb = tensor_values(b, name);
    EXPECT_LT(testing::relative_error(vb.data(), va.data(), va.size()), 1e-4) << name;
  }
}

TEST(Train, ResumeIsBitIdentical) {
  testing::TempDir dir;
  const Recipe recipe =
      demo_recipe(small_run(6, {"--checkpoint.save_final_hf=false", "--training.eval_every=2"}));
  train(recipe, TrainOptions{dir / "straight"}, cpu());

  TrainOptions first{dir / "resumed"};
  first.stop_after_steps = 3;
  const TrainSummary stopped = train(recipe, first, cpu());
  EXPECT_TRUE(stopped.interrupted);
  EXPECT_EQ(stopped.steps, 3);
  ASSERT_TRUE(latest_checkpoint(dir / "resumed" / "checkpoints").has_value());
  TrainOptions second{dir / "resumed"};
  second.resume_latest = true;
  const TrainSummary resumed = train(recipe, second, cpu());
  EXPECT_EQ(resumed.start_step, 3);
  EXPECT_EQ(resumed.steps, 6);

  const auto straight = read_metrics(dir / "straight" / "metrics.jsonl");
  const auto again = read_metrics(dir / "resumed" / "metrics.jsonl");
  ASSERT_EQ(straight.size(), again.size());
  for (size_t i = 0; i < straight.size(); ++i) {
    EXPECT_EQ(straight[i].at("step"), again[i].at("step"));
    for (const char* key : {"loss", "grad_norm", "lr", "eval_loss", "eval_accuracy", "tokens"})
      if (straight[i].contains(key))
        EXPECT_EQ(straight[i].at(key), again[i].at(key)) << key << " row " << i;
  }
}

// Runs the moetune binary; returns its exit status (or 128 + signal).
int run_binary(const std::vector<std::string>& arguments, const fs::path& log,
               const std::string& env = "") {
  std::string command = env + " " + testing::moetune_binary().string();
  for (const auto& argument : arguments) command += " '" + argument + "'";
  command += " > '" + log.string() + "' 2>&1";
  const int status = std::system(command.c_str());
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

std::vector<std::string> cli_arguments(const fs::path& out, const std::vector<std::string>& extra) {
  std::vector<std::string> arguments = {"train",
                                        (testing::source_dir() / "recipes" / "demo.yaml").string(),
                                        "--output-dir", out.string()};
  for (const auto& o : small_run(0)) arguments.push_back("--" + o.key + "=" + o.value);
  arguments.insert(arguments.end(), extra.begin(), extra.end());
  return arguments;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

TEST(Train, KillDuringCheckpointWriteKeepsThePreviousOne) {
  testing::TempDir dir;
  const fs::path out = dir / "run";
  const auto arguments =
      cli_arguments(out, {"--training.max_steps=6", "--checkpoint.every=2",
                          "--checkpoint.keep_last=3", "--checkpoint.save_final_hf=false"});
  const int aborted = run_binary(arguments, dir / "log1", "MOETUNE_TEST_ABORT_IN_CHECKPOINT=4");
  EXPECT_NE(aborted, 0) << read_text(dir / "log1");
  const fs::path checkpoints = out / "checkpoints";
  EXPECT_TRUE(fs::exists(checkpoints / "step-4.tmp")) << "the hook should abort inside the write";
  EXPECT_FALSE(fs::exists(checkpoints / "step-4"));
  const auto latest = latest_checkpoint(checkpoints);
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->filename(), "step-2");
  EXPECT_EQ(read_trainer_state(*latest).at("step").get<int64_t>(), 2);

  // Resuming picks step-2, clears the torn step-4.tmp, and matches an uninterrupted run.
  auto resume = arguments;
  resume.push_back("--resume");
  ASSERT_EQ(run_binary(resume, dir / "log2"), 0) << read_text(dir / "log2");
  EXPECT_FALSE(fs::exists(checkpoints / "step-4.tmp"));
  EXPECT_NE(read_text(dir / "log2").find("resumed from"), std::string::npos);
  TrainOptions straight{dir / "straight"};
  train(demo_recipe(small_run(6, {"--checkpoint.every=2", "--checkpoint.save_final_hf=false"})),
        straight, cpu());
  EXPECT_EQ(losses_of(out / "metrics.jsonl"), losses_of(dir / "straight" / "metrics.jsonl"));
}

TEST(Train, SigtermFinishesTheStepAndCheckpoints) {
  testing::TempDir dir;
  const fs::path out = dir / "run";
  const auto arguments =
      cli_arguments(out, {"--training.max_steps=100000", "--checkpoint.save_final_hf=false"});
  const fs::path log = dir / "log";
  // Everything the child needs is prepared before fork(): between fork and exec it calls only
  // async-signal-safe functions (no allocation: another thread may hold the allocator's lock).
  std::vector<char*> argv;
  const std::string binary = testing::moetune_binary().string();
  argv.push_back(const_cast<char*>(binary.c_str()));
  for (const auto& argument : arguments) argv.push_back(const_cast<char*>(argument.c_str()));
  argv.push_back(nullptr);
  const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::execv(binary.c_str(), argv.data());
    ::_exit(127);
  }
  ::close(fd);
  // Wait until a few steps are logged, then ask it to stop.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    if (fs::exists(out / "metrics.jsonl") && read_metrics(out / "metrics.jsonl").size() >= 2) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(::kill(child, SIGTERM), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << read_text(log);
  EXPECT_EQ(WEXITSTATUS(status), 0) << read_text(log);
  EXPECT_NE(read_text(log).find("SIGTERM"), std::string::npos) << read_text(log);
  const auto latest = latest_checkpoint(out / "checkpoints");
  ASSERT_TRUE(latest.has_value()) << read_text(log);
  const auto rows = read_metrics(out / "metrics.jsonl");
  ASSERT_FALSE(rows.empty());
  EXPECT_EQ(read_trainer_state(*latest).at("step").get<int64_t>(),
            rows.back().at("step").get<int64_t>());
}

TEST(Train, NonFiniteStepsStopTheRun) {
  testing::TempDir dir;
  const Recipe recipe = demo_recipe(
      small_run(20, {"--optimizer.lr=1e30", "--optimizer.grad_clip=0", "--scheduler.type=constant",
                     "--scheduler.warmup_steps=0", "--training.max_bad_steps=2"}));
  try {
    train(recipe, TrainOptions{dir / "run"}, cpu());
    FAIL() << "a run at lr 1e30 should diverge";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("non-finite"), std::string::npos) << error.what();
  }
}

// Label: fast demo. A few dozen steps of the demo at a higher learning rate: the loss must at
// least halve, and the output folder must be complete.
TEST(Train, ShortDemoLearnsAndWritesTheOutputFolder) {
  testing::TempDir dir;
  const Recipe recipe = demo_recipe(
      small_run(40, {"--training.eval_every=20", "--optimizer.lr=5e-3", "--checkpoint.every=20"}));
  const TrainSummary summary = train(recipe, TrainOptions{dir / "run"}, cpu());
  EXPECT_LE(summary.last_loss, 0.5 * summary.first_loss)
      << summary.first_loss << " -> " << summary.last_loss;
  ASSERT_TRUE(summary.eval_loss.has_value());
  EXPECT_LT(*summary.eval_loss, summary.first_loss);

  const fs::path out = dir / "run";
  for (const char* file :
       {"metrics.jsonl", "recipe.yaml", "loss.svg", "hf/config.json", "hf/tokenizer.json",
        "hf/tokenizer_config.json", "hf/generation_config.json"})
    EXPECT_TRUE(fs::exists(out / file)) << file;
  EXPECT_TRUE(fs::exists(out / "hf" / "model.safetensors") ||
              fs::exists(out / "hf" / "model.safetensors.index.json"));
  EXPECT_EQ(list_checkpoints(out / "checkpoints").size(), 1u);  // keep_last: 1
  int eval_rows = 0;
  for (const auto& row : read_metrics(out / "metrics.jsonl")) {
    if (row.value("eval", false)) {
      ++eval_rows;
      EXPECT_TRUE(row.contains("eval_accuracy"));
    } else {
      for (const char* key :
           {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"})
        EXPECT_TRUE(row.contains(key)) << key;
    }
  }
  EXPECT_EQ(eval_rows, 2);  // step 20 and the end
  const std::string svg = read_text(out / "loss.svg");
  EXPECT_NE(svg.find("<path"), std::string::npos);
  EXPECT_NE(svg.find("<circle"), std::string::npos);
  EXPECT_NE(svg.find("optimizer step"), std::string::npos);
}

}  // namespace
}  // namespace moetune
