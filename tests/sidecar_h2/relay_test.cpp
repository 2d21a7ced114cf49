// The HTTP/2 relay (sidecar/h2/relay.h) with real gRPC clients and servers over real TLS
// on 127.0.0.1, and scripted nghttp2 peers (h2_peer.h) for the frames gRPC never sends.
#include "shardguard/sidecar/h2/relay.h"

#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "shardguard/common/pki.h"
#include "support/grpc_echo.h"
#include "sidecar_h2/h2_peer.h"

namespace shardguard::sidecar::h2 {
namespace {

using namespace std::chrono_literals;
using testing::H2Peer;
using testsupport::EchoServer;
using testsupport::unary_call;

const std::string kClientId = "spiffe://shardguard.local/ns/ml/job/fm/shard/0";
const std::string kRelayId = "spiffe://shardguard.local/ns/ml/job/fm/shard/1";
const std::string kDenied = "/test.Echo/Denied";
const std::string kInspected = "/test.Echo/Inspected";

struct Pki {
  CaBundle ca;
  Leaf relay;
  Leaf client;
};
const Pki& pki() {
  static const Pki p = [] {
    Pki x;
    x.ca = create_ca("h2 relay test CA", std::chrono::hours(1));
    x.relay = issue_leaf(x.ca, kRelayId, std::chrono::hours(1));
    x.client = issue_leaf(x.ca, kClientId, std::chrono::hours(1));
    return x;
  }();
  return p;
}

PeerVerifier svid_verifier(SvidRole role) {
  std::string ca = pki().ca.cert_pem;
  return [ca, role](const std::string& leaf) {
    SvidCheck c = verify_svid(leaf, ca, std::chrono::system_clock::now(), role);
    return PeerVerdict{c.ok, c.spiffe_id, c.reason};
  };
}

std::string random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

std::string framed(const std::string& payload) {
  return grpc_prefix(false, static_cast<uint32_t>(payload.size())) + payload;
}

int connect_to(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Waits (bounded) for f() to hold, checking every few milliseconds.
template <typename F>
bool eventually(F f, std::chrono::milliseconds timeout = 20s) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (f()) return true;
    std::this_thread::sleep_for(2ms);
  }
  return f();
}

// An upstream reached through UpstreamConfig::dial: a socket pair whose other end the
// test drives as a scripted HTTP/2 server.
class DialedUpstream {
 public:
  std::function<int()> dial() {
    return [this] {
      int sv[2];
      if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return -1;
      std::lock_guard<std::mutex> lock(mu_);
      fds_.push_back(sv[1]);
      cv_.notify_all();
      return sv[0];
    };
  }
  // The test's end of the next connection the relay opened (-1 after the timeout).
  int next(std::chrono::milliseconds timeout = 20s) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, timeout, [&] { return taken_ < fds_.size(); })) return -1;
    return fds_[taken_++];
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int> fds_;
  size_t taken_ = 0;
};

class RelayTest : public ::testing::Test {
 protected:
  // A relay in front of the echo server: TLS downstream (or plaintext with `tls` false).
  void start(RelayLimits limits = {}, bool tls = true, std::function<int()> dial = nullptr) {
    RelayConfig config;
    if (tls)
      config.server_tls = TlsContext::create(TlsContext::Side::server, pki().relay.cert_pem, pki().relay.key_pem,
                                             svid_verifier(SvidRole::client));
    config.plaintext_peer_id = kClientId;
    config.upstreams["echo"] =
        UpstreamConfig{upstream_address_.empty() ? echo_.address() : upstream_address_, nullptr, std::move(dial)};
    config.drop_request_headers = {"shardguard-target"};
    config.limits = limits;
    RelayHooks hooks;
    hooks.decide = [this](const RequestInfo& r) {
      std::lock_guard<std::mutex> lock(mu_);
      ++decisions_;
      decided_ids_.push_back(r.call_id);
      last_peer_ = std::string(r.peer_id);
      last_path_ = std::string(r.path);
      last_headers_ = r.headers;
      if (r.path == kDenied) return Decision::refuse(GrpcCode::permission_denied, deny_message_);
      return Decision::allow_to("echo", r.path == kInspected);
    };
    hooks.on_message = [this](const CallInfo& c, Direction d, const GrpcMessage& m) {
      std::lock_guard<std::mutex> lock(mu_);
      inspected_.emplace_back(d, m.payload);
      EXPECT_EQ(c.path, kInspected);
      if (m.payload.find("forbidden") != std::string::npos)
        return Decision::refuse(GrpcCode::permission_denied, "rule export: message refused");
      return Decision::allow_to("echo");
    };
    hooks.on_call_end = [this](const CallEnd& e) {
      std::lock_guard<std::mutex> lock(mu_);
      ends_.push_back(e);
    };
    hooks.on_handshake_failure = [this](std::string_view reason, std::string_view) {
      std::lock_guard<std::mutex> lock(mu_);
      handshake_reasons_.emplace_back(reason);
    };
    relay_ = std::make_unique<Relay>(listen_, std::move(config), std::move(hooks), 1);
    relay_->start();
  }
  void TearDown() override {
    if (relay_) relay_->shutdown(2s);
    EXPECT_EQ(relay_ ? relay_->stats().buffered_bytes.load() : 0, 0);
  }
  std::shared_ptr<grpc::Channel> channel() {
    return testsupport::tls_channel("127.0.0.1:" + std::to_string(relay_->port()), pki().client.cert_pem,
                                    pki().client.key_pem);
  }
  int decisions() {
    std::lock_guard<std::mutex> lock(mu_);
    return decisions_;
  }
  std::vector<CallEnd> ends() {
    std::lock_guard<std::mutex> lock(mu_);
    return ends_;
  }
  size_t ends_count() { return ends().size(); }

