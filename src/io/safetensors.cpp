// Safetensors reader (mmap + full validation) and atomic writer; see safetensors.h.
// Validation mirrors the reference Rust implementation: the header must be a JSON object of
// well-formed entries, every byte range must hold exactly numel * element size bytes, and
// the ranges, sorted, must tile the data section with no overlap, hole or trailing bytes.
// All size arithmetic is overflow-checked (hostile shapes like [2^40, 2^40] are rejected,
// not wrapped). Top-level keys are checked for duplicates while parsing, because the JSON
// library would otherwise silently keep the last one.
#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

namespace moetune {

namespace {

using ordered_json = nlohmann::ordered_json;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference implementation's limit
constexpr uint64_t kMaxDim = uint64_t{1} << 62;

std::string in_quotes(const std::string& name) { return "'" + name + "'"; }

uint64_t read_le64(const std::byte* bytes) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | static_cast<uint8_t>(bytes[i]);
  return value;
}

// A JSON array of non-negative integers, or an error naming `what`.
std::vector<uint64_t> unsigned_list(const ordered_json& value, const std::string& where,
                                    const char* what) {
  if (!value.is_array())
    fail(where, what, " must be a list of non-negative integers, got ", value.dump());
  std::vector<uint64_t> list;
  for (const auto& item : value) {
    if (!item.is_number_unsigned())
      fail(where, what, " must be a list of non-negative integers, got ", value.dump());
    list.push_back(item.get<uint64_t>());
  }
  return list;
}

std::string span_str(const std::vector<uint64_t>& list) {
  std::string text = "[";
  for (size_t i = 0; i < list.size(); ++i) text += (i ? ", " : "") + std::to_string(list[i]);
  return text + "]";
}

inline float load_as_float(const std::byte* element, DType dtype) {
  if (dtype == DType::F32) {
    float value;
    std::memcpy(&value, element, 4);
    return value;
  }
  uint16_t bits;
  std::memcpy(&bits, element, 2);
  return dtype == DType::BF16 ? bf16_to_float(bits) : f16_to_float(bits);
}

inline void store_float(float value, std::byte* element, DType dtype) {
  if (dtype == DType::F32) {
    std::memcpy(element, &value, 4);
    return;
  }
  uint16_t bits = dtype == DType::BF16 ? float_to_bf16(value) : float_to_f16(value);
  std::memcpy(element, &bits, 2);
}

// write(2) until done; errors name the file.
void write_all(int fd, const void* data, size_t size, const std::string& path) {
  const char* cursor = static_cast<const char*>(data);
  while (size > 0) {
    size_t chunk = std::min<size_t>(size, size_t{1} << 30);
    ssize_t written = ::write(fd, cursor, chunk);
    if (written < 0 && errno == EINTR) continue;
    if (written <= 0) fail(path, ": write failed: ", std::strerror(errno));
    cursor += written;
    size -= static_cast<size_t>(written);
  }
}

void remove_quietly(const std::filesystem::path& path) {
  std::error_code ignored;
  std::filesystem::remove(path, ignored);
}

}  // namespace

// ---- reading ----------------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : path_(path) {
  const std::string where = path.string() + ": ";
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(where, "cannot open: ", std::strerror(errno));
  struct stat status {};
  if (::fstat(fd, &status) != 0 || !S_ISREG(status.st_mode)) {
    ::close(fd);
    fail(where, "not a regular file");
  }
  file_size_ = static_cast<uint64_t>(status.st_size);
  if (file_size_ < 8) {
    ::close(fd);
    fail(where, "file is ", file_size_, " bytes, shorter than the 8-byte header length");
  }
  void* mapping = ::mmap(nullptr, file_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);
  if (mapping == MAP_FAILED) fail(where, "mmap failed: ", std::strerror(map_errno));
  mapping_ = static_cast<const std::byte*>(mapping);

  try {
    uint64_t header_size = read_le64(mapping_);
    if (header_size > kMaxHeaderBytes)
      fail(where, "header length ", header_size, " is larger than the limit of ", kMaxHeaderBytes,
           " bytes (not a safetensors file?)");
    if (header_size > file_size_ - 8)
      fail(where, "header length ", header_size, " runs past the end of the file (", file_size_,
           " bytes)");
    data_start_ = 8 + header_size;
    parse_header(std::string_view(reinterpret_cast<const char*>(mapping_ + 8), header_size),
                 file_size_ - data_start_);
  } catch (...) {
    release();
    throw;
  }
}

