// CPU attention_cached_forward (generation): n queries at the end of a KV cache must equal
// the last n rows of the training attention_forward over the whole sequence (one row, causal,
// GQA), for a prefill (past 0) and for decode steps after it; bad shapes are errors.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/error.h"
#include "ops/backend.h"
#include "test_util.h"

namespace moetune {
namespace {

void check_cached_equals_full(int64_t total, int64_t past, int64_t q_heads, int64_t kv_heads,
                              int64_t dim) {
  auto backend = make_cpu_backend();
  const int64_t n = total - past, capacity = total + 3;
  std::vector<float> q = testing::random_floats(total * q_heads * dim, 1);
  std::vector<float> k = testing::random_floats(capacity * kv_heads * dim, 2);
  std::vector<float> v = testing::random_floats(capacity * kv_heads * dim, 3);
  const float scale = 1.0f / std::sqrt(float(dim));
  // the training op over the first `total` positions
  std::vector<float> full(q.size()), lse(q_heads * total);
  backend->attention_forward(Tensor(q.data(), DType::F32, {1, total, q_heads, dim}),
                             Tensor(k.data(), DType::F32, {1, total, kv_heads, dim}),
                             Tensor(v.data(), DType::F32, {1, total, kv_heads, dim}), scale,
                             Tensor(), Tensor(full.data(), DType::F32, {1, total, q_heads, dim}),
                             Tensor(lse.data(), DType::F32, {1, q_heads, total}));
  // the cached op for the last n queries (the cache has room beyond them, never read)
  std::vector<float> cached(n * q_heads * dim);
  backend->attention_cached_forward(
      Tensor(q.data() + past * q_heads * dim, DType::F32, {n, q_heads, dim}),
      Tensor(k.data(), DType::F32, {capacity, kv_heads, dim}),
      Tensor(v.data(), DType::F32, {capacity, kv_heads, dim}), past, scale,
      Tensor(cached.data(), DType::F32, {n, q_heads, dim}));
  EXPECT_LT(
      testing::relative_error(cached.data(), full.data() + past * q_heads * dim, cached.size()),
      1e-6)
      << "total " << total << " past " << past;
}

TEST(OpsAttentionCached, EqualsFullAttention) {
  check_cached_equals_full(9, 0, 4, 2, 8);    // prefill
  check_cached_equals_full(9, 8, 4, 2, 8);    // one decode step
  check_cached_equals_full(17, 12, 6, 1, 5);  // several, multi-query
  check_cached_equals_full(1, 0, 2, 2, 3);    // a single token
}

TEST(OpsAttentionCached, RejectsBadShapes) {
  auto backend = make_cpu_backend();
  std::vector<float> q(2 * 4 * 8), cache(5 * 2 * 8), out(q.size());
  const Tensor tq(q.data(), DType::F32, {2, 4, 8}), tc(cache.data(), DType::F32, {5, 2, 8}),
      to(out.data(), DType::F32, {2, 4, 8});
  EXPECT_THROW(backend->attention_cached_forward(tq, tc, tc, 4, 1.0f, to), Error);  // 4 + 2 > 5
  EXPECT_THROW(backend->attention_cached_forward(tq, tc, tc, -1, 1.0f, to), Error);
  const Tensor odd_heads(cache.data(), DType::F32, {5, 3, 8});
  EXPECT_THROW(backend->attention_cached_forward(tq, odd_heads, odd_heads, 0, 1.0f, to), Error);
  EXPECT_NO_THROW(backend->attention_cached_forward(tq, tc, tc, 3, 1.0f, to));
}

}  // namespace
}  // namespace moetune
