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
// Not thread-safe (the caller locks).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <set>
#include <unordered_map>
#include <utility>

#include "core/error.h"

namespace moetune::cuda {

class BlockPool {
 public:
  static constexpr size_t kSmallStep = 512, kLargeStep = size_t(2) << 20;
  static constexpr size_t kSmallLimit = size_t(1) << 20;    // below: a small request
  static constexpr size_t kSmallSegment = size_t(2) << 20;  // what small blocks come from

  using RawAllocate = std::function<void*(size_t)>;  // nullptr when out of memory
  using RawFree = std::function<void(void*)>;

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

  static size_t round(size_t bytes) {
    const size_t step = bytes < kSmallLimit ? kSmallStep : kLargeStep;
    return std::max<size_t>(step, (bytes + step - 1) / step * step);
  }

  Allocation allocate(size_t bytes) {
    const size_t size = round(bytes);
    const bool small = size < kSmallLimit;
    FreeSet& pool = small ? free_small_ : free_large_;
    auto found = pool.lower_bound({size, nullptr});
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

  // Returns every entirely free segment to the raw allocator.
  void release_free_segments() {
    for (FreeSet* pool : {&free_small_, &free_large_}) {
      for (auto it = pool->begin(); it != pool->end();) {
        Block* block = blocks_.at(it->second);
        if (block->prev || block->next) {
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
    size_t free_blocks = 0, segments = 0;
    for (const auto& [pointer, block] : blocks_) {
      MOETUNE_CHECK(block->pointer == pointer && block->size > 0, "block pool: bad block");
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

  // block takes its free next neighbour's bytes (next leaves its free set and the pool).
  void absorb_next(Block* block, FreeSet& pool) {
    Block* next = block->next;
    pool.erase({next->size, next->pointer});
    block->size += next->size;
    block->next = next->next;
    if (next->next) next->next->prev = block;
    blocks_.erase(next->pointer);
    delete next;
  }

  RawAllocate raw_allocate_;
  RawFree raw_free_;
  std::unordered_map<char*, Block*> blocks_;  // every block by address
  FreeSet free_small_, free_large_;
  size_t reserved_ = 0;
};

}  // namespace moetune::cuda