void SafetensorsFile::parse_header(std::string_view header, uint64_t data_size) {
  const std::string file = path_.string();
  if (header.empty() || header.front() != '{')
    fail(file, ": header does not start with '{' (not a safetensors file?)");

  // Reject duplicate top-level keys while parsing (depth 1 = keys of the outer object).
  std::set<std::string> seen_keys;
  std::string duplicate;
  // Nesting is limited too: a valid header is 3 levels deep, and nlohmann's dump recurses.
  auto check_duplicates = [&](int depth, nlohmann::detail::parse_event_t event,
                              ordered_json& parsed) {
    if (depth > 8) fail(file, ": header JSON is nested deeper than 8 levels");
    if (event == nlohmann::detail::parse_event_t::key && depth == 1 && parsed.is_string() &&
        !seen_keys.insert(parsed.get<std::string>()).second && duplicate.empty())
      duplicate = parsed.get<std::string>();
    return true;
  };
  ordered_json root;
  try {
    root = ordered_json::parse(header.begin(), header.end(), check_duplicates);
  } catch (const nlohmann::json::exception& error) {
    fail(file, ": header is not valid JSON: ", error.what());
  }
  if (!root.is_object()) fail(file, ": header is not a JSON object");
  if (!duplicate.empty()) fail(file, ": header lists tensor ", in_quotes(duplicate), " twice");

  std::vector<TensorInfo> infos;
  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) fail(file, ": __metadata__ must be an object of strings");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string())
          fail(file, ": __metadata__ value of ", in_quotes(key), " must be a string, got ",
               value.dump());
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string where = file + ": tensor " + in_quotes(name) + ": ";
    if (!entry.is_object()) fail(where, "entry must be an object, got ", entry.dump());
    for (const char* key : {"dtype", "shape", "data_offsets"})
      if (!entry.contains(key)) fail(where, "missing '", key, "'");
    const auto& dtype_json = entry["dtype"];
    if (!dtype_json.is_string()) fail(where, "dtype must be a string, got ", dtype_json.dump());
    auto dtype = dtype_from_name(dtype_json.get<std::string>());
    if (!dtype) fail(where, "unknown dtype ", dtype_json.dump());

    TensorInfo info;
    info.name = name;
    info.dtype = *dtype;
    std::vector<uint64_t> dims = unsigned_list(entry["shape"], where, "shape");
    if (dims.size() > static_cast<size_t>(Shape::kMaxRank))
      fail(where, "shape ", span_str(dims), " has rank ", dims.size(), ", more than the ",
           Shape::kMaxRank, " supported");
    uint64_t needed = dtype_size(*dtype);
    bool overflow = false;
    for (uint64_t dim : dims) {
      if (dim > kMaxDim) overflow = true;
      overflow = overflow || __builtin_mul_overflow(needed, dim, &needed);
      info.shape.dims[info.shape.rank++] = static_cast<int64_t>(std::min(dim, kMaxDim));
    }
    if (overflow) fail(where, "shape ", span_str(dims), " is too large");

    std::vector<uint64_t> offsets = unsigned_list(entry["data_offsets"], where, "data_offsets");
    if (offsets.size() != 2)
      fail(where, "data_offsets must be [begin, end], got ", entry["data_offsets"].dump());
    info.data_begin = offsets[0];
    info.data_end = offsets[1];
    if (info.data_begin > info.data_end)
      fail(where, "data_offsets ", span_str(offsets), " end before they begin");
    if (info.data_end > data_size)
      fail(where, "data_offsets ", span_str(offsets), " run past the end of the data section (",
           data_size, " bytes)");
    if (info.bytes() != needed)
      fail(where, "data_offsets ", span_str(offsets), " hold ", info.bytes(), " bytes but shape ",
           info.shape.str(), " of ", dtype_name(info.dtype), " needs ", needed);
    infos.push_back(std::move(info));
  }

  // The ranges, sorted by position, must tile [0, data_size) exactly.
  std::stable_sort(infos.begin(), infos.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.data_begin != b.data_begin ? a.data_begin < b.data_begin : a.data_end < b.data_end;
  });
  uint64_t covered = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& info : infos) {
    if (info.data_begin < covered)
      fail(file, ": tensor ", in_quotes(info.name), ": bytes [", info.data_begin, ", ",
           info.data_end, ") overlap tensor ", in_quotes(previous->name), " [",
           previous->data_begin, ", ", previous->data_end, ")");
    if (info.data_begin > covered)
      fail(file, ": data section has a hole: bytes [", covered, ", ", info.data_begin,
           ") before tensor ", in_quotes(info.name), " belong to no tensor");
    covered = info.data_end;
    previous = &info;
  }
  if (covered != data_size)
    fail(file, ": data section has ", data_size - covered,
         " trailing bytes after the last tensor (", data_size, " bytes, tensors cover ", covered,
         ")");

  for (TensorInfo& info : infos) {
    names_.push_back(info.name);
    tensors_.emplace(info.name, std::move(info));
  }
}

