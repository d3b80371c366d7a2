// The caching device allocator: cudaMalloc is slow and synchronises, so freed blocks are
// kept in per-size free lists (sizes rounded up: 512 B steps below 1 MiB, 2 MiB steps
// above) and handed out again. All work runs on the backend's one stream, so a block freed
// by the host can be reused by any later launch without waiting. On out-of-memory the cache
// is returned to the driver and the allocation retried once. Statistics (in use, reserved,
// peaks) give `moetune bench` its peak memory.
#include <cuda_runtime.h>

#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "ops/cuda/device_memory.h"

namespace moetune::cuda {

namespace {

size_t round_size(size_t bytes) {
  constexpr size_t kSmall = 512, kLarge = 2u << 20;
  if (bytes < (1u << 20)) return (bytes + kSmall - 1) / kSmall * kSmall;
  return (bytes + kLarge - 1) / kLarge * kLarge;
}

class CachingAllocator {
 public:
  void* allocate(size_t bytes, bool zero_fill) {
    const size_t size = round_size(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    auto& list = free_[size];
    void* pointer = nullptr;
    if (!list.empty()) {
      pointer = list.back();
      list.pop_back();
    } else {
      cudaError_t status = cudaMalloc(&pointer, size);
      if (status == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        release_locked();
        status = cudaMalloc(&pointer, size);
      }
      if (status != cudaSuccess) {
        (void)cudaGetLastError();
        fail("out of GPU memory allocating ", bytes, " bytes (", stats_.in_use >> 20,
             " MiB in use, ", stats_.reserved >> 20,
             " MiB reserved): ", cudaGetErrorString(status));
      }
      stats_.reserved += size;
      stats_.peak_reserved = std::max(stats_.peak_reserved, stats_.reserved);
    }
    if (stream_ && zero_fill) {
      const cudaError_t status = cudaMemsetAsync(pointer, 0, size, stream_);
      if (status != cudaSuccess)
        fail("zero-filling a device allocation: ", cudaGetErrorString(status));
    }
    sizes_[pointer] = size;
    stats_.in_use += size;
    stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.in_use);
    return pointer;
  }

  void deallocate(void* pointer) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = sizes_.find(pointer);
    if (found == sizes_.end()) return;  // not ours: ignore rather than corrupt the cache
    stats_.in_use -= found->second;
    free_[found->second].push_back(pointer);
    sizes_.erase(found);
  }

  DeviceMemoryStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return stats_;
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.peak_in_use = stats_.in_use;
    stats_.peak_reserved = stats_.reserved;
  }
  void set_stream(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    stream_ = stream;
  }
  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_locked();
  }

 private:
  void release_locked() {
    cudaDeviceSynchronize();
    for (auto& [size, list] : free_) {
      for (void* pointer : list) {
        cudaFree(pointer);
        stats_.reserved -= size;
      }
      list.clear();
    }
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, size_t> sizes_;
  DeviceMemoryStats stats_;
  cudaStream_t stream_ = nullptr;
};

CachingAllocator& allocator() {
  static CachingAllocator* instance =
      new CachingAllocator();  // never destroyed: frees may come at exit
  return *instance;
}

}  // namespace

void* device_allocate(size_t bytes, bool zero_fill) {
  return allocator().allocate(bytes, zero_fill);
}
void device_free(void* pointer) { allocator().deallocate(pointer); }
DeviceMemoryStats device_memory_stats() { return allocator().stats(); }
void reset_device_memory_peak() { allocator().reset_peak(); }
void release_cached_device_memory() { allocator().release(); }
void set_allocation_stream(void* cuda_stream) {
  allocator().set_stream(static_cast<cudaStream_t>(cuda_stream));
}

}  // namespace moetune::cuda
