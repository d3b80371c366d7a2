// Test fixtures of the tokenizer tests: tokenizer folders from ../shared/data with their
// .xz files decompressed (once per test binary run, into a temp folder removed at exit),
// loaded tokenizers cached per folder, and the goldens of tests/goldens/tokenizer.
#pragma once

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>

#include "data/tokenizer.h"
#include "test_util.h"

namespace moetune::testing {

// A folder holding tokenizer.json (+ tokenizer_config.json) of shared/data/<folder>.
inline std::filesystem::path tokenizer_folder(const std::string& folder) {
  static std::mutex mutex;
  static TempDir temp;
  static std::map<std::string, std::filesystem::path> done;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = done.find(folder); it != done.end()) return it->second;
  const auto source = shared_data_dir() / folder;
  auto target = source;
  if (!std::filesystem::exists(source / "tokenizer.json") &&
      std::filesystem::exists(source / "tokenizer.json.xz")) {
    target = temp.path() / std::to_string(done.size());
    std::filesystem::create_directories(target);
    const auto result = run_command("xz -dc '" + (source / "tokenizer.json.xz").string() + "' > '" +
                                    (target / "tokenizer.json").string() + "'");
    if (result.exit_code != 0) throw std::runtime_error("xz failed: " + result.output);
    if (std::filesystem::exists(source / "tokenizer_config.json"))
      std::filesystem::copy_file(source / "tokenizer_config.json",
                                 target / "tokenizer_config.json");
  }
  done[folder] = target;
  return target;
}

inline nlohmann::json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// The tokenizer of shared/data/<folder>, loaded once.
inline const Tokenizer& shared_tokenizer(const std::string& folder) {
  static std::mutex mutex;
  static std::map<std::string, std::unique_ptr<Tokenizer>> loaded;
  const auto dir = tokenizer_folder(folder);
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = loaded[folder];
  if (!slot) slot = std::make_unique<Tokenizer>(Tokenizer::from_folder(dir));
  return *slot;
}

inline std::filesystem::path tokenizer_goldens_dir() {
  return source_dir() / "tests" / "goldens" / "tokenizer";
}

}  // namespace moetune::testing
