// Communicators without a GPU: the store communicator between threads (each rank with its
// own connection) checked against closed forms, including EP/DP group splits; the local
// (size 1) communicator; argument checks; and the expert/data parallel layout's rank ->
// group mapping.
#include <gtest/gtest.h>

#include <numeric>
#include <set>
#include <thread>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/store.h"

namespace moetune::dist {
namespace {

template <typename Body>
void on_ranks(int world_size, Body body) {
  StoreServer server(0, world_size, 30.0);
  std::vector<std::thread> threads;
  std::vector<std::string> errors(world_size);
  for (int rank = 0; rank < world_size; ++rank)
    threads.emplace_back([&, rank] {
      try {
        Store store("127.0.0.1", server.port(), rank, world_size, 20.0);
        std::vector<int> everyone(world_size);
        std::iota(everyone.begin(), everyone.end(), 0);
        StoreCommunicator world(store, everyone);
        body(rank, world);
      } catch (const std::exception& error) {
        errors[rank] = error.what();
      }
    });
  for (auto& thread : threads) thread.join();
  for (int rank = 0; rank < world_size; ++rank) EXPECT_EQ(errors[rank], "") << "rank " << rank;
}

void expect(bool condition, const std::string& what) {
  if (!condition) fail(what);
}

TEST(DistCommunicator, StoreCollectivesMatchClosedForms) {
  constexpr int kWorld = 3;
  on_ranks(kWorld, [](int rank, Communicator& comm) {
    expect(comm.rank() == rank && comm.size() == kWorld, "rank/size");
    // all_reduce, out of place, then in place, F32 and I64.
    std::vector<float> in = {float(rank), 1.5f * rank, -2.0f}, out(3);
    comm.all_reduce_sum(Tensor(in.data(), DType::F32, {3}), Tensor(out.data(), DType::F32, {3}),
                        nullptr);
    expect(out[0] == 3 && out[1] == 4.5f && out[2] == -6, "all_reduce F32");
    std::vector<int64_t> counts = {rank * 1000000000LL, 1};
    Tensor counts_tensor(counts.data(), DType::I64, {2});
    comm.all_reduce_sum(counts_tensor, counts_tensor, nullptr);
    expect(counts[0] == 3000000000LL && counts[1] == 3, "all_reduce I64 in place");
    // bf16 sums round once per addition, in rank order on every rank.
    std::vector<uint16_t> half = {float_to_bf16(0.5f * (rank + 1))};
    comm.all_reduce_sum(Tensor(half.data(), DType::BF16, {1}),
                        Tensor(half.data(), DType::BF16, {1}), nullptr);
    expect(bf16_to_float(half[0]) == 3.0f, "all_reduce BF16");
    // reduce_scatter: (3 ranks x 2) rows; chunk c of rank r = 10 r + c.
    std::vector<float> full(6), mine(2);
    for (int c = 0; c < kWorld; ++c) full[2 * c] = full[2 * c + 1] = float(10 * rank + c);
    comm.reduce_scatter_sum(Tensor(full.data(), DType::F32, {kWorld, 2}),
                            Tensor(mine.data(), DType::F32, {1, 2}), nullptr);
    expect(mine[0] == 30.0f + 3 * rank && mine[1] == mine[0], "reduce_scatter");
    // all_gather of (2) per rank.
    std::vector<int32_t> own = {rank, -rank}, all(2 * kWorld);
    comm.all_gather(Tensor(own.data(), DType::I32, {2}),
                    Tensor(all.data(), DType::I32, {kWorld, 2}), nullptr);
    for (int p = 0; p < kWorld; ++p) expect(all[2 * p] == p && all[2 * p + 1] == -p, "all_gather");
    // all_to_all_v: rank r sends p + r rows to peer p (some zero), rows (2) = {r, p}.
    std::vector<int64_t> send_rows(kWorld), recv_rows(kWorld);
    std::vector<float> send, recv(2 * 16);
    for (int p = 0; p < kWorld; ++p) {
      send_rows[p] = (p + rank) % 3;
      recv_rows[p] = (rank + p) % 3;
      for (int row = 0; row < send_rows[p]; ++row) send.insert(send.end(), {float(rank), float(p)});
    }
    send.resize(2 * 16);
    comm.all_to_all_v(Tensor(send.data(), DType::F32, {16, 2}), send_rows,
                      Tensor(recv.data(), DType::F32, {16, 2}), recv_rows, nullptr);
    size_t position = 0;
    for (int p = 0; p < kWorld; ++p)
      for (int row = 0; row < recv_rows[p]; ++row, position += 2)
        expect(recv[position] == p && recv[position + 1] == rank, "all_to_all_v");
    comm.barrier(nullptr);
  });
}

TEST(DistCommunicator, StoreGroupsFollowTheLayout) {
  constexpr int kWorld = 4;
  on_ranks(kWorld, [](int rank, Communicator& world) {
    // make_parallel_groups takes ownership; wrap the borrowed world in a forwarding split.
    auto groups = make_parallel_groups(world.split(0, rank), 2, 8);
    const ParallelLayout& layout = groups.layout;
    expect(groups.world->size() == 4 && groups.world->rank() == rank, "world group");
    expect(groups.expert->size() == 2 && groups.expert->rank() == layout.ep_rank(rank), "EP group");
    expect(groups.expert_dp->size() == 2 && groups.expert_dp->rank() == layout.dp_rank(rank),
           "expert DP group");
    // Summing the global rank over each group gives the sum of its members.
    auto sum_over = [&](Communicator& group) {
      float value = float(rank);
      group.all_reduce_sum(Tensor(&value, DType::F32, {1}), Tensor(&value, DType::F32, {1}),
                           nullptr);
      return value;
    };
    auto members_sum = [](const std::vector<int>& ranks) {
      return float(std::accumulate(ranks.begin(), ranks.end(), 0));
    };
    expect(sum_over(*groups.expert) == members_sum(layout.ep_group_ranks(rank)), "EP members");
    expect(sum_over(*groups.expert_dp) == members_sum(layout.expert_dp_group_ranks(rank)),
           "expert DP members");
    expect(sum_over(*groups.world) == 6.0f, "world members");
  });
}

TEST(DistCommunicator, LocalCommunicatorCopies) {
  LocalCommunicator comm;
  std::vector<float> in = {1, 2, 3, 4}, out(4);
  comm.all_reduce_sum(Tensor(in.data(), DType::F32, {4}), Tensor(out.data(), DType::F32, {2, 2}),
                      nullptr);
  EXPECT_EQ(out, in);
  std::fill(out.begin(), out.end(), 0.0f);
  std::vector<int64_t> rows = {2};
  comm.all_to_all_v(Tensor(in.data(), DType::F32, {2, 2}), rows,
                    Tensor(out.data(), DType::F32, {2, 2}), rows, nullptr);
  EXPECT_EQ(out, in);
  auto child = comm.split(3, 0);
  EXPECT_EQ(child->size(), 1);
  comm.barrier(nullptr);
}

TEST(DistCommunicator, ArgumentChecks) {
  LocalCommunicator comm;
  std::vector<float> a(4), b(3);
  std::vector<int32_t> c(4);
  EXPECT_THROW(comm.all_reduce_sum(Tensor(a.data(), DType::F32, {4}),
                                   Tensor(b.data(), DType::F32, {3}), nullptr),
               Error);
  EXPECT_THROW(comm.all_gather(Tensor(a.data(), DType::F32, {4}), Tensor(c.data(), DType::I32, {4}),
                               nullptr),
               Error);
  std::vector<int64_t> too_many = {5}, two = {1, 1}, one = {1}, negative = {-1};
  Tensor rows(a.data(), DType::F32, {2, 2});
  EXPECT_THROW(comm.all_to_all_v(rows, too_many, rows, too_many, nullptr), Error);
  EXPECT_THROW(comm.all_to_all_v(rows, two, rows, two, nullptr), Error);
  EXPECT_THROW(comm.all_to_all_v(rows, negative, rows, negative, nullptr), Error);
  EXPECT_THROW(comm.all_to_all_v(rows, one, Tensor(b.data(), DType::F32, {1, 3}), one, nullptr),
               Error);
  Tensor device(a.data(), DType::F32, {4}, Device::CUDA);  // no device copy was given
  EXPECT_THROW(
      comm.all_reduce_sum(device, Tensor(b.data(), DType::F32, {4}, Device::CUDA), nullptr), Error);
}

TEST(DistCommunicator, NcclFailsClearlyWithoutCuda) {
  if (nccl_available())
    GTEST_SKIP() << "this build has NCCL (tested on GPUs by dist-selftest --nccl)";
  StoreServer server(0, 1, 5.0);
  Store store("127.0.0.1", server.port(), 0, 1, 5.0);
  try {
    make_nccl_communicator(ProcessInfo{}, store);
    FAIL() << "no error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("without CUDA"), std::string::npos) << error.what();
  }
}

TEST(DistLayout, RankToGroupMapping) {
  ParallelLayout layout = ParallelLayout::make(8, 4, 128);
  EXPECT_EQ(layout.data_parallel, 2);
  EXPECT_EQ(layout.ep_group_ranks(5), (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(layout.expert_dp_group_ranks(5), (std::vector<int>{1, 5}));
  EXPECT_EQ(layout.local_experts(5, 128), (std::pair<int, int>{32, 32}));
  EXPECT_EQ(layout.local_experts(4, 128), (std::pair<int, int>{0, 32}));
  // Pure data parallel and pure expert parallel.
  ParallelLayout dp = ParallelLayout::make(4, 1);
  EXPECT_EQ(dp.ep_group_ranks(2), (std::vector<int>{2}));
  EXPECT_EQ(dp.expert_dp_group_ranks(2), (std::vector<int>{0, 1, 2, 3}));
  ParallelLayout ep = ParallelLayout::make(4, 4);
  EXPECT_EQ(ep.expert_dp_group_ranks(2), (std::vector<int>{2}));
}

TEST(DistLayout, GroupsPartitionTheWorldAndEveryExpertHasReplicas) {
  for (int world : {1, 2, 4, 6, 8, 16}) {
    for (int ep = 1; ep <= world; ++ep) {
      if (world % ep) continue;
      ParallelLayout layout = ParallelLayout::make(world, ep, 0);
      std::set<std::vector<int>> ep_groups, dp_groups;
      for (int rank = 0; rank < world; ++rank) {
        auto ep_ranks = layout.ep_group_ranks(rank), dp_ranks = layout.expert_dp_group_ranks(rank);
        EXPECT_EQ(ep_ranks[layout.ep_rank(rank)], rank);
        EXPECT_EQ(dp_ranks[layout.dp_rank(rank)], rank);
        for (int member : ep_ranks) {
          EXPECT_EQ(layout.ep_color(member), layout.ep_color(rank));
          EXPECT_EQ(layout.ep_key(member), member - ep_ranks[0]);
        }
        // Replicas of an expert shard hold the same experts.
        for (int member : dp_ranks)
          EXPECT_EQ(layout.local_experts(member, 4 * ep), layout.local_experts(rank, 4 * ep));
        ep_groups.insert(ep_ranks);
        dp_groups.insert(dp_ranks);
      }
      EXPECT_EQ(static_cast<int>(ep_groups.size()), layout.data_parallel);
      EXPECT_EQ(static_cast<int>(dp_groups.size()), layout.expert_parallel);
      // Every EP group holds every expert exactly once.
      for (const auto& group : ep_groups) {
        std::vector<int> holder(4 * ep, -1);
        for (int member : group) {
          auto [first, count] = layout.local_experts(member, 4 * ep);
          for (int e = first; e < first + count; ++e) {
            EXPECT_EQ(holder[e], -1);
            holder[e] = member;
          }
        }
        EXPECT_EQ(std::count(holder.begin(), holder.end(), -1), 0);
      }
    }
  }
}

TEST(DistLayout, BadLayoutsFailClearly) {
  auto message = [](int world, int ep, int experts) {
    try {
      ParallelLayout::make(world, ep, experts);
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string();
  };
  EXPECT_NE(message(8, 3, 0).find("expert_parallel=3 does not divide the 8 ranks"),
            std::string::npos);
  EXPECT_NE(message(8, 4, 6).find("does not divide the 6 experts"), std::string::npos);
  EXPECT_NE(message(4, 0, 0).find("at least 1"), std::string::npos);
  EXPECT_NE(message(0, 1, 0).find("at least 1"), std::string::npos);
}

}  // namespace
}  // namespace moetune::dist
