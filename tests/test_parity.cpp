// Parity with Transformers: runs `moetune forward-backward --adamw ...` on every fixture
// folder of tests/fixtures/parity (made by tests/fixtures/make_parity_fixtures.py from
// Transformers itself) and checks loss, logits, aux loss, every gradient (per expert, under
// its on-disk name) and the loss after one AdamW step within 1e-4 relative error per tensor.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "test_util.h"

namespace moetune {
namespace {

using testing::TempDir;

std::filesystem::path fixture_root() { return testing::source_dir() / "tests/fixtures/parity"; }

class ParityTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ParityTest, MatchesTransformers) {
  const std::filesystem::path folder = fixture_root() / GetParam();
  ASSERT_TRUE(std::filesystem::exists(folder / "expected.safetensors")) << folder;
  std::ifstream adamw_file(folder / "adamw.json");
  const nlohmann::json adamw = nlohmann::json::parse(adamw_file);
  char adamw_arg[256];
  std::snprintf(
      adamw_arg, sizeof adamw_arg, "lr=%.17g,beta1=%.17g,beta2=%.17g,eps=%.17g,weight_decay=%.17g",
      adamw["lr"].get<double>(), adamw["beta1"].get<double>(), adamw["beta2"].get<double>(),
      adamw["eps"].get<double>(), adamw["weight_decay"].get<double>());

  TempDir temp;
  const auto out = temp / "out.safetensors";
  const auto result =
      testing::run_command(testing::moetune_binary().string() + " forward-backward --model " +
                           folder.string() + " --batch " + (folder / "batch.safetensors").string() +
                           " --out " + out.string() + " --adamw " + adamw_arg);
  ASSERT_EQ(result.exit_code, 0) << result.output;

  const SafetensorsFile expected(folder / "expected.safetensors");
  const SafetensorsFile actual(out);
  size_t checked = 0;
  for (const std::string& name : expected.names()) {
    ASSERT_TRUE(actual.contains(name)) << "moetune did not write " << name;
    const int64_t count = expected.info(name).shape.numel();
    ASSERT_EQ(actual.info(name).shape.numel(), count) << name;
    std::vector<float> want(count), got(count);
    expected.read_as_f32(name, want);
    actual.read_as_f32(name, got);
    const double error = testing::relative_error(got.data(), want.data(), want.size());
    EXPECT_LE(error, 1e-4) << GetParam() << ": " << name;
    ++checked;
  }
  for (const std::string& name : actual.names())
    EXPECT_TRUE(expected.contains(name)) << "moetune wrote " << name << ", Transformers has none";
  EXPECT_TRUE(expected.contains("loss_after_step"));
  EXPECT_GT(checked, 10u);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ParityTest,
                         ::testing::Values("qwen3_moe_aux", "qwen3_moe_top3", "mixtral_top2",
                                           "mixtral_top1", "qwen3_dense", "llama3_rope"));

}  // namespace
}  // namespace moetune
