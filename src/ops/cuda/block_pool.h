// The bookkeeping of the CUDA caching allocator (ops/cuda/caching_allocator.cpp), free of
// CUDA so that CPU tests can drive it: segments of raw memory (cudaMalloc there) cut into
// blocks in address order; best fit with splitting and coalescing, as PyTorch's allocator.
// - Sizes are rounded: 512-byte steps below 1 MiB ("small" requests), 2 MiB steps above.
// - Two pools: small requests are carved from 2 MiB segments, large ones from segments of
//   their own rounded size; a block never moves between pools.
// - A request takes the smallest free block of its pool that is large enough and splits
//   off the rest (at least one rounding step) as a free block, so buffers whose size
//   changes per call (expert rows with real routing) reuse any large enough freed block
//   instead of leaving blocks of every size behind.
// - A freed block merges with its free neighbours of the same segment.
// - Out of raw memory: every entirely free segment is returned, then the raw allocation
//   is retried once.
// - Optionally (set_growable_range; CUDA virtual memory management in the allocator) the
//   large pool is one growable segment instead of segments of their own: an address range
//   reserved once, mapped at its end in granules as needed. A request that fits no free
//   block grows the range by what the free tail block lacks, so every large block has
//   neighbours to merge with, and free space left between steps of different sizes is never
//   stranded in a segment of the wrong size (PyTorch's "expandable segments"). Releasing
//   unmaps the mapped chunks that lie wholly in the free tail; free blocks inside the range
//   stay mapped (the pool is reused in the next step's same pattern).
// Not thread-safe (the caller locks).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/error.h"

namespace moetune::cuda {

class BlockPool {
 public:
  static constexpr size_t kSmallStep = 512, kLargeStep = size_t(2) << 20;
  static constexpr size_t kSmallLimit = size_t(1) << 20;    // below: a small request
  static constexpr size_t kSmallSegment = size_t(2) << 20;  // what small blocks come from

  using RawAllocate = std::function<void*(size_t)>;  // nullptr when out of memory
  using RawFree = std::function<void(void*)>;

  // An address range reserved (nothing mapped) for the large pool, and how to map memory
  // into it: `map(at, bytes)` (false when out of memory) and `unmap(at, bytes)` of exactly a
  // range that one `map` call mapped. `granule`: the mapping unit, a multiple of kLargeStep.
  struct GrowableRange {
    char* base = nullptr;
    size_t capacity = 0;
    size_t granule = kLargeStep;
    std::function<bool(char*, size_t)> map;
    std::function<void(char*, size_t)> unmap;
  };

  struct Allocation {
    void* pointer = nullptr;  // nullptr: out of memory
    size_t size = 0;          // the block's size (the rounded request)
  };

  BlockPool(RawAllocate raw_allocate, RawFree raw_free)
      : raw_allocate_(std::move(raw_allocate)), raw_free_(std::move(raw_free)) {}
  ~BlockPool() {
    for (auto& [pointer, block] : blocks_) delete block;
  }
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // Large blocks come from `range` from now on (call before the first large allocation).
  void set_growable_range(GrowableRange range) {
    MOETUNE_CHECK(range.base && range.granule % kLargeStep == 0 && range.granule > 0,
                  "block pool: a growable range needs a base and a granule of 2 MiB steps");
    MOETUNE_CHECK(free_large_.empty() && !growable(), "block pool: large pool already in use");
    range_ = std::move(range);
  }
  bool growable() const { return range_.base != nullptr; }
  size_t mapped() const { return mapped_; }  // bytes of the growable range mapped now

  // The block size of a request (throws moetune::Error where rounding would overflow).
  static size_t round(size_t bytes) {
    if (bytes > SIZE_MAX - kLargeStep)
      fail("a device allocation of ", bytes, " bytes is beyond any device");
    const size_t step = bytes < kSmallLimit ? kSmallStep : kLargeStep;
    return std::max<size_t>(step, (bytes + step - 1) / step * step);
  }

