// `moetune launch --nproc-per-node N [options] -- <subcommand> [args...]`: one node's
// launcher, for when neither torchrun nor MPI/Slurm is at hand. Forks N copies of this
// binary with RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT set (each
// rank then uses cuda:LOCAL_RANK), prefixes their output lines with "[rank N] ", and makes
// the job fail as a whole: when a rank exits non-zero or dies by a signal, the others get
// SIGTERM, then SIGKILL after a grace period, and the launcher exits non-zero naming it.
//
// Tricks:
// - Each rank runs in its own process group, so the launcher alone receives the terminal's
//   Ctrl-C and forwards it, and stopping a rank stops whatever it started too.
// - Children ask the kernel for SIGKILL when the launcher dies (PR_SET_PDEATHSIG): a killed
//   launcher leaves no orphaned ranks holding GPUs.
// - The rank named when several fail: one whose own fault it was (not kExitPeerFailure, not
//   stopped by this launcher) before the others, then the one seen ending first: its output
//   pipes close at its exit, before its peers can notice (and before it can be reaped), so
//   that order is the order of the exits, up to the resolution of one pass of the loop.
// - Signals reach the poll() loop through a self-pipe; the loop reads the ranks' pipes,
//   reaps children and enforces the grace period. No threads.
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"

namespace moetune::cli {

namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kTailLines = 40;  // hidden output kept per rank, shown when it fails

struct LaunchOptions {
  int nproc_per_node = 0;
  int master_port = 0;  // 0: a free port
  std::optional<double> timeout_s;
  double grace_period_s = 10.0;
  bool all_ranks = false;
  std::vector<std::string> command;  // the moetune subcommand and its arguments
};

void print_launch_usage() {
  std::printf(
      "usage: moetune launch --nproc-per-node N [options] -- <command> [args...]\n\n"
      "Runs N ranks of `moetune <command> [args...]` on this node (one per GPU; rank i uses\n"
      "cuda:i). If a rank fails, the others are stopped and launch exits non-zero.\n\n"
      "options:\n"
      "  --nproc-per-node N   ranks to start (required)\n"
      "  --master-port P      rendezvous port (default: a free one)\n"
      "  --timeout S          seconds any rank waits for the others (MOETUNE_DIST_TIMEOUT_S,\n"
      "                       default 300)\n"
      "  --grace-period S     seconds between SIGTERM and SIGKILL when stopping ranks (10)\n"
      "  --all-ranks          show every rank's output (default: rank 0's, and a failing\n"
      "                       rank's last lines)\n");
}

double parse_seconds(std::string_view option, const std::string& text) {
  char* stop = nullptr;
  double value = std::strtod(text.c_str(), &stop);
  if (text.empty() || *stop != '\0' || !(value >= 0) || value > 1e7)
    fail(option, ": '", text, "' is not a number of seconds");
  return value;
}

int parse_int(std::string_view option, const std::string& text, int low, int high) {
  char* stop = nullptr;
  long value = std::strtol(text.c_str(), &stop, 10);
  if (text.empty() || *stop != '\0' || value < low || value > high)
    fail(option, ": '", text, "' is not an integer in ", low, "..", high);
  return static_cast<int>(value);
}

// Returns nullopt for --help.
std::optional<LaunchOptions> parse_launch_options(int argc, char** argv) {
  LaunchOptions options;
  int i = 1;
  for (; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") {
      ++i;
      break;
    }
    if (arg == "-h" || arg == "--help") return std::nullopt;
    if (arg.rfind("--", 0) != 0) break;  // the subcommand starts here
    std::string value;
    const size_t equals = arg.find('=');
    const bool is_flag = arg == "--all-ranks";
    if (equals != std::string::npos) {
      value = arg.substr(equals + 1);
      arg = arg.substr(0, equals);
    } else if (!is_flag) {
      if (i + 1 >= argc) fail("option ", arg, " needs a value");
      value = argv[++i];
    }
    if (arg == "--nproc-per-node" || arg == "--nproc_per_node")
      options.nproc_per_node = parse_int(arg, value, 1, 4096);
    else if (arg == "--master-port" || arg == "--master_port")
      options.master_port = parse_int(arg, value, 1, 65535);
    else if (arg == "--timeout")
      options.timeout_s = parse_seconds(arg, value);
    else if (arg == "--grace-period")
      options.grace_period_s = parse_seconds(arg, value);
    else if (arg == "--all-ranks")
      options.all_ranks = true;
    else
      fail("unknown option ", arg, " (moetune launch --help lists them)");
  }
  for (; i < argc; ++i) options.command.emplace_back(argv[i]);
  if (options.nproc_per_node == 0) fail("--nproc-per-node N is required");
  if (options.command.empty())
    fail("no command to run: moetune launch --nproc-per-node N -- <command> [args...]");
  if (options.command[0] == "launch") fail("launch cannot launch itself");
  return options;
}

