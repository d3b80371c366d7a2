// The caching allocator's bookkeeping (ops/cuda/block_pool.h) on fake addresses: reuse,
// splitting, coalescing, the two pools, out-of-memory release, the growable range of the
// large pool (mapping what the free tail lacks, unmapping whole chunks of a free tail) and
// random sequences in both modes checked against the structural invariants and against
// overlap of the handed-out ranges.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <vector>

#include "ops/cuda/block_pool.h"

namespace moetune::cuda {
namespace {

constexpr size_t kMiB = size_t(1) << 20;

// Raw memory: fake, spaced addresses (never dereferenced), with an optional capacity.
struct FakeDevice {
  uintptr_t next = uintptr_t(1) << 40;
  size_t capacity = SIZE_MAX, used = 0;
  std::map<void*, size_t> segments;
  int allocations = 0;

  BlockPool pool() {
    return BlockPool(
        [this](size_t bytes) -> void* {
          if (used + bytes > capacity) return nullptr;
          void* p = reinterpret_cast<void*>(next);
          next += bytes + (size_t(1) << 30);  // a gap: segments are never contiguous
          segments[p] = bytes;
          used += bytes;
          ++allocations;
          return p;
        },
        [this](void* p) {
          used -= segments.at(p);
          segments.erase(p);
        });
  }

  // Gives `pool` a growable range for its large blocks at kRangeBase (mapped memory counts
  // against the same capacity).
  static constexpr uintptr_t kRangeBase = uintptr_t(1) << 50;
  std::map<char*, size_t> mapped;  // chunk start -> bytes, as map() received them
  int maps = 0, unmaps = 0;

