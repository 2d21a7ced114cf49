// Test support: a generic gRPC echo server (any method, unary or streaming: every
// message is sent back as it came) and small synchronous client helpers over the
// generic API. Stands in for shardd behind a sidecar in the sidecar's tests and in
// bench/sidecar_bench; the shardd integration test uses the real shardd.
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

namespace shardguard::testsupport {

// Request metadata that changes how the echo server answers a call: with
// "x-echo-reply: ack" it reads continuously and answers with an 8-byte little-endian
// count of the messages received so far, one write in flight, coalescing (the last
// ack always carries the final count): the shape of a one-way pipeline stream.
// Custom metadata crosses the sidecars like any other.
inline constexpr const char* kEchoReplyHeader = "x-echo-reply";

class EchoServer {
 public:
  // Listens on 127.0.0.1:<any port>, plaintext.
  EchoServer();
  ~EchoServer();
  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  // Calls that reached the server, and messages it received.
  int calls() const { return calls_.load(); }
  int64_t messages() const { return messages_.load(); }
  std::vector<std::string> methods() const;
  // Request metadata of the last call (custom keys only).
  std::multimap<std::string, std::string> last_metadata() const;

  class Reactor;
  class Acker;

 private:
  friend class Reactor;
  friend class Acker;
  // Counts the call and keeps its method and metadata.
  void record(grpc::GenericCallbackServerContext* ctx);
  class Service;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::atomic<int> calls_{0};
  std::atomic<int64_t> messages_{0};
  mutable std::mutex mu_;
  std::vector<std::string> methods_;
  std::multimap<std::string, std::string> last_metadata_;
};

grpc::ByteBuffer to_buffer(const std::string& bytes);
std::string from_buffer(const grpc::ByteBuffer& buffer);

struct CallResult {
  grpc::Status status;
  std::string reply;
};
// One unary call over the generic API, waited for (deadline `timeout`).
CallResult unary_call(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                      const std::string& payload,
                      const std::multimap<std::string, std::string>& metadata = {},
                      std::chrono::milliseconds timeout = std::chrono::seconds(20));

// A mutual-TLS channel that presents `cert_pem`/`key_pem` (none when empty) and
// accepts any server certificate: the test plays an attacker or a peer, and only
// the server's checks are under test. `server_cert_seen`, when given, receives the
// PEM the server presented.
std::shared_ptr<grpc::Channel> tls_channel(const std::string& address, const std::string& cert_pem,
                                           const std::string& key_pem,
                                           std::shared_ptr<std::string> server_cert_seen = nullptr);

}  // namespace shardguard::testsupport