  EchoServer echo_;
  std::unique_ptr<Relay> relay_;
  std::mutex mu_;
  int decisions_ = 0;
  std::string listen_ = "127.0.0.1:0";
  std::string upstream_address_;  // "" = the echo server's numeric address
  std::vector<uint64_t> decided_ids_;
  std::vector<std::pair<Direction, std::string>> inspected_;
  std::vector<std::string> handshake_reasons_;
  std::string last_peer_, last_path_;
  HeaderList last_headers_;
  std::vector<CallEnd> ends_;
  std::string deny_message_ = "rule deny-test: 100% refused \xc3\xbc";
};

// A bidi stream over gRPC's generic API, driven step by step.
class Stream {
 public:
  Stream(const std::shared_ptr<grpc::Channel>& channel, const std::string& method) : stub_(channel) {
    ctx_.set_deadline(std::chrono::system_clock::now() + 60s);
    call_ = stub_.PrepareCall(&ctx_, method, &cq_);
    call_->StartCall(tag(1));
    started_ = next();
  }
  ~Stream() {
    ctx_.TryCancel();
    cq_.Shutdown();
    void* t;
    bool ok;
    while (cq_.Next(&t, &ok)) {
    }
  }
  bool started() const { return started_; }
  std::string round_trip(const std::string& msg) {
    call_->Write(testsupport::to_buffer(msg), tag(2));
    if (!next()) return "<write failed>";
    grpc::ByteBuffer back;
    call_->Read(&back, tag(3));
    if (!next()) return "<read failed>";
    return testsupport::from_buffer(back);
  }
  grpc::Status close() {
    call_->WritesDone(tag(4));
    next();
    grpc::Status status;
    call_->Finish(&status, tag(5));
    next();
    return status;
  }

 private:
  static void* tag(intptr_t i) { return reinterpret_cast<void*>(i); }
  bool next() {
    void* t = nullptr;
    bool ok = false;
    return cq_.Next(&t, &ok) && ok;
  }
  grpc::GenericStub stub_;
  grpc::ClientContext ctx_;
  grpc::CompletionQueue cq_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call_;
  bool started_ = false;
};

TEST_F(RelayTest, UnaryCallsAreRelayedByteExactOnOneUpstreamConnection) {
  start();
  auto ch = channel();
  const std::vector<size_t> sizes = {0, 1, 1000, 16 * 1024 + 3, 1 << 20, 5 << 20};
  for (size_t i = 0; i < sizes.size(); ++i) {
    std::string payload = random_bytes(sizes[i], static_cast<uint32_t>(i));
    auto r = unary_call(ch, "/test.Echo/Unary", payload, {{"x-custom", "v1"}, {"shardguard-target", "gone"}});
    ASSERT_TRUE(r.status.ok()) << sizes[i] << ": " << r.status.error_message();
    EXPECT_TRUE(r.reply == payload) << "size " << sizes[i];
  }
  EXPECT_EQ(echo_.calls(), static_cast<int>(sizes.size()));
  EXPECT_EQ(echo_.last_metadata().count("x-custom"), 1u);
  EXPECT_EQ(echo_.last_metadata().count("shardguard-target"), 0u);  // dropped by the relay
  {
    std::lock_guard<std::mutex> lock(mu_);
    EXPECT_EQ(last_peer_, kClientId);  // from the TLS handshake
    EXPECT_EQ(last_path_, "/test.Echo/Unary");
  }
  ASSERT_TRUE(eventually([&] { return ends_count() == sizes.size(); }))
      << ends_count() << " ends, active " << relay_->stats().active_calls.load();
  auto e = ends();
  for (size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_EQ(e[i].grpc_status, 0);
    EXPECT_EQ(e[i].request_bytes, sizes[i] + 5);
    EXPECT_EQ(e[i].response_bytes, sizes[i] + 5);
    EXPECT_EQ(e[i].request_messages, 1u);
    EXPECT_EQ(e[i].info.peer_id, kClientId);
    EXPECT_EQ(e[i].info.id, decided_ids_[i]);  // decide() and on_call_end speak of one call
    EXPECT_FALSE(e[i].refused_by_relay);
  }
  EXPECT_EQ(relay_->stats().upstream_connects_total.load(), 1u);
  EXPECT_EQ(relay_->stats().downstream_connections.load(), 1);
}

