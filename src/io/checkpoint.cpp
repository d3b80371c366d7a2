// Sharded HF checkpoints: reading through the index, writing like save_pretrained.
// The index is untrusted too: shard names must be plain file names inside the folder (no
// "../" escapes), every shard must exist and hold the tensors the index puts there, and a
// tensor may live in only one shard. Tensors a shard holds but the index omits are still
// served (Transformers loads whole shard files, so they are part of the model).
#include "io/checkpoint.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <set>

#include "core/error.h"
#include "io/json_file.h"

namespace moetune {

namespace {

std::string in_quotes(const std::string& text) { return "'" + text + "'"; }

}  // namespace

std::string shard_file_name(size_t index, size_t count) {
  char name[64];
  std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", index + 1, count);
  return name;
}

bool is_weight_file_name(const std::string& name) {
  if (name == kSafetensorsName || name == kSafetensorsIndexName) return true;
  const std::string_view pattern = "model-#####-of-#####.safetensors";
  if (name.size() != pattern.size()) return false;
  for (size_t i = 0; i < name.size(); ++i)
    if (pattern[i] == '#' ? !std::isdigit(static_cast<unsigned char>(name[i]))
                          : name[i] != pattern[i])
      return false;
  return true;
}

// ---- reading ----------------------------------------------------------------------------------

CheckpointReader::CheckpointReader(const std::filesystem::path& location) {
  std::error_code error;
  if (std::filesystem::is_regular_file(location, error)) {
    folder_ = location.has_parent_path() ? location.parent_path() : ".";
    add_shard(SafetensorsFile(location));
    return;
  }
  folder_ = location;
  if (!std::filesystem::is_directory(location, error))
    fail(location.string(), ": no such checkpoint folder or .safetensors file");
  if (std::filesystem::exists(location / kSafetensorsName)) {
    add_shard(SafetensorsFile(location / kSafetensorsName));
    return;
  }
  if (std::filesystem::exists(location / kSafetensorsIndexName)) {
    open_index(location / kSafetensorsIndexName);
    return;
  }
  std::string hint;
  if (std::filesystem::exists(location / "pytorch_model.bin") ||
      std::filesystem::exists(location / "pytorch_model.bin.index.json"))
    hint = " (pytorch_model.bin checkpoints are not supported: convert them to safetensors)";
  fail(location.string(), ": holds neither ", kSafetensorsName, " nor ", kSafetensorsIndexName,
       hint);
}

void CheckpointReader::open_index(const std::filesystem::path& index_path) {
  sharded_ = true;
  const std::string where = index_path.string() + ": ";
  nlohmann::json index = read_json_file(index_path);
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    fail(where, "must be an object with a \"weight_map\" object");

  // Shard file -> the tensors the index puts there.
  std::map<std::string, std::vector<std::string>> listed;
  for (const auto& [tensor, shard] : index["weight_map"].items()) {
    if (!shard.is_string())
      fail(where, "weight_map entry of tensor ", in_quotes(tensor), " must be a file name, got ",
           shard.dump());
    std::string file = shard.get<std::string>();
    if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos ||
        file.find('\\') != std::string::npos || file.find('\0') != std::string::npos)
      fail(where, "weight_map entry of tensor ", in_quotes(tensor), ": shard name ", shard.dump(),
           " is not a plain file name in the folder");
    listed[file].push_back(tensor);
  }
  if (listed.empty()) fail(where, "weight_map is empty");

  for (const auto& [file, tensors] : listed) {
    std::filesystem::path shard_path = folder_ / file;
    if (!std::filesystem::exists(shard_path))
      fail(where, "shard ", in_quotes(file), " (listed for tensor ", in_quotes(tensors.front()),
           ") does not exist in ", folder_.string());
    SafetensorsFile shard(shard_path);
    for (const std::string& tensor : tensors)
      if (!shard.contains(tensor))
        fail(where, "the index puts tensor ", in_quotes(tensor), " in shard ", in_quotes(file),
             ", which does not hold it");
    add_shard(std::move(shard));
  }
}

void CheckpointReader::add_shard(SafetensorsFile shard) {
  size_t shard_index = shards_.size();
  for (const std::string& name : shard.names()) {
    auto [it, inserted] = shard_of_.emplace(name, shard_index);
    if (!inserted)
      fail(folder_.string(), ": tensor ", in_quotes(name),
           " is in two shards: ", shards_[it->second].path().filename().string(), " and ",
           shard.path().filename().string());
    names_.push_back(name);
  }
  shards_.push_back(std::move(shard));
}