  void make_growable(BlockPool& pool, size_t range_capacity = size_t(1) << 40) {
    BlockPool::GrowableRange range;
    range.base = reinterpret_cast<char*>(kRangeBase);
    range.capacity = range_capacity;
    range.map = [this](char* p, size_t bytes) {
      if (used + bytes > capacity) return false;
      EXPECT_EQ(mapped.count(p), 0u);
      if (!mapped.empty()) {  // always right after the mapped prefix
        EXPECT_EQ(std::prev(mapped.end())->first + std::prev(mapped.end())->second, p);
      }
      mapped[p] = bytes;
      used += bytes;
      ++maps;
      return true;
    };
    range.unmap = [this](char* p, size_t bytes) {
      ASSERT_EQ(mapped.count(p), 1u) << "unmap of a range no map() call mapped";
      ASSERT_EQ(mapped.at(p), bytes);
      ASSERT_EQ(std::prev(mapped.end())->first, p) << "unmapped other than from the end";
      mapped.erase(p);
      used -= bytes;
      ++unmaps;
    };
    pool.set_growable_range(std::move(range));
  }
};

char* at(void* p) { return static_cast<char*>(p); }

TEST(BlockPool, RoundsSmallAndLargeRequests) {
  EXPECT_EQ(BlockPool::round(0), 512u);
  EXPECT_EQ(BlockPool::round(1), 512u);
  EXPECT_EQ(BlockPool::round(513), 1024u);
  EXPECT_EQ(BlockPool::round(kMiB - 1), kMiB);
  EXPECT_EQ(BlockPool::round(kMiB), 2 * kMiB);
  EXPECT_EQ(BlockPool::round(5 * kMiB + 1), 6 * kMiB);
  EXPECT_THROW(BlockPool::round(SIZE_MAX), Error);
  FakeDevice device;
  BlockPool pool = device.pool();
  EXPECT_THROW(pool.allocate(SIZE_MAX - 100), Error);
  device.make_growable(pool);
  EXPECT_THROW(pool.allocate(SIZE_MAX - kMiB), Error);
  pool.verify();
}

TEST(BlockPool, SplitsAFreedBlockAndReusesTheRest) {
  FakeDevice device;
  BlockPool pool = device.pool();
  const auto big = pool.allocate(100 * kMiB);
  ASSERT_NE(big.pointer, nullptr);
  EXPECT_EQ(pool.free(big.pointer), 100 * kMiB);
  const auto a = pool.allocate(30 * kMiB);  // from the freed block: no new segment
  const auto b = pool.allocate(50 * kMiB);
  EXPECT_EQ(device.allocations, 1);
  EXPECT_EQ(a.pointer, big.pointer);
  EXPECT_EQ(at(b.pointer), at(a.pointer) + 30 * kMiB);
  EXPECT_EQ(pool.cached(), 20 * kMiB);
  EXPECT_EQ(pool.reserved(), 100 * kMiB);
  pool.verify();
  const auto c = pool.allocate(30 * kMiB);  // 20 MiB left: a new segment
  EXPECT_EQ(device.allocations, 2);
  EXPECT_EQ(c.size, 30 * kMiB);
  pool.verify();
}

TEST(BlockPool, CoalescesWithBothNeighbours) {
  FakeDevice device;
  BlockPool pool = device.pool();
  const auto whole = pool.allocate(60 * kMiB);
  pool.free(whole.pointer);
  const auto a = pool.allocate(20 * kMiB), b = pool.allocate(20 * kMiB),
             c = pool.allocate(20 * kMiB);
  ASSERT_EQ(device.allocations, 1);
  pool.free(a.pointer);
  pool.free(c.pointer);
  pool.verify();
  // 40 MiB are free but in two pieces: a 40 MiB request needs a new segment
  const auto d = pool.allocate(40 * kMiB);
  EXPECT_EQ(device.allocations, 2);
  pool.free(d.pointer);
  pool.free(b.pointer);  // merges with both neighbours: the first segment is whole again
  pool.verify();
  const auto e = pool.allocate(60 * kMiB);
  EXPECT_EQ(e.pointer, whole.pointer);
  EXPECT_EQ(device.allocations, 2);
  EXPECT_EQ(pool.free(e.pointer), 60 * kMiB);
  EXPECT_EQ(pool.free(e.pointer), 0u) << "a double free must be ignored";
  EXPECT_EQ(pool.free(reinterpret_cast<void*>(0x1234)), 0u);
}

TEST(BlockPool, NeverMergesAcrossSegmentsOrPools) {
  FakeDevice device;
  BlockPool pool = device.pool();
  const auto a = pool.allocate(4 * kMiB), b = pool.allocate(4 * kMiB);
  pool.free(a.pointer);
  pool.free(b.pointer);
  pool.verify();
  pool.allocate(8 * kMiB);  // two 4 MiB segments do not make an 8 MiB block
  EXPECT_EQ(device.allocations, 3);
  // small requests come from 2 MiB segments of their own, never from a large block
  const auto s = pool.allocate(1000);
  EXPECT_EQ(device.allocations, 4);
  EXPECT_EQ(s.size, 1024u);
  const auto t = pool.allocate(100 * 1024);
  EXPECT_EQ(device.allocations, 4);
  EXPECT_EQ(at(t.pointer), at(s.pointer) + 1024);
  pool.verify();
}

TEST(BlockPool, OutOfMemoryReleasesWholeFreeSegmentsAndRetries) {
  FakeDevice device;
  device.capacity = 100 * kMiB;
  BlockPool pool = device.pool();
  const auto a = pool.allocate(40 * kMiB), b = pool.allocate(40 * kMiB);
  pool.free(b.pointer);
  const auto c = pool.allocate(50 * kMiB);  // 40 cached + 40 in use: only with b's release
  ASSERT_NE(c.pointer, nullptr);
  EXPECT_EQ(pool.reserved(), 90 * kMiB);
  EXPECT_EQ(device.used, 90 * kMiB);
  EXPECT_EQ(pool.allocate(40 * kMiB).pointer, nullptr);  // truly out of memory
  pool.free(a.pointer);
  pool.free(c.pointer);
  pool.release_free_segments();
  EXPECT_EQ(pool.reserved(), 0u);
  EXPECT_EQ(device.used, 0u);
  pool.verify();
}

TEST(BlockPool, GrowableRangeMapsOnlyWhatTheFreeTailLacks) {
  FakeDevice device;
  BlockPool pool = device.pool();
  device.make_growable(pool);
  const auto a = pool.allocate(100 * kMiB), b = pool.allocate(20 * kMiB);
  EXPECT_EQ(at(a.pointer), reinterpret_cast<char*>(FakeDevice::kRangeBase));
  EXPECT_EQ(at(b.pointer), at(a.pointer) + 100 * kMiB);
  EXPECT_EQ(device.maps, 2);
  EXPECT_EQ(device.allocations, 0) << "large blocks must not take segments of their own";
  pool.free(b.pointer);
  const auto c = pool.allocate(50 * kMiB);  // the free 20 MiB tail grows by 30
  EXPECT_EQ(c.pointer, b.pointer);
  EXPECT_EQ(device.maps, 3);
  EXPECT_EQ(device.mapped.rbegin()->second, 30 * kMiB);
  EXPECT_EQ(pool.reserved(), 150 * kMiB);
  EXPECT_EQ(pool.mapped(), 150 * kMiB);
  pool.verify();
  // a and c free: one 150 MiB block, where separate segments would have needed a third
  pool.free(a.pointer);
  pool.free(c.pointer);
  pool.verify();
  const auto d = pool.allocate(150 * kMiB);
  EXPECT_EQ(d.pointer, a.pointer);
  EXPECT_EQ(device.maps, 3);
  // small requests still come from segments of their own
  const auto s = pool.allocate(4096);
  EXPECT_EQ(device.allocations, 1);
  EXPECT_EQ(pool.reserved(), 152 * kMiB);
  pool.free(s.pointer);
  pool.free(d.pointer);
  pool.verify();
}

TEST(BlockPool, GrowableRangeUnmapsWholeChunksOfTheFreeTail) {
  FakeDevice device;
  BlockPool pool = device.pool();
  device.make_growable(pool);
  const auto a = pool.allocate(100 * kMiB), b = pool.allocate(20 * kMiB);
  pool.free(b.pointer);
  const auto c = pool.allocate(10 * kMiB);  // at b's start: the tail is free from 110 MiB
  const auto d = pool.allocate(40 * kMiB);  // 10 left in b's chunk, 30 more mapped
  ASSERT_EQ(device.maps, 3);
  pool.free(d.pointer);
  pool.release_free_segments();  // the 30 MiB chunk is wholly free, the 20 MiB one is not
  EXPECT_EQ(device.unmaps, 1);
  EXPECT_EQ(pool.mapped(), 120 * kMiB);
  EXPECT_EQ(pool.cached(), 10 * kMiB);
  pool.verify();
  pool.free(c.pointer);
  pool.release_free_segments();
  EXPECT_EQ(pool.mapped(), 100 * kMiB);
  pool.verify();
  pool.free(a.pointer);
  pool.release_free_segments();
  EXPECT_EQ(pool.mapped(), 0u);
  EXPECT_EQ(pool.reserved(), 0u);
  EXPECT_TRUE(device.mapped.empty());
  pool.verify();
  const auto e = pool.allocate(8 * kMiB);  // and it grows again from the base
  EXPECT_EQ(at(e.pointer), reinterpret_cast<char*>(FakeDevice::kRangeBase));
  pool.verify();
}

TEST(BlockPool, GrowableRangeOutOfMemoryReleasesAndRetriesThenFails) {
  FakeDevice device;
  device.capacity = 100 * kMiB;
  BlockPool pool = device.pool();
  device.make_growable(pool);
  const auto s = pool.allocate(1000);  // a 2 MiB small segment
  pool.free(s.pointer);
  const auto a = pool.allocate(60 * kMiB), b = pool.allocate(30 * kMiB);
  pool.free(b.pointer);
  // growing b's free 30 MiB tail to 40 would need 102 MiB: the release unmaps b's chunk
  // and returns the free small segment, and the retry maps 40 MiB after a
  const auto c = pool.allocate(40 * kMiB);
  ASSERT_NE(c.pointer, nullptr);
  EXPECT_EQ(c.pointer, b.pointer);
  EXPECT_TRUE(device.segments.empty());
  EXPECT_EQ(pool.reserved(), 100 * kMiB);
  EXPECT_EQ(device.unmaps, 1);
  EXPECT_EQ(pool.allocate(4 * kMiB).pointer, nullptr);  // truly out of memory
  pool.verify();
  FakeDevice other;
  BlockPool small_range = other.pool();
  other.make_growable(small_range, 64 * kMiB);  // the range's own limit
  EXPECT_NE(small_range.allocate(64 * kMiB).pointer, nullptr);
  EXPECT_EQ(small_range.allocate(2 * kMiB).pointer, nullptr);
  small_range.verify();
  pool.free(a.pointer);
  pool.free(c.pointer);
}

// Many allocations of varying sizes, freed in random order: the structure stays valid,
// handed-out ranges never overlap, and the cache serves the steady state without new
// segments once it holds the largest working set. Both modes of the large pool.
class BlockPoolRandom : public ::testing::TestWithParam<bool> {};

TEST_P(BlockPoolRandom, SequencesKeepTheInvariants) {
  const bool growable = GetParam();
  FakeDevice device;
  BlockPool pool = device.pool();
  if (growable) device.make_growable(pool);
  std::mt19937 rng(7);
  std::map<char*, size_t> live;  // start -> size
  auto overlaps = [&](char* p, size_t size) {
    auto next = live.lower_bound(p);
    if (next != live.end() && next->first < p + size) return true;
    if (next != live.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second > p) return true;
    }
    return false;
  };
  std::uniform_int_distribution<int> kind(0, 9);
  std::uniform_int_distribution<size_t> small(1, 900 * 1024), large(kMiB, 300 * kMiB);
  int allocations_after_warmup = 0;
  for (int i = 0; i < 4000; ++i) {
    if (i == 3000) allocations_after_warmup = device.allocations + device.maps;
    if (live.size() > 40 || (kind(rng) < 4 && !live.empty())) {
      auto victim = live.begin();
      std::advance(victim, std::uniform_int_distribution<size_t>(0, live.size() - 1)(rng));
      ASSERT_EQ(pool.free(victim->first), victim->second);
      live.erase(victim);
    } else {
      const size_t bytes = kind(rng) < 5 ? small(rng) : large(rng);
      const auto got = pool.allocate(bytes);
      ASSERT_NE(got.pointer, nullptr);
      ASSERT_GE(got.size, bytes);
      ASSERT_FALSE(overlaps(at(got.pointer), got.size)) << "step " << i;
      live[at(got.pointer)] = got.size;
    }
    if (i % 50 == 0) {
      ASSERT_NO_THROW(pool.verify()) << "step " << i;
    }
  }
  pool.verify();
  size_t in_use = 0;
  for (const auto& [p, size] : live) in_use += size;
  EXPECT_EQ(pool.reserved(), in_use + pool.cached());
  EXPECT_LE(device.allocations + device.maps - allocations_after_warmup, 2)
      << "the cache keeps asking for new memory in the steady state";
  for (const auto& [p, size] : live) pool.free(p);
  pool.verify();
  pool.release_free_segments();
  EXPECT_EQ(pool.reserved(), 0u);
  EXPECT_TRUE(device.segments.empty());
  EXPECT_TRUE(device.mapped.empty());
}

INSTANTIATE_TEST_SUITE_P(LargePool, BlockPoolRandom, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Growable" : "Segments"; });

}  // namespace
}  // namespace moetune::cuda
