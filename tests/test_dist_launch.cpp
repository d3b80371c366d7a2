// `moetune launch` with real processes on the CPU: N ranks run `moetune dist-selftest`
// (bootstrap, store, collectives, group splits) and succeed; a rank that exits non-zero,
// dies by a signal, hangs, or never joins makes the whole launch fail within the timeout,
// naming the rank, with the other ranks stopped (no hang); Ctrl-C is passed on.
#include <gtest/gtest.h>

#include <chrono>
#include <regex>

#include "test_util.h"

namespace moetune {
namespace {

using Clock = std::chrono::steady_clock;

struct Timed {
  testing::CommandResult result;
  double seconds = 0;
};

// Runs `moetune launch <arguments>` with extra environment, under a hard 60 s limit.
Timed launch(const std::string& arguments, const std::string& environment = "") {
  const auto start = Clock::now();
  Timed timed;
  timed.result = testing::run_command(environment + " timeout -s KILL 60 " +
                                      testing::moetune_binary().string() + " launch " + arguments);
  timed.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return timed;
}

int count_of(const std::string& text, const std::string& needle) {
  int count = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1))
    ++count;
  return count;
}

TEST(DistLaunch, ThreeRanksRunTheSelftest) {
  Timed run = launch("--nproc-per-node 3 -- dist-selftest --expert-parallel 3");
  EXPECT_EQ(run.result.exit_code, 0) << run.result.output;
  // Only rank 0's output is shown by default.
  EXPECT_EQ(count_of(run.result.output, "[rank 0] dist-selftest: rank 0/3"), 1)
      << run.result.output;
  EXPECT_EQ(count_of(run.result.output, "[rank 1]"), 0) << run.result.output;
  EXPECT_NE(run.result.output.find("via moetune launch"), std::string::npos);
  EXPECT_LT(run.seconds, 10.0);
}

TEST(DistLaunch, AllRanksShowsEveryRank) {
  Timed run = launch("--nproc-per-node 4 --all-ranks -- dist-selftest --expert-parallel 2");
  EXPECT_EQ(run.result.exit_code, 0) << run.result.output;
  for (int rank = 0; rank < 4; ++rank)
    EXPECT_EQ(
        count_of(run.result.output, "[rank " + std::to_string(rank) + "] dist-selftest: rank " +
                                        std::to_string(rank) + "/4"),
        1)
        << run.result.output;
}

TEST(DistLaunch, CrashingRankFailsTheJobAndNamesIt) {
  Timed run = launch("--nproc-per-node 3 --timeout 30 -- dist-selftest",
                     "MOETUNE_SELFTEST_FAIL_RANK=1 MOETUNE_SELFTEST_FAIL=exit");
  EXPECT_EQ(run.result.exit_code, 3) << run.result.output;
  EXPECT_NE(run.result.output.find("failed: rank 1 exited with status 3"), std::string::npos)
      << run.result.output;
  // The failing rank's own output is shown although only rank 0's is by default.
  EXPECT_NE(run.result.output.find("[rank 1] dist-selftest: rank 1 fails on purpose"),
            std::string::npos)
      << run.result.output;
  EXPECT_LT(run.seconds, 10.0);
}

TEST(DistLaunch, OtherRanksAreStoppedWhenOneExitsEarly) {
  // Rank 2 exits before joining the store; ranks 0 and 1 would wait 100 s at the barrier:
  // the launcher must stop them (SIGTERM) and return at once.
  Timed run = launch("--nproc-per-node 3 --timeout 100 --grace-period 2 -- dist-selftest",
                     "MOETUNE_SELFTEST_FAIL_RANK=2 MOETUNE_SELFTEST_FAIL=exit-early");
  EXPECT_EQ(run.result.exit_code, 3) << run.result.output;
  EXPECT_NE(run.result.output.find("rank 2"), std::string::npos) << run.result.output;
  EXPECT_NE(run.result.output.find("stopping the other ranks"), std::string::npos);
  EXPECT_LT(run.seconds, 10.0);
}

TEST(DistLaunch, RankKilledBySignal) {
  Timed run = launch("--nproc-per-node 2 -- dist-selftest",
                     "MOETUNE_SELFTEST_FAIL_RANK=0 MOETUNE_SELFTEST_FAIL=kill");
  EXPECT_EQ(run.result.exit_code, 128 + 9) << run.result.output;
  EXPECT_NE(run.result.output.find("rank 0 was killed by signal 9"), std::string::npos)
      << run.result.output;
  EXPECT_LT(run.seconds, 10.0);
}

TEST(DistLaunch, HungRankTimesOutNamingIt) {
  Timed run = launch("--nproc-per-node 3 --timeout 1.5 --grace-period 1 -- dist-selftest",
                     "MOETUNE_SELFTEST_FAIL_RANK=1 MOETUNE_SELFTEST_FAIL=no-show");
  EXPECT_NE(run.result.exit_code, 0) << run.result.output;
  EXPECT_NE(run.result.output.find("rank 1 of 3 did not arrive"), std::string::npos)
      << run.result.output;
  EXPECT_LT(run.seconds, 15.0);
}

TEST(DistLaunch, InterruptIsPassedToTheRanks) {
  // Rank 1 hangs; the launcher gets SIGINT after 1 s and must stop both ranks.
  const auto start = Clock::now();
  testing::CommandResult result = testing::run_command(
      "(MOETUNE_SELFTEST_FAIL_RANK=1 MOETUNE_SELFTEST_FAIL=hang " +
      testing::moetune_binary().string() +
      " launch --nproc-per-node 2 --timeout 100 --grace-period 2 -- dist-selftest & pid=$!; "
      "sleep 1; kill -INT $pid; wait $pid)");
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  EXPECT_EQ(result.exit_code, 128 + 2) << result.output;
  EXPECT_NE(result.output.find("interrupted"), std::string::npos) << result.output;
  EXPECT_LT(seconds, 10.0);
}

TEST(DistLaunch, BadArguments) {
  EXPECT_NE(launch("-- dist-selftest").result.output.find("--nproc-per-node N is required"),
            std::string::npos);
  EXPECT_NE(launch("--nproc-per-node 2").result.output.find("no command to run"),
            std::string::npos);
  EXPECT_NE(launch("--nproc-per-node zero -- version").result.output.find("--nproc-per-node"),
            std::string::npos);
  EXPECT_NE(launch("--bogus 1 -- version").result.output.find("unknown option --bogus"),
            std::string::npos);
  Timed run = launch("--nproc-per-node 2 -- version");
  EXPECT_EQ(run.result.exit_code, 0) << run.result.output;
  EXPECT_NE(run.result.output.find("[rank 0] moetune"), std::string::npos) << run.result.output;
}

}  // namespace
}  // namespace moetune