TEST_F(RelayTest, UpstreamNamedByHostNameIsResolvedAndUsed) {
  // A name (not a numeric address) is looked up on a resolver thread, off the loop;
  // each of its addresses is tried in turn (localhost may come as ::1 first, where
  // the echo server does not listen). (A name that does not resolve is not tested:
  // finding that out asks a DNS server, and tests talk only to 127.0.0.1.)
  const std::string port = echo_.address().substr(echo_.address().rfind(':') + 1);
  upstream_address_ = "localhost:" + port;
  start();
  auto ch = channel();
  for (int i = 0; i < 3; ++i) {
    auto r = unary_call(ch, "/test.Echo/Unary", "by name " + std::to_string(i));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.reply, "by name " + std::to_string(i));
  }
  EXPECT_EQ(relay_->stats().upstream_connects_total.load(), 1u);
}

TEST_F(RelayTest, SmallWindowsAreGivenBackAfterEveryCall) {
  // 40 calls of 300 KiB each way through 1 MiB connection windows: any byte not given
  // back to a window would stall the calls that follow on the shared upstream session.
  RelayLimits limits;
  limits.stream_window = 256 * 1024;
  limits.connection_window = 1 << 20;
  start(limits);
  auto ch = channel();
  std::vector<std::thread> callers;
  std::atomic<int> ok{0};
  for (int t = 0; t < 4; ++t)
    callers.emplace_back([&, t] {
      for (int i = 0; i < 10; ++i) {
        std::string payload = random_bytes(300 * 1024, static_cast<uint32_t>(t * 100 + i));
        auto r = unary_call(ch, "/test.Echo/Window", payload, {}, 30s);
        if (r.status.ok() && r.reply == payload) ++ok;
      }
    });
  for (auto& c : callers) c.join();
  EXPECT_EQ(ok.load(), 40);
  EXPECT_EQ(relay_->stats().upstream_connects_total.load(), 1u);
}

// The sidecar pair's shape: client ══TLS══▶ relay A ══mTLS══▶ relay B ──▶ echo server.
// A's upstream session is a TLS client that checks B's server SVID and identity.
TEST_F(RelayTest, ChainedRelaysSpeakMutualTlsUpstream) {
  start();  // relay B, in front of the echo server
  auto upstream_tls = [](const std::string& expected) {
    std::string ca = pki().ca.cert_pem;
    return TlsContext::create(TlsContext::Side::client, pki().client.cert_pem, pki().client.key_pem,
                              [ca, expected](const std::string& leaf) {
                                SvidCheck c = verify_svid(leaf, ca, std::chrono::system_clock::now(), SvidRole::server);
                                if (c.ok && c.spiffe_id != expected) return PeerVerdict{false, "", "wrong_peer"};
                                return PeerVerdict{c.ok, c.spiffe_id, c.reason};
                              });
  };
  std::string b_address = "127.0.0.1:" + std::to_string(relay_->port());
  RelayConfig a;
  a.server_tls = TlsContext::create(TlsContext::Side::server, pki().relay.cert_pem, pki().relay.key_pem,
                                    svid_verifier(SvidRole::client));
  a.upstreams["b"] = UpstreamConfig{b_address, upstream_tls(kRelayId), nullptr};
  a.upstreams["impostor"] = UpstreamConfig{b_address, upstream_tls("spiffe://shardguard.local/ns/ml/job/fm/shard/9"),
                                           nullptr};
  RelayHooks hooks;
  hooks.decide = [](const RequestInfo& r) {
    return Decision::allow_to(r.path == "/test.Echo/Impostor" ? "impostor" : "b");
  };
  Relay relay_a("127.0.0.1:0", a, hooks, 2);
  relay_a.start();
  auto ch = testsupport::tls_channel("127.0.0.1:" + std::to_string(relay_a.port()), pki().client.cert_pem,
                                     pki().client.key_pem);
  for (int i = 0; i < 4; ++i) {  // two worker threads: each has its own upstream session
    std::string payload = random_bytes(200 * 1024 + static_cast<size_t>(i), static_cast<uint32_t>(i));
    auto r = unary_call(ch, "/test.Echo/Chained", payload);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_TRUE(r.reply == payload);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    EXPECT_EQ(last_peer_, kClientId);  // B saw A's client certificate
  }
  // A server that is not the expected peer fails A's handshake: the call is UNAVAILABLE.
  auto bad = unary_call(ch, "/test.Echo/Impostor", "x");
  EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(bad.status.error_message().find("wrong_peer"), std::string::npos) << bad.status.error_message();
  EXPECT_EQ(echo_.calls(), 4);
  relay_a.shutdown(2s);
}

