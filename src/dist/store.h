// A small TCP key-value store for rendezvous, in the manner of torch.distributed's
// TCPStore: rank 0 serves it on MASTER_PORT (a thread of its process), every rank
// (rank 0 too) connects as a client. Used to exchange the ncclUniqueId, for barriers, and
// to notice dead ranks so that the others stop with a clear message instead of hanging.
//
// Tricks:
// - A blocking get carries its deadline to the server, which answers "timed out" itself;
//   the connection stays usable, so a barrier that times out can still ask which ranks
//   never arrived and name them.
// - Every client says who it is (rank, role) on connecting and goodbye on closing. A
//   connection that closes without goodbye means its process died: the server records the
//   rank as dead and fails every pending and later wait with that rank's name.
// - A Watchdog thread per rank pings the server on its own connection; a rank whose pings
//   stop for the heartbeat timeout (hung, SIGSTOPped, node gone without a TCP reset) is
//   declared dead too, and every Watchdog hears of dead ranks within one interval.
// Every blocking call is bounded by the timeout (MOETUNE_DIST_TIMEOUT_S, default 300 s).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "dist/bootstrap.h"

namespace moetune::dist {

// The server side. Runs one thread that owns all state (no locks): a poll() loop over the
// listening socket, the client connections and a wake-up pipe.
class StoreServer {
 public:
  // port 0 lets the system pick one (see port()). heartbeat_timeout_s applies to Watchdog
  // connections only. Fails with a clear message when the port cannot be bound.
  StoreServer(int port, int world_size, double heartbeat_timeout_s);
  // Waits (up to linger_timeout_s) until every client has disconnected, then stops: rank 0
  // must not vanish while other ranks still finish their last barrier.
  ~StoreServer();
  StoreServer(const StoreServer&) = delete;
  StoreServer& operator=(const StoreServer&) = delete;

  int port() const { return port_; }
  void set_linger_timeout(double seconds) { linger_timeout_s_ = seconds; }

 private:
  void serve();

  int listen_fd_ = -1;
  int wake_pipe_[2] = {-1, -1};
  int port_ = 0;
  int world_size_ = 1;
  double heartbeat_timeout_s_ = 60.0;
  std::atomic<double> linger_timeout_s_{300.0};
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

// One client connection. Thread-safe (one request at a time); a Watchdog opens its own.
class Store {
 public:
  enum class Role { Main, Watchdog };
  // Connects to host:port, retrying until timeout_s (the server may not be up yet).
  Store(const std::string& host, int port, int rank, int world_size, double timeout_s,
        Role role = Role::Main);
  ~Store();  // says goodbye and closes
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  double timeout_s() const { return timeout_s_; }

  void set(const std::string& key, std::string_view value);
  // Waits until the key is set (bounded by the timeout). Fails, naming the rank, when a
  // rank died meanwhile.
  std::string get(const std::string& key);
  std::optional<std::string> try_get(const std::string& key);  // never waits
  int64_t add(const std::string& key, int64_t delta);          // atomic; returns the new value
  void erase(const std::string& key);
  // Returns when every rank has called barrier(name) the same number of times. On timeout
  // the error names the ranks that did not arrive.
  void barrier(const std::string& name);
  // Ranks the server has declared dead, with the reason; empty when all are well.
  std::string dead_ranks();

 private:
  struct Reply;
  Reply request(uint8_t op, const std::vector<std::string>& fields, double reply_timeout_s);
  std::string where() const;

  std::string host_;
  int port_ = 0;
  int rank_ = 0;
  int world_size_ = 1;
  double timeout_s_ = 300.0;
  int fd_ = -1;
  std::mutex mutex_;
  std::map<std::string, int64_t> barrier_generation_;
};

// Pings the store every interval on its own connection. When the server reports a dead
// rank, or the server itself (rank 0) is gone, calls on_failure(message) once from its
// thread; the default prints the message to stderr and ends the process with exit code 1
// (a rank blocked inside a GPU collective cannot be woken any other way).
class Watchdog {
 public:
  using FailureHandler = std::function<void(const std::string& message)>;
  Watchdog(const std::string& host, int port, int rank, int world_size, double timeout_s,
           double interval_s = 1.0, FailureHandler on_failure = {});
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  void run();

  std::unique_ptr<Store> store_;
  int rank_ = 0;
  double interval_s_ = 1.0;
  FailureHandler on_failure_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::thread thread_;
};

// The rendezvous of one process: the server (rank 0 only), this rank's store client and
// its watchdog. Members are destroyed in reverse order: the watchdog and the client say
// goodbye before rank 0's server stops.
struct Rendezvous {
  ProcessInfo info;
  double timeout_s = 300.0;
  std::unique_ptr<StoreServer> server;
  std::unique_ptr<Store> store;
  std::unique_ptr<Watchdog> watchdog;
};

// Starts the server on rank 0, connects every rank, and starts a watchdog when
// `with_watchdog` (heartbeat timeout = timeout_s). For a single process, store and server
// still work (in-process, on a free port) so that code need not special-case world size 1.
Rendezvous rendezvous(const ProcessInfo& info, double timeout_s, bool with_watchdog = true,
                      Watchdog::FailureHandler on_failure = {});

}  // namespace moetune::dist
