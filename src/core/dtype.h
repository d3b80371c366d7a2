// Element types of tensors and their conversions.
// bf16 and fp16 are stored as raw uint16_t bit patterns on the host; conversions round
// to nearest even, as torch does. fp8 types are recognised (safetensors can hold them)
// but no op computes in them yet.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

namespace moetune {

enum class DType : uint8_t { F32, BF16, F16, F64, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2 };

// Bytes per element.
size_t dtype_size(DType dtype);
// The safetensors spelling: "F32", "BF16", "F8_E4M3", ...
std::string_view dtype_name(DType dtype);
// Parses a safetensors dtype string; nullopt when it is not one we know.
std::optional<DType> dtype_from_name(std::string_view name);
// True for the types ops can compute with (F32, BF16, F16 as storage).
bool dtype_is_float(DType dtype);

inline float bf16_to_float(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

inline uint16_t float_to_bf16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  if ((word & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((word >> 16) | 0x40);  // NaN
  uint32_t rounding_bias = 0x7fffu + ((word >> 16) & 1u);
  return static_cast<uint16_t>((word + rounding_bias) >> 16);
}

float f16_to_float(uint16_t bits);
uint16_t float_to_f16(float value);

}  // namespace moetune
