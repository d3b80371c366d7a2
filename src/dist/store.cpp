// The TCP store (see store.h). Wire format, both directions: a frame is a u32 byte count
// (little endian) then the payload: u8 code, u32 field count, and per field a u32 length
// and its bytes. Frames over 256 MiB or malformed payloads close the connection (the server
// never trusts what arrives). The server is one thread and one poll() loop; the client is
// blocking sockets with poll() deadlines.
#include "dist/store.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <set>

#include "core/error.h"

namespace moetune::dist {

namespace {

using Clock = std::chrono::steady_clock;
constexpr uint32_t kMaxFrameBytes = 256u << 20;

// Request codes (client -> server) and reply codes (server -> client).
enum : uint8_t {
  kHello = 1,
  kSet,
  kGet,
  kCheck,
  kAdd,
  kErase,
  kPing,
  kBye,
  kOk = 100,
  kValue,
  kMissing,
  kTimeout,
  kFailure,
};

struct Message {
  uint8_t code = 0;
  std::vector<std::string> fields;
};

void append_u32(std::string& out, uint32_t value) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

uint32_t read_u32(const char* bytes) {
  uint32_t value = 0;
  for (int i = 0; i < 4; ++i)
    value |= static_cast<uint32_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  return value;
}

std::string encode(const Message& message) {
  std::string payload;
  payload.push_back(static_cast<char>(message.code));
  append_u32(payload, static_cast<uint32_t>(message.fields.size()));
  for (const auto& field : message.fields) {
    append_u32(payload, static_cast<uint32_t>(field.size()));
    payload += field;
  }
  std::string frame;
  append_u32(frame, static_cast<uint32_t>(payload.size()));
  return frame + payload;
}

// Decodes one payload; nullopt when it is malformed.
std::optional<Message> decode(std::string_view payload) {
  if (payload.size() < 5) return std::nullopt;
  Message message;
  message.code = static_cast<uint8_t>(payload[0]);
  uint32_t count = read_u32(payload.data() + 1);
  size_t position = 5;
  if (count > payload.size()) return std::nullopt;
  for (uint32_t i = 0; i < count; ++i) {
    if (payload.size() - position < 4) return std::nullopt;
    uint32_t length = read_u32(payload.data() + position);
    position += 4;
    if (payload.size() - position < length) return std::nullopt;
    message.fields.emplace_back(payload.substr(position, length));
    position += length;
  }
  if (position != payload.size()) return std::nullopt;
  return message;
}

// If `buffer` holds a whole frame, removes it and returns its payload. Sets `bad` for a
// frame over the size limit.
std::optional<std::string> take_frame(std::string& buffer, bool& bad) {
  if (buffer.size() < 4) return std::nullopt;
  uint32_t length = read_u32(buffer.data());
  if (length > kMaxFrameBytes) {
    bad = true;
    return std::nullopt;
  }
  if (buffer.size() - 4 < length) return std::nullopt;
  std::string payload = buffer.substr(4, length);
  buffer.erase(0, 4 + static_cast<size_t>(length));
  return payload;
}

bool send_all(int fd, std::string_view bytes) {
  while (!bytes.empty()) {
    ssize_t sent = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (sent < 0 && errno == EINTR) continue;
    if (sent <= 0) return false;
    bytes.remove_prefix(static_cast<size_t>(sent));
  }
  return true;
}

int milliseconds_until(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return static_cast<int>(std::clamp<int64_t>(left.count(), 0, 1 << 30));
}

Clock::time_point after_seconds(double seconds) {
  return Clock::now() + std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6));
}

std::string format_seconds(double seconds) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g s", seconds);
  return text;
}

// ---- server state ------------------------------------------------------------------------

struct Connection {
  std::string input;
  int rank = -1;  // -1 until HELLO
  bool watchdog = false;
  bool said_goodbye = false;
  Clock::time_point last_seen = Clock::now();
};

struct Waiter {
  int fd;
  std::string key;
  Clock::time_point deadline;
};

