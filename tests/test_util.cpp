// Implementation of the shared test helpers (see test_util.h).
#include "test_util.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <random>

namespace moetune::testing {

std::filesystem::path source_dir() { return MOETUNE_SOURCE_DIR; }
std::filesystem::path shared_data_dir() { return source_dir().parent_path() / "shared" / "data"; }
std::filesystem::path moetune_binary() { return MOETUNE_BINARY; }

TempDir::TempDir() {
  std::random_device device;
  std::mt19937_64 rng(device());
  path_ = std::filesystem::temp_directory_path() / ("moetune-test-" + std::to_string(rng()));
  std::filesystem::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

CommandResult run_command(const std::string& command_line) {
  CommandResult result;
  FILE* pipe = popen((command_line + " 2>&1").c_str(), "r");
  if (!pipe) return {127, "popen failed"};
  std::array<char, 4096> chunk;
  size_t count;
  while ((count = fread(chunk.data(), 1, chunk.size(), pipe)) > 0) result.output.append(chunk.data(), count);
  int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

std::vector<float> random_floats(size_t count, unsigned seed, float scale) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-scale, scale);
  std::vector<float> values(count);
  for (auto& value : values) value = uniform(rng);
  return values;
}

double relative_error(const float* actual, const float* expected, size_t count) {
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < count; ++i) {
    max_diff = std::max(max_diff, std::abs(static_cast<double>(actual[i]) - expected[i]));
    max_ref = std::max(max_ref, std::abs(static_cast<double>(expected[i])));
  }
  return max_diff / std::max(max_ref, 1e-30);
}

}  // namespace moetune::testing
