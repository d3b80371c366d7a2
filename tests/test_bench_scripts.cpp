// The Python benchmark scripts under bench/: bench/make_results.py keeps the multi-GPU fields
// of bench/hf_fsdp_baseline.py's lines and moetune's optimizer-in-the-backward flags, and that
// baseline runs end to end on the CPU (two ranks under torchrun, gloo, a tiny Qwen3-MoE
// config). Like HfFolder.TransformersLoadsWhatWeWrite these skip when python3 (or torch +
// transformers) is not installed, so CI without them passes.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "test_util.h"

namespace moetune {
namespace {

using json = nlohmann::json;

// The last line of `output` that starts with '{', parsed (torch prints warnings around it).
json last_json_line(const std::string& output) {
  std::istringstream lines(output);
  std::string line, found;
  while (std::getline(lines, line))
    if (!line.empty() && line.front() == '{') found = line;
  if (found.empty()) return json();
  return json::parse(found, nullptr, /*allow_exceptions=*/false);
}

TEST(BenchScripts, MakeResultsKeepsGpusOfMultiGpuLines) {
  if (testing::run_command("python3 -c 'import json'").exit_code != 0)
    GTEST_SKIP() << "python3 not installed";
  testing::TempDir dir;
  {
    std::ofstream lines(dir / "bench.jsonl");
    lines
        << "some log line\n"
        << R"({"engine": "transformers", "gpu": "NVIDIA H200", "layers": 8, "seq": 4096, "micro_batch": 1, )"
        << R"("routing": "real", "tps": 30395.0, "tflops": 164.2, "peak_gib": 51.22, "step_s": 0.1348})"
        << "\n"
        << R"({"engine": "transformers+fsdp2", "gpu": "NVIDIA H200", "gpus": 4, "layers": 48, "seq": 4096, )"
        << R"("micro_batch": 1, "routing": "balanced", "recompute": false, "tps": 1234.5, "tflops": 12.3, )"
        << R"("peak_gib": 80.5, "peak_alloc_gib": 70.25, "step_s": 3.3179, "loss": 12.0})"
        << "\n";
  }
  auto result = testing::run_command(
      "python3 " + (testing::source_dir() / "bench" / "make_results.py").string() + " " +
      (dir / "bench.jsonl").string() + " 2026-11-22");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  json summary = json::parse(result.output, nullptr, false);
  ASSERT_FALSE(summary.is_discarded()) << result.output;
  EXPECT_EQ(summary["gpu"], "NVIDIA H200");
  EXPECT_EQ(summary["date"], "2026-11-22");
  ASSERT_EQ(summary["runs"].size(), 2u);
  const json& one = summary["runs"][0];
  const json& many = summary["runs"][1];
  EXPECT_FALSE(one.contains("gpus"));
  EXPECT_EQ(one["recompute"], false);
  EXPECT_EQ(one["tps"], 30395.0);
  EXPECT_EQ(many["engine"], "transformers+fsdp2");
  EXPECT_EQ(many["gpus"], 4);
  EXPECT_EQ(many["layers"], 48);
  EXPECT_EQ(many["routing"], "balanced");
  EXPECT_EQ(many["peak_gib"], 80.5);
  EXPECT_EQ(many["peak_alloc_gib"], 70.25);
  EXPECT_FALSE(many.contains("loss"));
}

// moetune's lines keep the A/B flags of the optimizer in the backward.
TEST(BenchScripts, MakeResultsKeepsTheOptimizerInBackwardFlags) {
  if (testing::run_command("python3 -c 'import json'").exit_code != 0)
    GTEST_SKIP() << "python3 not installed";
  testing::TempDir dir;
  {
    std::ofstream lines(dir / "bench.jsonl");
    lines
        << R"({"engine": "moetune", "gpu": "NVIDIA H100", "layers": 8, "seq": 4096, "micro_batch": 1, )"
        << R"("routing": "real", "optimizer_in_backward": true, "fused_expert_update": false, )"
        << R"("overlap_optimizer": true, "tps": 30000.0, "tflops": 160.0, "peak_gib": 40.0, "step_s": 0.13})"
        << "\n";
  }
  auto result = testing::run_command(
      "python3 " + (testing::source_dir() / "bench" / "make_results.py").string() + " " +
      (dir / "bench.jsonl").string() + " 2026-11-22");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  json summary = json::parse(result.output, nullptr, false);
  ASSERT_FALSE(summary.is_discarded()) << result.output;
  ASSERT_EQ(summary["runs"].size(), 1u);
  EXPECT_EQ(summary["runs"][0]["optimizer_in_backward"], true);
  EXPECT_EQ(summary["runs"][0]["fused_expert_update"], false);
  EXPECT_EQ(summary["runs"][0]["overlap_optimizer"], true);
}

// Two CPU ranks: meta init, FSDP2 per layer and root, a step, one JSON line from rank 0.
// ~15-20 s of CPU time in all (three Python processes importing torch), under 20 s wall idle.
TEST(BenchScripts, FsdpBaselineRunsOnCpu) {
#if defined(__SANITIZE_ADDRESS__)
  // The script is Python (nothing of ours to instrument) and takes ~30 s of torch start-up;
  // the release build runs it.
  GTEST_SKIP() << "not in sanitizer builds";
#endif
  if (testing::run_command("python3 -c 'import torch, torch.distributed, transformers'")
          .exit_code != 0)
    GTEST_SKIP() << "torch/transformers not installed";
  const auto root = testing::source_dir();
  std::string command =
      "cd " + root.string() +
      " && OMP_NUM_THREADS=1 python3 -m torch.distributed.run --standalone --nproc-per-node 2 "
      "bench/hf_fsdp_baseline.py --device cpu --config tests/fixtures/bench/tiny_qwen3_moe.json "
      "--layers 1 --seq 32 --micro-batch 1 --steps 1 --warmup 1 --routing balanced";
  auto result = testing::run_command(command);
  ASSERT_EQ(result.exit_code, 0) << result.output;
  json line = last_json_line(result.output);
  ASSERT_TRUE(line.is_object()) << result.output;
  EXPECT_EQ(line["engine"], "transformers+fsdp2");
  EXPECT_EQ(line["gpus"], 2);
  EXPECT_EQ(line["gpu"], "cpu");
  EXPECT_EQ(line["layers"], 1);
  EXPECT_EQ(line["seq"], 32);
  EXPECT_EQ(line["micro_batch"], 1);
  EXPECT_EQ(line["routing"], "balanced");
  EXPECT_EQ(line["tokens_per_step"], 32);
  EXPECT_TRUE(line["experts"] == "grouped_mm" || line["experts"] == "eager") << line.dump();
  const double step_s = line["step_s"], tps = line["tps"], loss = line["loss"];
  EXPECT_GT(step_s, 0.0);
  EXPECT_NEAR(tps, 32 / step_s, 0.01 * tps + 0.2);
  // Random init (std 0.02) predicts ~uniformly over the 512-token vocabulary: loss ~ ln 512.
  EXPECT_NEAR(loss, std::log(512.0), 0.3) << line.dump();
}

}  // namespace
}  // namespace moetune