class ServerState {
 public:
  ServerState(int world_size, double heartbeat_timeout_s)
      : world_size_(world_size), heartbeat_timeout_s_(heartbeat_timeout_s) {}

  std::map<int, Connection> connections;

  // Handles one request; returns false when the connection must be closed.
  bool handle(int fd, const Message& request) {
    Connection& connection = connections[fd];
    connection.last_seen = Clock::now();
    const auto& f = request.fields;
    auto reply = [&](uint8_t code, std::vector<std::string> fields = {}) {
      return send_all(fd, encode({code, std::move(fields)}));
    };
    if (connection.rank < 0 && request.code != kHello) return false;
    switch (request.code) {
      case kHello: {
        if (f.size() != 3) return false;
        int rank = std::atoi(f[0].c_str());
        int world_size = std::atoi(f[1].c_str());
        if (world_size != world_size_)
          return reply(kFailure, {"rank " + f[0] + " says WORLD_SIZE=" + f[1] +
                                  " but the store on rank 0 has WORLD_SIZE=" +
                                  std::to_string(world_size_)}) &&
                 false;
        if (rank < 0 || rank >= world_size_) return false;
        bool watchdog = f[2] == "watchdog";
        for (const auto& [other_fd, other] : connections) {
          if (other_fd != fd && other.rank == rank && other.watchdog == watchdog)
            return reply(kFailure, {"rank " + f[0] +
                                    " connected to the store twice (two processes with the "
                                    "same RANK?)"}) &&
                   false;
        }
        connection.rank = rank;
        connection.watchdog = watchdog;
        return reply(kOk);
      }
      case kSet: {
        if (f.size() != 2) return false;
        data_[f[0]] = f[1];
        wake_waiters(f[0]);
        return reply(kOk);
      }
      case kGet: {
        if (f.size() != 2) return false;
        auto found = data_.find(f[0]);
        if (found != data_.end()) return reply(kValue, {found->second});
        if (!dead_.empty()) return reply(kFailure, {dead_description()});
        // Clamped: the number comes off the network (NaN fails the comparison: 0).
        const double timeout_ms = std::atof(f[1].c_str());
        const double seconds = timeout_ms > 0 ? std::min(timeout_ms / 1000.0, 1e8) : 0.0;
        waiters_.push_back({fd, f[0], after_seconds(seconds)});
        return true;
      }
      case kCheck: {
        if (f.size() != 1) return false;
        auto found = data_.find(f[0]);
        if (found == data_.end()) return reply(kMissing);
        return reply(kValue, {found->second});
      }
      case kAdd: {
        if (f.size() != 2) return false;
        int64_t value = std::atoll(data_[f[0]].c_str()) + std::atoll(f[1].c_str());
        data_[f[0]] = std::to_string(value);
        wake_waiters(f[0]);
        return reply(kValue, {data_[f[0]]});
      }
      case kErase:
        if (f.size() != 1) return false;
        data_.erase(f[0]);
        return reply(kOk);
      case kPing:
        return reply(kValue, {dead_description()});
      case kBye:
        connection.said_goodbye = true;
        return reply(kOk);
      default:
        return false;
    }
  }

  // A connection went away: a rank that did not say goodbye is dead.
  void closed(int fd) {
    auto found = connections.find(fd);
    if (found == connections.end()) return;
    const Connection& connection = found->second;
    if (connection.rank >= 0 && !connection.said_goodbye && !dead_.count(connection.rank))
      declare_dead(connection.rank, "rank " + std::to_string(connection.rank) +
                                        " closed its store connection without finishing "
                                        "(its process died or was killed)");
    std::erase_if(waiters_, [fd](const Waiter& waiter) { return waiter.fd == fd; });
    connections.erase(found);
  }

