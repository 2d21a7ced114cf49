// The replica group's store (common/kv_store.h): what Gloo's rendezvous needs of it,
// where it listens, its limits, and what it does with a malformed request.
#include "shardguard/common/kv_store.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace shardguard {
namespace {

using namespace std::chrono_literals;

std::vector<uint8_t> bytes(const std::string& s) { return {s.begin(), s.end()}; }

// A raw TCP connection to 127.0.0.1:port (-1 when refused).
int connect_raw(const std::string& host, int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  ::inet_pton(AF_INET, host.c_str(), &a.sin_addr);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Whether the server closed the connection (a read returns end of stream).
bool closed_by_peer(int fd) {
  char c = 0;
  timeval tv{10, 0};  // a bound on the test, not a synchronisation: the close comes first
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  return ::recv(fd, &c, 1, 0) == 0;
}

TEST(KvStore, SetGetAddCompareSetDeleteCheckAndCount) {
  KvServer server("127.0.0.1", 0);
  KvClient c("127.0.0.1", server.port(), 5s);
  c.set("a", bytes("one"));
  EXPECT_EQ(c.get("a", 0ms), bytes("one"));
  EXPECT_EQ(c.get("missing", 0ms), std::nullopt);
  EXPECT_EQ(c.add("n", 1), 1);
  EXPECT_EQ(c.add("n", 41), 42);
  EXPECT_EQ(c.get("n", 0ms), bytes("42"));  // decimal text, as TCPStore keeps a counter
  EXPECT_EQ(c.add("n", -50), -8);
  // compare-and-set as TCPStore: absent + empty expected sets it; a match replaces it;
  // a mismatch leaves it and answers what is there; absent + an expected value stores nothing.
  EXPECT_EQ(c.compare_set("cs", {}, bytes("x")), bytes("x"));
  EXPECT_EQ(c.compare_set("cs", bytes("x"), bytes("y")), bytes("y"));
  EXPECT_EQ(c.compare_set("cs", bytes("x"), bytes("z")), bytes("y"));
  EXPECT_EQ(c.compare_set("absent", bytes("e"), bytes("d")), bytes("e"));
  EXPECT_FALSE(c.check({"absent"}));
  EXPECT_TRUE(c.check({"a", "n", "cs"}));
  EXPECT_FALSE(c.check({"a", "absent"}));
  EXPECT_EQ(c.size(), 3);
  EXPECT_TRUE(c.remove("a"));
  EXPECT_FALSE(c.remove("a"));
  EXPECT_EQ(c.size(), 2);
  // A counter that is not an integer is an error reply, and the connection stays usable.
  c.set("text", bytes("abc"));
  EXPECT_THROW(c.add("text", 1), std::runtime_error);
  EXPECT_EQ(c.add("n", 8), 0);
}

TEST(KvStore, GetAndWaitSeeKeysSetByAnotherClient) {
  KvServer server("127.0.0.1", 0);
  KvClient waiter("127.0.0.1", server.port(), 5s);
  KvClient setter("127.0.0.1", server.port(), 5s);
  // Set on another connection before or while the wait blocks: either way it returns
  // true once both keys are there.
  std::thread t([&] {
    setter.set("x", bytes("1"));
    setter.set("y", bytes("2"));
  });
  EXPECT_TRUE(waiter.wait({"x", "y"}, 20s));
  t.join();
  EXPECT_EQ(waiter.get("y", 20s), bytes("2"));
  // Keys that never come: the wait and the get time out (false, nullopt), no exception.
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_FALSE(waiter.wait({"never"}, 100ms));
  EXPECT_EQ(waiter.get("never", 100ms), std::nullopt);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 200ms);
}

// Only on the address it is given: a store on 127.0.0.1 is not reachable on another
// loopback address (nor, in a pod, on the pod's IP).
TEST(KvStore, ListensOnlyOnItsAddress) {
  KvServer server("127.0.0.1", 0);
  const int fd = connect_raw("127.0.0.2", server.port());
  EXPECT_EQ(fd, -1);
  if (fd >= 0) ::close(fd);
  EXPECT_THROW(KvClient("127.0.0.2", server.port(), 1s), std::runtime_error);
  EXPECT_THROW(KvServer("store.example", 0), std::runtime_error);  // a literal address only
  try {
    KvServer again("127.0.0.1", server.port());
    FAIL() << "bound a port already served";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("127.0.0.1:" + std::to_string(server.port())), std::string::npos) << e.what();
  }
}

// A frame too long, an unknown op or a truncated request closes that connection and is
// counted; nothing stored changes and other clients go on.
TEST(KvStore, MalformedRequestsCloseTheirConnectionAndLoseNothing) {
  std::atomic<int> reported{0};  // shardd's shardguard_replica_store_refused_total
  KvServer server("127.0.0.1", 0, [&] { ++reported; });
  KvClient c("127.0.0.1", server.port(), 5s);
  c.set("kept", bytes("v"));
  const std::vector<std::vector<uint8_t>> garbage = {
      {0xff, 0xff, 0xff, 0xff},                      // 4 GiB frame
      {0, 0, 0, 0},                                  // empty frame
      {0, 0, 0, 1, 99},                              // unknown op
      {0, 0, 0, 6, 1, 0, 0, 0, 9, 'k'},              // SET whose key runs past the frame
      {0, 0, 0, 2, 7, 1},                            // key count with trailing garbage
  };
  for (size_t i = 0; i < garbage.size(); ++i) {
    const int fd = connect_raw("127.0.0.1", server.port());
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::send(fd, garbage[i].data(), garbage[i].size(), MSG_NOSIGNAL), static_cast<ssize_t>(garbage[i].size()));
    EXPECT_TRUE(closed_by_peer(fd)) << "garbage " << i;
    ::close(fd);
  }
  EXPECT_EQ(server.refused(), garbage.size());
  EXPECT_EQ(reported.load(), static_cast<int>(garbage.size()));
  EXPECT_EQ(c.get("kept", 0ms), bytes("v"));
  EXPECT_EQ(c.size(), 1);
}

