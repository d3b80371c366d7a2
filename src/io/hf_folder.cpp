// config.json writing and tokenizer file copying for saved HF folders (see hf_folder.h).
// Copies go through a temporary name and a rename, like every other file we write, so an
// interrupted save never leaves a truncated tokenizer.json behind.
#include "io/hf_folder.h"

#include "core/error.h"
#include "io/json_file.h"

namespace moetune {

namespace {

void copy_file_atomic(const std::filesystem::path& from, const std::filesystem::path& to) {
  std::filesystem::path temporary = to;
  temporary += ".tmp";
  std::error_code error;
  std::filesystem::copy_file(from, temporary, std::filesystem::copy_options::overwrite_existing,
                             error);
  if (!error) std::filesystem::rename(temporary, to, error);
  if (error) {
    std::error_code ignored;
    std::filesystem::remove(temporary, ignored);
    fail(from.string(), ": cannot copy to ", to.string(), ": ", error.message());
  }
}

}  // namespace

void write_config_json(const std::filesystem::path& folder, const nlohmann::json& raw_config,
                       const std::optional<std::string>& dtype) {
  if (!raw_config.is_object()) fail(folder.string(), ": config to write must be a JSON object");
  nlohmann::json config = raw_config;
  if (dtype) {
    config["dtype"] = *dtype;
    if (config.contains("torch_dtype")) config["torch_dtype"] = *dtype;
  }
  std::error_code error;
  std::filesystem::create_directories(folder, error);
  if (error) fail(folder.string(), ": cannot create folder: ", error.message());
  write_json_file(folder / "config.json", config);
}

std::vector<std::string> copy_tokenizer_files(const std::filesystem::path& source,
                                              const std::filesystem::path& destination) {
  std::error_code error;
  if (!std::filesystem::is_directory(source, error)) fail(source.string(), ": not a folder");
  std::filesystem::create_directories(destination, error);
  if (error) fail(destination.string(), ": cannot create folder: ", error.message());
  if (std::filesystem::equivalent(source, destination, error)) return {};

  std::vector<std::string> copied;
  for (const char* name : kTokenizerFiles) {
    if (!std::filesystem::is_regular_file(source / name, error)) continue;
    copy_file_atomic(source / name, destination / name);
    copied.push_back(name);
  }
  std::filesystem::path templates = source / kChatTemplatesFolder;
  if (std::filesystem::is_directory(templates, error)) {
    std::filesystem::create_directories(destination / kChatTemplatesFolder, error);
    for (const auto& entry : std::filesystem::directory_iterator(templates, error)) {
      if (!entry.is_regular_file()) continue;
      std::string name = std::string(kChatTemplatesFolder) + "/" + entry.path().filename().string();
      copy_file_atomic(entry.path(), destination / name);
      copied.push_back(name);
    }
  }
  return copied;
}

}  // namespace moetune
