// Statistics of the CUDA caching allocator (the allocator every device Buffer goes through
// once the CUDA backend exists). `peak_reserved` is the most device memory the process held
// through it: what `moetune bench` reports as peak_gib.
#pragma once

#include <cstddef>

namespace moetune::cuda {

struct DeviceMemoryStats {
  size_t in_use = 0;         // bytes handed out and not yet freed
  size_t peak_in_use = 0;
  size_t reserved = 0;       // bytes obtained from cudaMalloc (in use + cached)
  size_t peak_reserved = 0;
};

DeviceMemoryStats device_memory_stats();
void reset_device_memory_peak();
// Returns cached blocks to the driver (synchronises the device).
void release_cached_device_memory();

}  // namespace moetune::cuda