// The sidecar's shape of use: its own acceptor hands sockets to the relay (no listener
// of the relay's own), and a rotated certificate serves new connections while the open
// stream goes on.
TEST_F(RelayTest, AdoptedSocketsAndARotatedServerCertificate) {
  listen_ = "";
  start();
  int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(listen(listener, 16), 0);
  socklen_t len = sizeof a;
  getsockname(listener, reinterpret_cast<sockaddr*>(&a), &len);
  const std::string address = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
  std::atomic<bool> done{false};
  std::thread acceptor([&] {  // hands every connection to the relay until the test ends
    while (!done) {
      pollfd p{listener, POLLIN, 0};
      if (poll(&p, 1, 20) > 0) {
        int fd = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd >= 0) relay_->adopt(fd);
      }
    }
  });
  auto seen_first = std::make_shared<std::string>();
  auto first = testsupport::tls_channel(address, pki().client.cert_pem, pki().client.key_pem, seen_first);
  {
    Stream s(first, "/test.Echo/Rotation");
    ASSERT_TRUE(s.started());
    EXPECT_EQ(s.round_trip("before"), "before");
    Leaf renewed = issue_leaf(pki().ca, kRelayId, std::chrono::hours(2));
    relay_->set_server_tls(TlsContext::create(TlsContext::Side::server, renewed.cert_pem, renewed.key_pem,
                                              svid_verifier(SvidRole::client)));
    auto seen_second = std::make_shared<std::string>();
    auto second = testsupport::tls_channel(address, pki().client.cert_pem, pki().client.key_pem, seen_second);
    auto r = unary_call(second, "/test.Echo/After", "after");
    EXPECT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(*seen_second, renewed.cert_pem);  // the new connection got the new certificate
    EXPECT_EQ(*seen_first, pki().relay.cert_pem);
    EXPECT_EQ(s.round_trip("during"), "during");  // the open stream was not dropped
    EXPECT_TRUE(s.close().ok());
  }
  done = true;
  acceptor.join();
  close(listener);
}

// The export guard's seam: a stream the decision asks to inspect hands every whole
// message, both ways, to on_message before forwarding it; a refused one never leaves.
TEST_F(RelayTest, InspectedStreamsShowWholeMessagesAndCanBeRefusedMidStream) {
  RelayLimits limits;
  limits.stream_window = 64 * 1024;  // messages larger than the window still arrive whole
  start(limits);
  Stream s(channel(), kInspected);
  ASSERT_TRUE(s.started());
  const std::string big = random_bytes(300 * 1024, 3);
  EXPECT_TRUE(s.round_trip("small") == "small");
  EXPECT_TRUE(s.round_trip(big) == big);
  EXPECT_EQ(s.round_trip("this is forbidden"), "<read failed>");
  grpc::Status status = s.close();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(status.error_message(), "rule export: message refused");
  EXPECT_EQ(echo_.messages(), 2);  // the refused message never reached the server
  std::lock_guard<std::mutex> lock(mu_);
  ASSERT_EQ(inspected_.size(), 5u);
  EXPECT_EQ(inspected_[0], std::make_pair(Direction::request, std::string("small")));
  EXPECT_EQ(inspected_[1], std::make_pair(Direction::response, std::string("small")));
  EXPECT_TRUE(inspected_[2] == std::make_pair(Direction::request, big));
  EXPECT_TRUE(inspected_[3] == std::make_pair(Direction::response, big));
  EXPECT_EQ(inspected_[4], std::make_pair(Direction::request, std::string("this is forbidden")));
}

TEST_F(RelayTest, StreamingCallIsRelayedMessageByMessage) {
  start();
  Stream s(channel(), "/test.Echo/Stream");
  ASSERT_TRUE(s.started());
  for (int i = 0; i < 50; ++i) {
    std::string msg = random_bytes(static_cast<size_t>(i) * 997, static_cast<uint32_t>(100 + i));
    ASSERT_TRUE(s.round_trip(msg) == msg) << i;
  }
  EXPECT_TRUE(s.close().ok());
  ASSERT_TRUE(eventually([&] { return ends_count() == 1; }));
  EXPECT_EQ(ends()[0].request_messages, 50u);
  EXPECT_EQ(ends()[0].response_messages, 50u);
  EXPECT_EQ(ends()[0].grpc_status, 0);
}

TEST_F(RelayTest, RefusalReachesTheGrpcClientAsPermissionDeniedWithItsMessage) {
  start();
  auto r = unary_call(channel(), kDenied, "secret");
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(r.status.error_message(), deny_message_);
  EXPECT_EQ(echo_.calls(), 0);  // nothing went upstream
  EXPECT_EQ(relay_->stats().upstream_connects_total.load(), 0u);
  ASSERT_TRUE(eventually([&] { return ends_count() == 1; }));
  EXPECT_TRUE(ends()[0].refused_by_relay);
  EXPECT_EQ(ends()[0].refusal_reason, "decision");
  EXPECT_EQ(ends()[0].grpc_status, 7);
  EXPECT_EQ(relay_->stats().refused_total.load(), 1u);
}