  Allocation allocate(size_t bytes) {
    const size_t size = round(bytes);
    const bool small = size < kSmallLimit;
    FreeSet& pool = small ? free_small_ : free_large_;
    auto found = pool.lower_bound({size, nullptr});
    if (found == pool.end() && !small && growable()) {
      if (!grow_range(size)) {
        release_free_segments();
        if (!grow_range(size)) return {};
      }
      found = pool.lower_bound({size, nullptr});
    }
    if (found == pool.end()) {
      const size_t segment = small ? kSmallSegment : size;
      char* raw = static_cast<char*>(raw_allocate_(segment));
      if (raw == nullptr) {
        release_free_segments();
        raw = static_cast<char*>(raw_allocate_(segment));
        if (raw == nullptr) return {};
      }
      reserved_ += segment;
      Block* block = new Block{raw, segment, nullptr, nullptr, false, small};
      blocks_[raw] = block;
      found = pool.insert({segment, raw}).first;
    }
    Block* block = blocks_.at(found->second);
    pool.erase(found);
    if (block->size > size) {  // the rest (a multiple of the pool's step) stays free
      Block* rest =
          new Block{block->pointer + size, block->size - size, block, block->next, false, small};
      if (block->next) block->next->prev = rest;
      block->next = rest;
      block->size = size;
      if (range_tail_ == block) range_tail_ = rest;
      blocks_[rest->pointer] = rest;
      pool.insert({rest->size, rest->pointer});
    }
    block->allocated = true;
    return {block->pointer, block->size};
  }

  // Returns the freed block's size; 0 (and nothing changes) for a pointer this pool did
  // not hand out or that is already free.
  size_t free(void* pointer) {
    auto found = blocks_.find(static_cast<char*>(pointer));
    if (found == blocks_.end() || !found->second->allocated) return 0;
    Block* block = found->second;
    const size_t size = block->size;
    block->allocated = false;
    FreeSet& pool = block->small ? free_small_ : free_large_;
    if (Block* next = block->next; next && !next->allocated) absorb_next(block, pool);
    if (Block* prev = block->prev; prev && !prev->allocated) {
      pool.erase({prev->size, prev->pointer});
      absorb_next(prev, pool);
      block = prev;
    }
    pool.insert({block->size, block->pointer});
    return size;
  }

  // Returns every entirely free segment to the raw allocator, and unmaps the growable
  // range's mapped chunks that lie wholly in its free tail.
  void release_free_segments() {
    shrink_range();
    for (FreeSet* pool : {&free_small_, &free_large_}) {
      for (auto it = pool->begin(); it != pool->end();) {
        Block* block = blocks_.at(it->second);
        if (block->prev || block->next || in_range(block->pointer)) {
          ++it;
          continue;
        }
        raw_free_(block->pointer);
        reserved_ -= block->size;
        blocks_.erase(block->pointer);
        delete block;
        it = pool->erase(it);
      }
    }
  }

  size_t reserved() const { return reserved_; }  // the segments' bytes
  size_t cached() const {                        // free bytes held
    size_t bytes = 0;
    for (const FreeSet* pool : {&free_small_, &free_large_})
      for (const auto& [size, pointer] : *pool) bytes += size;
    return bytes;
  }

  // Checks the structure (tests): the blocks of each segment tile it in address order, no
  // two neighbours are both free, and the free sets hold exactly the free blocks.
  void verify() const {
    size_t free_blocks = 0, segments = 0, range_bytes = 0;
    for (const auto& [pointer, block] : blocks_) {
      MOETUNE_CHECK(block->pointer == pointer && block->size > 0, "block pool: bad block");
      if (in_range(block->pointer)) {
        range_bytes += block->size;
        MOETUNE_CHECK(!block->small && block->pointer + block->size <= range_.base + mapped_,
                      "block pool: a block of the growable range lies beyond its mapped part");
        MOETUNE_CHECK(block->prev || block->pointer == range_.base,
                      "block pool: the growable range's first block is not at its base");
      }
      if (block->next) {
        MOETUNE_CHECK(
            block->next->prev == block && block->pointer + block->size == block->next->pointer,
            "block pool: blocks of a segment do not tile it");
        MOETUNE_CHECK(block->allocated || block->next->allocated,
                      "block pool: two free neighbours");
        MOETUNE_CHECK(block->next->small == block->small, "block pool: pools mixed");
      }
      if (!block->prev) ++segments;
      if (!block->allocated) {
        ++free_blocks;
        const FreeSet& pool = block->small ? free_small_ : free_large_;
        MOETUNE_CHECK(pool.count({block->size, block->pointer}) == 1,
                      "block pool: a free block is missing from its free set");
      }
    }
    MOETUNE_CHECK(free_blocks == free_small_.size() + free_large_.size(),
                  "block pool: the free sets hold blocks that are not free");
    MOETUNE_CHECK(segments > 0 || reserved_ == 0, "block pool: reserved bytes without segments");
    MOETUNE_CHECK(range_bytes == mapped_, "block pool: the growable range's blocks do not tile it");
    size_t chunk_bytes = 0;
    for (size_t chunk : range_chunks_) chunk_bytes += chunk;
    MOETUNE_CHECK(chunk_bytes == mapped_, "block pool: mapped chunks do not add up");
  }

