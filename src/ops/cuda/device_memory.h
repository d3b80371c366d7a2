// Statistics of the CUDA caching allocator (the allocator every device Buffer goes through
// once the CUDA backend exists). `peak_reserved` is the most device memory the process held
// through it: what `moetune bench` reports as peak_gib.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/tensor.h"

namespace moetune::cuda {

struct DeviceMemoryStats {
  size_t in_use = 0;  // bytes handed out and not yet freed
  size_t peak_in_use = 0;
  size_t reserved = 0;  // bytes obtained from the driver (in use + cached)
  size_t peak_reserved = 0;
  bool growable_range = false;  // large blocks from one growable mapped range (the default
                                // where the device supports virtual memory management)
};

DeviceMemoryStats device_memory_stats();
void reset_device_memory_peak();
// Device allocations are zero-filled (as host ones are) by a memset on this stream, the
// backend's one stream, so the fill is ordered after earlier work that used a reused block.
void set_allocation_stream(void* cuda_stream);
// While backend ops run on a side stream (nullptr: back to the ops' stream): allocations
// are zero-filled on it, and blocks freed then are reused only once it has passed the free.
void set_side_allocation_stream(void* cuda_stream);
// A side stream that has finished its work is going away: its pending frees complete, its
// cached events are destroyed.
void forget_side_allocation_stream(void* cuda_stream);
// Name of the current GPU ("NVIDIA H100 80GB HBM3").
const char* device_name();
// Fills a BF16/F32 device tensor with normal(0, std) values (hash of seed and index):
// fast random weights for benchmarks.
void fill_normal(const Tensor& tensor, float std, uint64_t seed);
// Returns cached blocks to the driver (synchronises the device).
void release_cached_device_memory();

}  // namespace moetune::cuda
