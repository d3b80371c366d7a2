// The rank spawner itself (test_spawn_ranks.h): ranks meet at the store and see their
// place and arguments; a failing rank is named with its own gtest output; hanging ranks are
// all killed at the timeout instead of hanging the test; a body test that does not exist is
// reported; and outside run_ranks a test is no rank (its body skips).
#include <gtest/gtest.h>

#include <chrono>
#include <iostream>
#include <thread>

#include "test_spawn_ranks.h"

namespace moetune {
namespace {

std::string message_of(const ::testing::AssertionResult& result) { return result.message(); }

TEST(SpawnRanks, RanksMeetAndSeeTheirPlaceAndArguments) {
  const auto runs =
      testing::run_ranks(3, "SpawnRanksRank.MeetsTheOthers", {.args = {{"WORD", "hi"}}});
  ASSERT_TRUE(testing::ranks_passed(runs));
  ASSERT_EQ(runs.size(), 3u);
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_TRUE(runs[rank].ran);
    EXPECT_EQ(runs[rank].exit_code, 0);
    EXPECT_NE(runs[rank].output.find("rank " + std::to_string(rank) + " of 3 says hi"),
              std::string::npos)
        << runs[rank].output;
  }
}

TEST(SpawnRanksRank, MeetsTheOthers) {
  const auto spawned = testing::spawned_rank();
  if (!spawned) GTEST_SKIP() << testing::kRankBodyOnly;
  const auto store = spawned->connect();
  store->add("arrived", 1);
  store->barrier("meet");
  ASSERT_EQ(store->add("arrived", 0), spawned->world());
  std::cout << "rank " << spawned->rank() << " of " << spawned->world() << " says "
            << spawned->arg("WORD") << std::endl;
}

TEST(SpawnRanks, AFailingRankIsNamedWithItsOutput) {
  const auto runs = testing::run_ranks(2, "SpawnRanksRank.FailsOnRankOne");
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_EQ(runs[0].exit_code, 0);
  EXPECT_EQ(runs[1].exit_code, 1);
  EXPECT_TRUE(runs[1].ran);
  const ::testing::AssertionResult passed = testing::ranks_passed(runs);
  EXPECT_FALSE(passed);
  const std::string message = message_of(passed);
  EXPECT_NE(message.find("rank 1 of 2 exited with status 1"), std::string::npos) << message;
  EXPECT_NE(message.find("rank 1 fails on purpose"), std::string::npos) << message;
  EXPECT_EQ(message.find("rank 0 of 2"), std::string::npos) << message;
}

TEST(SpawnRanksRank, FailsOnRankOne) {
  const auto spawned = testing::spawned_rank();
  if (!spawned) GTEST_SKIP() << testing::kRankBodyOnly;
  EXPECT_NE(spawned->rank(), 1) << "rank 1 fails on purpose";
}

TEST(SpawnRanks, HangingRanksAreKilledAtTheTimeout) {
  testing::RankOptions options;
  options.timeout_s = 1.0;
  const auto start = std::chrono::steady_clock::now();
  const auto runs = testing::run_ranks(2, "SpawnRanksRank.Hangs", options);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 20.0);
  ASSERT_EQ(runs.size(), 2u);
  for (const testing::RankRun& run : runs) {
    EXPECT_TRUE(run.timed_out);
    EXPECT_EQ(run.exit_code, 128 + 9);  // SIGKILL
  }
  const std::string message = message_of(testing::ranks_passed(runs));
  EXPECT_NE(message.find("rank 0 of 2 was still running at the timeout"), std::string::npos)
      << message;
  EXPECT_NE(message.find("rank 1 of 2 was still running at the timeout"), std::string::npos)
      << message;
}

TEST(SpawnRanksRank, Hangs) {
  const auto spawned = testing::spawned_rank();
  if (!spawned) GTEST_SKIP() << testing::kRankBodyOnly;
  std::this_thread::sleep_for(std::chrono::minutes(10));
}

TEST(SpawnRanks, ABodyTestThatDoesNotRunIsReported) {
  const auto runs = testing::run_ranks(1, "SpawnRanksRank.NoSuchTest");
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_FALSE(runs[0].ran);
  const std::string message = message_of(testing::ranks_passed(runs));
  EXPECT_NE(message.find("did not run its body test"), std::string::npos) << message;
}

TEST(SpawnRanks, ATestRunNormallyIsNoRank) { EXPECT_FALSE(testing::spawned_rank().has_value()); }

}  // namespace
}  // namespace moetune