  // Expires waits and heartbeats; returns the fds of connections to close.
  std::vector<int> tick() {
    auto now = Clock::now();
    std::vector<int> to_close;
    for (auto& [fd, connection] : connections) {
      if (!connection.watchdog || connection.said_goodbye || dead_.count(connection.rank)) continue;
      double silent_s = std::chrono::duration<double>(now - connection.last_seen).count();
      if (silent_s > heartbeat_timeout_s_) {
        declare_dead(connection.rank, "rank " + std::to_string(connection.rank) +
                                          " sent no heartbeat for " +
                                          format_seconds(heartbeat_timeout_s_) +
                                          " (hung, stopped, or its node is unreachable)");
        to_close.push_back(fd);
      }
    }
    std::erase_if(waiters_, [&](const Waiter& waiter) {
      if (waiter.deadline > now) return false;
      send_all(waiter.fd, encode({kTimeout, {}}));
      return true;
    });
    return to_close;
  }

  // Milliseconds until the next deadline, at most 500 (heartbeats are checked that often).
  int poll_timeout_ms() const {
    int timeout = 500;
    for (const auto& waiter : waiters_)
      timeout = std::min(timeout, milliseconds_until(waiter.deadline));
    return timeout;
  }

 private:
  void wake_waiters(const std::string& key) {
    const std::string& value = data_[key];
    std::erase_if(waiters_, [&](const Waiter& waiter) {
      if (waiter.key != key) return false;
      send_all(waiter.fd, encode({kValue, {value}}));
      return true;
    });
  }

  void declare_dead(int rank, std::string reason) {
    dead_[rank] = std::move(reason);
    const std::string message = dead_description();
    for (const auto& waiter : waiters_) send_all(waiter.fd, encode({kFailure, {message}}));
    waiters_.clear();
  }

  std::string dead_description() const {
    std::string text;
    for (const auto& [rank, reason] : dead_) text += (text.empty() ? "" : "; ") + reason;
    return text;
  }

  int world_size_;
  double heartbeat_timeout_s_;
  std::map<std::string, std::string> data_;
  std::vector<Waiter> waiters_;
  std::map<int, std::string> dead_;
};

std::string errno_text() { return std::strerror(errno); }

}  // namespace

// ---- StoreServer ------------------------------------------------------------------------

StoreServer::StoreServer(int port, int world_size, double heartbeat_timeout_s)
    : world_size_(world_size), heartbeat_timeout_s_(heartbeat_timeout_s) {
  // Dual-stack IPv6 when the system has it, else IPv4; all interfaces (multi-node).
  listen_fd_ = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int yes = 1, no = 0;
  int bound = -1;
  if (listen_fd_ >= 0) {
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    ::setsockopt(listen_fd_, IPPROTO_IPV6, IPV6_V6ONLY, &no, sizeof(no));
    sockaddr_in6 address{};
    address.sin6_family = AF_INET6;
    address.sin6_addr = in6addr_any;
    address.sin6_port = htons(static_cast<uint16_t>(port));
    bound = ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address));
    if (bound != 0 && errno != EADDRINUSE && errno != EACCES) {
      ::close(listen_fd_);
      listen_fd_ = -1;
    }
  }
  if (listen_fd_ < 0) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd_ < 0) fail("cannot create the store's socket: ", errno_text());
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_ANY);
    address.sin_port = htons(static_cast<uint16_t>(port));
    bound = ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  }
  if (bound != 0 || ::listen(listen_fd_, 1024) != 0) {
    std::string reason = errno_text();
    ::close(listen_fd_);
    fail("rank 0 cannot serve the rendezvous store on port ", port, ": ", reason,
         " (another job on this node? choose another MASTER_PORT)");
  }
  sockaddr_storage actual{};
  socklen_t length = sizeof(actual);
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&actual), &length);
  port_ = actual.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&actual)->sin6_port)
                                       : ntohs(reinterpret_cast<sockaddr_in*>(&actual)->sin_port);
  if (::pipe2(wake_pipe_, O_CLOEXEC) != 0) {
    ::close(listen_fd_);
    fail("cannot create the store's wake-up pipe: ", errno_text());
  }
  thread_ = std::thread([this] { serve(); });
}

