// Tensor: a non-owning view (pointer, dtype, shape, device) of contiguous row-major
// memory, and Buffer: the RAII owner of one allocation on one device.
// Ops and model code pass Tensors around; who owns the bytes (a Buffer, an mmap'd
// safetensors file, an arena) is decided by the caller. Shapes are written as comments
// next to every tensor in model code: `// (tokens, hidden)`.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include "core/dtype.h"
#include "core/error.h"

namespace moetune {

enum class Device : uint8_t { CPU, CUDA };

struct Shape {
  static constexpr int kMaxRank = 6;
  std::array<int64_t, kMaxRank> dims{};
  int rank = 0;

  Shape() = default;
  Shape(std::initializer_list<int64_t> list);
  int64_t operator[](int i) const { return dims[i < 0 ? rank + i : i]; }
  int64_t& operator[](int i) { return dims[i < 0 ? rank + i : i]; }
  int64_t numel() const;
  bool operator==(const Shape& other) const;
  bool operator!=(const Shape& other) const { return !(*this == other); }
  std::string str() const;  // "[2, 3, 4]"
};

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::F32;
  Shape shape;
  Device device = Device::CPU;

  Tensor() = default;
  Tensor(void* data_, DType dtype_, Shape shape_, Device device_ = Device::CPU)
      : data(data_), dtype(dtype_), shape(shape_), device(device_) {}

  int64_t numel() const { return shape.numel(); }
  size_t bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  int rank() const { return shape.rank; }
  int64_t size(int dim) const { return shape[dim]; }
  bool defined() const { return data != nullptr || numel() == 0; }

  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }

  // Same bytes, another shape with the same number of elements.
  Tensor view(Shape new_shape) const;
  // Rows [begin, end) along the first dimension.
  Tensor slice_rows(int64_t begin, int64_t end) const;
  // Element `index` along the first dimension, with that dimension dropped.
  Tensor select(int64_t index) const;
};

// Owns one allocation on one device. Allocation goes through the backend of that
// device (see ops/backend.h); CPU buffers use aligned host memory.
class Buffer {
 public:
  Buffer() : storage_(nullptr, Deleter{}) {}
  Buffer(DType dtype, Shape shape, Device device = Device::CPU);
  // Without the zero fill (contents undefined): for buffers the next op overwrites entirely,
  // where a fill would be a wasted pass over memory (per-group gradients).
  static Buffer uninitialized(DType dtype, Shape shape, Device device);
  Buffer(Buffer&&) noexcept = default;
  Buffer& operator=(Buffer&&) noexcept = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  Tensor tensor() const { return tensor_; }
  operator Tensor() const { return tensor_; }
  void* data() const { return tensor_.data; }
  const Shape& shape() const { return tensor_.shape; }
  DType dtype() const { return tensor_.dtype; }
  int64_t numel() const { return tensor_.numel(); }
  size_t bytes() const { return tensor_.bytes(); }
  template <typename T>
  T* ptr() const {
    return tensor_.ptr<T>();
  }

 private:
  struct Deleter {
    Device device = Device::CPU;
    void operator()(void* pointer) const;
  };
  std::unique_ptr<void, Deleter> storage_;
  Tensor tensor_;
};

// Device allocation hooks, set by the CUDA backend when it is linked in (so that core
// does not depend on CUDA). Host allocations are 64-byte aligned; both are zero-filled unless
// zero_fill is false.
void* allocate_bytes(Device device, size_t bytes, bool zero_fill = true);
void free_bytes(Device device, void* pointer);
using DeviceAllocator = void* (*)(size_t bytes, bool zero_fill);
using DeviceDeallocator = void (*)(void*);
void register_device_allocator(DeviceAllocator allocate, DeviceDeallocator deallocate);

}  // namespace moetune
