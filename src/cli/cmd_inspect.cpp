// `moetune inspect DIR`: what a model folder holds and what training it costs:
// architecture, parameters (total and active per token), dtypes on disk, and the memory
// to train with AdamW in three layouts (fp32 everything; bf16 weights with fp32 master
// weights and bf16 or fp32 gradients) for one micro-batch shape.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <map>

#include "cli/commands.h"
#include "io/checkpoint.h"
#include "model/memory_plan.h"
#include "model/model.h"

namespace moetune::cli {

namespace {
std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 4) bytes /= 1024, ++unit;
  char text[32];
  std::snprintf(text, sizeof text, "%.2f %s", bytes, units[unit]);
  return text;
}
std::string human_count(double count) {
  const char* units[] = {"", "K", "M", "B", "T"};
  int unit = 0;
  while (count >= 1000 && unit < 4) count /= 1000, ++unit;
  char text[32];
  std::snprintf(text, sizeof text, unit ? "%.2f%s" : "%.0f%s", count, units[unit]);
  return text;
}
void print_plan(const char* title, const MemoryPlan& plan) {
  std::printf("  %s\n", title);
  std::printf("    weights %s, grads %s, master %s, AdamW state %s\n",
              human_bytes(plan.weights).c_str(), human_bytes(plan.grads).c_str(),
              human_bytes(plan.master_weights).c_str(), human_bytes(plan.optimizer_state).c_str());
  std::printf("    activations %s (+ scratch %s)  total %s\n",
              human_bytes(plan.activations).c_str(), human_bytes(plan.scratch).c_str(),
              human_bytes(plan.total()).c_str());
}
}  // namespace

int run_inspect(int argc, char** argv) {
  CLI::App app{"Describe a model folder and the memory to train it"};
  app.name("moetune inspect");
  std::string dir;
  int64_t batch = 1, seq = 4096;
  app.add_option("dir", dir, "HF model folder (or a bare config.json)")->required();
  app.add_option("--batch", batch, "micro-batch rows for the memory estimate");
  app.add_option("--seq", seq, "tokens per row for the memory estimate");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
  const std::filesystem::path location(dir);
  const bool config_only = location.extension() == ".json";
  ModelConfig config = load_model_config(config_only ? location : location / "config.json");
  if (config.head_dim <= 0) config.head_dim = config.hidden_size / config.num_attention_heads;

  std::printf("%s (%s)\n", dir.c_str(), config.model_type.c_str());
  std::printf("  layers %lld, hidden %lld, heads %lld (kv %lld, head_dim %lld), vocab %lld\n",
              static_cast<long long>(config.num_hidden_layers),
              static_cast<long long>(config.hidden_size),
              static_cast<long long>(config.num_attention_heads),
              static_cast<long long>(config.num_key_value_heads),
              static_cast<long long>(config.head_dim), static_cast<long long>(config.vocab_size));
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) moe_layers += config.layer_is_moe(l);
  if (config.is_moe()) {
    std::printf("  MoE: %lld experts, top-%lld, expert width %lld, %lld of %lld layers sparse%s\n",
                static_cast<long long>(config.num_experts),
                static_cast<long long>(config.num_experts_per_tok),
                static_cast<long long>(config.moe_intermediate_size),
                static_cast<long long>(moe_layers),
                static_cast<long long>(config.num_hidden_layers),
                config.output_router_logits ? ", aux loss on" : "");
  }
  if (moe_layers < config.num_hidden_layers)
    std::printf("  dense MLP width %lld\n", static_cast<long long>(config.intermediate_size));
  std::printf("  rope %s theta %g%s%s%s\n", config.rope.type.c_str(), config.rope.theta,
              config.qk_norm ? ", qk-norm" : "", config.attention_bias ? ", attention bias" : "",
              config.tie_word_embeddings ? ", tied embeddings" : "");
  std::printf("  parameters: %s total, %s active per token\n",
              human_count(static_cast<double>(count_parameters(config, false))).c_str(),
              human_count(static_cast<double>(count_parameters(config, true))).c_str());

  const bool has_weights =
      !config_only && (std::filesystem::exists(location / kSafetensorsName) ||
                       std::filesystem::exists(location / kSafetensorsIndexName));
  if (has_weights) {
    CheckpointReader reader(dir);
    std::map<std::string, std::pair<int64_t, int64_t>> by_dtype;  // tensors, bytes
    for (const std::string& name : reader.names()) {
      const TensorInfo& info = reader.info(name);
      auto& entry = by_dtype[std::string(dtype_name(info.dtype))];
      entry.first += 1;
      entry.second += static_cast<int64_t>(info.bytes());
    }
    std::printf("  on disk:");
    for (const auto& [dtype, entry] : by_dtype)
      std::printf(" %s %lld tensors %s;", dtype.c_str(), static_cast<long long>(entry.first),
                  human_bytes(static_cast<double>(entry.second)).c_str());
    std::printf(" (config dtype %s)\n", config.dtype.c_str());
  } else {
    std::printf("  no weights here (config dtype %s)\n", config.dtype.c_str());
  }

  std::printf("memory to train with AdamW, micro-batch %lld x %lld tokens:\n",
              static_cast<long long>(batch), static_cast<long long>(seq));
  MemoryPlanOptions fp32{DType::F32, DType::F32, batch, seq};
  print_plan("fp32 weights, fp32 grads:", plan_memory(config, fp32));
  MemoryPlanOptions bf16_grads{DType::BF16, DType::BF16, batch, seq};
  print_plan("bf16 weights + fp32 master, bf16 grads:", plan_memory(config, bf16_grads));
  MemoryPlanOptions fp32_grads{DType::BF16, DType::F32, batch, seq};
  print_plan("bf16 weights + fp32 master, fp32 grads:", plan_memory(config, fp32_grads));
  return 0;
}

}  // namespace moetune::cli
