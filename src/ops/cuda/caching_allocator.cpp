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
// Large blocks come from one growable address range (BlockPool::GrowableRange) where the
// device supports CUDA virtual memory management: the device's memory size of addresses
// reserved at the first allocation, physical memory created and mapped at the range's end
// (cuMemCreate + cuMemMap) as the pool grows, unmapped from its end when released. Blocks
// of different layers and steps then merge across what would be segment boundaries (with
// real routing, buffers whose size changes per layer otherwise strand cached memory in
// segments of the wrong size). The driver functions come through
// cudaGetDriverEntryPointByVersion (no link against libcuda). MOETUNE_EXPANDABLE_SEGMENTS=0
// turns it off (segments from cudaMalloc, as before); so does a device without it.
// Side streams (Backend::SideStream::begin_ops: optimizer updates beside the backward): while
// a side stream is the allocation stream, new blocks are zero-filled on it, and a block
// freed then is not reusable at once (the side kernels may still read it when the ops'
// stream would take it): it waits in `pending_` with an event recorded on the side stream
// at the free (an event of that stream's context, cached per side stream), and goes back to the
// pool once the event has completed (polled, never waited for, at each allocation). Blocks the side
// stream takes from the pool were freed before its begin_ops() (a single host thread), and
// begin_ops() makes the side stream wait for every op enqueued so far: their last users have
// finished by then.
#include <cuda.h>  // driver types of the virtual memory functions (called through entry points)
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "ops/cuda/block_pool.h"
#include "ops/cuda/device_memory.h"
#include "ops/cuda/driver_entry_point.h"
#include "ops/cuda/sm_partition.h"

namespace moetune::cuda {

namespace {

// CUDA's virtual memory management for the growable range: an address range reserved once
// on the current device, chunks of physical memory mapped into it and unmapped again.
class VirtualMemoryRange {
 public:
  // The range for the current device, or nullptr where it is not supported (or turned off).
  static std::unique_ptr<VirtualMemoryRange> create() {
    if (const char* setting = std::getenv("MOETUNE_EXPANDABLE_SEGMENTS");
        setting && std::strcmp(setting, "0") == 0)
      return nullptr;
    auto range = std::make_unique<VirtualMemoryRange>();
    return range->init() ? std::move(range) : nullptr;
  }

  BlockPool::GrowableRange growable_range() {
    BlockPool::GrowableRange range;
    range.base = reinterpret_cast<char*>(base_);
    range.capacity = capacity_;
    range.granule = granule_;
    range.map = [this](char* at, size_t bytes) { return map(at, bytes); };
    range.unmap = [this](char* at, size_t bytes) { unmap(at, bytes); };
    return range;
  }

 private:
  template <class Function>
  static bool entry_point(const char* name, Function& function) {
    return driver_entry_point(name, 12000, function);
  }

  bool init() {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || cudaFree(nullptr) != cudaSuccess) {
      (void)cudaGetLastError();  // no device: the caller falls back to cudaMalloc
      return false;
    }
    decltype(&cuDeviceGetAttribute) get_attribute = nullptr;
    decltype(&cuMemGetAllocationGranularity) get_granularity = nullptr;
    decltype(&cuMemAddressReserve) address_reserve = nullptr;
    if (!entry_point("cuDeviceGetAttribute", get_attribute) ||
        !entry_point("cuMemGetAllocationGranularity", get_granularity) ||
        !entry_point("cuMemAddressReserve", address_reserve) ||
        !entry_point("cuMemCreate", create_) || !entry_point("cuMemRelease", release_) ||
        !entry_point("cuMemMap", map_) || !entry_point("cuMemUnmap", unmap_) ||
        !entry_point("cuMemSetAccess", set_access_))
      return false;
    int supported = 0;
    if (get_attribute(&supported, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
                      device) != CUDA_SUCCESS ||
        !supported)
      return false;
    std::memset(&properties_, 0, sizeof(properties_));
    properties_.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    properties_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    properties_.location.id = device;
    std::memset(&access_, 0, sizeof(access_));
    access_.location = properties_.location;
    access_.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    size_t granule = 0;
    if (get_granularity(&granule, &properties_, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED) !=
            CUDA_SUCCESS ||
        granule == 0)
      return false;
    // the pool's sizes are 2 MiB steps: map in a common multiple of both
    granule_ = BlockPool::kLargeStep;
    while (granule_ % granule != 0) granule_ += BlockPool::kLargeStep;
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    capacity_ = (total_bytes + granule_ - 1) / granule_ * granule_;
    if (address_reserve(&base_, capacity_, granule_, 0, 0) != CUDA_SUCCESS) return false;
    return true;
  }