TEST_F(RelayTest, ClientsWithoutAValidCertificateFailTheHandshakeWithTheVerifiersReason) {
  start();
  auto r = unary_call(testsupport::tls_channel("127.0.0.1:" + std::to_string(relay_->port()), "", ""),
                      "/test.Echo/Unary", "x", {}, 5s);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(decisions(), 0);
  // (Counted once the relay has seen its own alert go out: the client may be first.)
  EXPECT_TRUE(eventually([&] { return relay_->stats().handshake_failures_total.load() >= 1u; }));
  // A leaf of another CA: the verifier's own reason reaches the hook.
  CaBundle other = create_ca("another CA", std::chrono::hours(1));
  Leaf stranger = issue_leaf(other, kClientId, std::chrono::hours(1));
  auto r2 = unary_call(testsupport::tls_channel("127.0.0.1:" + std::to_string(relay_->port()), stranger.cert_pem,
                                                stranger.key_pem),
                       "/test.Echo/Unary", "x", {}, 5s);
  EXPECT_EQ(r2.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(decisions(), 0);
  ASSERT_TRUE(eventually([&] {
    std::lock_guard<std::mutex> lock(mu_);
    return handshake_reasons_.size() >= 2;
  }));
  std::lock_guard<std::mutex> lock(mu_);
  EXPECT_EQ(handshake_reasons_[0], "no_certificate");
  EXPECT_EQ(handshake_reasons_.back(), "untrusted");
}

TEST_F(RelayTest, ThousandConcurrentStreamsOnOneConnection) {
  start();
  auto ch = channel();
  constexpr int kStreams = 1000;
  struct S {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call;
    grpc::ByteBuffer in;
    grpc::Status status;
  };
  grpc::GenericStub stub(ch);
  grpc::CompletionQueue cq;
  std::vector<std::unique_ptr<S>> streams;
  auto wait_all = [&] {
    int ok_count = 0;
    for (int i = 0; i < kStreams; ++i) {
      void* t;
      bool ok = false;
      if (cq.AsyncNext(&t, &ok, std::chrono::system_clock::now() + 60s) != grpc::CompletionQueue::GOT_EVENT) break;
      ok_count += ok ? 1 : 0;
    }
    return ok_count;
  };
  for (int i = 0; i < kStreams; ++i) {
    auto s = std::make_unique<S>();
    s->ctx.set_deadline(std::chrono::system_clock::now() + 120s);
    s->call = stub.PrepareCall(&s->ctx, "/test.Echo/Many", &cq);
    s->call->StartCall(s.get());
    streams.push_back(std::move(s));
  }
  ASSERT_EQ(wait_all(), kStreams);
  for (int i = 0; i < kStreams; ++i) streams[i]->call->Write(testsupport::to_buffer("m" + std::to_string(i)), streams[i].get());
  ASSERT_EQ(wait_all(), kStreams);
  for (int i = 0; i < kStreams; ++i) streams[i]->call->Read(&streams[i]->in, streams[i].get());
  ASSERT_EQ(wait_all(), kStreams);
  for (int i = 0; i < kStreams; ++i) EXPECT_EQ(testsupport::from_buffer(streams[i]->in), "m" + std::to_string(i));
  // All of them are open at once, on one downstream and one upstream connection.
  EXPECT_EQ(relay_->stats().active_calls.load(), kStreams);
  EXPECT_EQ(relay_->stats().downstream_connections.load(), 1);
  EXPECT_EQ(relay_->stats().upstream_connections.load(), 1);
  for (int i = 0; i < kStreams; ++i) streams[i]->call->WritesDone(streams[i].get());
  ASSERT_EQ(wait_all(), kStreams);
  for (int i = 0; i < kStreams; ++i) streams[i]->call->Finish(&streams[i]->status, streams[i].get());
  ASSERT_EQ(wait_all(), kStreams);
  for (int i = 0; i < kStreams; ++i) EXPECT_TRUE(streams[i]->status.ok()) << i;
  EXPECT_EQ(echo_.calls(), kStreams);
  ASSERT_TRUE(eventually([&] { return relay_->stats().active_calls.load() == 0; }));
  cq.Shutdown();
  void* t;
  bool ok;
  while (cq.Next(&t, &ok)) {
  }
}

TEST_F(RelayTest, MessageOverTheLimitIsRefusedFromItsPrefix) {
  RelayLimits limits;
  limits.max_message_bytes = 1 << 20;
  start(limits);
  auto r = unary_call(channel(), "/test.Echo/Big", std::string((2 << 20) + 1, 'b'));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(r.status.error_message().find("exceeds the sidecar's limit of 1048576 bytes"), std::string::npos)
      << r.status.error_message();
  EXPECT_EQ(echo_.messages(), 0);
  ASSERT_TRUE(eventually([&] { return ends_count() == 1; }));
  EXPECT_EQ(ends()[0].request_bytes, 0u);  // not one byte of it went upstream
  EXPECT_EQ(ends()[0].refusal_reason, "message_too_large");
  // The same connection serves the next call.
  auto ok = unary_call(channel(), "/test.Echo/Small", "s");
  EXPECT_TRUE(ok.status.ok());
}

TEST_F(RelayTest, PeerThatNeverReadsCostsAtMostTheStreamWindow) {
  RelayLimits limits;
  limits.stream_window = 1 << 20;
  start(limits, /*tls=*/false);
  H2Peer client(H2Peer::Role::client, connect_to(relay_->port()));
  // 24 MiB comes back: far more than the socket buffers and the relay's window hold.
  const std::string payload(24 << 20, 'r');
  int32_t id = client.request("/test.Echo/Flood", {}, framed(payload), true);
  // Reads until the echo server has the request, then never again.
  ASSERT_TRUE(client.pump_until([&] { return client.streams[id].sent == payload.size() + 5; }, 60s));
  const RelayStats& stats = relay_->stats();
  // The upstream fills the relay's window for this stream and stops there.
  ASSERT_TRUE(client.pump_until([&] { return stats.buffered_bytes.load() >= (1 << 20) - 64 * 1024; }, 60s, false))
      << stats.buffered_bytes.load();
  uint64_t relayed = stats.bytes_downstream_total.load();
  // More rounds change nothing: the bytes held stay within the window.
  client.pump_until([] { return false; }, 300ms, false);
  EXPECT_LE(stats.peak_buffered_bytes.load(), int64_t{1} << 20);
  EXPECT_LE(stats.buffered_bytes.load(), int64_t{1} << 20);
  EXPECT_EQ(stats.bytes_downstream_total.load(), relayed);
  EXPECT_LE(stats.output_bytes.load(), static_cast<int64_t>(limits.max_output_bytes) + 16 * 1024 + 9);
  // The client gives up: everything held is released.
  client.rst(id, NGHTTP2_CANCEL);
  client.pump_until([] { return false; }, 50ms, false);
  ASSERT_TRUE(eventually([&] { return stats.buffered_bytes.load() == 0 && stats.active_calls.load() == 0; }));
}

TEST_F(RelayTest, InspectedStreamWithAReaderThatNeverReadsHoldsTheWindowAndOneMessage) {
  RelayLimits limits;
  limits.stream_window = 1 << 20;
  start(limits, /*tls=*/false);
  H2Peer client(H2Peer::Role::client, connect_to(relay_->port()));
  // 24 messages of 1 MiB, echoed one by one; the client never reads the replies.
  std::string body;
  const std::string one(1 << 20, 'i');
  for (int i = 0; i < 24; ++i) body += framed(one);
  int32_t id = client.request(kInspected, {}, body, true);
  ASSERT_TRUE(client.pump_until([&] { return client.streams[id].sent == body.size(); }, 60s));
  const RelayStats& stats = relay_->stats();
  ASSERT_TRUE(client.pump_until([&] { return stats.buffered_bytes.load() >= (1 << 20); }, 60s, false));
  client.pump_until([] { return false; }, 300ms, false);
  // At most: per direction the window, one message being collected and one being sent.
  EXPECT_LE(stats.peak_buffered_bytes.load(), 2 * (3 << 20) + 64 * 1024);
  client.rst(id, NGHTTP2_CANCEL);
  client.pump_until([] { return false; }, 50ms, false);
  ASSERT_TRUE(eventually([&] { return stats.buffered_bytes.load() == 0 && stats.active_calls.load() == 0; }));
}

TEST_F(RelayTest, HeadersSplitIntoContinuationsAreReassembledBeforeTheDecision) {
  start({}, /*tls=*/false);
  H2Peer client(H2Peer::Role::client, connect_to(relay_->port()));
  // 40 KiB of an incompressible value: HEADERS + CONTINUATION frames of 16 KiB.
  std::string big = random_bytes(30 * 1024, 7);
  for (auto& c : big) c = static_cast<char>('a' + (static_cast<unsigned char>(c) % 26));
  int32_t id = client.request(kDenied, {{"x-big", big}}, framed("x"), true);
  ASSERT_TRUE(client.pump_until([&] { return client.streams[id].closed; }));
  EXPECT_GE(client.frames_sent[NGHTTP2_CONTINUATION], 1);
  auto& s = client.streams[id];
  EXPECT_EQ(H2Peer::header(s.headers, ":status"), "200");
  EXPECT_EQ(H2Peer::header(s.headers, "content-type"), "application/grpc");
  EXPECT_EQ(H2Peer::header(s.headers, "grpc-status"), "7");  // trailers-only
  EXPECT_EQ(H2Peer::header(s.headers, "grpc-message"), percent_encode_grpc_message(deny_message_));
  std::lock_guard<std::mutex> lock(mu_);
  bool found = false;
  for (const auto& [n, v] : last_headers_) found = found || (n == "x-big" && v == big);
  EXPECT_TRUE(found) << "decide() saw the whole header block";
}

TEST_F(RelayTest, HeaderListOverTheLimitIsRefusedBeforeTheDecision) {
  start({}, /*tls=*/false);
  H2Peer client(H2Peer::Role::client, connect_to(relay_->port()));
  std::vector<std::pair<std::string, std::string>> extra;
  for (int i = 0; i < 5; ++i) extra.emplace_back("x-pad-" + std::to_string(i), std::string(14 * 1024, 'p'));
  int32_t id = client.request("/test.Echo/Unary", extra, framed("x"), true);
  ASSERT_TRUE(client.pump_until([&] { return client.streams[id].closed; }));
  auto& s = client.streams[id];
  EXPECT_EQ(s.close_code, 0u);
  EXPECT_FALSE(client.peer_closed);
  EXPECT_EQ(H2Peer::header(s.headers, "grpc-status"), "8");
  EXPECT_NE(H2Peer::header(s.headers, "grpc-message").find("exceed the sidecar's limit of 61440 bytes"), std::string::npos);
  EXPECT_EQ(decisions(), 0);
  EXPECT_EQ(echo_.calls(), 0);
  ASSERT_TRUE(eventually([&] { return ends_count() == 1; }));
  EXPECT_EQ(ends()[0].refusal_reason, "header_list_too_large");
  // A list just under the limit reaches decide() on the same connection (the echo
  // server, gRPC, would itself refuse 50 KiB of metadata, so the decision refuses it).
  int32_t ok = client.request(kDenied, {{"x-pad", std::string(50 * 1024, 'q')}}, framed("y"), true);
  ASSERT_TRUE(client.pump_until([&] { return client.streams[ok].closed; }));
  EXPECT_EQ(H2Peer::header(client.streams[ok].headers, "grpc-status"), "7");
  EXPECT_EQ(decisions(), 1);
}

TEST_F(RelayTest, StreamResetMidMessageIsPassedUpstreamAndTheConnectionLives) {
  start({}, /*tls=*/false);
  H2Peer client(H2Peer::Role::client, connect_to(relay_->port()));
  // The prefix announces 100,000 bytes; only 40,000 are sent, then RST_STREAM.
  std::string partial = grpc_prefix(false, 100000) + std::string(40000, 'h');
  int32_t id = client.request("/test.Echo/Half", {}, partial, false);
  ASSERT_TRUE(client.pump_until([&] { return client.streams[id].sent == partial.size(); }));
  ASSERT_TRUE(eventually([&] { return echo_.calls() == 1; }));
  client.rst(id, NGHTTP2_CANCEL);
  ASSERT_TRUE(client.pump_until([&] { return ends_count() == 1; }));
  EXPECT_EQ(ends()[0].grpc_status, -1);
  EXPECT_EQ(ends()[0].reset_code, static_cast<uint32_t>(NGHTTP2_CANCEL));
  EXPECT_TRUE(eventually([&] { return relay_->stats().active_calls.load() == 0; }));
  // The upstream connection is still the first one and serves the next call.
  int32_t next = client.request("/test.Echo/Again", {}, framed("again"), true);
  ASSERT_TRUE(client.pump_until([&] { return client.streams[next].closed; }));
  EXPECT_EQ(client.streams[next].data, framed("again"));
  EXPECT_EQ(relay_->stats().upstream_connects_total.load(), 1u);
}

TEST_F(RelayTest, UpstreamResetIsPassedDownstreamWithItsCode) {
  DialedUpstream upstream;
  start({}, /*tls=*/false, upstream.dial());
  H2Peer client(H2Peer::Role::client, connect_to(relay_->port()));
  int32_t id = client.request("/test.Echo/Reset", {}, framed("r"), false);
  ASSERT_TRUE(client.pump_until([&] { return decisions() == 1; }));
  H2Peer server(H2Peer::Role::server, upstream.next());
  ASSERT_TRUE(server.pump_until([&] { return !server.requests_seen.empty(); }));
  server.rst(server.requests_seen[0], NGHTTP2_ENHANCE_YOUR_CALM);
  server.pump_until([] { return false; }, 20ms);
  ASSERT_TRUE(client.pump_until([&] { return client.streams[id].closed; }));
  EXPECT_TRUE(client.streams[id].rst_received);
  EXPECT_EQ(client.streams[id].close_code, static_cast<uint32_t>(NGHTTP2_ENHANCE_YOUR_CALM));
}

TEST_F(RelayTest, UpstreamThatDiesMidStreamEndsEveryCallWithUnavailable) {
  DialedUpstream upstream;
  start({}, /*tls=*/true, upstream.dial());
  auto ch = channel();
  std::vector<grpc::Status> statuses(3);
  std::vector<std::thread> callers;
  for (int i = 0; i < 3; ++i)
    callers.emplace_back([&, i] { statuses[i] = unary_call(ch, "/test.Echo/Doomed", "payload", {}, 30s).status; });
  H2Peer server(H2Peer::Role::server, upstream.next());
  ASSERT_TRUE(server.pump_until([&] { return server.requests_seen.size() == 3; }));
  // Answers each with headers and half a message, then the connection drops.
  for (int32_t sid : server.requests_seen) server.respond(sid, grpc_prefix(false, 1000) + std::string(300, 'z'), false);
  server.pump_until([&] { return false; }, 50ms);
  server.die();
  for (auto& t : callers) t.join();
  for (const auto& s : statuses) {
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
    EXPECT_NE(s.error_message().find("upstream connection"), std::string::npos) << s.error_message();
  }
  ASSERT_TRUE(eventually([&] { return ends_count() == 3; }));
  for (const auto& e : ends()) EXPECT_TRUE(e.upstream_failed);
  EXPECT_EQ(relay_->stats().active_calls.load(), 0);
}

TEST_F(RelayTest, FrozenUpstreamIsFoundByItsUnansweredPingAndTheCallFailsUnavailable) {
  // A peer that stops (SIGSTOP, a vanished node): the socket stays open, nothing comes
  // back, no RST ever arrives. Without keepalive the call would wait for its deadline
  // and every later call would queue on the same dead connection.
  DialedUpstream upstream;
  RelayLimits limits;
  limits.keepalive_interval = 200ms;
  limits.keepalive_timeout = 300ms;
  start(limits, /*tls=*/true, upstream.dial());
  auto ch = channel();
  const auto t0 = std::chrono::steady_clock::now();
  grpc::Status status;
  std::thread caller([&] { status = unary_call(ch, "/test.Echo/Frozen", "payload", {}, 30s).status; });
  const int frozen = upstream.next();  // the test's end: never read, never written
  ASSERT_GE(frozen, 0);
  caller.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_NE(status.error_message().find("did not answer a PING within 300 ms"), std::string::npos)
      << status.error_message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 20s);  // well before the call's own deadline
  EXPECT_EQ(relay_->stats().keepalive_timeouts_total.load(), 1u);
  close(frozen);
}