StoreServer::~StoreServer() {
  stopping_ = true;
  char byte = 0;
  [[maybe_unused]] ssize_t written = ::write(wake_pipe_[1], &byte, 1);
  thread_.join();
  ::close(listen_fd_);
  ::close(wake_pipe_[0]);
  ::close(wake_pipe_[1]);
}

void StoreServer::serve() {
  ServerState state(world_size_, heartbeat_timeout_s_);
  std::optional<Clock::time_point> linger_deadline;
  auto close_connection = [&](int fd) {
    state.closed(fd);
    ::close(fd);
  };
  while (true) {
    if (stopping_) {
      if (!linger_deadline) linger_deadline = after_seconds(linger_timeout_s_);
      if (state.connections.empty() || Clock::now() >= *linger_deadline) break;
    }
    std::vector<pollfd> fds = {{wake_pipe_[0], POLLIN, 0}, {listen_fd_, POLLIN, 0}};
    for (const auto& [fd, connection] : state.connections) fds.push_back({fd, POLLIN, 0});
    int ready = ::poll(fds.data(), fds.size(), state.poll_timeout_ms());
    if (ready < 0 && errno != EINTR) break;
    if (ready > 0) {
      if (fds[0].revents & POLLIN) {
        char bytes[16];
        [[maybe_unused]] ssize_t got = ::read(wake_pipe_[0], bytes, sizeof(bytes));
      }
      if (fds[1].revents & POLLIN) {
        int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd >= 0) {
          int yes = 1;
          ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof(yes));
          state.connections[fd] = Connection{};
        }
      }
      for (size_t i = 2; i < fds.size(); ++i) {
        if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        const int fd = fds[i].fd;
        char bytes[65536];
        ssize_t got = ::recv(fd, bytes, sizeof(bytes), 0);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
          close_connection(fd);
          continue;
        }
        Connection& connection = state.connections[fd];
        connection.input.append(bytes, static_cast<size_t>(got));
        bool keep = true;
        bool bad = false;
        while (keep) {
          auto payload = take_frame(state.connections[fd].input, bad);
          if (!payload) break;
          auto request = decode(*payload);
          keep = request && state.handle(fd, *request);
        }
        if (!keep || bad) close_connection(fd);
      }
    }
    for (int fd : state.tick()) close_connection(fd);
  }
  for (const auto& [fd, connection] : state.connections) ::close(fd);
}

// ---- Store (client) ---------------------------------------------------------------------

struct Store::Reply {
  uint8_t code = 0;
  std::vector<std::string> fields;
};

namespace {

// One attempt to connect to any address of host:port; returns the fd or -1 (errno set).
int try_connect(const std::string& host, int port, std::string& error) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* addresses = nullptr;
  int status = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &addresses);
  if (status != 0) {
    error = std::string("cannot resolve host: ") + ::gai_strerror(status);
    return -1;
  }
  int fd = -1;
  for (addrinfo* address = addresses; address != nullptr; address = address->ai_next) {
    fd = ::socket(address->ai_family, address->ai_socktype | SOCK_CLOEXEC, address->ai_protocol);
    if (fd < 0) continue;
    if (::connect(fd, address->ai_addr, address->ai_addrlen) == 0) break;
    error = errno_text();
    ::close(fd);
    fd = -1;
  }
  ::freeaddrinfo(addresses);
  if (fd >= 0) {
    int yes = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof(yes));
  }
  return fd;
}

}  // namespace

