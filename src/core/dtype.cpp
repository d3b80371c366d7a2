// DType names, sizes and the fp16 conversions (bf16 is inline in dtype.h).
#include "core/dtype.h"

#include <cmath>

namespace moetune {

namespace {
struct DTypeInfo {
  DType dtype;
  std::string_view name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::F32, "F32", 4},      {DType::BF16, "BF16", 2},        {DType::F16, "F16", 2},
    {DType::F64, "F64", 8},      {DType::I64, "I64", 8},          {DType::I32, "I32", 4},
    {DType::I16, "I16", 2},      {DType::I8, "I8", 1},            {DType::U8, "U8", 1},
    {DType::BOOL, "BOOL", 1},    {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
};
}  // namespace

size_t dtype_size(DType dtype) {
  for (const auto& info : kDTypes)
    if (info.dtype == dtype) return info.size;
  return 0;
}

std::string_view dtype_name(DType dtype) {
  for (const auto& info : kDTypes)
    if (info.dtype == dtype) return info.name;
  return "?";
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& info : kDTypes)
    if (info.name == name) return info.dtype;
  return std::nullopt;
}

bool dtype_is_float(DType dtype) {
  return dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16;
}

float f16_to_float(uint16_t bits) {
  uint32_t sign = (bits >> 15) & 1u, exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else if (exponent == 31) {
    magnitude = mantissa ? NAN : INFINITY;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
  }
  return sign ? -magnitude : magnitude;
}

uint16_t float_to_f16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  uint32_t sign = (word >> 16) & 0x8000u;
  uint32_t abs_word = word & 0x7fffffffu;
  if (abs_word > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (abs_word >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (abs_word < 0x38800000u) {  // subnormal or zero in fp16: round to nearest even
    float magnitude;
    std::memcpy(&magnitude, &abs_word, sizeof(magnitude));
    float scaled = magnitude * 16777216.0f;  // 2^24
    uint32_t rounded = static_cast<uint32_t>(std::nearbyint(scaled));
    return static_cast<uint16_t>(sign | rounded);
  }
  uint32_t rebased = abs_word - 0x38000000u;  // exponent bias 127 -> 15
  uint32_t rounding_bias = 0xfffu + ((rebased >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rebased + rounding_bias) >> 13));
}

}  // namespace moetune
