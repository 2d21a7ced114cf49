// libFuzzer target: arbitrary bytes as the plaintext HTTP/2 a downstream peer sends after
// TLS, into a real downstream session of the relay (sidecar/h2/relay.h) on a socket pair,
// with a stub upstream whose connection always fails (allowed calls end UNAVAILABLE).
// Exercises nghttp2's server session through the relay's callbacks: header counting
// and the limit, the decision hook, refusals (trailers-only), the gRPC frame inspector
// (streaming and collecting), resets, GOAWAY and the connection's teardown.
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "shardguard/sidecar/h2/relay.h"

namespace h2 = shardguard::sidecar::h2;

namespace {

struct Harness {
  h2::EventLoop loop;
  std::unique_ptr<h2::RelayWorker> worker;
  Harness() {
    h2::RelayConfig config;
    config.plaintext_peer_id = "spiffe://shardguard.local/ns/ml/job/fm/shard/0";
    h2::UpstreamConfig stub;
    stub.address = "127.0.0.1:1";
    stub.dial = [] { return -1; };  // the connection fails: no network, no second session
    config.upstreams["stub"] = stub;
    config.limits.max_header_list_bytes = 4096;
    config.limits.max_message_bytes = 1024;
    config.limits.stream_window = 65535;
    config.limits.max_output_bytes = 16384;
    h2::RelayHooks hooks;
    hooks.decide = [](const h2::RequestInfo& r) {
      if (r.path.find("deny") != std::string_view::npos)
        return h2::Decision::refuse(h2::GrpcCode::permission_denied, "rule fuzz: denied \x01%");
      return h2::Decision::allow_to("stub", r.path.find("inspect") != std::string_view::npos);
    };
    hooks.on_message = [](const h2::CallInfo&, h2::Direction, const h2::GrpcMessage& m) {
      if (m.payload == "refuse") return h2::Decision::refuse(h2::GrpcCode::permission_denied, "no");
      return h2::Decision::allow_to("stub");
    };
    hooks.on_call_end = [](const h2::CallEnd&) {};
    worker = std::make_unique<h2::RelayWorker>(loop, config, hooks, nullptr);
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Harness harness;
  if (size > 64 * 1024) return 0;  // more than the socket pair buffers at once
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 0;
  int buf = 256 * 1024;
  setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
  harness.worker->adopt(sv[0]);
  size_t off = 0;
  uint8_t sink[16384];
  // Writes the input, reads what the relay answers, then closes our side; bounded rounds.
  for (int round = 0; round < 2000 && !harness.worker->idle(); ++round) {
    if (off < size) {
      ssize_t n = send(sv[1], data + off, size - off, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n > 0) off += static_cast<size_t>(n);
      if (off == size) shutdown(sv[1], SHUT_WR);
    } else if (size == 0 && round == 0) {
      shutdown(sv[1], SHUT_WR);
    }
    while (recv(sv[1], sink, sizeof sink, MSG_DONTWAIT) > 0) {
    }
    harness.loop.run_once(std::chrono::milliseconds(0));
  }
  harness.worker->close_all();
  for (int round = 0; round < 100 && harness.loop.run_once(std::chrono::milliseconds(0)) > 0; ++round) {
  }
  close(sv[1]);
  return 0;
}