  bool map(char* at, size_t bytes) {
    CUmemGenericAllocationHandle handle = 0;
    if (create_(&handle, bytes, &properties_, 0) != CUDA_SUCCESS) return false;  // out of memory
    const CUdeviceptr address = reinterpret_cast<CUdeviceptr>(at);
    if (map_(address, bytes, 0, handle, 0) != CUDA_SUCCESS) {
      release_(handle);
      return false;
    }
    if (set_access_(address, bytes, &access_, 1) != CUDA_SUCCESS) {
      unmap_(address, bytes);
      release_(handle);
      return false;
    }
    handles_[at] = handle;
    return true;
  }

  void unmap(char* at, size_t bytes) {
    cudaDeviceSynchronize();  // queued kernels may still use the freed tail
    auto found = handles_.find(at);
    MOETUNE_CHECK(found != handles_.end(), "unmapping device memory that was not mapped");
    if (unmap_(reinterpret_cast<CUdeviceptr>(at), bytes) != CUDA_SUCCESS ||
        release_(found->second) != CUDA_SUCCESS)
      fail("unmapping ", bytes, " bytes of device memory failed");
    handles_.erase(found);
  }

  decltype(&cuMemCreate) create_ = nullptr;
  decltype(&cuMemRelease) release_ = nullptr;
  decltype(&cuMemMap) map_ = nullptr;
  decltype(&cuMemUnmap) unmap_ = nullptr;
  decltype(&cuMemSetAccess) set_access_ = nullptr;
  CUmemAllocationProp properties_{};
  CUmemAccessDesc access_{};
  CUdeviceptr base_ = 0;
  size_t capacity_ = 0, granule_ = 0;
  std::unordered_map<char*, CUmemGenericAllocationHandle> handles_;  // by mapped address
};

class CachingAllocator {
 public:
  void* allocate(size_t bytes, bool zero_fill) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!range_checked_) {  // at the first allocation: the device is chosen by then
      range_checked_ = true;
      range_ = VirtualMemoryRange::create();
      if (range_) pool_.set_growable_range(range_->growable_range());
      stats_.growable_range = range_ != nullptr;
    }
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
      std::vector<cudaEvent_t>& spare = spare_events_[side_stream_];
      if (!spare.empty()) {
        event = spare.back();
        spare.pop_back();
      } else {
        event = create_event_for(side_stream_, cudaEventDisableTiming);  // its context's
      }
      if (cudaEventRecord(event, side_stream_) != cudaSuccess)
        fail("recording a CUDA event for a side-stream free");
      pending_.push_back({pointer, event, side_stream_});
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
  // `stream` has finished all its work and goes away: its frees are complete and its events
  // are destroyed (a later stream may get the same handle in another context).
  void forget_side_stream(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t kept = 0;
    for (Pending& block : pending_) {
      if (block.stream == stream) {
        pool_.free(block.pointer);
        cudaEventDestroy(block.event);
      } else {
        pending_[kept++] = block;
      }
    }
    pending_.resize(kept);
    if (auto it = spare_events_.find(stream); it != spare_events_.end()) {
      for (cudaEvent_t event : it->second) cudaEventDestroy(event);
      spare_events_.erase(it);
    }
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
        spare_events_[block.stream].push_back(block.event);
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
  bool range_checked_ = false;
  std::unique_ptr<VirtualMemoryRange> range_;  // the large pool's range, where supported
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
    cudaEvent_t event;    // recorded on the side stream at the free
    cudaStream_t stream;  // that side stream
  };
  std::vector<Pending> pending_;
  // Per side stream: an event records only on streams of its own context (sm_partition.h).
  std::unordered_map<cudaStream_t, std::vector<cudaEvent_t>> spare_events_;
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
void forget_side_allocation_stream(void* cuda_stream) {
  allocator().forget_side_stream(static_cast<cudaStream_t>(cuda_stream));
}

}  // namespace moetune::cuda
