// The caching device allocator: cudaMalloc is slow and synchronises, so freed blocks are
// kept in per-size free lists (sizes rounded up: 512 B steps below 1 MiB, 2 MiB steps
// above) and handed out again. The ops run on the backend's one stream, so a block freed
// by the host can be reused by any later launch on it without waiting. Best fit with slack:
// a request with no cached block of its exact size takes the smallest cached block up to a
// quarter larger. Buffers whose size changes from layer to layer and step to step (the
// expert rows a rank receives with real routing, sized per call, and their index plans)
// otherwise each leave a block of their own size behind, which no other size reuses: the
// cache then grows until out-of-memory (measured: 46 GiB more reserved than with balanced
// routing on 48 layers), and every new size costs a cudaMalloc, which synchronises. On
// out-of-memory the cache is returned to the driver and the allocation retried once. Statistics (in
// use, reserved, peaks) give `moetune bench` its peak memory; a block counts with its whole size.
// Side streams (Backend::SideStream::begin_ops: optimizer updates beside the backward): while
// a side stream is the allocation stream, new blocks are zero-filled on it, and a block
// freed then is not reusable at once (the side kernels may still read it when the ops'
// stream would take it): it waits in `pending_` with an event recorded on the side stream
// at the free, and joins the free lists once the event has completed (polled, never
// waited for, at each allocation). Blocks the side stream takes from the free lists were
// freed before its begin_ops() (a single host thread), and begin_ops() makes the side
// stream wait for every op enqueued so far: their last users have finished by then.
#include <cuda_runtime.h>

#include <map>
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
    recycle_pending_locked(false);
    void* pointer = nullptr;
    size_t block = size;
    // The smallest cached block of at least `size` bytes (lists are never left empty).
    if (auto cached = free_.lower_bound(size);
        cached != free_.end() && cached->first <= size + size / 4) {
      block = cached->first;
      pointer = cached->second.back();
      cached->second.pop_back();
      if (cached->second.empty()) free_.erase(cached);
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
    cudaStream_t fill_stream = side_stream_ ? side_stream_ : stream_;
    if (fill_stream && zero_fill) {
      const cudaError_t status = cudaMemsetAsync(pointer, 0, size, fill_stream);
      if (status != cudaSuccess)
        fail("zero-filling a device allocation: ", cudaGetErrorString(status));
    }
    sizes_[pointer] = block;
    stats_.in_use += block;
    stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.in_use);
    return pointer;
  }

  void deallocate(void* pointer) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = sizes_.find(pointer);
    if (found == sizes_.end()) return;  // not ours: ignore rather than corrupt the cache
    stats_.in_use -= found->second;
    if (side_stream_) {
      cudaEvent_t event = nullptr;
      if (!spare_events_.empty()) {
        event = spare_events_.back();
        spare_events_.pop_back();
      } else if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming) != cudaSuccess) {
        fail("creating a CUDA event for a side-stream free");
      }
      if (cudaEventRecord(event, side_stream_) != cudaSuccess)
        fail("recording a CUDA event for a side-stream free");
      pending_.push_back({pointer, found->second, event});
    } else {
      free_[found->second].push_back(pointer);
    }
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
  void set_side_stream(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    side_stream_ = stream;
  }
  void release() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_locked();
  }

 private:
  // Pending side-stream frees whose event has completed (all of them after a device
  // synchronisation: `all`) go back to the free lists.
  void recycle_pending_locked(bool all) {
    size_t kept = 0;
    for (Pending& block : pending_) {
      const cudaError_t status = all ? cudaSuccess : cudaEventQuery(block.event);
      if (status == cudaSuccess) {
        free_[block.size].push_back(block.pointer);
        spare_events_.push_back(block.event);
      } else {
        if (status == cudaErrorNotReady) (void)cudaGetLastError();  // not an error: clear it
        pending_[kept++] = block;
      }
    }
    pending_.resize(kept);
  }

  void release_locked() {
    cudaDeviceSynchronize();
    recycle_pending_locked(true);
    for (auto& [size, list] : free_) {
      for (void* pointer : list) {
        cudaFree(pointer);
        stats_.reserved -= size;
      }
    }
    free_.clear();
  }

  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;  // block size -> cached blocks (never empty)
  std::unordered_map<void*, size_t> sizes_;
  struct Pending {
    void* pointer;
    size_t size;
    cudaEvent_t event;  // recorded on the side stream at the free
  };
  std::vector<Pending> pending_;
  std::vector<cudaEvent_t> spare_events_;
  DeviceMemoryStats stats_;
  cudaStream_t stream_ = nullptr;       // the ops' stream
  cudaStream_t side_stream_ = nullptr;  // set while backend ops run on a side stream
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
void set_side_allocation_stream(void* cuda_stream) {
  allocator().set_side_stream(static_cast<cudaStream_t>(cuda_stream));
}

}  // namespace moetune::cuda
