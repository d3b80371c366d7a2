// run_ranks and spawned_rank (see test_spawn_ranks.h). Each rank's stdout and stderr go to
// a file of a temporary folder (no pipes to drain while waiting); the ranks are polled with
// waitpid(WNOHANG) until they all exit or the deadline passes. The child environment is this
// process's, minus variables that would confuse a rank (launcher variables, GTEST_* such as
// GTEST_OUTPUT, which would make every rank overwrite the parent's report), plus the rank's.
#include "test_spawn_ranks.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "test_util.h"

extern char** environ;

namespace moetune::testing {
namespace {

constexpr const char* kBodyVariable = "MOETUNE_TEST_RANK_BODY";  // the body test's name
constexpr const char* kArgPrefix = "MOETUNE_TEST_ARG_";

// Variables of the parent that a rank must not inherit.
bool dropped(std::string_view name) {
  for (std::string_view prefix : {"GTEST_", "MOETUNE_TEST_", "OMPI_COMM_WORLD_", "PMI_"})
    if (name.starts_with(prefix)) return true;
  for (std::string_view exact : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                 "MASTER_ADDR", "MASTER_PORT", "MOETUNE_DIST_TIMEOUT_S"})
    if (name == exact) return true;
  return false;
}

std::vector<std::string> rank_environment(int rank, int world, int port,
                                          const std::string& test_name,
                                          const RankOptions& options) {
  std::vector<std::string> variables;
  for (char** entry = environ; *entry; ++entry) {
    const std::string_view text(*entry);
    if (!dropped(text.substr(0, text.find('=')))) variables.emplace_back(text);
  }
  const std::pair<std::string, std::string> own[] = {
      {"RANK", std::to_string(rank)},
      {"WORLD_SIZE", std::to_string(world)},
      {"LOCAL_RANK", std::to_string(rank)},
      {"LOCAL_WORLD_SIZE", std::to_string(world)},
      {"MASTER_ADDR", "127.0.0.1"},
      {"MASTER_PORT", std::to_string(port)},
      {"MOETUNE_DIST_TIMEOUT_S", std::to_string(options.store_timeout_s)},
      {kBodyVariable, test_name}};
  for (const auto& [name, value] : own) variables.push_back(name + "=" + value);
  for (const auto& [key, value] : options.args)
    variables.push_back(std::string(kArgPrefix) + key + "=" + value);
  return variables;
}

// Starts one rank with stdout and stderr into `log`; returns its pid (errno text on failure).
pid_t spawn_rank(const std::string& executable, const std::string& test_name,
                 std::vector<std::string> environment, const std::filesystem::path& log,
                 std::string& error) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  std::string filter = "--gtest_filter=" + test_name, color = "--gtest_color=no";
  std::vector<char*> argv = {const_cast<char*>(executable.c_str()), filter.data(), color.data(),
                             nullptr};
  std::vector<char*> envp;
  for (std::string& variable : environment) envp.push_back(variable.data());
  envp.push_back(nullptr);
  pid_t pid = -1;
  const int status =
      posix_spawn(&pid, executable.c_str(), &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (status != 0) {
    error = std::strerror(status);
    return -1;
  }
  return pid;
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

}  // namespace

std::vector<RankRun> run_ranks(int world, const std::string& test_name,
                               const RankOptions& options) {
  TempDir logs;
  dist::StoreServer server(0, world, options.store_timeout_s);
  server.set_linger_timeout(5.0);
  const std::string executable = std::filesystem::read_symlink("/proc/self/exe").string();
  std::vector<RankRun> runs(static_cast<size_t>(world));
  std::vector<pid_t> running(static_cast<size_t>(world), -1);
  auto log_of = [&](int rank) { return logs / ("rank" + std::to_string(rank) + ".log"); };
  auto kill_all = [&] {
    for (pid_t pid : running)
      if (pid > 0) ::kill(pid, SIGKILL);
  };

  std::fflush(stdout);
  std::fflush(stderr);
  for (int rank = 0; rank < world; ++rank) {
    runs[rank].rank = rank;
    std::string error;
    running[rank] = spawn_rank(executable, test_name,
                               rank_environment(rank, world, server.port(), test_name, options),
                               log_of(rank), error);
    if (running[rank] < 0) {
      runs[rank].output = "cannot start " + executable + ": " + error;
      kill_all();
      break;
    }
  }

  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(options.timeout_s);
  for (bool waiting = true; waiting;) {
    waiting = false;
    for (int rank = 0; rank < world; ++rank) {
      if (running[rank] <= 0) continue;
      int status = 0;
      const pid_t done = ::waitpid(running[rank], &status, WNOHANG);
      if (done == running[rank] || (done < 0 && errno != EINTR)) {
        runs[rank].exit_code = done == running[rank] ? exit_code_of(status) : -1;
        running[rank] = 0;
      } else {
        waiting = true;
      }
    }
    if (waiting && std::chrono::steady_clock::now() > deadline) {
      for (int rank = 0; rank < world; ++rank) runs[rank].timed_out = running[rank] > 0;
      kill_all();
      for (int rank = 0; rank < world; ++rank) {
        if (running[rank] <= 0) continue;
        int status = 0;
        ::waitpid(running[rank], &status, 0);
        runs[rank].exit_code = exit_code_of(status);
        running[rank] = 0;
      }
      break;
    }
    if (waiting) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }

  for (int rank = 0; rank < world; ++rank) {
    RankRun& run = runs[rank];
    if (std::filesystem::exists(log_of(rank))) run.output = read_file(log_of(rank));
    run.ran = run.output.find("[       OK ] " + test_name) != std::string::npos ||
              run.output.find("[  FAILED  ] " + test_name) != std::string::npos;
  }
  return runs;
}

::testing::AssertionResult ranks_passed(const std::vector<RankRun>& runs) {
  std::ostringstream failures;
  for (const RankRun& run : runs) {
    std::string how;
    if (run.timed_out)
      how = "was still running at the timeout and was killed (every rank was)";
    else if (run.exit_code != 0)
      how = "exited with status " + std::to_string(run.exit_code);
    else if (!run.ran)
      how = "did not run its body test (filtered out or skipped)";
    else
      continue;
    failures << "\n---- rank " << run.rank << " of " << runs.size() << " " << how
             << "; its output:\n"
             << run.output;
  }
  if (failures.str().empty()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "ranks failed:" << failures.str();
}

std::string SpawnedRank::arg(const std::string& key) const {
  const char* value = std::getenv((kArgPrefix + key).c_str());
  if (!value) fail("run_ranks was not given the argument ", key, " (", kArgPrefix, key, ")");
  return value;
}

std::unique_ptr<dist::Store> SpawnedRank::connect() const {
  return std::make_unique<dist::Store>(process.master_addr, process.master_port, process.rank,
                                       process.world_size, store_timeout_s);
}

std::optional<SpawnedRank> spawned_rank() {
  const char* body = std::getenv(kBodyVariable);
  const ::testing::TestInfo* test = ::testing::UnitTest::GetInstance()->current_test_info();
  if (!body || !test || std::string(test->test_suite_name()) + "." + test->name() != body)
    return std::nullopt;
  SpawnedRank rank;
  rank.process = dist::detect_process_info();
  rank.store_timeout_s = dist::dist_timeout_seconds();
  return rank;
}

}  // namespace moetune::testing
