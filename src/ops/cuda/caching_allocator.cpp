// The caching device allocator: cudaMalloc is slow and synchronises, so freed blocks are
// kept and handed out again. The bookkeeping is BlockPool (ops/cuda/block_pool.h): segments
// from cudaMalloc cut into blocks, best fit with splitting and coalescing, small requests
// (< 1 MiB) from 2 MiB segments of their own. Buffers whose size changes from layer to layer
// and step to step (the expert rows a rank receives with real routing) then reuse any freed
// block large enough, and its rest serves other requests, instead of each size leaving a block
// of its own behind (measured before: 6-7 GiB cached and unusable on 48 layers with real
// routing; earlier still, with exact sizes only, 46 GiB). The ops run on the backend's one
// stream, so a block freed by the host can be reused by any later launch on it without
// waiting. On out-of-memory the entirely free segments are returned to the driver and the
// allocation retried once. Statistics (in use, reserved, peaks) give `moetune bench` its peak
// memory; a block counts with its rounded size.
// Side streams (Backend::SideStream::begin_ops: optimizer updates beside the backward): while
// a side stream is the allocation stream, new blocks are zero-filled on it, and a block
// freed then is not reusable at once (the side kernels may still read it when the ops'
// stream would take it): it waits in `pending_` with an event recorded on the side stream
// at the free, and goes back to the pool once the event has completed (polled, never
// waited for, at each allocation). Blocks the side stream takes from the pool were
// freed before its begin_ops() (a single host thread), and begin_ops() makes the side
// stream wait for every op enqueued so far: their last users have finished by then.
#include <cuda_runtime.h>

#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "ops/cuda/block_pool.h"
#include "ops/cuda/device_memory.h"

namespace moetune::cuda {

namespace {

class CachingAllocator {
 public:
  void* allocate(size_t bytes, bool zero_fill) {
    std::lock_guard<std::mutex> lock(mutex_);
    recycle_pending_locked(false);
    BlockPool::Allocation block = pool_.allocate(bytes);
    if (block.pointer == nullptr) {  // the pool gave its free segments back and retried
      cudaDeviceSynchronize();       // then pending side-stream frees may join too
      recycle_pending_locked(true);
      pool_.release_free_segments();
      block = pool_.allocate(bytes);
    }
    if (block.pointer == nullptr)  // (the pool's cudaMalloc cleared its error already)
      fail("out of GPU memory allocating ", bytes, " bytes (", stats_.in_use >> 20, " MiB in use, ",
           pool_.reserved() >> 20,
           " MiB reserved): cudaMalloc failed after the cache was released");
    stats_.reserved = pool_.reserved();
    stats_.peak_reserved = std::max(stats_.peak_reserved, stats_.reserved);
    cudaStream_t fill_stream = side_stream_ ? side_stream_ : stream_;
    if (fill_stream && zero_fill) {
      const cudaError_t status = cudaMemsetAsync(block.pointer, 0, block.size, fill_stream);
      if (status != cudaSuccess)
        fail("zero-filling a device allocation: ", cudaGetErrorString(status));
    }
    sizes_[block.pointer] = block.size;
    stats_.in_use += block.size;
    stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.in_use);
    return block.pointer;
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
      pending_.push_back({pointer, event});
    } else {
      pool_.free(pointer);
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
  // synchronisation: `all`) go back to the pool.
  void recycle_pending_locked(bool all) {
    size_t kept = 0;
    for (Pending& block : pending_) {
      const cudaError_t status = all ? cudaSuccess : cudaEventQuery(block.event);
      if (status == cudaSuccess) {
        pool_.free(block.pointer);
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
    pool_.release_free_segments();
    stats_.reserved = pool_.reserved();
  }

  std::mutex mutex_;
  // Segments from cudaMalloc (nullptr when it fails: out of memory), back by cudaFree.
  BlockPool pool_{[](size_t bytes) -> void* {
                    void* pointer = nullptr;
                    if (cudaMalloc(&pointer, bytes) == cudaSuccess) return pointer;
                    (void)cudaGetLastError();  // clear the out-of-memory error
                    return nullptr;
                  },
                  [](void* pointer) { cudaFree(pointer); }};
  std::unordered_map<void*, size_t> sizes_;  // handed-out blocks (not pending ones)
  struct Pending {
    void* pointer;
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
