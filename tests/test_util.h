// Helpers shared by the tests: paths to the source tree, ../shared/data and the moetune
// binary, temporary folders, running a command, random tensors and tolerance checks.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace moetune::testing {

std::filesystem::path source_dir();       // the repository root
std::filesystem::path shared_data_dir();  // ../shared/data beside the repository
std::filesystem::path moetune_binary();   // the built `moetune` command

// A fresh empty folder under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

struct CommandResult {
  int exit_code = 0;
  std::string output;  // stdout and stderr together
};
// Runs a shell command line and captures its output.
CommandResult run_command(const std::string& command_line);

// Deterministic uniform [-scale, scale) floats.
std::vector<float> random_floats(size_t count, unsigned seed, float scale = 1.0f);

// max |a - b| / max(max |b|, tiny): the per-tensor relative error the parity tests use.
double relative_error(const float* actual, const float* expected, size_t count);

}  // namespace moetune::testing
