// Hugging Face checkpoints: one model.safetensors, or shards listed by
// model.safetensors.index.json ({"metadata": {...}, "weight_map": {tensor: shard file}}).
// CheckpointReader opens every shard (mmap; see safetensors.h), checks the index against the
// shards and looks tensors up by name across them. write_checkpoint splits tensors into
// shards the way Transformers' save_pretrained does (in order; a new shard when the next
// tensor would pass max_shard_bytes; a tensor larger than that alone in its own shard).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "io/safetensors.h"

namespace moetune {

class CheckpointReader {
 public:
  // `location` is an HF folder (model.safetensors or model.safetensors.index.json inside;
  // the single file wins when both exist, as in Transformers) or one .safetensors file.
  explicit CheckpointReader(const std::filesystem::path& location);

  const std::filesystem::path& folder() const { return folder_; }
  // Every tensor: shards in file-name order, each in the order its bytes sit in the file.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return shard_of_.count(name) != 0; }
  const std::vector<SafetensorsFile>& shards() const { return shards_; }
  bool sharded() const { return sharded_; }

  // Errors for a missing tensor name the folder and the tensor.
  const SafetensorsFile& file_of(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const { return file_of(name).info(name); }
  Tensor tensor(const std::string& name) const { return file_of(name).tensor(name); }
  std::span<const std::byte> bytes(const std::string& name) const {
    return file_of(name).bytes(name);
  }
  void read_into(const std::string& name, Tensor destination) const {
    file_of(name).read_into(name, destination);
  }
  void read_as_f32(const std::string& name, std::span<float> out) const {
    file_of(name).read_as_f32(name, out);
  }

 private:
  void open_index(const std::filesystem::path& index_path);
  void add_shard(SafetensorsFile shard);

  std::filesystem::path folder_;
  bool sharded_ = false;
  std::vector<SafetensorsFile> shards_;
  std::unordered_map<std::string, size_t> shard_of_;
  std::vector<std::string> names_;
};

inline constexpr const char* kSafetensorsName = "model.safetensors";
inline constexpr const char* kSafetensorsIndexName = "model.safetensors.index.json";

// "model-00002-of-00004.safetensors" for index 1 of 4 shards.
std::string shard_file_name(size_t index, size_t count);
// model.safetensors, its index, or model-00001-of-00004.safetensors.
bool is_weight_file_name(const std::string& name);

// Parses a size like "5GB" (10^9), "500MB", "2GiB" (2^30), "100KiB", "1.5GB" or "123"
// (bytes), as Transformers' max_shard_size does; lower case and a space before the unit are
// fine. Errors name the text.
uint64_t parse_byte_size(std::string_view text);

// Writes `tensors` into `folder` (created if needed) as model.safetensors when their bytes
// fit in max_shard_bytes, else as model-0000i-of-0000N.safetensors + the index. Stale
// weight files from an earlier save in the folder are removed. Returns the file names written.
std::vector<std::string> write_checkpoint(const std::filesystem::path& folder,
                                          std::span<const NamedTensor> tensors,
                                          uint64_t max_shard_bytes,
                                          const std::map<std::string, std::string>& metadata = {});

}  // namespace moetune
