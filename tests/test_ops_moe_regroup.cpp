// CPU moe_regroup_by_expert (the expert-parallel regroup of rows received from the peers by
// local expert) against a straightforward reference: list the received rows with their
// expert, stable-sort them by expert. Awkward cases: local experts without rows, a peer
// that sends nothing, a rank that receives nothing, one peer, uneven random counts; then
// the permutation drives moe_gather (as the dispatcher does) and malformed offsets fail.
#include <algorithm>
#include <numeric>
#include <random>

#include "test_ops_helpers.h"

namespace moetune::testing {
namespace {

// counts[p][g]: rows peer p holds for global expert g -> peer_offsets (P, E + 1).
HostI32 offsets_of(const std::vector<std::vector<int32_t>>& counts) {
  const int64_t peers = static_cast<int64_t>(counts.size());
  const int64_t experts = static_cast<int64_t>(counts[0].size());
  HostI32 offsets({peers, experts + 1});
  for (int64_t p = 0; p < peers; ++p)
    for (int64_t g = 0; g < experts; ++g)
      offsets[p * (experts + 1) + g + 1] = offsets[p * (experts + 1) + g] + counts[p][g];
  return offsets;
}

struct Regroup {
  HostI32 local_offsets, regroup, ungroup;
};

Regroup run(Backend& backend, HostI32& peer_offsets, int64_t first, int64_t local, int64_t rows) {
  Regroup out{HostI32({local + 1}), HostI32({rows}), HostI32({rows})};
  std::fill(out.regroup.values.begin(), out.regroup.values.end(), -7);  // poison
  std::fill(out.ungroup.values.begin(), out.ungroup.values.end(), -7);
  backend.moe_regroup_by_expert(peer_offsets.tensor(), first, out.local_offsets.tensor(),
                                out.regroup.tensor(), out.ungroup.tensor());
  return out;
}

// The reference: received rows (peer-major, each peer's rows of experts [first, first +
// local) in its order) labelled by local expert, then a stable sort by that label.
void expect_matches_reference(Backend& backend, const std::vector<std::vector<int32_t>>& counts,
                              int64_t first, int64_t local) {
  std::vector<int32_t> expert_of_received;
  for (const auto& peer : counts)
    for (int64_t e = 0; e < local; ++e)
      expert_of_received.insert(expert_of_received.end(), peer[first + e], static_cast<int32_t>(e));
  const int64_t rows = static_cast<int64_t>(expert_of_received.size());
  std::vector<int32_t> regroup(expert_of_received.size());
  std::iota(regroup.begin(), regroup.end(), 0);
  std::stable_sort(regroup.begin(), regroup.end(), [&](int32_t a, int32_t b) {
    return expert_of_received[a] < expert_of_received[b];
  });
  std::vector<int32_t> ungroup(regroup.size()), local_offsets(static_cast<size_t>(local + 1), 0);
  for (size_t r = 0; r < regroup.size(); ++r) ungroup[regroup[r]] = static_cast<int32_t>(r);
  for (int32_t e : expert_of_received) ++local_offsets[e + 1];
  std::partial_sum(local_offsets.begin(), local_offsets.end(), local_offsets.begin());

  HostI32 peer_offsets = offsets_of(counts);
  Regroup got = run(backend, peer_offsets, first, local, rows);
  EXPECT_EQ(got.local_offsets.values, local_offsets);
  EXPECT_EQ(got.regroup.values, regroup);
  EXPECT_EQ(got.ungroup.values, ungroup);
}

TEST(OpsMoeRegroup, MatchesStableSortOnAwkwardCounts) {
  auto backend = make_cpu_backend();
  // 3 peers, 6 experts, this rank holds experts [2, 4): expert 3 receives nothing from
  // anyone, peer 1 sends nothing to this rank (it has rows for other ranks' experts).
  expect_matches_reference(*backend, {{1, 0, 2, 0, 3, 1}, {4, 2, 0, 0, 1, 1}, {0, 0, 3, 0, 0, 5}},
                           2, 2);
  // The same peers seen from the rank of experts [4, 6) and of experts [0, 2).
  expect_matches_reference(*backend, {{1, 0, 2, 0, 3, 1}, {4, 2, 0, 0, 1, 1}, {0, 0, 3, 0, 0, 5}},
                           4, 2);
  expect_matches_reference(*backend, {{1, 0, 2, 0, 3, 1}, {4, 2, 0, 0, 1, 1}, {0, 0, 3, 0, 0, 5}},
                           0, 2);
  // This rank receives no row at all (M = 0), and a single peer (ep = 1) with one expert.
  expect_matches_reference(*backend, {{0, 0, 5}, {0, 0, 2}}, 0, 2);
  expect_matches_reference(*backend, {{3}}, 0, 1);
}

TEST(OpsMoeRegroup, MatchesStableSortOnRandomCounts) {
  auto backend = make_cpu_backend();
  std::mt19937 rng(7);
  for (int peers : {1, 2, 3, 4}) {
    for (int local : {1, 3, 8}) {
      const int experts = peers * local;
      std::vector<std::vector<int32_t>> counts(peers, std::vector<int32_t>(experts));
      std::uniform_int_distribution<int> count(0, 9);
      for (auto& peer : counts)
        for (auto& c : peer) c = rng() % 3 == 0 ? 0 : count(rng);       // a third are empty
      if (peers > 1) std::fill(counts[1].begin(), counts[1].end(), 0);  // a silent peer
      for (int rank = 0; rank < peers; ++rank)
        expect_matches_reference(*backend, counts, rank * local, local);
    }
  }
}

// The dispatcher's use: received rows (each row holds its local expert as value) gathered
// by regroup come out sorted by expert, and ungroup brings them back.
TEST(OpsMoeRegroup, PermutationsDriveTheGather) {
  auto backend = make_cpu_backend();
  const std::vector<std::vector<int32_t>> counts = {{2, 0, 3, 1}, {0, 4, 0, 2}, {1, 1, 1, 1}};
  const int64_t first = 2, local = 2, width = 3;
  HostI32 peer_offsets = offsets_of(counts);
  const int64_t rows = 3 + 1 + 2 + 1 + 1;  // experts 2 and 3 of every peer
  Regroup plan = run(*backend, peer_offsets, first, local, rows);
  HostF32 received({rows, width});
  int64_t row = 0;
  for (const auto& peer : counts)
    for (int64_t e = 0; e < local; ++e)
      for (int32_t i = 0; i < peer[first + e]; ++i, ++row)
        for (int64_t c = 0; c < width; ++c) received[row * width + c] = float(e * 100 + row);
  HostF32 grouped({rows, width}), back({rows, width});
  backend->moe_gather(received.tensor(), plan.regroup.tensor(), 1, grouped.tensor());
  for (int64_t e = 0; e < local; ++e)
    for (int32_t r = plan.local_offsets[e]; r < plan.local_offsets[e + 1]; ++r)
      EXPECT_EQ(static_cast<int64_t>(grouped[r * width]) / 100, e) << "row " << r;
  backend->moe_gather(grouped.tensor(), plan.ungroup.tensor(), 1, back.tensor());
  EXPECT_EQ(back.values, received.values);
}

TEST(OpsMoeRegroup, MalformedArgumentsFail) {
  auto backend = make_cpu_backend();
  HostI32 peer_offsets = offsets_of({{1, 2}, {3, 0}});
  HostI32 local_offsets({2}), regroup({3}), ungroup({3});
  auto call = [&](HostI32& offsets, int64_t first, HostI32& out) {
    backend->moe_regroup_by_expert(offsets.tensor(), first, local_offsets.tensor(), out.tensor(),
                                   out.tensor());
  };
  HostI32 two({2}), four({4});
  EXPECT_NO_THROW(call(peer_offsets, 1, two));           // expert 1: 2 + 0 rows
  EXPECT_NO_THROW(call(peer_offsets, 0, four));          // expert 0: 1 + 3 rows
  EXPECT_THROW(call(peer_offsets, 0, regroup), Error);   // the peers send 4 rows, not 3
  EXPECT_THROW(call(peer_offsets, 2, regroup), Error);   // expert 2 of 2
  EXPECT_THROW(call(peer_offsets, -1, regroup), Error);  // negative first expert
  HostI32 decreasing({2, 3}, {0, 4, 1, 0, 3, 3});
  HostI32 one({1});
  EXPECT_THROW(call(decreasing, 1, one), Error);
}

}  // namespace
}  // namespace moetune::testing