 private:
  struct Block {
    char* pointer;
    size_t size;
    Block* prev;  // neighbours in the same segment
    Block* next;
    bool allocated;
    bool small;  // its pool
  };
  using FreeSet = std::set<std::pair<size_t, char*>>;  // (size, address) of free blocks

  bool in_range(const char* pointer) const {
    return growable() && pointer >= range_.base && pointer < range_.base + range_.capacity;
  }

  // The growable range's last block (nullptr while nothing is mapped).
  Block* range_tail() const { return range_tail_; }

  // Maps what a `size`-byte request lacks beyond the free tail block; false when the range
  // is full or the mapping fails (out of memory).
  bool grow_range(size_t size) {
    Block* tail = range_tail();
    const size_t have = tail && !tail->allocated ? tail->size : 0;
    const size_t grow = (size - have + range_.granule - 1) / range_.granule * range_.granule;
    if (grow > range_.capacity - mapped_) return false;
    char* at = range_.base + mapped_;
    if (!range_.map(at, grow)) return false;
    range_chunks_.push_back(grow);
    mapped_ += grow;
    reserved_ += grow;
    if (have > 0) {
      free_large_.erase({tail->size, tail->pointer});
      tail->size += grow;
    } else {
      Block* block = new Block{at, grow, tail, nullptr, false, false};
      if (tail) tail->next = block;
      blocks_[at] = block;
      range_tail_ = tail = block;
    }
    free_large_.insert({tail->size, tail->pointer});
    return true;
  }

  // Unmaps the mapped chunks that lie wholly in the free tail block, last first.
  void shrink_range() {
    Block* tail = range_tail();
    if (!tail || tail->allocated) return;
    const size_t tail_offset = size_t(tail->pointer - range_.base);
    size_t released = 0;
    while (!range_chunks_.empty() && mapped_ - range_chunks_.back() >= tail_offset) {
      const size_t chunk = range_chunks_.back();
      range_chunks_.pop_back();
      mapped_ -= chunk;
      range_.unmap(range_.base + mapped_, chunk);
      released += chunk;
    }
    if (released == 0) return;
    reserved_ -= released;
    free_large_.erase({tail->size, tail->pointer});
    tail->size -= released;
    if (tail->size > 0) {
      free_large_.insert({tail->size, tail->pointer});
      return;
    }
    range_tail_ = tail->prev;
    if (range_tail_) range_tail_->next = nullptr;
    blocks_.erase(tail->pointer);
    delete tail;
  }

  // block takes its free next neighbour's bytes (next leaves its free set and the pool).
  void absorb_next(Block* block, FreeSet& pool) {
    Block* next = block->next;
    pool.erase({next->size, next->pointer});
    block->size += next->size;
    block->next = next->next;
    if (next->next) next->next->prev = block;
    if (range_tail_ == next) range_tail_ = block;
    blocks_.erase(next->pointer);
    delete next;
  }

  RawAllocate raw_allocate_;
  RawFree raw_free_;
  std::unordered_map<char*, Block*> blocks_;  // every block by address
  FreeSet free_small_, free_large_;
  size_t reserved_ = 0;
  GrowableRange range_;               // base == nullptr: large blocks get segments of their own
  size_t mapped_ = 0;                 // the range's mapped prefix
  std::vector<size_t> range_chunks_;  // sizes of its map() calls, in address order
  Block* range_tail_ = nullptr;       // its last block
};

}  // namespace moetune::cuda
