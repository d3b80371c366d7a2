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
int run_launch(int argc, char** argv);
int run_dist_selftest(int argc, char** argv);

}  // namespace moetune::cli