Store::Store(const std::string& host, int port, int rank, int world_size, double timeout_s,
             Role role)
    : host_(host), port_(port), rank_(rank), world_size_(world_size), timeout_s_(timeout_s) {
  const auto deadline = after_seconds(timeout_s);
  std::string error;
  int pause_ms = 20;
  while (true) {
    fd_ = try_connect(host, port, error);
    if (fd_ >= 0) break;
    if (Clock::now() >= deadline)
      fail("rank ", rank, " could not connect to the rendezvous store at ", where(), " within ",
           format_seconds(timeout_s), " (last error: ", error,
           "); is rank 0 running, and are MASTER_ADDR/MASTER_PORT right?");
    std::this_thread::sleep_for(
        std::chrono::milliseconds(std::min(pause_ms, milliseconds_until(deadline))));
    pause_ms = std::min(pause_ms * 2, 500);
  }
  try {
    Reply reply = request(kHello,
                          {std::to_string(rank), std::to_string(world_size),
                           role == Role::Watchdog ? "watchdog" : "main"},
                          timeout_s);
    if (reply.code != kOk) fail("rank ", rank, " was refused by the store at ", where());
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

Store::~Store() {
  try {
    request(kBye, {}, std::min(timeout_s_, 10.0));
  } catch (const std::exception&) {
    // The server may be gone already; nothing to tell it then.
  }
  ::close(fd_);
}

std::string Store::where() const { return host_ + ":" + std::to_string(port_); }

Store::Reply Store::request(uint8_t op, const std::vector<std::string>& fields,
                            double reply_timeout_s) {
  if (fd_ < 0) fail("the store connection of rank ", rank_, " is closed after an earlier error");
  auto lost = [&](const char* what) {
    ::close(fd_);
    fd_ = -1;
    throw PeerFailure(detail::concat("rank ", rank_, " lost the rendezvous store at ", where(),
                                     " (", what, "): rank 0, which serves it, has probably died"));
  };
  if (!send_all(fd_, encode({op, fields}))) lost("send failed");
  const auto deadline = after_seconds(reply_timeout_s);
  std::string buffer;
  while (true) {
    bool bad = false;
    if (auto payload = take_frame(buffer, bad)) {
      auto message = decode(*payload);
      if (!message) lost("malformed reply");
      if (message->code == kFailure)
        throw PeerFailure(message->fields.empty() ? std::string("store failure")
                                                  : message->fields[0]);
      return {message->code, std::move(message->fields)};
    }
    if (bad) lost("oversized reply");
    pollfd entry{fd_, POLLIN, 0};
    int ready = ::poll(&entry, 1, milliseconds_until(deadline));
    if (ready < 0 && errno == EINTR) continue;
    if (ready == 0) {
      ::close(fd_);
      fd_ = -1;
      fail("rank ", rank_, ": the rendezvous store at ", where(), " did not answer within ",
           format_seconds(reply_timeout_s), " (rank 0 hung?)");
    }
    char bytes[65536];
    ssize_t got = ::recv(fd_, bytes, sizeof(bytes), 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) lost(got == 0 ? "connection closed" : "receive failed");
    buffer.append(bytes, static_cast<size_t>(got));
  }
}

void Store::set(const std::string& key, std::string_view value) {
  std::lock_guard lock(mutex_);
  request(kSet, {key, std::string(value)}, timeout_s_);
}

std::string Store::get(const std::string& key) {
  std::lock_guard lock(mutex_);
  // The server expires the wait; the client waits a little longer for that answer.
  Reply reply = request(kGet, {key, std::to_string(timeout_s_ * 1000.0)}, timeout_s_ + 10.0);
  if (reply.code == kTimeout)
    fail("rank ", rank_, " timed out after ", format_seconds(timeout_s_), " waiting for key '", key,
         "' in the rendezvous store (MOETUNE_DIST_TIMEOUT_S sets the limit)");
  return reply.fields.at(0);
}

std::optional<std::string> Store::try_get(const std::string& key) {
  std::lock_guard lock(mutex_);
  Reply reply = request(kCheck, {key}, timeout_s_);
  if (reply.code == kMissing) return std::nullopt;
  return reply.fields.at(0);
}

int64_t Store::add(const std::string& key, int64_t delta) {
  std::lock_guard lock(mutex_);
  Reply reply = request(kAdd, {key, std::to_string(delta)}, timeout_s_);
  return std::atoll(reply.fields.at(0).c_str());
}

void Store::erase(const std::string& key) {
  std::lock_guard lock(mutex_);
  request(kErase, {key}, timeout_s_);
}

std::string Store::dead_ranks() {
  std::lock_guard lock(mutex_);
  return request(kPing, {}, timeout_s_).fields.at(0);
}

void Store::barrier(const std::string& name) {
  const int64_t generation = barrier_generation_[name]++;
  const std::string prefix = "barrier/" + name + "/" + std::to_string(generation);
  set(prefix + "/arrived/" + std::to_string(rank_), "1");
  if (add(prefix + "/count", 1) == world_size_) set(prefix + "/done", "1");
  Reply reply;
  {
    std::lock_guard lock(mutex_);
    try {
      reply =
          request(kGet, {prefix + "/done", std::to_string(timeout_s_ * 1000.0)}, timeout_s_ + 10.0);
    } catch (const PeerFailure& error) {  // keeps its type: the process exits with 75 for it
      throw PeerFailure(detail::concat("barrier '", name, "' on rank ", rank_, ": ", error.what()));
    } catch (const Error& error) {
      fail("barrier '", name, "' on rank ", rank_, ": ", error.what());
    }
  }
  if (reply.code != kTimeout) return;
  std::string missing;
  int missing_count = 0;
  for (int rank = 0; rank < world_size_; ++rank) {
    if (try_get(prefix + "/arrived/" + std::to_string(rank))) continue;
    missing += (missing.empty() ? "" : ", ") + std::to_string(rank);
    ++missing_count;
  }
  fail("barrier '", name, "' timed out after ", format_seconds(timeout_s_), " on rank ", rank_,
       ": ", missing_count == 1 ? "rank " : "ranks ", missing, " of ", world_size_,
       " did not arrive (MOETUNE_DIST_TIMEOUT_S sets the limit)");
}

// ---- Watchdog -----------------------------------------------------------------------------

Watchdog::Watchdog(const std::string& host, int port, int rank, int world_size, double timeout_s,
                   double interval_s, FailureHandler on_failure)
    : rank_(rank), interval_s_(interval_s), on_failure_(std::move(on_failure)) {
  store_ = std::make_unique<Store>(host, port, rank, world_size, timeout_s, Store::Role::Watchdog);
  if (!on_failure_) {
    on_failure_ = [](const std::string& message) {
      std::fprintf(stderr, "moetune: distributed job failed: %s\n", message.c_str());
      std::fflush(stderr);
      std::_Exit(kExitPeerFailure);
    };
  }
  thread_ = std::thread([this] { run(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void Watchdog::run() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    std::string problem;
    lock.unlock();
    try {
      problem = store_->dead_ranks();
    } catch (const Error& error) {
      problem = error.what();
    }
    lock.lock();
    if (stopping_) break;
    if (!problem.empty()) {
      lock.unlock();
      on_failure_("rank " + std::to_string(rank_) + " stops: " + problem);
      return;
    }
    wake_.wait_for(lock, std::chrono::microseconds(static_cast<int64_t>(interval_s_ * 1e6)),
                   [this] { return stopping_; });
  }
}

// ---- rendezvous ---------------------------------------------------------------------------

Rendezvous rendezvous(const ProcessInfo& info, double timeout_s, bool with_watchdog,
                      Watchdog::FailureHandler on_failure) {
  Rendezvous result;
  result.info = info;
  result.timeout_s = timeout_s;
  std::string host = info.master_addr.empty() ? "127.0.0.1" : info.master_addr;
  int port = info.master_port;
  if (info.rank == 0) {
    result.server =
        std::make_unique<StoreServer>(info.world_size > 1 ? port : 0, info.world_size, timeout_s);
    result.server->set_linger_timeout(timeout_s);
    port = result.server->port();
    if (info.world_size == 1) host = "127.0.0.1";
  }
  result.store = std::make_unique<Store>(host, port, info.rank, info.world_size, timeout_s);
  if (with_watchdog)
    result.watchdog = std::make_unique<Watchdog>(host, port, info.rank, info.world_size, timeout_s,
                                                 1.0, std::move(on_failure));
  return result;
}

}  // namespace moetune::dist
