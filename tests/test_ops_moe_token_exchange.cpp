// CPU ops of the expert-parallel token exchange: moe_rank_ids and moe_local_ids on a small
// hand-checked routing (every "none" bucket value included), bad arguments, and the
// row ops over a prefix of a sort: moe_gather of the first R rows, its backward adding only
// those rows, and moe_combine skipping the slots sorted past R.
#include <gtest/gtest.h>

#include <vector>

#include "core/error.h"
#include "ops/backend.h"

namespace moetune {
namespace {

std::vector<int32_t> ints(const Buffer& b) {
  return std::vector<int32_t>(b.ptr<int32_t>(), b.ptr<int32_t>() + b.numel());
}
std::vector<float> floats(const Buffer& b) {
  return std::vector<float>(b.ptr<float>(), b.ptr<float>() + b.numel());
}
Buffer i32(std::vector<int32_t> values, Shape shape) {
  Buffer b(DType::I32, shape);
  std::copy(values.begin(), values.end(), b.ptr<int32_t>());
  return b;
}
Buffer f32(std::vector<float> values, Shape shape) {
  Buffer b(DType::F32, shape);
  std::copy(values.begin(), values.end(), b.ptr<float>());
  return b;
}

// 3 tokens, top-2 of 6 experts on 3 ranks (2 experts each).
const std::vector<int32_t> kIds = {0, 1,   // token 0: rank 0 only
                                   5, 2,   // token 1: ranks 2 and 1
                                   3, 4};  // token 2: ranks 1 and 2

TEST(OpsMoeTokenExchange, RankAndLocalIds) {
  auto backend = make_cpu_backend();
  const Buffer ids = i32(kIds, {3, 2});
  Buffer ranks(DType::I32, {3, 3});
  backend->moe_rank_ids(ids, 2, ranks);
  EXPECT_EQ(ints(ranks), (std::vector<int32_t>{0, 3, 3,  // 3 = "none"
                                               3, 1, 2,  //
                                               3, 1, 2}));
  Buffer local(DType::I32, {3, 2});
  backend->moe_local_ids(ids, 2, 2, local);  // rank 1: experts 2 and 3
  EXPECT_EQ(ints(local), (std::vector<int32_t>{2, 2, 2, 0, 1, 2}));
}

TEST(OpsMoeTokenExchange, BadArgumentsFail) {
  auto backend = make_cpu_backend();
  const Buffer ids = i32(kIds, {3, 2});
  Buffer ranks(DType::I32, {3, 2});  // 2 ranks of 2 experts cannot hold expert 5
  EXPECT_THROW(backend->moe_rank_ids(ids, 2, ranks), Error);
  Buffer wrong_rows(DType::I32, {2, 3});
  EXPECT_THROW(backend->moe_rank_ids(ids, 2, wrong_rows), Error);
  Buffer local(DType::I32, {3, 3});
  EXPECT_THROW(backend->moe_local_ids(ids, 0, 2, local), Error);  // shape
  Buffer ok(DType::I32, {3, 2});
  EXPECT_THROW(backend->moe_local_ids(ids, 0, 0, ok), Error);  // no local experts
}

TEST(OpsMoeTokenExchange, RowOpsOverAPrefix) {
  auto backend = make_cpu_backend();
  // rank 1's view of the 3 tokens: local ids (2 = none), sorted with 3 buckets
  Buffer local = i32({2, 2, 2, 0, 1, 2}, {3, 2});
  Buffer offsets(DType::I32, {4}), sorted(DType::I32, {6}), slot_rows(DType::I32, {6});
  backend->moe_sort_by_expert(local, 3, offsets, sorted, slot_rows);
  EXPECT_EQ(ints(offsets), (std::vector<int32_t>{0, 1, 2, 6}));
  EXPECT_EQ(ints(sorted), (std::vector<int32_t>{3, 4, 0, 1, 2, 5}));
  const int64_t M = 2;  // rows of this rank's experts: slot 3 (token 1), slot 4 (token 2)
  const Tensor prefix = sorted.tensor().slice_rows(0, M);
  const Buffer x = f32({1, 10, 2, 20, 3, 30}, {3, 2});
  Buffer rows(DType::F32, {M, 2});
  backend->moe_gather(x, prefix, 2, rows);
  EXPECT_EQ(floats(rows), (std::vector<float>{2, 20, 3, 30}));
  Buffer dx = f32({0, 0, 0, 0, 0, 0}, {3, 2});
  backend->moe_gather_backward(f32({1, 2, 3, 4}, {M, 2}), prefix, 2, dx);
  EXPECT_EQ(floats(dx), (std::vector<float>{0, 0, 1, 2, 3, 4}));
  // combine: token 1 = w[1,1] * y[0], token 2 = w[2,0] * y[1], token 0 = 0
  const Buffer y = f32({1, 2, 3, 4}, {M, 2});
  const Buffer weights = f32({0.5f, 0.5f, 0.25f, 0.75f, 2.0f, 9.0f}, {3, 2});
  Buffer out(DType::F32, {3, 2});
  backend->moe_combine(y, weights, slot_rows, out);
  EXPECT_EQ(floats(out), (std::vector<float>{0, 0, 0.75f, 1.5f, 6, 8}));
  // a prefix longer than the slots fails
  Buffer too_many(DType::I32, {7});
  EXPECT_THROW(backend->moe_gather(x, too_many, 2, Buffer(DType::F32, {7, 2})), Error);
}

}  // namespace
}  // namespace moetune
