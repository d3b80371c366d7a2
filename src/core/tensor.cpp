// Shape arithmetic, tensor views, and Buffer allocation.
#include "core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

namespace moetune {

Shape::Shape(std::initializer_list<int64_t> list) {
  MOETUNE_CHECK(list.size() <= kMaxRank, "rank ", list.size(), " exceeds ", kMaxRank);
  for (int64_t dim : list) dims[rank++] = dim;
}

int64_t Shape::numel() const {
  int64_t count = 1;
  for (int i = 0; i < rank; ++i) count *= dims[i];
  return count;
}

bool Shape::operator==(const Shape& other) const {
  if (rank != other.rank) return false;
  for (int i = 0; i < rank; ++i)
    if (dims[i] != other.dims[i]) return false;
  return true;
}

std::string Shape::str() const {
  std::ostringstream out;
  out << "[";
  for (int i = 0; i < rank; ++i) out << (i ? ", " : "") << dims[i];
  out << "]";
  return out.str();
}

Tensor Tensor::view(Shape new_shape) const {
  MOETUNE_CHECK(new_shape.numel() == numel(), "view ", shape.str(), " as ", new_shape.str());
  return Tensor(data, dtype, new_shape, device);
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  MOETUNE_CHECK(rank() >= 1 && 0 <= begin && begin <= end && end <= shape[0], "slice_rows ", begin,
                ":", end, " of ", shape.str());
  Shape new_shape = shape;
  new_shape[0] = end - begin;
  size_t row_bytes = shape[0] ? bytes() / static_cast<size_t>(shape[0]) : 0;
  return Tensor(static_cast<char*>(data) + row_bytes * begin, dtype, new_shape, device);
}

Tensor Tensor::select(int64_t index) const {
  Tensor row = slice_rows(index, index + 1);
  Shape new_shape;
  for (int i = 1; i < rank(); ++i) new_shape.dims[new_shape.rank++] = shape[i];
  row.shape = new_shape;
  return row;
}

namespace {
DeviceAllocator g_device_allocate = nullptr;      // set once at start-up by the CUDA backend
DeviceDeallocator g_device_deallocate = nullptr;  // (registration, not mutable state in use)
}  // namespace

void register_device_allocator(DeviceAllocator allocate, DeviceDeallocator deallocate) {
  g_device_allocate = allocate;
  g_device_deallocate = deallocate;
}

void* allocate_bytes(Device device, size_t bytes, bool zero_fill) {
  if (bytes == 0) return nullptr;
  if (device == Device::CPU) {
    size_t rounded = (bytes + 63) / 64 * 64;
    void* pointer = std::aligned_alloc(64, rounded);
    if (!pointer) fail("out of host memory allocating ", bytes, " bytes");
    if (zero_fill) std::memset(pointer, 0, rounded);
    return pointer;
  }
  if (!g_device_allocate) fail("this build of moetune has no CUDA backend (built without nvcc)");
  return g_device_allocate(bytes, zero_fill);
}

void free_bytes(Device device, void* pointer) {
  if (!pointer) return;
  if (device == Device::CPU) {
    std::free(pointer);
  } else if (g_device_deallocate) {
    g_device_deallocate(pointer);
  }
}

Buffer Buffer::uninitialized(DType dtype, Shape shape, Device device) {
  Buffer buffer;
  buffer.storage_ = std::unique_ptr<void, Deleter>(nullptr, Deleter{device});
  buffer.tensor_ = Tensor(nullptr, dtype, shape, device);
  buffer.storage_.reset(allocate_bytes(device, buffer.tensor_.bytes(), false));
  buffer.tensor_.data = buffer.storage_.get();
  return buffer;
}

void Buffer::Deleter::operator()(void* pointer) const { free_bytes(device, pointer); }

Buffer::Buffer(DType dtype, Shape shape, Device device)
    : storage_(nullptr, Deleter{device}), tensor_(nullptr, dtype, shape, device) {
  storage_.reset(allocate_bytes(device, tensor_.bytes()));
  tensor_.data = storage_.get();
}

}  // namespace moetune