// A port no one listens on right now (the OS picks it; it is free again when we close).
int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) fail("cannot create a socket to find a free port: ", std::strerror(errno));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof(address);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    ::close(fd);
    fail("cannot find a free port: ", std::strerror(errno), " (pass --master-port)");
  }
  ::close(fd);
  return ntohs(address.sin_port);
}

std::string self_executable() {
  char path[4096];
  ssize_t length = ::readlink("/proc/self/exe", path, sizeof(path) - 1);
  if (length <= 0) fail("cannot find this program's path (/proc/self/exe)");
  return std::string(path, static_cast<size_t>(length));
}

// ---- signals through a self-pipe ---------------------------------------------------------

int g_signal_pipe_write = -1;  // written by the handler only (async-signal-safe)

void on_signal(int signal_number) {
  const int saved_errno = errno;
  const char byte = static_cast<char>(signal_number);
  [[maybe_unused]] ssize_t written = ::write(g_signal_pipe_write, &byte, 1);
  errno = saved_errno;
}

class SignalPipe {
 public:
  SignalPipe() {
    if (::pipe2(fds_, O_CLOEXEC | O_NONBLOCK) != 0)
      fail("cannot create a pipe: ", std::strerror(errno));
    g_signal_pipe_write = fds_[1];
    struct sigaction action {};
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    for (int signal_number : kSignals)
      ::sigaction(signal_number, &action, &saved_[index(signal_number)]);
  }
  ~SignalPipe() {
    for (int signal_number : kSignals)
      ::sigaction(signal_number, &saved_[index(signal_number)], nullptr);
    g_signal_pipe_write = -1;
    ::close(fds_[0]);
    ::close(fds_[1]);
  }
  int read_fd() const { return fds_[0]; }

 private:
  static constexpr int kSignals[] = {SIGCHLD, SIGINT, SIGTERM, SIGHUP};
  static int index(int signal_number) {
    for (int i = 0; i < 4; ++i)
      if (kSignals[i] == signal_number) return i;
    return 0;
  }
  int fds_[2] = {-1, -1};
  struct sigaction saved_[4]{};
};

// ---- the ranks ---------------------------------------------------------------------------------

struct Rank {
  int rank = 0;
  pid_t pid = -1;
  int fds[2] = {-1, -1};         // read ends of the child's stdout and stderr
  std::string partial[2];        // an unfinished last line per stream
  std::deque<std::string> tail;  // last lines not shown (for the failure report)
  bool running = false;
  int status = 0;
  int64_t ended_pass = -1;  // the loop pass that first saw it end (output closed or reaped)
  bool failed = false;      // failed on its own or because of a peer, outside an interrupt
  bool root_cause = false;  // failed, neither with kExitPeerFailure nor stopped by us
};

