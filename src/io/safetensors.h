// Reading and writing .safetensors files.
// Format: 8-byte little-endian header length N, N bytes of JSON header
// ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then
// the data section; offsets are relative to its start. The reader maps the whole file
// read-only (mmap, released by RAII) and checks every field and every byte range before
// handing out a view, so a truncated or hostile file gives an Error naming the file, the
// tensor and the problem instead of a crash. The writer goes through `path.tmp`, fsync and
// rename, so a crash never leaves a half-written file under the real name.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"

namespace moetune {

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  uint64_t data_begin = 0;  // byte range in the data section (after the header)
  uint64_t data_end = 0;
  uint64_t bytes() const { return data_end - data_begin; }
};

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::filesystem::path& path() const { return path_; }
  // Tensor names in the order their bytes sit in the file.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t file_size() const { return file_size_; }

  // A CPU view into the mapping. The memory is READ-ONLY (writing to it faults); copy it
  // (read_into) to get a tensor you may modify. Fails if the bytes are not aligned to the
  // element size (the format does not promise alignment; read_into works regardless).
  Tensor tensor(const std::string& name) const;
  // The raw bytes of a tensor.
  std::span<const std::byte> bytes(const std::string& name) const;

  // Copies the tensor into `destination` (a CPU tensor with the same shape), converting
  // between F32, BF16 and F16 (round to nearest even); other dtypes only copy to the same
  // dtype. Errors name the file and the tensor.
  void read_into(const std::string& name, Tensor destination) const;
  // The tensor converted to F32 into `out` (out.size() must equal the element count).
  void read_as_f32(const std::string& name, std::span<float> out) const;

 private:
  void parse_header(std::string_view header, uint64_t data_size);
  void release();

  std::filesystem::path path_;
  const std::byte* mapping_ = nullptr;
  uint64_t file_size_ = 0;
  uint64_t data_start_ = 0;  // offset of the data section in the file
  std::vector<std::string> names_;
  std::unordered_map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Converts `source` into `destination` (same element count, CPU) between F32, BF16 and F16;
// equal dtypes copy bytes. `what` names the tensor in error messages.
void convert_tensor(Tensor source, Tensor destination, const std::string& what);

struct NamedTensor {
  std::string name;
  Tensor tensor;  // CPU, contiguous
};

// Writes the tensors (in the order given, unless that would misalign an element type, in
// which case they are stably sorted by element size, largest first) with
// `__metadata__` = {"format": "pt"} plus `metadata`. Atomic: path.tmp + fsync + rename.
void write_safetensors(const std::filesystem::path& path, std::span<const NamedTensor> tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace moetune
