// The `moetune` subcommands. Each lives in its own cmd_*.cpp, parses its own arguments
// (CLI11) and returns the process exit code; main.cpp maps names to these functions.
#pragma once

namespace moetune::cli {

using CommandFn = int (*)(int argc, char** argv);

struct Command {
  const char* name;
  CommandFn run;
  const char* summary;
};

int run_version(int argc, char** argv);
int run_forward_backward(int argc, char** argv);
int run_init(int argc, char** argv);
int run_inspect(int argc, char** argv);
int run_data(int argc, char** argv);
int run_tokenize(int argc, char** argv);
int run_bench_tokenizer(int argc, char** argv);
int run_render_chat(int argc, char** argv);
int run_bench(int argc, char** argv);
int run_train(int argc, char** argv);
int run_plan(int argc, char** argv);
int run_generate(int argc, char** argv);
int run_launch(int argc, char** argv);
int run_dist_selftest(int argc, char** argv);

}  // namespace moetune::cli