// Limits: a key or value over its size is refused by the client before it is sent (the
// connection stays); a full store answers with an error and keeps what it has.
TEST(KvStore, LimitsAreErrorsThatNameTheSize) {
  KvServer server("127.0.0.1", 0);
  KvClient c("127.0.0.1", server.port(), 5s);
  try {
    c.set(std::string(kMaxKvKey + 1, 'k'), bytes("v"));
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("a key of 4097 bytes (at most 4096)"), std::string::npos) << e.what();
  }
  EXPECT_THROW(c.set("big", std::vector<uint8_t>(kMaxKvValue + 1)), std::runtime_error);
  // 64 values of 1 MiB would exceed the store's 64 MiB with their keys.
  int stored = 0;
  std::string error;
  for (int i = 0; i < 70 && error.empty(); ++i) {
    try {
      c.set("v" + std::to_string(i), std::vector<uint8_t>(kMaxKvValue, 'x'));
      ++stored;
    } catch (const std::runtime_error& e) {
      error = e.what();
    }
  }
  EXPECT_EQ(stored, 63);
  EXPECT_NE(error.find("more than 67108864 bytes"), std::string::npos) << error;
  EXPECT_EQ(c.size(), 63);
  EXPECT_TRUE(c.remove("v0"));
  c.set("small", bytes("fits again"));
}

// Stopping the server ends a blocked wait with an error at once, and later requests fail
// with the store's address in the message.
TEST(KvStore, StopEndsBlockedWaitsAndLaterCallsFail) {
  auto server = std::make_unique<KvServer>("127.0.0.1", 0);
  const int port = server->port();
  KvClient c("127.0.0.1", port, 5s);
  std::thread stopper([&] { server->stop(); });
  // Whether the wait starts before or after the stop, it cannot succeed: the key is
  // never set, and a stopped server answers nothing.
  EXPECT_ANY_THROW(c.wait({"never"}, 60s));
  stopper.join();
  try {
    c.size();
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("127.0.0.1:" + std::to_string(port)), std::string::npos) << e.what();
  }
}

// Answers from something that is not a KvServer: a malformed answer is an error naming
// the store and the request, never a value or a quiet "false".
TEST(KvStore, MalformedAnswersAreErrorsNamingTheRequest) {
  const int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  ::inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  ASSERT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(listener, 1), 0);
  socklen_t len = sizeof a;
  ::getsockname(listener, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin_port);
  const std::vector<std::vector<uint8_t>> answers = {
      {0},                                // add: OK without the sum
      {0, 0, 0, 0, 9, 'x'},               // get: 9 bytes announced, 1 sent
      {0, 7},                             // check: a flag that is neither 0 nor 1
      {0, 1, 2},                          // delete: a byte after the flag
      {0, 0, 0, 0, 0, 0, 0, 0, 3, 0xff},  // key count: a byte after the count
      {2, 1},                             // delete: "timed out" with a flag
      {0, 1},                             // set: a byte after OK
      {2, 7},                             // wait: a byte after "timed out"
  };
  std::thread server([&] {
    const int fd = ::accept(listener, nullptr, nullptr);
    const auto read_exact = [&](uint8_t* p, size_t n) { return ::recv(fd, p, n, MSG_WAITALL) == static_cast<ssize_t>(n); };
    for (const auto& answer : answers) {
      uint8_t head[4];
      if (!read_exact(head, 4)) break;
      std::vector<uint8_t> request((size_t{head[2]} << 8) | head[3]);  // these requests are short
      if (!read_exact(request.data(), request.size())) break;
      std::vector<uint8_t> frame{0, 0, 0, static_cast<uint8_t>(answer.size())};
      frame.insert(frame.end(), answer.begin(), answer.end());
      ::send(fd, frame.data(), frame.size(), MSG_NOSIGNAL);
    }
    uint8_t end = 0;
    ::recv(fd, &end, 1, 0);  // until the client closes
    ::close(fd);
  });
  const auto error_of = [](const std::function<void()>& call) -> std::string {
    try {
      call();
    } catch (const std::runtime_error& e) {
      return e.what();
    }
    return "no error";
  };
  {
    KvClient c("127.0.0.1", port, 5s);
    const std::string where = "replica group store 127.0.0.1:" + std::to_string(port);
    const std::string add = error_of([&] { c.add("n", 1); });
    EXPECT_EQ(add, where + ": a malformed answer to add");
    EXPECT_NE(error_of([&] { c.get("k", 0ms); }).find("a malformed answer to get"), std::string::npos);
    EXPECT_NE(error_of([&] { c.check({"k"}); }).find("a malformed answer to check"), std::string::npos);
    EXPECT_NE(error_of([&] { c.remove("k"); }).find("a malformed answer to delete"), std::string::npos);
    EXPECT_NE(error_of([&] { c.size(); }).find("a malformed answer to the key count"), std::string::npos);
    EXPECT_NE(error_of([&] { c.remove("k"); }).find("a malformed answer to delete"), std::string::npos);
    EXPECT_NE(error_of([&] { c.set("k", bytes("v")); }).find("a malformed answer to set"), std::string::npos);
    EXPECT_NE(error_of([&] { c.wait({"k"}, 0ms); }).find("a malformed answer to wait"), std::string::npos);
  }
  server.join();
  ::close(listener);
}

}  // namespace
}  // namespace shardguard
