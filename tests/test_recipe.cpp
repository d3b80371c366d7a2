// Recipe parsing: defaults, derived gradient accumulation, overrides typed by the schema,
// and the errors a user gets for unknown keys (with the closest valid key), wrong types,
// bad combinations and unsupported parallel layouts. The resolved recipe.yaml parses back
// to the same recipe.
#include <gtest/gtest.h>

#include <fstream>

#include "core/error.h"
#include "test_util.h"
#include "train/recipe.h"

namespace moetune {
namespace {

namespace fs = std::filesystem;

// A minimal valid recipe over the demo's files, with `extra` YAML appended.
std::string base_yaml(const std::string& extra = "") {
  const fs::path demo = testing::source_dir() / "recipes" / "demo";
  return "model:\n  config: " + (demo / "config.json").string() + "\n" +
         "data:\n  train: " + (demo / "train.jsonl").string() +
         "\n  eval: " + (demo / "eval.jsonl").string() + "\n" +
         "training:\n  max_steps: 10\n  micro_batch: 2\n  global_batch_sequences: 8\n  seq_len: "
         "64\n" +
         extra;
}

Recipe parse(const std::string& yaml, const std::vector<RecipeOverride>& overrides = {}) {
  return parse_recipe(YAML::Load(yaml), testing::source_dir(), "test.yaml", overrides);
}

std::string error_of(const std::string& yaml, const std::vector<RecipeOverride>& overrides = {}) {
  try {
    parse(yaml, overrides);
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

TEST(Recipe, DefaultsAndAccumulation) {
  const Recipe recipe = parse(base_yaml());
  EXPECT_EQ(recipe.training.grad_accumulation(), 4);
  EXPECT_EQ(recipe.training.global_batch_rows(), 8);
  EXPECT_EQ(*recipe.training.max_steps, 10);
  EXPECT_EQ(recipe.scheduler.type, ScheduleType::Cosine);
  EXPECT_DOUBLE_EQ(recipe.optimizer.lr, 1e-4);
  EXPECT_EQ(recipe.model.tokenizer,
            (testing::source_dir() / "recipes" / "demo").lexically_normal());
  EXPECT_FALSE(recipe.optimizer.decays("model.layers.0.input_layernorm.weight"));
  EXPECT_FALSE(recipe.optimizer.decays("model.layers.0.self_attn.q_proj.bias"));
  EXPECT_TRUE(recipe.optimizer.decays("model.layers.0.self_attn.q_proj.weight"));
  EXPECT_TRUE(recipe.parallel.overlap_communication);
}

TEST(Recipe, GlobalBatchTokens) {
  std::string yaml = base_yaml();
  yaml.replace(yaml.find("global_batch_sequences: 8"), 25, "global_batch_tokens: 512");
  EXPECT_EQ(parse(yaml).training.grad_accumulation(), 4);  // 512 / 64 = 8 rows, micro 2
  yaml.replace(yaml.find("global_batch_tokens: 512"), 24, "global_batch_tokens: 500");
  EXPECT_NE(error_of(yaml).find("not a multiple of training.seq_len"), std::string::npos);
}

TEST(Recipe, OverridesAreTyped) {
  const Recipe recipe = parse(
      base_yaml(),
      {parse_override("--optimizer.lr=2e-5"), parse_override("--scheduler.type=linear"),
       parse_override("--optimizer.betas=[0.8, 0.9]"), parse_override("--training.max_steps=3")});
  EXPECT_DOUBLE_EQ(recipe.optimizer.lr, 2e-5);
  EXPECT_EQ(recipe.scheduler.type, ScheduleType::Linear);
  EXPECT_DOUBLE_EQ(recipe.optimizer.beta1, 0.8);
  EXPECT_DOUBLE_EQ(recipe.optimizer.beta2, 0.9);
  EXPECT_EQ(*recipe.training.max_steps, 3);

  const std::string wrong_type = error_of(base_yaml(), {parse_override("--optimizer.lr=fast")});
  EXPECT_NE(wrong_type.find("optimizer.lr"), std::string::npos) << wrong_type;
  EXPECT_NE(wrong_type.find("fast"), std::string::npos) << wrong_type;
  const std::string unknown = error_of(base_yaml(), {parse_override("--optimizer.learning_rat=1")});
  EXPECT_NE(unknown.find("optimizer.learning_rat"), std::string::npos) << unknown;
  EXPECT_THROW(parse_override("--optimizer.lr"), Error);
}

TEST(Recipe, UnknownKeysSuggestTheClosest) {
  const std::string section = error_of(base_yaml("optimiser:\n  lr: 1e-3\n"));
  EXPECT_NE(section.find("optimiser"), std::string::npos) << section;
  EXPECT_NE(section.find("optimizer"), std::string::npos) << section;
  const std::string key = error_of(base_yaml("optimizer:\n  weight_decy: 0.1\n"));
  EXPECT_NE(key.find("optimizer.weight_decy"), std::string::npos) << key;
  EXPECT_NE(key.find("optimizer.weight_decay"), std::string::npos) << key;
  const std::string training = error_of(base_yaml("  eval_evry: 5\n"));
  EXPECT_NE(training.find("training.eval_every"), std::string::npos) << training;
}

TEST(Recipe, WrongTypesAndCombinations) {
  EXPECT_NE(error_of(base_yaml("  eval_every: often\n")).find("training.eval_every"),
            std::string::npos);
  EXPECT_NE(error_of(base_yaml("optimizer:\n  betas: 0.9\n")).find("optimizer.betas"),
            std::string::npos);
  EXPECT_NE(error_of(base_yaml("scheduler:\n  type: cosinus\n")).find("cosinus"),
            std::string::npos);
  EXPECT_NE(error_of(base_yaml("checkpoint:\n  save_final_hf: perhaps\n"))
                .find("checkpoint.save_final_hf"),
            std::string::npos);
  EXPECT_NE(error_of(base_yaml("  epochs: 2\n")).find("max_steps"), std::string::npos);
  EXPECT_NE(error_of(base_yaml("scheduler:\n  warmup_steps: 3\n  warmup_ratio: 0.1\n"))
                .find("warmup_ratio"),
            std::string::npos);
  EXPECT_NE(error_of(base_yaml("optimizer:\n  lr: -1\n")).find("optimizer.lr"), std::string::npos);

  std::string not_divisible = base_yaml();
  not_divisible.replace(not_divisible.find("global_batch_sequences: 8"), 25,
                        "global_batch_sequences: 7");
  EXPECT_NE(error_of(not_divisible).find("not a multiple of training.micro_batch"),
            std::string::npos);

  const std::string parallel = error_of(base_yaml("parallel:\n  data_parallel: 0\n"));
  EXPECT_NE(parallel.find("parallel.data_parallel"), std::string::npos) << parallel;
  EXPECT_NE(error_of(base_yaml("parallel:\n  zero_stage: 3\n")).find("parallel.zero_stage"),
            std::string::npos);
  EXPECT_NE(error_of(base_yaml("parallel:\n  device: tpu\n")).find("parallel.device"),
            std::string::npos);
  EXPECT_NE(error_of(base_yaml("parallel:\n  overlap_communication: maybe\n"))
                .find("parallel.overlap_communication"),
            std::string::npos);
  EXPECT_NE(error_of("data:\n  train: x.jsonl\n").find("model"), std::string::npos);
}

TEST(Recipe, ScheduleFromRecipe) {
  Recipe recipe =
      parse(base_yaml("scheduler:\n  warmup_ratio: 0.1\n  min_lr: 1e-5\noptimizer:\n  lr: 1e-4\n"));
  const LrSchedule schedule = recipe.scheduler.make(recipe.optimizer.lr, 95);
  EXPECT_EQ(schedule.warmup_steps, 10);  // ceil(95 * 0.1), as Transformers
  EXPECT_NEAR(schedule.min_lr_ratio, 0.1, 1e-12);
  EXPECT_NEAR(schedule.lr(95), 1e-5, 1e-15);
}

TEST(Recipe, ResolvedYamlRoundTrips) {
  const Recipe recipe = parse(
      base_yaml("optimizer:\n  lr: 3e-3\n  no_decay: [norm]\nscheduler:\n  warmup_steps: 4\n"),
      {parse_override("--logging.every=5"),
       parse_override("--parallel.overlap_communication=false")});
  const std::string text = resolved_recipe_yaml(recipe);
  testing::TempDir dir;
  { std::ofstream(dir / "recipe.yaml") << text; }
  const Recipe again = load_recipe(dir / "recipe.yaml");
  const std::string text_again = resolved_recipe_yaml(again);
  EXPECT_EQ(text_again.substr(text_again.find('\n')), text.substr(text.find('\n')));
  EXPECT_NE(text.find("lr: 0.003\n"), std::string::npos) << text;
  EXPECT_DOUBLE_EQ(again.optimizer.lr, 3e-3);
  EXPECT_EQ(again.logging.every, 5);
  EXPECT_FALSE(again.parallel.overlap_communication);
  EXPECT_EQ(again.optimizer.no_decay, std::vector<std::string>{"norm"});
  EXPECT_EQ(again.data.train.size(), 1u);
  EXPECT_EQ(again.data.train[0].path, recipe.data.train[0].path);
}

TEST(Recipe, DemoRecipeLoads) {
  const Recipe recipe = load_recipe(testing::source_dir() / "recipes" / "demo.yaml");
  EXPECT_TRUE(recipe.model.config.has_value());
  EXPECT_TRUE(recipe.data.has_eval());
}

}  // namespace
}  // namespace moetune

namespace moetune {
// training.recompute turns on per-layer activation checkpointing and round-trips.
TEST(RecipeRecompute, ParsesAndRejectsNonBoolean) {
  testing::TempDir dir;
  auto write = [&](const std::string& value) {
    std::ofstream(dir / "r.yaml") << "model: {config: c.json}\n"
                                     "data: {train: t.jsonl}\n"
                                     "training: {max_steps: 1, global_batch_sequences: 1, "
                                     "micro_batch: 1, recompute: "
                                  << value << "}\n";
  };
  std::ofstream(dir / "c.json") << "{}";
  std::ofstream(dir / "tokenizer.json") << "{}";
  std::ofstream(dir / "t.jsonl") << "{\"text\": \"a\"}\n";
  write("true");
  EXPECT_TRUE(load_recipe(dir / "r.yaml", {}).training.recompute);
  write("sometimes");
  EXPECT_THROW(load_recipe(dir / "r.yaml", {}), Error);
}
}  // namespace moetune
