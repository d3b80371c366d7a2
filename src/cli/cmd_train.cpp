// `moetune train RECIPE.yaml [--section.key=value ...] [--output-dir DIR] [--resume [PATH]]`
// Arguments are parsed by hand (not CLI11) because overrides are open-ended: any
// `--a.b=value` with a dot before the '=' is a recipe override.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include "cli/commands.h"
#include "core/error.h"
#include "io/model_config.h"
#include "ops/backend.h"
#include "train/parallel_context.h"
#include "train/recipe.h"
#include "train/trainer.h"

namespace moetune::cli {

namespace fs = std::filesystem;

namespace {
void print_train_usage() {
  std::printf(
      "usage: moetune train RECIPE.yaml [--section.key=value ...] [--output-dir DIR] [--resume "
      "[PATH]]\n\n"
      "  --section.key=value   override a recipe value, e.g. --optimizer.lr=2e-5 "
      "--training.max_steps=50\n"
      "  --output-dir DIR      where metrics.jsonl, checkpoints/, hf/, recipe.yaml, loss.svg go\n"
      "                        (default: out/<recipe name>)\n"
      "  --resume [PATH]       continue from PATH (a checkpoints/step-N folder) or, without PATH,\n"
      "                        from the newest complete checkpoint in the output folder\n"
      "  --stop-after-steps N  stop with a checkpoint once N optimizer steps are done\n"
      "SIGINT/SIGTERM stop after the current step with a checkpoint (exit 0).\n");
}
}  // namespace

int run_train(int argc, char** argv) {
  std::optional<fs::path> recipe_path, output_dir, resume_from;
  bool resume_latest = false;
  std::optional<int64_t> stop_after;
  std::vector<RecipeOverride> overrides;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      print_train_usage();
      return 0;
    } else if (arg == "--output-dir" || arg == "-o") {
      if (i + 1 >= argc) fail("--output-dir needs a folder");
      output_dir = argv[++i];
    } else if (arg.rfind("--output-dir=", 0) == 0) {
      output_dir = arg.substr(std::strlen("--output-dir="));
    } else if (arg == "--stop-after-steps") {
      if (i + 1 >= argc) fail("--stop-after-steps needs a number");
      const std::string value = argv[++i];
      char* end = nullptr;
      stop_after = std::strtoll(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || *stop_after < 1)
        fail("--stop-after-steps: expected a positive number, got ", value);
    } else if (arg == "--resume") {
      // An optional PATH: the next argument when it is a folder.
      if (i + 1 < argc && argv[i + 1][0] != '-' && fs::is_directory(argv[i + 1]))
        resume_from = argv[++i];
      else
        resume_latest = true;
    } else if (arg.rfind("--resume=", 0) == 0) {
      resume_from = arg.substr(std::strlen("--resume="));
    } else if (arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos &&
               arg.find('.') < arg.find('=')) {
      overrides.push_back(parse_override(arg));
    } else if (arg[0] == '-') {
      fail("unknown option ", arg,
           " (recipe overrides look like --optimizer.lr=2e-5; see moetune train --help)");
    } else if (!recipe_path) {
      recipe_path = arg;
    } else {
      fail("unexpected argument ", arg, " (one recipe file only)");
    }
  }
  if (!recipe_path) {
    print_train_usage();
    return 2;
  }
  if (resume_from && !fs::is_directory(*resume_from))
    fail("--resume: ", resume_from->string(), " is not a folder");
  const Recipe recipe = load_recipe(*recipe_path, overrides);
  TrainOptions options;
  options.output_dir = output_dir ? *output_dir : fs::path("out") / recipe_path->stem();
  options.resume_from = resume_from;
  options.resume_latest = resume_latest;
  options.stop_after_steps = stop_after;
  // Started by a launcher with several processes: join the others first (the rank's GPU
  // follows from its local rank).
  int64_t num_experts = 0;
  {
    const fs::path config =
        recipe.model.path ? *recipe.model.path / "config.json" : *recipe.model.config;
    num_experts = load_model_config(config).num_experts;
  }
  const std::unique_ptr<ParallelContext> parallel =
      start_parallel(recipe.parallel.device, recipe.parallel.expert_parallel,
                     recipe.parallel.data_parallel, num_experts);
  options.parallel = parallel.get();
  const auto backend = make_backend(parallel ? parallel->device : recipe.parallel.device);
  train(recipe, options, *backend);
  return 0;
}

}  // namespace moetune::cli
