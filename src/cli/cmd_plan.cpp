// `moetune plan RECIPE.yaml [--section.key=value ...] [--device-memory-gib G] [--ranks N]`:
// the memory a training run of the recipe will hold per rank (weights, gradients, optimizer
// state, activations of one micro-batch) and whether it fits the target device, without
// loading weights or data. --ranks: the processes the run will have (the recipe's parallel
// section splits them into expert- and data-parallel ranks as the trainer does).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>

#include "cli/commands.h"
#include "core/error.h"
#include "io/model_config.h"
#include "model/memory_plan.h"
#include "model/model.h"
#include "train/parallel_context.h"
#include "train/recipe.h"

namespace moetune::cli {

namespace fs = std::filesystem;

namespace {

// MemAvailable of /proc/meminfo in bytes (0 when unknown).
int64_t available_host_memory() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  int64_t kib = 0;
  std::string unit;
  while (meminfo >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024;
  return 0;
}

// Bytes in GiB, or MiB below 1 GiB.
std::string gib(int64_t bytes) {
  char text[32];
  const double value = static_cast<double>(bytes);
  if (value >= 1024.0 * 1024.0 * 1024.0)
    std::snprintf(text, sizeof(text), "%10.3f GiB", value / (1024.0 * 1024.0 * 1024.0));
  else
    std::snprintf(text, sizeof(text), "%10.3f MiB", value / (1024.0 * 1024.0));
  return text;
}

// A parameter count as "30.53B" or "0.44M".
std::string count(int64_t parameters) {
  char text[32];
  const double value = static_cast<double>(parameters);
  if (value >= 1e9)
    std::snprintf(text, sizeof(text), "%.2fB", value / 1e9);
  else
    std::snprintf(text, sizeof(text), "%.2fM", value / 1e6);
  return text;
}

}  // namespace

int run_plan(int argc, char** argv) {
  std::optional<fs::path> recipe_path;
  std::optional<double> device_gib;
  std::string ranks_text = "1";
  std::vector<RecipeOverride> overrides;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::printf(
          "usage: moetune plan RECIPE.yaml [--section.key=value ...] [--device-memory-gib G] "
          "[--ranks N]\n");
      return 0;
    } else if (arg == "--device-memory-gib" && i + 1 < argc) {
      device_gib = std::strtod(argv[++i], nullptr);
    } else if (arg == "--ranks" && i + 1 < argc) {
      ranks_text = argv[++i];
    } else if (arg.rfind("--ranks=", 0) == 0) {
      ranks_text = arg.substr(std::strlen("--ranks="));
    } else if (arg.rfind("--device-memory-gib=", 0) == 0) {
      device_gib = std::strtod(arg.c_str() + std::strlen("--device-memory-gib="), nullptr);
    } else if (arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos &&
               arg.find('.') < arg.find('=')) {
      overrides.push_back(parse_override(arg));
    } else if (arg[0] != '-' && !recipe_path) {
      recipe_path = arg;
    } else {
      fail("unexpected argument ", arg, " (see moetune plan --help)");
    }
  }
  if (!recipe_path) {
    std::printf(
        "usage: moetune plan RECIPE.yaml [--section.key=value ...] [--device-memory-gib G] "
        "[--ranks N]\n");
    return 2;
  }
  if (device_gib && !(*device_gib > 0)) fail("--device-memory-gib: expected a positive number");
  char* ranks_end = nullptr;
  const long ranks = std::strtol(ranks_text.c_str(), &ranks_end, 10);
  if (ranks_text.empty() || *ranks_end != '\0' || ranks < 1 || ranks > 1 << 20)
    fail("--ranks: expected a positive whole number of processes, got '", ranks_text, "'");
  const Recipe recipe = load_recipe(*recipe_path, overrides);
  const fs::path config_file =
      recipe.model.path ? *recipe.model.path / "config.json" : *recipe.model.config;
  const ModelConfig config = load_model_config(config_file);
  const auto& t = recipe.training;

  MemoryPlanOptions options;
  options.param_dtype = recipe.model.dtype;
  options.grad_dtype = DType::F32;  // the trainer keeps fp32 gradients
  options.batch = t.micro_batch;
  options.seq = t.seq_len;
  options.per_group_grads = recipe.optimizer_in_backward(static_cast<int>(ranks));
  // One process updates the expert weights inside their gradient GEMMs (the trainer's
  // InBackwardOptimizer over AdamW); several reduce the expert gradients first.
  options.fused_expert_updates = options.per_group_grads && ranks == 1;
  dist::ParallelLayout layout;
  if (ranks > 1) {
    layout = resolve_layout(static_cast<int>(ranks), recipe.parallel.expert_parallel,
                            recipe.parallel.data_parallel, config.num_experts);
    options.expert_parallel = layout.expert_parallel;
    options.data_parallel = layout.data_parallel;
    options.zero_stage = static_cast<int>(recipe.parallel.zero_stage);
  }
  const MemoryPlan plan = plan_memory(config, options);

  std::printf("memory plan for %s (%s, %s parameters, %s active per token)\n",
              recipe.source.c_str(), config.model_type.c_str(),
              count(count_parameters(config, false)).c_str(),
              count(count_parameters(config, true)).c_str());
  std::printf("  micro-batch %lld x %lld tokens, gradient accumulation %lld, weights %s\n",
              static_cast<long long>(t.micro_batch), static_cast<long long>(t.seq_len),
              static_cast<long long>(t.grad_accumulation()),
              recipe.model.dtype == DType::BF16 ? "bf16" : "fp32");
  if (ranks > 1)
    std::printf(
        "  per rank of %ld: data_parallel %d x expert_parallel %d, zero_stage %lld%s\n", ranks,
        layout.data_parallel, layout.expert_parallel,
        static_cast<long long>(recipe.parallel.zero_stage),
        layout.expert_parallel > 1 ? " (expert activations: balanced routing assumed)" : "");
  std::printf("  weights                    %s\n", gib(plan.weights).c_str());
  std::printf("  gradients                  %s%s\n", gib(plan.grads).c_str(),
              options.fused_expert_updates
                  ? "  (per group, no expert gradients: optimizer in the backward)"
              : options.per_group_grads ? "  (per group: optimizer in the backward)"
                                        : "");
  std::printf("  optimizer state (AdamW)    %s\n", gib(plan.optimizer_state).c_str());
  if (plan.master_weights)
    std::printf("  fp32 master weights        %s\n", gib(plan.master_weights).c_str());
  std::printf("  activations / micro-batch  %s\n", gib(plan.activations).c_str());
  std::printf("  backward scratch           %s\n", gib(plan.scratch).c_str());
  std::printf("  total                      %s\n", gib(plan.total()).c_str());

  std::optional<int64_t> capacity;
  std::string where;
  if (recipe.parallel.device == "cpu") {
    if (const int64_t available = available_host_memory()) {
      capacity = available;
      where = "host memory available now (MemAvailable)";
    }
  } else if (device_gib) {
    capacity = static_cast<int64_t>(*device_gib * 1024.0 * 1024.0 * 1024.0);
    where = "device memory (--device-memory-gib)";
  }
  if (!capacity) {
    std::printf(
        "target %s: its memory is queried when training starts (pass --device-memory-gib G to "
        "check now)\n",
        recipe.parallel.device.c_str());
    return 0;
  }
  const bool fits = plan.total() <= *capacity;
  std::printf("target %s: %s of %s -> %s\n", recipe.parallel.device.c_str(), gib(*capacity).c_str(),
              where.c_str(),
              fits ? "fits"
                   : "DOES NOT FIT (lower training.micro_batch or training.seq_len, or use "
                     "model.dtype: bf16)");
  return fits ? 0 : 3;
}

}  // namespace moetune::cli
