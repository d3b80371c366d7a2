// Helpers shared by the GPU suites (tests/cuda/): whether the current device is a Hopper
// (sm_90) GPU, which the CUTLASS sm90 kernels and SM partitions need.
#pragma once

#include <cuda_runtime.h>

namespace moetune::testing {

inline bool hopper_gpu() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return major == 9 && minor == 0;
}

}  // namespace moetune::testing