void signal_rank(const Rank& rank, int signal_number) {
  if (!rank.running) return;
  if (::kill(-rank.pid, signal_number) != 0) ::kill(rank.pid, signal_number);
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int signal_number = WTERMSIG(status);
    const char* name = ::strsignal(signal_number);
    return "was killed by signal " + std::to_string(signal_number) + " (" + (name ? name : "?") +
           ")";
  }
  return "stopped with wait status " + std::to_string(status);
}

class Launcher {
 public:
  explicit Launcher(LaunchOptions options) : options_(std::move(options)) {}

  int run() {
    const int port = options_.master_port ? options_.master_port : free_port();
    const std::string executable = self_executable();
    std::fflush(stdout);
    std::fflush(stderr);
    ranks_.resize(options_.nproc_per_node);
    for (int rank = 0; rank < options_.nproc_per_node; ++rank) start(rank, port, executable);
    loop();
    return report();
  }

 private:
  void start(int rank_index, int port, const std::string& executable) {
    Rank& rank = ranks_[rank_index];
    rank.rank = rank_index;
    int out_pipe[2], err_pipe[2];
    if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0)
      fail("cannot create pipes for rank ", rank_index, ": ", std::strerror(errno));
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) fail("cannot start rank ", rank_index, ": fork failed: ", std::strerror(errno));
    if (pid == 0) exec_child(rank_index, port, executable, out_pipe[1], err_pipe[1], parent);
    ::setpgid(pid, pid);  // also done by the child; whichever runs first wins the race
    ::close(out_pipe[1]);
    ::close(err_pipe[1]);
    rank.pid = pid;
    rank.fds[0] = out_pipe[0];
    rank.fds[1] = err_pipe[0];
    rank.running = true;
  }

  [[noreturn]] void exec_child(int rank, int port, const std::string& executable, int out_fd,
                               int err_fd, pid_t parent) {
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(1);  // the launcher died before prctl
    // A launcher started in the background of a script has SIGINT ignored, and ignored
    // signals survive exec: the ranks must still stop when the launcher passes one on.
    ::signal(SIGINT, SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    ::dup2(out_fd, STDOUT_FILENO);
    ::dup2(err_fd, STDERR_FILENO);
    const int n = options_.nproc_per_node;
    ::setenv("RANK", std::to_string(rank).c_str(), 1);
    ::setenv("WORLD_SIZE", std::to_string(n).c_str(), 1);
    ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
    ::setenv("LOCAL_WORLD_SIZE", std::to_string(n).c_str(), 1);
    ::setenv("MASTER_ADDR", "127.0.0.1", 1);
    ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
    ::setenv("MOETUNE_LAUNCH", "1", 1);
    if (options_.timeout_s)
      ::setenv("MOETUNE_DIST_TIMEOUT_S", std::to_string(*options_.timeout_s).c_str(), 1);
    ::setenv("NCCL_NVLS_ENABLE", "0", 0);  // NVLink multicast off unless asked for (see docs)
    std::vector<char*> arguments;
    arguments.push_back(const_cast<char*>(executable.c_str()));
    for (auto& argument : options_.command) arguments.push_back(argument.data());
    arguments.push_back(nullptr);
    ::execv(executable.c_str(), arguments.data());
    std::fprintf(stderr, "moetune launch: cannot run %s: %s\n", executable.c_str(),
                 std::strerror(errno));
    ::_exit(127);
  }

  bool shown(const Rank& rank) const { return options_.all_ranks || rank.rank == 0; }

  void emit_line(Rank& rank, int stream, const std::string& line) {
    if (!shown(rank)) {
      rank.tail.push_back(line);
      if (rank.tail.size() > kTailLines) rank.tail.pop_front();
      return;
    }
    FILE* out = stream == 0 ? stdout : stderr;
    std::fprintf(out, "[rank %d] %s\n", rank.rank, line.c_str());
    std::fflush(out);
  }

  // Reads what is available; closes the stream at EOF.
  void drain(Rank& rank, int stream) {
    char bytes[65536];
    ssize_t got = ::read(rank.fds[stream], bytes, sizeof(bytes));
    if (got < 0 && (errno == EINTR || errno == EAGAIN)) return;
    if (got <= 0) {
      if (!rank.partial[stream].empty()) emit_line(rank, stream, rank.partial[stream]);
      rank.partial[stream].clear();
      ::close(rank.fds[stream]);
      rank.fds[stream] = -1;
      if (rank.fds[0] < 0 && rank.fds[1] < 0 && rank.ended_pass < 0) rank.ended_pass = pass_;
      return;
    }
    std::string& partial = rank.partial[stream];
    partial.append(bytes, static_cast<size_t>(got));
    size_t start = 0;
    for (size_t newline; (newline = partial.find('\n', start)) != std::string::npos;
         start = newline + 1)
      emit_line(rank, stream, partial.substr(start, newline - start));
    partial.erase(0, start);
  }

  void reap() {
    int status = 0;
    pid_t pid;
    while ((pid = ::waitpid(-1, &status, WNOHANG)) > 0) {
      for (Rank& rank : ranks_) {
        if (rank.pid != pid || !rank.running) continue;
        rank.running = false;
        rank.status = status;
        if (rank.ended_pass < 0) rank.ended_pass = pass_;
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0) continue;
        // Failures after an interrupt we passed on are its consequence, unless one came first.
        if (interrupted_ && !any_failure_) continue;
        rank.failed = true;
        rank.root_cause = !(WIFEXITED(status) && WEXITSTATUS(status) == kExitPeerFailure) &&
                          !stopped_by_us(status);
        if (!any_failure_) {
          any_failure_ = true;
          std::fprintf(stderr, "moetune launch: rank %d (pid %d) %s; stopping the other ranks\n",
                       rank.rank, static_cast<int>(pid), describe_status(status).c_str());
          std::fflush(stderr);
          stop_all(SIGTERM);
        }
      }
    }
  }

  // The failed rank to name: a root cause before a rank that stopped because of another,
  // then the one seen ending first, then the lowest rank.
  const Rank* culprit() const {
    const Rank* best = nullptr;
    for (const Rank& rank : ranks_) {
      if (!rank.failed) continue;
      if (!best || (rank.root_cause != best->root_cause ? rank.root_cause
                                                        : rank.ended_pass < best->ended_pass))
        best = &rank;
    }
    return best;
  }

  // Killed by the SIGTERM/SIGKILL this launcher sends after a failure.
  bool stopped_by_us(int status) const {
    return kill_deadline_ && WIFSIGNALED(status) &&
           (WTERMSIG(status) == SIGTERM || WTERMSIG(status) == SIGKILL);
  }

  void stop_all(int signal_number) {
    for (const Rank& rank : ranks_) signal_rank(rank, signal_number);
    if (!kill_deadline_)
      kill_deadline_ = Clock::now() + std::chrono::milliseconds(
                                          static_cast<int64_t>(options_.grace_period_s * 1000));
  }

  void handle_signal(int signal_number) {
    if (signal_number == SIGCHLD) return reap();
    if (interrupted_) {  // a second Ctrl-C: no more waiting
      for (const Rank& rank : ranks_) signal_rank(rank, SIGKILL);
      return;
    }
    interrupted_ = signal_number;
    std::fprintf(stderr, "moetune launch: got signal %d (%s); passing it to the ranks\n",
                 signal_number, ::strsignal(signal_number));
    std::fflush(stderr);
    for (const Rank& rank : ranks_) signal_rank(rank, signal_number);
    if (!kill_deadline_)
      kill_deadline_ = Clock::now() + std::chrono::milliseconds(
                                          static_cast<int64_t>(options_.grace_period_s * 1000));
  }

  bool any_running() const {
    for (const Rank& rank : ranks_)
      if (rank.running) return true;
    return false;
  }

  void loop() {
    SignalPipe signals;
    reap();  // a child may have died before the handler was installed
    std::optional<Clock::time_point> drain_deadline;
    while (true) {
      const bool running = any_running();
      if (!running && !drain_deadline)  // grandchildren may hold the pipes open: 1 s more
        drain_deadline = Clock::now() + std::chrono::seconds(1);
      std::vector<pollfd> fds = {{signals.read_fd(), POLLIN, 0}};
      std::vector<std::pair<int, int>> owners = {{-1, -1}};
      for (int index = 0; index < static_cast<int>(ranks_.size()); ++index)
        for (int stream = 0; stream < 2; ++stream)
          if (ranks_[index].fds[stream] >= 0) {
            fds.push_back({ranks_[index].fds[stream], POLLIN, 0});
            owners.emplace_back(index, stream);
          }
      if (!running && fds.size() == 1) break;
      std::optional<Clock::time_point> wake = drain_deadline;
      if (kill_deadline_ && running && (!wake || *kill_deadline_ < *wake)) wake = kill_deadline_;
      int timeout_ms = 1000;
      if (wake) {
        auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(*wake - Clock::now()).count();
        timeout_ms = static_cast<int>(std::clamp<int64_t>(left, 0, 1000));
      }
      int ready = ::poll(fds.data(), fds.size(), timeout_ms);
      ++pass_;
      if (ready < 0 && errno != EINTR) fail("poll failed: ", std::strerror(errno));
      if (ready > 0) {
        if (fds[0].revents & POLLIN) {
          char received[64];
          ssize_t got = ::read(signals.read_fd(), received, sizeof(received));
          for (ssize_t i = 0; i < got; ++i) handle_signal(received[i]);
        }
        for (size_t i = 1; i < fds.size(); ++i)
          if (fds[i].revents & (POLLIN | POLLHUP | POLLERR))
            drain(ranks_[owners[i].first], owners[i].second);
      }
      reap();
      if (kill_deadline_ && Clock::now() >= *kill_deadline_ && any_running()) {
        for (const Rank& rank : ranks_) {
          if (!rank.running) continue;
          std::fprintf(stderr, "moetune launch: rank %d did not stop within %g s; killing it\n",
                       rank.rank, options_.grace_period_s);
          signal_rank(rank, SIGKILL);
        }
        kill_deadline_ = Clock::now() + std::chrono::hours(24);  // once
      }
      if (drain_deadline && Clock::now() >= *drain_deadline) break;
    }
    for (Rank& rank : ranks_)
      for (int& fd : rank.fds)
        if (fd >= 0) ::close(fd), fd = -1;
  }

  int report() {
    if (const Rank* failed = culprit()) {
      const Rank& rank = *failed;
      std::fprintf(stderr, "moetune launch: failed: rank %d %s\n", rank.rank,
                   describe_status(rank.status).c_str());
      if (!rank.tail.empty()) {
        std::fprintf(stderr, "moetune launch: last output of rank %d:\n", rank.rank);
        for (const auto& line : rank.tail)
          std::fprintf(stderr, "[rank %d] %s\n", rank.rank, line.c_str());
      }
      std::fflush(stderr);
      if (WIFEXITED(rank.status)) return WEXITSTATUS(rank.status);
      return 128 + WTERMSIG(rank.status);
    }
    if (interrupted_) {
      std::fprintf(stderr, "moetune launch: interrupted (signal %d)\n", interrupted_);
      return 128 + interrupted_;
    }
    return 0;
  }

  LaunchOptions options_;
  std::vector<Rank> ranks_;
  bool any_failure_ = false;
  int64_t pass_ = 0;  // passes of the poll loop so far
  int interrupted_ = 0;
  std::optional<Clock::time_point> kill_deadline_;
};

}  // namespace

int run_launch(int argc, char** argv) {
  auto options = parse_launch_options(argc, argv);
  if (!options) {
    print_launch_usage();
    return 0;
  }
  return Launcher(std::move(*options)).run();
}

}  // namespace moetune::cli
