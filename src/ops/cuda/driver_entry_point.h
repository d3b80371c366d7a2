// A CUDA driver function reached through cudaGetDriverEntryPointByVersion, so that nothing
// links libcuda: the caching allocator's virtual memory functions and the SM partitions'
// green-context functions come this way.
#pragma once

#include <cuda_runtime.h>

namespace moetune::cuda {

// Sets `function` to the driver's `symbol` as of CUDA `version` (1000 * major + 10 * minor:
// the ABI the caller's prototypes and structs were compiled against). False, with `function`
// untouched and the runtime's error cleared, where the driver lacks it; *status (optional)
// says why (found, not found, or the driver older than `version`).
template <class Function>
bool driver_entry_point(const char* symbol, unsigned version, Function& function,
                        cudaDriverEntryPointQueryResult* status = nullptr) {
  void* pointer = nullptr;
  cudaDriverEntryPointQueryResult found{};
  const cudaError_t error =
      cudaGetDriverEntryPointByVersion(symbol, &pointer, version, cudaEnableDefault, &found);
  if (status) *status = found;
  if (error != cudaSuccess || found != cudaDriverEntryPointSuccess || pointer == nullptr) {
    (void)cudaGetLastError();
    return false;
  }
  function = reinterpret_cast<Function>(pointer);
  return true;
}

}  // namespace moetune::cuda