TEST_F(RelayTest, AnsweredPingsKeepASlowUpstreamsConnection) {
  DialedUpstream upstream;
  RelayLimits limits;
  limits.keepalive_interval = 100ms;
  limits.keepalive_timeout = 300ms;
  start(limits, /*tls=*/true, upstream.dial());
  auto ch = channel();
  grpc::Status status;
  std::thread caller([&] { status = unary_call(ch, "/test.Echo/Slow", "payload", {}, 30s).status; });
  H2Peer server(H2Peer::Role::server, upstream.next());
  ASSERT_TRUE(server.pump_until([&] { return server.requests_seen.size() == 1; }));
  // Slow to answer, but alive: its session answers the relay's PINGs while it thinks,
  // for more than twice interval + timeout.
  server.pump_until([&] { return false; }, 1000ms);
  EXPECT_GE(server.pings_received, 2);
  EXPECT_EQ(relay_->stats().keepalive_timeouts_total.load(), 0u);
  EXPECT_EQ(relay_->stats().active_calls.load(), 1);  // the call still waits for its answer
  EXPECT_EQ(relay_->stats().upstream_connects_total.load(), 1u);
  server.die();
  caller.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(status.error_message().find("PING"), std::string::npos) << status.error_message();
}

TEST_F(RelayTest, UpstreamGoawayMovesNewCallsToANewConnection) {
  auto first = std::make_unique<EchoServer>();
  std::atomic<int> port{first->port()};
  start({}, true, [&port] {
    int fd = connect_to(port.load());
    return fd;
  });
  auto ch = channel();
  ASSERT_TRUE(unary_call(ch, "/test.Echo/One", "1").status.ok());
  EXPECT_EQ(first->calls(), 1);
  EchoServer second;
  port = second.port();
  first.reset();  // GOAWAY, then the connection closes
  ASSERT_TRUE(eventually([&] { return relay_->stats().upstream_connections.load() == 0; }));
  auto r = unary_call(ch, "/test.Echo/Two", "2");
  EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(second.calls(), 1);
  EXPECT_EQ(relay_->stats().upstream_connects_total.load(), 2u);
  EXPECT_EQ(relay_->stats().downstream_connections.load(), 1);  // the client never noticed
}

