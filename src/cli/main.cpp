// Entry point of the `moetune` command: dispatches to a subcommand and turns every
// moetune::Error into one clear line on stderr and exit code 1 (never a crash).
#include <cstdio>
#include <cstring>
#include <exception>
#include <string_view>

#include "cli/commands.h"
#include "core/error.h"

namespace moetune::cli {

namespace {
constexpr Command kCommands[] = {
    {"version", run_version, "print the version and the backends this build has"},
    {"forward-backward", run_forward_backward,
     "one forward+backward (+AdamW step) on a batch file"},
    {"init", run_init, "write a randomly initialised model folder from a config.json"},
    {"inspect", run_inspect, "describe a model folder and the memory to train it"},
    {"data", run_data, "preview a recipe's dataset: rendered examples, loss masks, token stats"},
    {"tokenize", run_tokenize, "encode/decode JSONL text with a Hugging Face tokenizer"},
    {"bench-tokenizer", run_bench_tokenizer, "measure single-threaded tokenizer encode speed"},
    {"render-chat", run_render_chat, "render chat conversations (JSONL) with a chat template"},
    {"bench", run_bench, "training-step throughput on the GPU (one JSON line)"},
    {"train", run_train, "train a model from a YAML recipe (moetune train RECIPE.yaml)"},
    {"plan", run_plan, "print the memory plan of a recipe and whether it fits"},
    {"generate", run_generate, "generate text with a model folder (KV cache, CPU)"},
    {"launch", run_launch, "run a command as N ranks on this node (multi-GPU)"},
    {"dist-selftest", run_dist_selftest, "check bootstrap, store and collectives across ranks"},
};

void print_usage() {
  std::printf("moetune: fine-tune Hugging Face models (MoE first), natively in C++/CUDA\n\n");
  std::printf(
      "usage: moetune <command> [options]   (moetune <command> --help for its options)\n\n");
  std::printf("commands:\n");
  for (const auto& command : kCommands) std::printf("  %-18s %s\n", command.name, command.summary);
}
}  // namespace

}  // namespace moetune::cli

int main(int argc, char** argv) {
  using namespace moetune::cli;
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    print_usage();
    return argc < 2 ? 2 : 0;
  }
  const std::string_view name = argv[1];
  for (const auto& command : kCommands) {
    if (name != command.name) continue;
    try {
      return command.run(argc - 1, argv + 1);
    } catch (const moetune::PeerFailure& error) {
      std::fprintf(stderr, "moetune %s: error: %s\n", command.name, error.what());
      return moetune::kExitPeerFailure;
    } catch (const moetune::Error& error) {
      std::fprintf(stderr, "moetune %s: error: %s\n", command.name, error.what());
      return 1;
    } catch (const std::exception& error) {
      std::fprintf(stderr, "moetune %s: internal error: %s\n", command.name, error.what());
      return 1;
    }
  }
  std::fprintf(stderr, "moetune: unknown command '%s' (moetune --help lists them)\n", argv[1]);
  return 2;
}
