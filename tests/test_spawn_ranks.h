// Multi-process tests without fork(): run_ranks starts `world` fresh copies of this test
// binary (/proc/self/exe, posix_spawn), each running one "rank body" test
// (--gtest_filter=<its name>) with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR
// and MASTER_PORT set as `moetune launch` sets them; the ranks meet at a dist::StoreServer
// that run_ranks serves. A rank body reads its place with spawned_rank() and skips itself when
// the test runs normally (ctest runs every test, rank bodies included).
// Why not fork(): a child forked from a process with running threads (OpenBLAS, gtest, the
// store server) can block forever on a lock another thread held at the fork (seen under
// ASan); a spawned process starts clean. A timeout kills every rank instead of hanging, and
// each rank's own gtest output (its failures, sanitizer reports) comes back in the message.
#pragma once

#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dist/bootstrap.h"
#include "dist/store.h"

namespace moetune::testing {

struct RankOptions {
  // Passed to every rank as MOETUNE_TEST_ARG_<KEY>=<value>; read with SpawnedRank::arg.
  std::map<std::string, std::string> args;
  double timeout_s = 120;       // all ranks together; then every rank is killed
  double store_timeout_s = 30;  // any blocking store call of a rank (MOETUNE_DIST_TIMEOUT_S)
};

struct RankRun {
  int rank = 0;
  int exit_code = -1;      // the exit status, or 128 + the signal that killed the rank
  bool timed_out = false;  // still running at the timeout (then killed)
  bool ran = false;        // the body test ran to its end (not filtered out, not skipped)
  std::string output;      // the rank's stdout and stderr together
};

// Starts `world` ranks running the test `test_name` ("Suite.Name") and waits for all of
// them. Every rank is killed when one cannot be started or when the timeout passes.
std::vector<RankRun> run_ranks(int world, const std::string& test_name,
                               const RankOptions& options = {});

// Success when every rank ran its body test and passed; otherwise a message naming each
// rank that failed, how, and its output.
::testing::AssertionResult ranks_passed(const std::vector<RankRun>& runs);

// A rank body's place in the job (from the environment run_ranks set).
struct SpawnedRank {
  dist::ProcessInfo process;  // rank, world size, store address
  double store_timeout_s = 30;

  int rank() const { return process.rank; }
  int world() const { return process.world_size; }
  // MOETUNE_TEST_ARG_<KEY>; fails (moetune::Error) when run_ranks was not given it.
  std::string arg(const std::string& key) const;
  // A client connection to the job's store.
  std::unique_ptr<dist::Store> connect() const;
};

// This process's place when it is a rank that run_ranks started for the running test;
// nullopt otherwise (the body then skips: GTEST_SKIP() << kRankBodyOnly).
std::optional<SpawnedRank> spawned_rank();
inline constexpr const char* kRankBodyOnly = "rank body: runs only in ranks started by run_ranks";

}  // namespace moetune::testing
