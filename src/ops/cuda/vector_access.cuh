// Vectorised row access for the memory-bound kernels: V consecutive elements loaded to / stored
// from fp32 registers, with one 16-byte access when V elements make 16 bytes (V = 8 for
// bf16, 4 for fp32). The caller checks that rows are multiples of V and 16-byte aligned
// (vector_aligned), else instantiates V = 1. Packed<scalar_t, V> keeps V elements in their
// storage type (a bf16 row held in registers takes half the registers of its fp32 values).
// Kept out of device_utils.cuh so that the CUTLASS file does not recompile when these change.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "ops/cuda/device_utils.cuh"

namespace moetune::cuda {

template <typename scalar_t, int V>
__device__ __forceinline__ void load_vec(const scalar_t* p, float (&out)[V]) {
  if constexpr (V * sizeof(scalar_t) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const scalar_t* v = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_float(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_float(p[i]);
  }
}
template <typename scalar_t, int V>
__device__ __forceinline__ void store_vec(scalar_t* p, const float (&in)[V]) {
  if constexpr (V * sizeof(scalar_t) == 16) {
    uint4 raw;
    scalar_t* v = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = from_float<scalar_t>(in[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = from_float<scalar_t>(in[i]);
  }
}

template <typename scalar_t, int V>
struct alignas(V * sizeof(scalar_t) == 16 ? 16 : alignof(scalar_t)) Packed {
  scalar_t v[V];
};
template <typename scalar_t, int V>
__device__ __forceinline__ Packed<scalar_t, V> load_packed(const scalar_t* p) {
  Packed<scalar_t, V> out;
  if constexpr (V * sizeof(scalar_t) == 16) {
    *reinterpret_cast<uint4*>(&out) = *reinterpret_cast<const uint4*>(p);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out.v[i] = p[i];
  }
  return out;
}
template <typename scalar_t, int V>
__device__ __forceinline__ void store_packed(scalar_t* p, const Packed<scalar_t, V>& in) {
  if constexpr (V * sizeof(scalar_t) == 16) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&in);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = in.v[i];
  }
}

// Whether rows of `row_elements` elements of `element_bytes` at these pointers take 16-byte
// vectors.
inline bool vector_aligned(int64_t row_elements, int64_t element_bytes,
                           std::initializer_list<const void*> pointers) {
  if (row_elements * element_bytes % 16 != 0) return false;
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace moetune::cuda
