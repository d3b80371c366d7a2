// Device-side helpers shared by the kernel files: fp32 loads/stores from F32 or BF16
// storage (math is always fp32), warp/block reductions, and the dtype dispatch macro
// that instantiates a kernel for float and __nv_bfloat16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ops/cuda/cuda_common.h"

namespace moetune::cuda {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}
__device__ __forceinline__ float warp_max(float value) {
  for (int offset = 16; offset > 0; offset >>= 1)
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  value = warp_sum(value);
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  value = lane < warps ? partial[lane] : 0.0f;
  return warp_sum(value);
}

__device__ __forceinline__ float block_max(float value) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  value = warp_max(value);
  __syncthreads();
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  value = lane < warps ? partial[lane] : -INFINITY;
  return warp_max(value);
}

// Run-time storage dtype of a secondary operand (uniform branch per launch).
enum class Kind : int { F32 = 0, BF16 = 1, F16 = 2 };

inline Kind kind_of(const Tensor& t) {
  switch (t.dtype) {
    case DType::F32:
      return Kind::F32;
    case DType::BF16:
      return Kind::BF16;
    case DType::F16:
      return Kind::F16;
    default:
      fail("CUDA op: dtype ", dtype_name(t.dtype), " is not a float type");
  }
}

__device__ __forceinline__ float load_any(const void* p, Kind kind, int64_t i) {
  if (kind == Kind::BF16) return __bfloat162float(static_cast<const bf16*>(p)[i]);
  if (kind == Kind::F16) return __half2float(static_cast<const __half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}
__device__ __forceinline__ void store_any(void* p, Kind kind, int64_t i, float v) {
  if (kind == Kind::BF16)
    static_cast<bf16*>(p)[i] = __float2bfloat16_rn(v);
  else if (kind == Kind::F16)
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  else
    static_cast<float*>(p)[i] = v;
}

}  // namespace moetune::cuda

// Runs BODY with `scalar_t` bound to float or bf16 according to DTYPE (F32 / BF16).
#define MOETUNE_DISPATCH_FLOAT(DTYPE, WHAT, ...)                      \
  do {                                                                \
    if ((DTYPE) == ::moetune::DType::F32) {                           \
      using scalar_t = float;                                         \
      __VA_ARGS__;                                                    \
    } else if ((DTYPE) == ::moetune::DType::BF16) {                   \
      using scalar_t = ::moetune::cuda::bf16;                         \
      __VA_ARGS__;                                                    \
    } else {                                                          \
      ::moetune::fail(WHAT, ": dtype ", ::moetune::dtype_name(DTYPE), \
                      " not supported (F32 or BF16)");                \
    }                                                                 \
  } while (0)
