// CPU reference backend: the factory, the shared argument checks, and the memory ops
// (copy with float dtype conversion, fill). The op families are in the other cpu_*.cpp.
#include "ops/cpu/cpu_backend.h"

#include <cstring>

namespace moetune {

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<cpu::CpuBackend>(); }

namespace cpu {

void expect_tensor(const Tensor& t, DType dtype, const char* op, const char* name) {
  if (!t.defined()) fail(op, ": tensor '", name, "' is not defined");
  if (t.device != Device::CPU) fail(op, ": tensor '", name, "' is not on the CPU");
  if (t.dtype != dtype)
    fail(op, ": tensor '", name, "' has dtype ", dtype_name(t.dtype), ", expected ",
         dtype_name(dtype), " (the CPU backend computes in F32 only)");
}

void expect_shape(const Tensor& t, const Shape& shape, const char* op, const char* name) {
  if (t.shape != shape)
    fail(op, ": tensor '", name, "' has shape ", t.shape.str(), ", expected ", shape.str());
}

float* f32(const Tensor& t, const char* op, const char* name) {
  expect_tensor(t, DType::F32, op, name);
  return t.ptr<float>();
}

int32_t* i32(const Tensor& t, const char* op, const char* name) {
  expect_tensor(t, DType::I32, op, name);
  return t.ptr<int32_t>();
}

void expect_offsets(const int32_t* offsets, int64_t count, int64_t rows, const char* op,
                    const char* name) {
  if (offsets[0] < 0) fail(op, ": ", name, "[0] = ", offsets[0], " is negative");
  for (int64_t i = 0; i < count; ++i)
    if (offsets[i + 1] < offsets[i])
      fail(op, ": ", name, " decrease at ", i, " (", offsets[i], " -> ", offsets[i + 1], ")");
  if (offsets[count] > rows)
    fail(op, ": ", name, "[", count, "] = ", offsets[count], " exceeds the ", rows, " rows");
}

namespace {

// Reads element i of a float tensor of dtype F32/BF16/F16 as fp32.
float load_float(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::F32:
      return static_cast<const float*>(data)[i];
    case DType::BF16:
      return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
    case DType::F16:
      return f16_to_float(static_cast<const uint16_t*>(data)[i]);
    default:
      fail("copy: unsupported dtype ", dtype_name(dtype));
  }
}

// Writes fp32 value to element i, rounding to nearest even for BF16/F16.
void store_float(void* data, DType dtype, int64_t i, float value) {
  switch (dtype) {
    case DType::F32:
      static_cast<float*>(data)[i] = value;
      return;
    case DType::BF16:
      static_cast<uint16_t*>(data)[i] = float_to_bf16(value);
      return;
    case DType::F16:
      static_cast<uint16_t*>(data)[i] = float_to_f16(value);
      return;
    default:
      fail("copy: unsupported dtype ", dtype_name(dtype));
  }
}

bool is_convertible_float(DType dtype) {
  return dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16;
}

}  // namespace

void CpuBackend::copy(const Tensor& dst, const Tensor& src) {
  if (!dst.defined() || !src.defined()) fail("copy: tensor not defined");
  if (dst.device != Device::CPU || src.device != Device::CPU)
    fail("copy: the CPU backend copies host tensors only");
  if (dst.numel() != src.numel())
    fail("copy: element counts differ: dst ", dst.shape.str(), " vs src ", src.shape.str());
  const int64_t count = src.numel();
  if (count == 0) return;
  if (dst.dtype == src.dtype) {
    if (dst.data != src.data) std::memmove(dst.data, src.data, src.bytes());
    return;
  }
  if (!is_convertible_float(dst.dtype) || !is_convertible_float(src.dtype))
    fail("copy: cannot convert ", dtype_name(src.dtype), " to ", dtype_name(dst.dtype),
         " (only F32/BF16/F16 convert)");
  for (int64_t i = 0; i < count; ++i)
    store_float(dst.data, dst.dtype, i, load_float(src.data, src.dtype, i));
}

void CpuBackend::fill(const Tensor& dst, float value) {
  if (!dst.defined()) fail("fill: tensor not defined");
  if (dst.device != Device::CPU) fail("fill: tensor is not on the CPU");
  const int64_t count = dst.numel();
  if (dst.dtype == DType::I32) {
    int32_t* out = dst.ptr<int32_t>();
    for (int64_t i = 0; i < count; ++i) out[i] = static_cast<int32_t>(value);
    return;
  }
  if (!is_convertible_float(dst.dtype))
    fail("fill: unsupported dtype ", dtype_name(dst.dtype), " (F32/BF16/F16/I32)");
  for (int64_t i = 0; i < count; ++i) store_float(dst.data, dst.dtype, i, value);
}

}  // namespace cpu
}  // namespace moetune