const SafetensorsFile& CheckpointReader::file_of(const std::string& name) const {
  auto it = shard_of_.find(name);
  if (it == shard_of_.end())
    fail(folder_.string(), ": checkpoint has no tensor ", in_quotes(name), " (", names_.size(),
         " tensors in ", shards_.size(), shards_.size() == 1 ? " file)" : " shards)");
  return shards_[it->second];
}

// ---- sizes ------------------------------------------------------------------------------------

uint64_t parse_byte_size(std::string_view text) {
  auto bad = [&]() -> uint64_t {
    fail("size '", text, "' is not a size like 5GB, 500MB, 2GiB or a number of bytes");
  };
  size_t position = 0;
  while (position < text.size() &&
         (std::isdigit(static_cast<unsigned char>(text[position])) || text[position] == '.'))
    ++position;
  std::string number(text.substr(0, position));
  if (number.empty() || std::count(number.begin(), number.end(), '.') > 1 || number == ".")
    return bad();
  std::string unit;
  for (char c : text.substr(position))
    if (c != ' ') unit += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  static const std::pair<const char*, double> kUnits[] = {{"", 1.0},
                                                          {"B", 1.0},
                                                          {"KB", 1e3},
                                                          {"MB", 1e6},
                                                          {"GB", 1e9},
                                                          {"TB", 1e12},
                                                          {"KIB", 1024.0},
                                                          {"MIB", 1048576.0},
                                                          {"GIB", 1073741824.0},
                                                          {"TIB", 1099511627776.0}};
  for (const auto& [name, scale] : kUnits) {
    if (unit != name) continue;
    double bytes = std::stod(number) * scale;
    if (!(bytes >= 1) || bytes > 1.8e19) return bad();
    return static_cast<uint64_t>(std::llround(bytes));
  }
  return bad();
}

// ---- writing ----------------------------------------------------------------------------------

std::vector<std::string> write_checkpoint(const std::filesystem::path& folder,
                                          std::span<const NamedTensor> tensors,
                                          uint64_t max_shard_bytes,
                                          const std::map<std::string, std::string>& metadata) {
  if (max_shard_bytes == 0) fail(folder.string(), ": max shard size must be positive");
  std::error_code error;
  std::filesystem::create_directories(folder, error);
  if (error) fail(folder.string(), ": cannot create folder: ", error.message());

  // Split like huggingface_hub's split_state_dict_into_shards: in order, a new shard when the
  // next tensor would overflow this one; an oversized tensor alone in its own shard.
  std::set<std::string> names;
  for (const NamedTensor& named : tensors)
    if (!names.insert(named.name).second)
      fail(folder.string(), ": tensor ", in_quotes(named.name), " is given twice");

  std::vector<std::vector<NamedTensor>> shards;
  std::vector<NamedTensor> current;
  uint64_t current_bytes = 0, total_bytes = 0, total_parameters = 0;
  for (const NamedTensor& named : tensors) {
    uint64_t bytes = named.tensor.bytes();
    total_bytes += bytes;
    total_parameters += static_cast<uint64_t>(named.tensor.numel());
    if (!current.empty() && current_bytes + bytes > max_shard_bytes) {
      shards.push_back(std::move(current));
      current.clear();
      current_bytes = 0;
    }
    current.push_back(named);
    current_bytes += bytes;
  }
  if (!current.empty() || shards.empty()) shards.push_back(std::move(current));

  std::vector<std::string> written;
  if (shards.size() == 1) {
    write_safetensors(folder / kSafetensorsName, shards[0], metadata);
    written.push_back(kSafetensorsName);
  } else {
    nlohmann::json weight_map = nlohmann::json::object();
    for (size_t i = 0; i < shards.size(); ++i) {
      std::string name = shard_file_name(i, shards.size());
      write_safetensors(folder / name, shards[i], metadata);
      for (const NamedTensor& named : shards[i]) weight_map[named.name] = name;
      written.push_back(name);
    }
    nlohmann::json index = {
        {"metadata", {{"total_size", total_bytes}, {"total_parameters", total_parameters}}},
        {"weight_map", weight_map}};
    write_json_file(folder / kSafetensorsIndexName, index);
    written.push_back(kSafetensorsIndexName);
  }

  // Remove weight files of an earlier save that the new one does not use (as save_pretrained).
  std::set<std::string> keep(written.begin(), written.end());
  for (const auto& entry : std::filesystem::directory_iterator(folder, error)) {
    std::string name = entry.path().filename().string();
    if (entry.is_regular_file() && is_weight_file_name(name) && !keep.count(name))
      std::filesystem::remove(entry.path(), error);
  }
  return written;
}

}  // namespace moetune
