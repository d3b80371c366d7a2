// The CUDA caching allocator's reuse rule (ops/cuda/caching_allocator.cpp): a large request
// takes the smallest cached block up to a quarter larger instead of a new cudaMalloc (so
// buffers sized per call, like the expert rows of real routing, stop growing the cache), a
// much smaller one does not take it, small blocks follow the same rule, and a reused block is
// zero-filled like a new one.
#include <gtest/gtest.h>

#include <vector>

#include "core/tensor.h"
#include "ops/backend.h"
#include "ops/cuda/device_memory.h"

namespace moetune {
namespace {

constexpr int64_t kMiB = int64_t(1) << 20;

TEST(CudaCachingAllocator, LargeRequestsReuseABlockUpToAQuarterLarger) {
  auto backend = make_cuda_backend(0);
  backend->synchronize();
  cuda::release_cached_device_memory();  // nothing cached from earlier tests
  void* first = nullptr;
  {
    Buffer block(DType::F32, {301 * kMiB / 4}, Device::CUDA);
    backend->fill(block, 1.0f);
    first = block.data();
  }
  const size_t reserved = cuda::device_memory_stats().reserved;
  {
    Buffer smaller(DType::F32, {250 * kMiB / 4}, Device::CUDA);  // 301 <= 1.25 * 250
    EXPECT_EQ(smaller.data(), first);
    EXPECT_EQ(cuda::device_memory_stats().reserved, reserved) << "a new cudaMalloc ran";
    std::vector<float> head(4096, -1.0f), tail(4096, -1.0f);
    backend->copy(Tensor(head.data(), DType::F32, {4096}), smaller.tensor().slice_rows(0, 4096));
    const int64_t n = smaller.tensor().numel();
    backend->copy(Tensor(tail.data(), DType::F32, {4096}),
                  smaller.tensor().slice_rows(n - 4096, n));
    backend->synchronize();
    for (size_t i = 0; i < head.size(); ++i) {
      ASSERT_EQ(head[i], 0.0f) << "reused block not zero-filled at " << i;
      ASSERT_EQ(tail[i], 0.0f) << "reused block not zero-filled near the end, " << i;
    }
  }
  {
    Buffer much_smaller(DType::F32, {200 * kMiB / 4}, Device::CUDA);  // 301 > 1.25 * 200
    EXPECT_NE(much_smaller.data(), first);
  }
  // The same rule for small blocks (index plans of a few KiB vary per layer too).
  backend->synchronize();
  cuda::release_cached_device_memory();
  void* small = nullptr;
  { small = Buffer(DType::I32, {5 * 1024}, Device::CUDA).data(); }  // 20 KiB
  {
    Buffer too_small(DType::I32, {3 * 1024}, Device::CUDA);  // 20 > 1.25 * 12 KiB
    EXPECT_NE(too_small.data(), small);
  }
  {
    Buffer within(DType::I32, {4 * 1024 + 100}, Device::CUDA);  // 20 <= 1.25 * 16.5 KiB
    EXPECT_EQ(within.data(), small);
  }
}

}  // namespace
}  // namespace moetune
