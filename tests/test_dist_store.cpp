// The rendezvous store: set/get/add/barrier between threads (each with its own TCP
// connection, as separate processes would have), timeouts that name the missing ranks,
// dead ranks (a real process that exits without goodbye: the barrier throws PeerFailure; a
// watchdog whose heartbeat stops), a lost server, refused connections and hostile bytes.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "core/error.h"
#include "dist/store.h"
#include "test_util.h"

namespace moetune::dist {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Runs body(rank) on world_size threads and rethrows the first failure.
template <typename Body>
void on_ranks(int world_size, Body body) {
  std::vector<std::thread> threads;
  std::vector<std::string> errors(world_size);
  for (int rank = 0; rank < world_size; ++rank)
    threads.emplace_back([&, rank] {
      try {
        body(rank);
      } catch (const std::exception& error) {
        errors[rank] = error.what();
      }
    });
  for (auto& thread : threads) thread.join();
  for (int rank = 0; rank < world_size; ++rank) EXPECT_EQ(errors[rank], "") << "rank " << rank;
}

std::string error_of(const std::function<void()>& body) {
  try {
    body();
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

TEST(DistStore, SetGetAddBarrierAcrossThreads) {
  constexpr int kWorld = 4;
  StoreServer server(0, kWorld, 30.0);
  on_ranks(kWorld, [&](int rank) {
    Store store("127.0.0.1", server.port(), rank, kWorld, 10.0);
    // Rank r publishes a value; everyone reads everyone's (get waits for late writers).
    store.set("value/" + std::to_string(rank), std::string(rank + 1, 'x'));
    for (int peer = 0; peer < kWorld; ++peer)
      if (store.get("value/" + std::to_string(peer)) != std::string(peer + 1, 'x'))
        fail("wrong value from rank ", peer);
    store.add("counter", rank + 1);
    store.barrier("after-add");
    if (store.add("counter", 0) != 1 + 2 + 3 + 4) fail("counter is not the sum");
    for (int round = 0; round < 5; ++round) store.barrier("loop");
    if (store.try_get("missing")) fail("try_get found a key nobody set");
    if (!store.dead_ranks().empty()) fail("a rank is reported dead");
    // Binary values (an ncclUniqueId is 128 arbitrary bytes).
    std::string binary(128, '\0');
    for (int i = 0; i < 128; ++i) binary[i] = static_cast<char>(i * 37 + rank);
    store.set("binary/" + std::to_string(rank), binary);
    if (store.get("binary/" + std::to_string(rank)) != binary) fail("binary value changed");
  });
}

TEST(DistStore, BarrierTimeoutNamesMissingRanks) {
  StoreServer server(0, 4, 30.0);
  std::vector<std::string> messages(2);
  const auto start = Clock::now();
  on_ranks(2, [&](int rank) {  // ranks 2 and 3 never come
    Store store("127.0.0.1", server.port(), rank, 4, 0.5);
    messages[rank] = error_of([&] { store.barrier("start"); });
  });
  EXPECT_LT(seconds_since(start), 5.0);
  for (const auto& message : messages) {
    EXPECT_NE(message.find("ranks 2, 3 of 4 did not arrive"), std::string::npos) << message;
    EXPECT_NE(message.find("barrier 'start' timed out"), std::string::npos) << message;
  }
}

TEST(DistStore, GetTimesOutAndConnectionStaysUsable) {
  StoreServer server(0, 1, 30.0);
  Store store("127.0.0.1", server.port(), 0, 1, 0.3);
  std::string message = error_of([&] { store.get("never"); });
  EXPECT_NE(message.find("waiting for key 'never'"), std::string::npos) << message;
  store.set("after", "ok");
  EXPECT_EQ(store.get("after"), "ok");
}

TEST(DistStore, ConnectFailsClearlyWithinTheTimeout) {
  int port = 0;
  {
    StoreServer server(0, 1, 1.0);
    port = server.port();
  }
  const auto start = Clock::now();
  std::string message = error_of([&] { Store store("127.0.0.1", port, 1, 2, 0.4); });
  EXPECT_NE(message.find("could not connect to the rendezvous store"), std::string::npos)
      << message;
  EXPECT_LT(seconds_since(start), 3.0);
}

TEST(DistStore, DuplicateRankAndWrongWorldSizeAreRefused) {
  StoreServer server(0, 2, 30.0);
  Store first("127.0.0.1", server.port(), 1, 2, 5.0);
  std::string message = error_of([&] { Store again("127.0.0.1", server.port(), 1, 2, 5.0); });
  EXPECT_NE(message.find("twice"), std::string::npos) << message;
  message = error_of([&] { Store other("127.0.0.1", server.port(), 0, 3, 5.0); });
  EXPECT_NE(message.find("WORLD_SIZE=3"), std::string::npos) << message;
}

TEST(DistStore, ProcessThatDiesWithoutGoodbyeIsReported) {
  // Rank 1 is a real process (moetune dist-selftest) that joins the store and exits.
  StoreServer server(0, 2, 30.0);
  Store store("127.0.0.1", server.port(), 0, 2, 20.0);
  std::thread rank1([&] {
    testing::run_command("RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=" +
                         std::to_string(server.port()) +
                         " MOETUNE_SELFTEST_FAIL_RANK=1 MOETUNE_SELFTEST_FAIL=exit " +
                         testing::moetune_binary().string() + " dist-selftest");
  });
  const auto start = Clock::now();
  std::string message;
  bool peer_failure = false;  // a PeerFailure (exit status 75), not a failure of this rank
  try {
    store.barrier("start");
  } catch (const PeerFailure& error) {
    message = error.what();
    peer_failure = true;
  } catch (const Error& error) {
    message = error.what();
  }
  rank1.join();
  EXPECT_TRUE(peer_failure) << message;
  EXPECT_NE(message.find("rank 1 closed its store connection"), std::string::npos) << message;
  EXPECT_LT(seconds_since(start), 10.0);
  EXPECT_NE(store.dead_ranks().find("rank 1"), std::string::npos);
}

TEST(DistStore, SilentWatchdogConnectionIsDeclaredDead) {
  // Rank 1's heartbeat connection never pings (a hung or stopped process): after the
  // heartbeat timeout the server declares it dead and rank 0's watchdog hears of it.
  StoreServer server(0, 2, 0.5);
  std::atomic<bool> failed{false};
  std::string failure;
  std::mutex mutex;
  Store silent("127.0.0.1", server.port(), 1, 2, 5.0, Store::Role::Watchdog);
  Watchdog watchdog("127.0.0.1", server.port(), 0, 2, 5.0, 0.05, [&](const std::string& message) {
    std::lock_guard lock(mutex);
    failure = message;
    failed = true;
  });
  const auto start = Clock::now();
  while (!failed && seconds_since(start) < 5.0)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::lock_guard lock(mutex);
  EXPECT_TRUE(failed);
  EXPECT_NE(failure.find("rank 1 sent no heartbeat"), std::string::npos) << failure;
}

TEST(DistStore, LostServerIsReportedAsRankZeroGone) {
  auto server = std::make_unique<StoreServer>(0, 2, 30.0);
  server->set_linger_timeout(0);
  Store store("127.0.0.1", server->port(), 1, 2, 5.0);
  server.reset();
  std::string message = error_of([&] { store.get("anything"); });
  EXPECT_NE(message.find("rank 0"), std::string::npos) << message;
  EXPECT_NE(message.find("lost the rendezvous store"), std::string::npos) << message;
}

TEST(DistStore, HostileBytesCloseOnlyThatConnection) {
  StoreServer server(0, 1, 30.0);
  auto send_raw = [&](const std::string& bytes) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(static_cast<uint16_t>(server.port()));
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
    ASSERT_EQ(::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL), ssize_t(bytes.size()));
    char reply[16];
    EXPECT_EQ(::recv(fd, reply, sizeof(reply), 0), 0);  // the server hangs up
    ::close(fd);
  };
  send_raw(std::string("\xff\xff\xff\xff", 4));                      // oversized frame
  send_raw(std::string("\x05\x00\x00\x00\x02\xff\xff\xff\xff", 9));  // bad field count
  send_raw(std::string("\x05\x00\x00\x00\x02\x00\x00\x00\x00", 9));  // SET before HELLO
  Store store("127.0.0.1", server.port(), 0, 1, 5.0);
  store.set("still", "serving");
  EXPECT_EQ(store.get("still"), "serving");
}

TEST(DistStore, RendezvousForOneProcess) {
  ProcessInfo info;  // single process: an in-process store on a free port
  Rendezvous rendezvous = dist::rendezvous(info, 5.0);
  rendezvous.store->barrier("alone");
  rendezvous.store->set("k", "v");
  EXPECT_EQ(rendezvous.store->get("k"), "v");
}

}  // namespace
}  // namespace moetune::dist