TEST_F(RelayTest, ShutdownSendsGoawayAndLetsOpenStreamsFinish) {
  start({}, /*tls=*/false);
  H2Peer client(H2Peer::Role::client, connect_to(relay_->port()));
  int32_t id = client.request("/test.Echo/Open", {}, framed("first"), false);
  ASSERT_TRUE(client.pump_until([&] { return client.streams[id].data == framed("first"); }));
  std::thread stopper([&] { relay_->shutdown(20s); });
  ASSERT_TRUE(client.pump_until([&] { return client.goaway_received; }));
  // A new stream after GOAWAY is refused; the open one still completes.
  client.send_data(id, framed("second"), true);
  ASSERT_TRUE(client.pump_until([&] { return client.streams[id].closed; }));
  stopper.join();
  EXPECT_EQ(client.streams[id].data, framed("first") + framed("second"));
  EXPECT_EQ(H2Peer::header(client.streams[id].trailers, "grpc-status"), "0");
}

TEST_F(RelayTest, ClientGoawayClosesTheConnectionAfterItsStreams) {
  start({}, /*tls=*/false);
  H2Peer client(H2Peer::Role::client, connect_to(relay_->port()));
  int32_t id = client.request("/test.Echo/Last", {}, framed("bye"), true);
  // (nghttp2 sends a GOAWAY ahead of queued HEADERS: the request goes out first.)
  ASSERT_TRUE(client.pump_until([&] { return client.streams[id].sent == framed("bye").size(); }));
  client.goaway(NGHTTP2_NO_ERROR);
  ASSERT_TRUE(client.pump_until([&] { return client.streams[id].closed; }));
  EXPECT_EQ(client.streams[id].data, framed("bye"));
  EXPECT_TRUE(eventually([&] { return relay_->stats().downstream_connections.load() == 0; }));
}

}  // namespace
}  // namespace shardguard::sidecar::h2
