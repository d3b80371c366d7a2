// The CUDA caching allocator on the device (its bookkeeping, ops/cuda/block_pool.h, has CPU
// tests in tests/test_block_pool.cpp): a freed large block serves a smaller request without a
// new cudaMalloc and its rest serves another one, freed neighbours merge to serve a larger
// request, small requests share a segment, and a reused block is zero-filled like a new one;
// with the growable range (the default), large blocks allocated one after another are
// neighbours that merge, and releasing unmaps the free tail.
#include <gtest/gtest.h>

#include <vector>

#include "core/tensor.h"
#include "ops/backend.h"
#include "ops/cuda/device_memory.h"

namespace moetune {
namespace {

constexpr int64_t kMiB = int64_t(1) << 20;

// A (bytes / 4) F32 device buffer.
Buffer device_bytes(int64_t bytes) { return Buffer(DType::F32, {bytes / 4}, Device::CUDA); }

void expect_zero_filled(Backend& backend, const Buffer& buffer) {
  std::vector<float> head(4096, -1.0f), tail(4096, -1.0f);
  const Tensor t = buffer.tensor();
  const int64_t n = t.numel();
  backend.copy(Tensor(head.data(), DType::F32, {4096}), t.slice_rows(0, 4096));
  backend.copy(Tensor(tail.data(), DType::F32, {4096}), t.slice_rows(n - 4096, n));
  backend.synchronize();
  for (size_t i = 0; i < head.size(); ++i) {
    ASSERT_EQ(head[i], 0.0f) << "reused block not zero-filled at " << i;
    ASSERT_EQ(tail[i], 0.0f) << "reused block not zero-filled near the end, " << i;
  }
}

TEST(CudaCachingAllocator, SplitsFreedBlocksAndMergesNeighbours) {
  auto backend = make_cuda_backend(0);
  backend->synchronize();
  cuda::release_cached_device_memory();  // nothing cached from earlier tests
  char* first = nullptr;
  {
    Buffer block = device_bytes(300 * kMiB);
    backend->fill(block, 1.0f);
    first = static_cast<char*>(block.data());
  }
  const size_t reserved = cuda::device_memory_stats().reserved;
  {
    Buffer smaller = device_bytes(200 * kMiB);  // the freed block, split
    Buffer rest = device_bytes(100 * kMiB);     // its rest
    EXPECT_EQ(smaller.data(), first);
    EXPECT_EQ(static_cast<char*>(rest.data()), first + 200 * kMiB);
    EXPECT_EQ(cuda::device_memory_stats().reserved, reserved) << "a new cudaMalloc ran";
    expect_zero_filled(*backend, smaller);
    expect_zero_filled(*backend, rest);
    backend->fill(smaller, 2.0f);
    backend->fill(rest, 3.0f);
  }
  {
    // both pieces were freed: they merged back into one 300 MiB block
    Buffer whole = device_bytes(300 * kMiB);
    EXPECT_EQ(whole.data(), first);
    EXPECT_EQ(cuda::device_memory_stats().reserved, reserved) << "the pieces did not merge";
    expect_zero_filled(*backend, whole);
  }
  // Small requests (index plans of a few KiB, varying per layer) share 2 MiB segments.
  backend->synchronize();
  cuda::release_cached_device_memory();
  const size_t before = cuda::device_memory_stats().reserved;
  {
    Buffer a(DType::I32, {5 * 1024}, Device::CUDA);
    Buffer b(DType::I32, {3 * 1024}, Device::CUDA);
    Buffer c(DType::I32, {100 * 1024}, Device::CUDA);
    // at most one new 2 MiB segment for all three (other live buffers may leave room)
    EXPECT_LE(cuda::device_memory_stats().reserved, before + 2 * kMiB);
    EXPECT_NE(a.data(), b.data());
    EXPECT_NE(b.data(), c.data());
  }
}

TEST(CudaCachingAllocator, GrowableRangeMergesBlocksOfSeparateGrowths) {
  auto backend = make_cuda_backend(0);
  {
    Buffer warm(DType::F32, {16}, Device::CUDA);  // the allocator decides on its range
  }
  if (!cuda::device_memory_stats().growable_range)
    GTEST_SKIP() << "no growable range (MOETUNE_EXPANDABLE_SEGMENTS=0 or no VMM support)";
  backend->synchronize();
  cuda::release_cached_device_memory();
  const cuda::DeviceMemoryStats start = cuda::device_memory_stats();
  // larger than any free block left by earlier tests: both must grow the range
  const int64_t cached = int64_t(start.reserved - start.in_use);
  const int64_t a_bytes = (cached / (2 * kMiB) + 60) * 2 * kMiB, b_bytes = a_bytes + 40 * kMiB;
  char* first = nullptr;
  {
    Buffer a = device_bytes(a_bytes);
    Buffer b = device_bytes(b_bytes);  // mapped right after a
    first = static_cast<char*>(a.data());
    backend->fill(a, 1.0f);
    backend->fill(b, 2.0f);
    EXPECT_EQ(static_cast<char*>(b.data()), first + a_bytes);
  }
  const size_t grown = cuda::device_memory_stats().reserved;
  EXPECT_LE(grown, start.reserved + size_t(a_bytes + b_bytes));
  {
    // both freed: one block (separate cudaMalloc segments could not serve this)
    const int64_t whole_bytes = a_bytes + b_bytes;
    Buffer whole = device_bytes(whole_bytes);
    EXPECT_EQ(whole.data(), first);
    EXPECT_EQ(cuda::device_memory_stats().reserved, grown) << "the range grew again";
    expect_zero_filled(*backend, whole);
    backend->fill(whole, 3.0f);
    std::vector<float> last(1, 0.0f);
    backend->copy(Tensor(last.data(), DType::F32, {1}),
                  whole.tensor().slice_rows(whole_bytes / 4 - 1, whole_bytes / 4));
    backend->synchronize();
    EXPECT_EQ(last[0], 3.0f);
  }
  backend->synchronize();
  cuda::release_cached_device_memory();  // the free tail is unmapped again
  EXPECT_LE(cuda::device_memory_stats().reserved, start.reserved);
}

}  // namespace
}  // namespace moetune