void SafetensorsFile::release() {
  if (mapping_) ::munmap(const_cast<std::byte*>(mapping_), file_size_);
  mapping_ = nullptr;
}

SafetensorsFile::~SafetensorsFile() { release(); }

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      mapping_(std::exchange(other.mapping_, nullptr)),
      file_size_(other.file_size_),
      data_start_(other.data_start_),
      names_(std::move(other.names_)),
      tensors_(std::move(other.tensors_)),
      metadata_(std::move(other.metadata_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    mapping_ = std::exchange(other.mapping_, nullptr);
    file_size_ = other.file_size_;
    data_start_ = other.data_start_;
    names_ = std::move(other.names_);
    tensors_ = std::move(other.tensors_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail(path_.string(), ": no tensor ", in_quotes(name));
  return it->second;
}

std::span<const std::byte> SafetensorsFile::bytes(const std::string& name) const {
  const TensorInfo& entry = info(name);
  return {mapping_ + data_start_ + entry.data_begin, static_cast<size_t>(entry.bytes())};
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  const TensorInfo& entry = info(name);
  const std::byte* data = bytes(name).data();
  if (reinterpret_cast<uintptr_t>(data) % dtype_size(entry.dtype) != 0)
    fail(path_.string(), ": tensor ", in_quotes(name), ": data at offset ",
         data_start_ + entry.data_begin, " is not aligned to its ", dtype_size(entry.dtype),
         "-byte ", dtype_name(entry.dtype), " elements; use read_into");
  return Tensor(const_cast<std::byte*>(data), entry.dtype, entry.shape, Device::CPU);
}

void SafetensorsFile::read_into(const std::string& name, Tensor destination) const {
  const TensorInfo& entry = info(name);
  const std::string what = path_.string() + ": tensor " + in_quotes(name);
  if (destination.device != Device::CPU) fail(what, ": read_into needs a CPU destination");
  if (destination.shape != entry.shape)
    fail(what, ": has shape ", entry.shape.str(), " but the destination has shape ",
         destination.shape.str());
  Tensor source(const_cast<std::byte*>(bytes(name).data()), entry.dtype, entry.shape);
  convert_tensor(source, destination, what);
}

void SafetensorsFile::read_as_f32(const std::string& name, std::span<float> out) const {
  const TensorInfo& entry = info(name);
  const std::string what = path_.string() + ": tensor " + in_quotes(name);
  if (static_cast<int64_t>(out.size()) != entry.shape.numel())
    fail(what, ": has ", entry.shape.numel(), " elements (shape ", entry.shape.str(),
         ") but the destination holds ", out.size());
  Tensor source(const_cast<std::byte*>(bytes(name).data()), entry.dtype, entry.shape);
  Tensor destination(out.data(), DType::F32, entry.shape);
  convert_tensor(source, destination, what);
}

void convert_tensor(Tensor source, Tensor destination, const std::string& what) {
  if (source.numel() != destination.numel())
    fail(what, ": ", source.numel(), " elements cannot fill a destination of ",
         destination.numel());
  if (source.dtype == destination.dtype) {
    if (source.bytes() > 0) std::memmove(destination.data, source.data, source.bytes());
    return;
  }
  for (DType dtype : {source.dtype, destination.dtype})
    if (!dtype_is_float(dtype))
      fail(what, ": dtype ", dtype_name(dtype), " is not supported yet (conversion from ",
           dtype_name(source.dtype), " to ", dtype_name(destination.dtype),
           "; only F32, BF16 and F16 convert)");
  // One tight loop per (source, destination) pair, so the dtype test is not per element.
  const auto* in = static_cast<const std::byte*>(source.data);
  auto* out = static_cast<std::byte*>(destination.data);
  const int64_t count = source.numel();
  auto run = [&]<DType kIn, DType kOut>() {
    constexpr size_t in_size = kIn == DType::F32 ? 4 : 2, out_size = kOut == DType::F32 ? 4 : 2;
    for (int64_t i = 0; i < count; ++i)
      store_float(load_as_float(in + i * in_size, kIn), out + i * out_size, kOut);
  };
  DType from = source.dtype, to = destination.dtype;
  if (from == DType::BF16 && to == DType::F32)
    run.operator()<DType::BF16, DType::F32>();
  else if (from == DType::F16 && to == DType::F32)
    run.operator()<DType::F16, DType::F32>();
  else if (from == DType::F32 && to == DType::BF16)
    run.operator()<DType::F32, DType::BF16>();
  else if (from == DType::F32 && to == DType::F16)
    run.operator()<DType::F32, DType::F16>();
  else if (from == DType::BF16 && to == DType::F16)
    run.operator()<DType::BF16, DType::F16>();
  else
    run.operator()<DType::F16, DType::BF16>();
}

// ---- writing ----------------------------------------------------------------------------------

void write_safetensors(const std::filesystem::path& path, std::span<const NamedTensor> tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string file = path.string();
  std::set<std::string> names;
  for (const NamedTensor& named : tensors) {
    const std::string where = file + ": tensor " + in_quotes(named.name);
    if (named.name.empty() || named.name == "__metadata__") fail(where, ": invalid tensor name");
    if (!names.insert(named.name).second) fail(where, ": given twice");
    if (named.tensor.device != Device::CPU) fail(where, ": only CPU tensors can be written");
    if (named.tensor.numel() < 0) fail(where, ": negative shape ", named.tensor.shape.str());
    if (named.tensor.numel() > 0 && !named.tensor.data) fail(where, ": has no data");
  }

  // Keep the given order unless it misaligns an element; then largest elements first.
  std::vector<const NamedTensor*> order;
  for (const NamedTensor& named : tensors) order.push_back(&named);
  uint64_t offset = 0;
  bool aligned = true;
  for (const NamedTensor* named : order) {
    aligned = aligned && offset % dtype_size(named->tensor.dtype) == 0;
    offset += named->tensor.bytes();
  }
  if (!aligned)
    std::stable_sort(order.begin(), order.end(), [](const NamedTensor* a, const NamedTensor* b) {
      return dtype_size(a->tensor.dtype) > dtype_size(b->tensor.dtype);
    });

  ordered_json header = ordered_json::object();
  ordered_json meta = ordered_json::object();
  meta["format"] = "pt";
  for (const auto& [key, value] : metadata) meta[key] = value;
  header["__metadata__"] = meta;
  offset = 0;
  for (const NamedTensor* named : order) {
    ordered_json shape = ordered_json::array();
    for (int i = 0; i < named->tensor.rank(); ++i) shape.push_back(named->tensor.shape[i]);
    uint64_t end = offset + named->tensor.bytes();
    header[named->name] = {{"dtype", std::string(dtype_name(named->tensor.dtype))},
                           {"shape", shape},
                           {"data_offsets", {offset, end}}};
    offset = end;
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  uint8_t length_bytes[8];
  for (int i = 0; i < 8; ++i) length_bytes[i] = static_cast<uint8_t>(header_text.size() >> (8 * i));

  std::filesystem::path temporary = path;
  temporary += ".tmp";
  int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(temporary.string(), ": cannot create: ", std::strerror(errno));
  try {
    write_all(fd, length_bytes, 8, temporary.string());
    write_all(fd, header_text.data(), header_text.size(), temporary.string());
    for (const NamedTensor* named : order)
      write_all(fd, named->tensor.data, named->tensor.bytes(), temporary.string());
    if (::fsync(fd) != 0) fail(temporary.string(), ": fsync failed: ", std::strerror(errno));
  } catch (...) {
    ::close(fd);
    remove_quietly(temporary);
    throw;
  }
  if (::close(fd) != 0) {
    remove_quietly(temporary);
    fail(temporary.string(), ": close failed: ", std::strerror(errno));
  }
  std::error_code error;
  std::filesystem::rename(temporary, path, error);
  if (error) {
    remove_quietly(temporary);
    fail(file, ": cannot rename ", temporary.string(), " into place: ", error.message());
  }
  // Make the rename itself durable.
  std::filesystem::path folder = path.has_parent_path() ? path.parent_path() : ".";
  int folder_fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (folder_fd >= 0) {
    ::fsync(folder_fd);
    ::close(folder_fd);
  }
}

}  // namespace moetune
