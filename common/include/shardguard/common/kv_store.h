// The rendezvous store of a stage's replica group: what c10d's TCPStore does for
// Gloo (set, get, add, compare-and-set, wait), but listening only on the address it is
// given. LibTorch 1.13's TCPStore binds every interface and takes no listening socket,
// so in a pod it was a port beside the sidecar that anyone on the pod network could
// reach; this one binds replica 0's loopback store address (127.0.0.1:7100 in a pod),
// which only the local shardd and the sidecar's store tunnel reach
// (docs/pipeline.md#the-replica-tunnels). Torch-free: shardd wraps it as a c10d::Store.
//
// Wire format, one request then one reply per round trip on a TCP connection: a frame
// is a 4-byte big-endian length (at most kMaxKvFrame) and that many bytes. A request
// is an op byte and its fields; a reply a status byte (0 ok, 1 error with a message,
// 2 timed out) and its fields. Strings and values are a 4-byte length and the bytes.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace shardguard {

constexpr size_t kMaxKvFrame = 2u << 20;          // 2 MiB: a request or reply
constexpr size_t kMaxKvKey = 4096;                // bytes of one key
constexpr size_t kMaxKvValue = 1u << 20;          // 1 MiB: one value
constexpr size_t kMaxKvKeys = 65536;              // keys held at once
constexpr size_t kMaxKvBytes = 64u << 20;         // keys and values held at once
constexpr size_t kMaxKvConnections = 64;          // open at once; more are closed at accept
constexpr std::chrono::milliseconds kMaxKvWait{3600 * 1000};  // the longest a get or wait blocks

// The server: replica 0's. Serves each connection on a thread of its own until the
// peer closes it or sends something that is not a request (closed and counted in
// refused(); nothing stored changes).
class KvServer {
 public:
  // Binds host:port (host a literal address or "localhost"; port 0 = any free one) and
  // starts accepting. Throws std::runtime_error naming the address when it cannot.
  // on_refused (optional) runs, on a server thread, for each connection refused() counts.
  KvServer(const std::string& host, int port, std::function<void()> on_refused = {});
  ~KvServer();  // stop()
  KvServer(const KvServer&) = delete;
  KvServer& operator=(const KvServer&) = delete;

  int port() const { return port_; }
  // Connections closed for a malformed request, a limit, or being one too many.
  uint64_t refused() const { return refused_.load(); }
  // Closes the listener and every connection, wakes every waiter, joins every thread.
  void stop();

 private:
  struct Worker {
    std::thread thread;
    int fd = -1;
    std::atomic<bool> done{false};
  };
  void accept_loop();
  void serve(int fd);
  // One request's reply (status byte first); false: the request was malformed.
  bool handle(const std::vector<uint8_t>& request, std::vector<uint8_t>* reply);
  void refuse();

  std::function<void()> on_refused_;

  int listen_fd_ = -1;
  int stop_fd_ = -1;  // eventfd, readable once stop() began
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> refused_{0};
  std::thread acceptor_;
  std::mutex workers_mu_;
  std::list<std::unique_ptr<Worker>> workers_;

  std::mutex mu_;  // data_ and bytes_
  std::condition_variable changed_;
  std::map<std::string, std::vector<uint8_t>> data_;
  size_t bytes_ = 0;
};

// A client: one connection, one request at a time (calls from several threads take
// turns). Every failure — the connection refused, closed or timed out, an error
// reply — throws std::runtime_error naming the store's address.
class KvClient {
 public:
  // Connects within `timeout`, which also bounds every later round trip beyond the
  // time a get or wait was asked to block.
  KvClient(const std::string& host, int port, std::chrono::milliseconds timeout);
  ~KvClient();
  KvClient(const KvClient&) = delete;
  KvClient& operator=(const KvClient&) = delete;

  void set(const std::string& key, const std::vector<uint8_t>& value);
  // The key's value once it exists, blocking up to `wait`; nullopt when it did not
  // appear in that time.
  std::optional<std::vector<uint8_t>> get(const std::string& key, std::chrono::milliseconds wait);
  // Adds `delta` to the key's integer (decimal text, as TCPStore keeps it; absent = 0)
  // and returns the sum.
  int64_t add(const std::string& key, int64_t delta);
  // TCPStore's compareSet: an absent key with `expected` empty, or a key holding
  // `expected`, is set to `desired`; returns the value the key holds afterwards (for
  // an absent key with `expected` not empty: `expected`, and nothing is stored).
  std::vector<uint8_t> compare_set(const std::string& key, const std::vector<uint8_t>& expected,
                                   const std::vector<uint8_t>& desired);
  bool remove(const std::string& key);  // whether it was there
  bool check(const std::vector<std::string>& keys);  // all present now
  int64_t size();                                    // keys held
  // Whether every key exists within `timeout` (blocking until they all do).
  bool wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout);

 private:
  std::vector<uint8_t> call(const std::vector<uint8_t>& request, std::chrono::milliseconds blocking);

  std::string where_;
  int fd_ = -1;
  std::chrono::milliseconds timeout_;
  std::mutex mu_;
};

}  // namespace shardguard
