// The sidecar's L4 tunnels (issue 20, sidecar/src/tunnel.h) between real Proxy
// instances over real TLS on 127.0.0.1: the c10d store and Gloo connections of the
// replicas of one stage, with the policy of pipeline_policy(…, replicas 2).
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <openssl/ssl.h>
#include <prometheus/registry.h>

#include "shardguard/common/files.h"
#include "shardguard/common/pki.h"
#include "shardguard/policy/policy.h"
#include "shardguard/sidecar/proxy.h"
#include "support/temp_dir.h"
#include "support/wait.h"

namespace shardguard::sidecar {
namespace {

using namespace std::chrono_literals;
using testsupport::eventually;

const std::string kTd = "shardguard.local";
const std::string kNs = "ml";
const std::string kJob = "fm";

std::string rid(int shard, int replica) {
  return spiffe_id_for_replica(kTd, kNs, kJob, static_cast<uint32_t>(shard), static_cast<uint32_t>(replica));
}

double metric(prometheus::Registry& r, const std::string& name, const std::map<std::string, std::string>& labels) {
  return testsupport::registry_sum(r, name, labels);
}

int connect_port(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  timeval tv{10, 0};  // a bound only: every read below ends by data or a close
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  return fd;
}

// Everything the other side sends until it closes (or the 10 s bound); *eof: it closed
// (FIN), *reset: it closed with our bytes unread (RST).
std::string read_to_eof(int fd, bool* eof, bool* reset = nullptr) {
  std::string out;
  char buf[16384];
  *eof = false;
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
      continue;
    }
    *eof = n == 0;
    if (reset) *reset = n < 0 && errno == ECONNRESET;
    return out;
  }
}

// A plain TCP server on 127.0.0.1 (the local c10d store, or a Gloo listener): each
// connection is answered with what it sends, transformed byte by byte (so a reply is
// not the request by accident), and half-closed when the client half-closes.
class EchoTcp {
 public:
  EchoTcp() {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a);
    ::listen(fd_, 16);
    socklen_t len = sizeof a;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    if (::pipe(stop_) != 0) std::abort();
    thread_ = std::thread([this] { run(); });
  }
  ~EchoTcp() {
    ::close(stop_[1]);
    thread_.join();
    for (auto& t : conns_) t.join();
    ::close(stop_[0]);
    ::close(fd_);
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  int connections() const { return connections_.load(); }
  int64_t received() const { return received_.load(); }
  static char transform(char c) { return static_cast<char>(c ^ 0x5a); }

 private:
  void run() {
    for (;;) {
      pollfd p[2] = {{fd_, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (::poll(p, 2, -1) < 0 || p[1].revents != 0) return;
      const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      ++connections_;
      conns_.emplace_back([this, c] { serve(c); });
    }
  }
  void serve(int c) {
    char buf[8192];
    for (;;) {
      pollfd p[2] = {{c, POLLIN, 0}, {stop_[0], POLLIN, 0}};
      if (::poll(p, 2, -1) < 0 || p[1].revents != 0) break;
      const ssize_t n = ::recv(c, buf, sizeof buf, 0);
      if (n <= 0) break;
      received_ += n;
      for (ssize_t i = 0; i < n; ++i) buf[i] = transform(buf[i]);
      if (::send(c, buf, static_cast<size_t>(n), MSG_NOSIGNAL) != n) break;
    }
    ::shutdown(c, SHUT_WR);
    ::close(c);
  }
  int fd_ = -1;
  int port_ = 0;
  int stop_[2] = {-1, -1};
  std::thread thread_;
  std::vector<std::thread> conns_;  // joined at the end (a test opens a few)
  std::atomic<int> connections_{0};
  std::atomic<int64_t> received_{0};
};

std::string pattern(size_t n, int seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 131 + static_cast<size_t>(seed) * 7 + i / 251) & 0xff);
  return s;
}

// Sends `payload`, half-closes, and reads the reply to the end on another thread.
struct Exchange {
  std::string reply;
  bool eof = false;
  bool reset = false;
  bool closed() const { return eof || reset; }  // a refusal may leave our bytes unread
};
Exchange exchange(int port, const std::string& payload) {
  Exchange ex;
  const int fd = connect_port(port);
  if (fd < 0) return ex;
  std::thread reader([&] { ex.reply = read_to_eof(fd, &ex.eof, &ex.reset); });
  size_t at = 0;
  while (at < payload.size()) {
    const ssize_t n = ::send(fd, payload.data() + at, payload.size() - at, MSG_NOSIGNAL);
    if (n <= 0) break;
    at += static_cast<size_t>(n);
  }
  ::shutdown(fd, SHUT_WR);
  reader.join();
  ::close(fd);
  return ex;
}

std::string transformed(std::string s) {
  for (char& c : s) c = EchoTcp::transform(c);
  return s;
}

class TunnelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ca_ = new CaBundle(create_ca("job-ca", std::chrono::hours(24)));
    for (const auto& [shard, replica] : std::vector<std::pair<int, int>>{{0, 0}, {0, 1}, {1, 1}}) {
      (*leaves_)[rid(shard, replica)] = issue_leaf(*ca_, rid(shard, replica), std::chrono::hours(24));
    }
  }
  static void TearDownTestSuite() {
    delete ca_;
    leaves_->clear();
  }
  void SetUp() override { write_file_atomic(dir_ + "/ca.pem", ca_->cert_pem); }
  void TearDown() override {
    for (auto& p : proxies_) p->shutdown(0ms);
    proxies_.clear();
  }

  // A sidecar with `id`'s certificate and the policy of stage `policy_shard` replica
  // `policy_replica` of a 2-stage job with 2 replicas.
  ProxyConfig config(const std::string& id, int policy_shard, int policy_replica) {
    const std::string d = dir_ + "/" + std::to_string(next_++);
    std::filesystem::create_directories(d);
    write_file_atomic(d + "/cert.pem", leaves_->at(id).cert_pem);
    write_file_atomic(d + "/key.pem", leaves_->at(id).key_pem, 0600);
    write_file_atomic(d + "/policy.json",
                      to_json(policy::pipeline_policy(kTd, kNs, kJob, policy_shard, 2, {}, policy_replica, 2)));
    ProxyConfig c;
    c.data_plane = DataPlane::h2;
    c.inbound_listen = "127.0.0.1:0";
    c.outbound_listen = "127.0.0.1:0";
    c.upstream = "127.0.0.1:1";
    c.cert_file = d + "/cert.pem";
    c.key_file = d + "/key.pem";
    c.ca_file = dir_ + "/ca.pem";
    c.policy_file = d + "/policy.json";
    c.handshake_timeout = 2000ms;
    c.first_bytes_timeout = 2000ms;
    c.reload_interval = 50ms;
    c.audit_file = d + "/audit.jsonl";
    return c;
  }
  Proxy& start(ProxyConfig c, std::shared_ptr<prometheus::Registry>* reg) {
    *reg = std::make_shared<prometheus::Registry>();
    proxies_.push_back(std::make_unique<Proxy>(std::move(c), *reg));
    proxies_.back()->start();
    return *proxies_.back();
  }
  // Replica 0 of stage 0: serves the store (store_) and maps replica 1's Gloo
  // tunnels to gloo_ by the map file.
  Proxy& start_replica0(const std::string& map_text) {
    ProxyConfig c = config(rid(0, 0), 0, 0);
    c.tunnel_store = store_.address();
    c.tunnel_map_file = dir_ + "/tunnel-map";
    write_file_atomic(c.tunnel_map_file, map_text);
    r0_audit_ = c.audit_file;
    return start(c, &r0_reg_);
  }
  // A sidecar holding `id`'s certificate whose --tunnel store and gloo lead to replica 0.
  Proxy& start_dialler(const std::string& id, int policy_shard, int policy_replica, const Proxy& r0) {
    ProxyConfig c = config(id, policy_shard, policy_replica);
    c.peers[rid(0, 0)] = "127.0.0.1:" + std::to_string(r0.inbound_port());
    c.tunnels.push_back({"store", "127.0.0.1:0", rid(0, 0)});
    c.tunnels.push_back({"gloo", "127.0.0.1:0", rid(0, 0)});
    return start(c, &r1_reg_);
  }
  std::string map_line(const std::string& id, const std::string& address) { return id + " " + address + "\n"; }

  static CaBundle* ca_;
  static std::map<std::string, Leaf>* leaves_;
  const testsupport::TempDir tmp_{"tunnel_test"};
  const std::string dir_ = tmp_.str();
  int next_ = 0;
  EchoTcp store_, gloo_;
  std::shared_ptr<prometheus::Registry> r0_reg_, r1_reg_;
  std::string r0_audit_;
  std::vector<std::unique_ptr<Proxy>> proxies_;
};
CaBundle* TunnelTest::ca_ = nullptr;
std::map<std::string, Leaf>* TunnelTest::leaves_ = new std::map<std::string, Leaf>();

TEST_F(TunnelTest, StoreAndGlooCrossTheSidecarsIntactAndAreCountedExactly) {
  Proxy& r0 = start_replica0(map_line(rid(1, 0), "127.0.0.1:9") + map_line(rid(0, 1), gloo_.address()));
  Proxy& r1 = start_dialler(rid(0, 1), 0, 1, r0);
  const std::string store_payload = pattern(24 * 1024 + 17, 1);
  const std::string gloo_payload = pattern(300 * 1024 + 5, 2);

  const Exchange s = exchange(r1.tunnel_port(0), store_payload);
  EXPECT_TRUE(s.eof) << "the half-close did not come back";
  EXPECT_EQ(s.reply, transformed(store_payload));
  const Exchange g = exchange(r1.tunnel_port(1), gloo_payload);
  EXPECT_TRUE(g.eof);
  EXPECT_EQ(g.reply, transformed(gloo_payload));
  EXPECT_EQ(store_.connections(), 1);
  EXPECT_EQ(store_.received(), static_cast<int64_t>(store_payload.size()));
  EXPECT_EQ(gloo_.connections(), 1);
  EXPECT_EQ(gloo_.received(), static_cast<int64_t>(gloo_payload.size()));

  // Payload bytes exactly, both ways, on both sidecars (the method line and the
  // answer are not payload).
  const double total = static_cast<double>(store_payload.size() + gloo_payload.size());
  const auto counted = [&](prometheus::Registry& reg, const char* dir, const std::string& peer) {
    return metric(reg, "shardguard_proxy_bytes_total", {{"direction", dir}, {"peer", peer}});
  };
  EXPECT_TRUE(eventually([&] {
    return counted(*r1_reg_, "sent", rid(0, 0)) == total && counted(*r1_reg_, "received", rid(0, 0)) == total &&
           counted(*r0_reg_, "sent", rid(0, 1)) == total && counted(*r0_reg_, "received", rid(0, 1)) == total;
  }));
  EXPECT_EQ(counted(*r1_reg_, "sent", rid(0, 0)), total);
  EXPECT_EQ(counted(*r0_reg_, "received", rid(0, 1)), total);
  for (auto* reg : {r0_reg_.get(), r1_reg_.get()}) {
    EXPECT_EQ(metric(*reg, "shardguard_tunnel_bytes_total",
                     {{"direction", "sent"}, {"method", policy::kTunnelGlooMethod}}),
              static_cast<double>(gloo_payload.size()));
    EXPECT_EQ(metric(*reg, "shardguard_tunnel_bytes_total",
                     {{"direction", "received"}, {"method", policy::kTunnelStoreMethod}}),
              static_cast<double>(store_payload.size()));
  }
  // One allow per tunnel and side, by the tunnel rules.
  EXPECT_EQ(metric(*r0_reg_, "shardguard_authz_decisions_total",
                   {{"decision", "allow"}, {"rule", "tunnel-from-replicas"}, {"method", policy::kTunnelGlooMethod}}),
            1);
  EXPECT_EQ(metric(*r1_reg_, "shardguard_authz_decisions_total",
                   {{"decision", "allow"}, {"rule", "tunnel-to-store"}, {"method", policy::kTunnelStoreMethod}}),
            1);
  EXPECT_TRUE(eventually([&] { return metric(*r0_reg_, "shardguard_tunnels_open", {}) == 0; }));
}

// A peer's address may be a host name (a Service's in a cluster): it is looked up off
// the tunnel's thread, within the tunnel's deadline, and the tunnel goes through.
TEST_F(TunnelTest, APeerNamedByHostNameIsLookedUpAndReached) {
  Proxy& r0 = start_replica0("");
  ProxyConfig c = config(rid(0, 1), 0, 1);
  c.peers[rid(0, 0)] = "localhost:" + std::to_string(r0.inbound_port());
  c.tunnels.push_back({"store", "127.0.0.1:0", rid(0, 0)});
  Proxy& r1 = start(c, &r1_reg_);
  const std::string payload = pattern(4096 + 3, 5);
  const Exchange s = exchange(r1.tunnel_port(0), payload);
  EXPECT_TRUE(s.eof);
  EXPECT_EQ(s.reply, transformed(payload));
  EXPECT_EQ(store_.connections(), 1);
}

// The half-close goes through on its own: the client half-closes, reads the reply to
// the end, and only the tunnel's own FIN ends it (the echo server answers after EOF).
TEST_F(TunnelTest, AnIdleTunnelStaysOpenAndShutdownClosesIt) {
  Proxy& r0 = start_replica0(map_line(rid(0, 1), gloo_.address()));
  Proxy& r1 = start_dialler(rid(0, 1), 0, 1, r0);
  const int fd = connect_port(r1.tunnel_port(1));
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::send(fd, "ping", 4, 0), 4);
  char buf[4];
  ASSERT_EQ(::recv(fd, buf, 4, MSG_WAITALL), 4);
  EXPECT_EQ(std::string(buf, 4), transformed("ping"));
  EXPECT_EQ(metric(*r0_reg_, "shardguard_tunnels_open", {}), 1);
  const auto t0 = std::chrono::steady_clock::now();
  r0.shutdown(200ms);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
  bool eof = false;
  read_to_eof(fd, &eof);
  EXPECT_TRUE(eof) << "the tunnel outlived replica 0's sidecar";
  ::close(fd);
}

TEST_F(TunnelTest, AnotherStageIsRefusedByTheInboundSideCountedAndAudited) {
  Proxy& r0 = start_replica0(map_line(rid(1, 1), gloo_.address()));
  // Stage 1's certificate, with a policy that lets it dial (its own would not).
  Proxy& evil = start_dialler(rid(1, 1), 0, 1, r0);
  for (int i = 0; i < 2; ++i) {
    const Exchange ex = exchange(evil.tunnel_port(i), "join the group");
    EXPECT_TRUE(ex.closed());
    EXPECT_EQ(ex.reply, "");
  }
  EXPECT_EQ(gloo_.connections(), 0);
  EXPECT_EQ(store_.connections(), 0);
  for (const char* m : {policy::kTunnelStoreMethod, policy::kTunnelGlooMethod}) {
    EXPECT_EQ(metric(*r0_reg_, "shardguard_authz_decisions_total",
                     {{"decision", "deny"}, {"rule", "default-deny"}, {"method", m}, {"peer", rid(1, 1)}}),
              1)
        << m;
  }
  EXPECT_EQ(metric(*r1_reg_, "shardguard_tunnel_refused_total", {{"reason", "denied_by_peer"}}), 2);
  EXPECT_EQ(metric(*r0_reg_, "shardguard_proxy_bytes_total", {{"peer", rid(1, 1)}}), 0);
  const std::string audit = read_file(r0_audit_);
  EXPECT_NE(audit.find(std::string("\"method\":\"") + policy::kTunnelGlooMethod + "\""), std::string::npos) << audit;
  EXPECT_NE(audit.find(rid(1, 1)), std::string::npos) << audit;
  EXPECT_NE(audit.find("\"rule\":\"default-deny\""), std::string::npos) << audit;
}

TEST_F(TunnelTest, EgressIsDecidedBeforeDialling) {
  Proxy& r0 = start_replica0("");
  // Replica 0 may not send Store anywhere (it serves the store).
  ProxyConfig c = config(rid(0, 0), 0, 0);
  c.peers[rid(0, 1)] = "127.0.0.1:" + std::to_string(r0.inbound_port());
  c.tunnels.push_back({"store", "127.0.0.1:0", rid(0, 1)});
  std::shared_ptr<prometheus::Registry> reg;
  Proxy& p = start(c, &reg);
  const Exchange ex = exchange(p.tunnel_port(0), "x");
  EXPECT_TRUE(ex.closed());
  EXPECT_EQ(metric(*reg, "shardguard_authz_decisions_total",
                   {{"decision", "deny"}, {"method", policy::kTunnelStoreMethod}, {"peer", rid(0, 1)}}),
            1);
  EXPECT_EQ(metric(*r0_reg_, "shardguard_authz_decisions_total", {}), 0);  // never dialled
  EXPECT_NE(read_file(c.audit_file).find(policy::kTunnelStoreMethod), std::string::npos);
}

TEST_F(TunnelTest, UnmappedPeersAndNonLoopbackMapLinesAreRefused) {
  Proxy& r0 = start_replica0(map_line(rid(1, 1), gloo_.address()));  // not replica 1's line
  Proxy& r1 = start_dialler(rid(0, 1), 0, 1, r0);
  Exchange ex = exchange(r1.tunnel_port(1), "x");
  EXPECT_TRUE(ex.closed());
  EXPECT_EQ(ex.reply, "");
  EXPECT_EQ(metric(*r0_reg_, "shardguard_authz_decisions_total",
                   {{"decision", "deny"}, {"rule", "tunnel-unmapped"}, {"peer", rid(0, 1)}}),
            1);
  // Re-read for every tunnel: a line with a host that is not loopback is refused too.
  write_file_atomic(dir_ + "/tunnel-map", map_line(rid(0, 1), "10.1.2.3:" + gloo_.address().substr(10)));
  ex = exchange(r1.tunnel_port(1), "x");
  EXPECT_TRUE(ex.closed());
  EXPECT_EQ(metric(*r0_reg_, "shardguard_authz_decisions_total",
                   {{"decision", "deny"}, {"rule", "tunnel-unmapped"}, {"peer", rid(0, 1)}}),
            2);
  EXPECT_EQ(gloo_.connections(), 0);
  const std::string audit = read_file(r0_audit_);
  EXPECT_NE(audit.find("\"rule\":\"tunnel-unmapped\""), std::string::npos) << audit;
  // A map that is a FIFO (or a link) is refused at once instead of blocking the tunnel.
  ::unlink((dir_ + "/tunnel-map").c_str());
  ASSERT_EQ(::mkfifo((dir_ + "/tunnel-map").c_str(), 0600), 0);
  ex = exchange(r1.tunnel_port(1), "x");
  EXPECT_TRUE(ex.closed());
  EXPECT_EQ(metric(*r0_reg_, "shardguard_authz_decisions_total",
                   {{"decision", "deny"}, {"rule", "tunnel-unmapped"}, {"peer", rid(0, 1)}}),
            3);
  ::unlink((dir_ + "/tunnel-map").c_str());
  write_file_atomic(dir_ + "/real-map", map_line(rid(0, 1), gloo_.address()));
  ASSERT_EQ(::symlink((dir_ + "/real-map").c_str(), (dir_ + "/tunnel-map").c_str()), 0);
  ex = exchange(r1.tunnel_port(1), "x");
  EXPECT_TRUE(ex.closed());
  EXPECT_EQ(metric(*r0_reg_, "shardguard_authz_decisions_total",
                   {{"decision", "deny"}, {"rule", "tunnel-unmapped"}, {"peer", rid(0, 1)}}),
            4);
  EXPECT_EQ(gloo_.connections(), 0);
  ::unlink((dir_ + "/tunnel-map").c_str());
  // And once the line is right, the same tunnel goes through.
  write_file_atomic(dir_ + "/tunnel-map", map_line(rid(0, 1), gloo_.address()));
  ex = exchange(r1.tunnel_port(1), "ok");
  EXPECT_EQ(ex.reply, transformed("ok"));
}

// A raw TLS client on the inbound port offering sg-tunnel/1: with no certificate it is
// refused in the handshake; the h2 relay on the same port is unaffected (proxy_test).
TEST_F(TunnelTest, ATunnelClientWithoutACertificateIsRefused) {
  Proxy& r0 = start_replica0(map_line(rid(0, 1), gloo_.address()));
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  ASSERT_NE(ctx, nullptr);
  SSL_CTX_set_alpn_protos(ctx, reinterpret_cast<const unsigned char*>("\x0bsg-tunnel/1"), 12);
  SSL* ssl = SSL_new(ctx);
  const int fd = connect_port(r0.inbound_port());
  ASSERT_GE(fd, 0);
  SSL_set_fd(ssl, fd);
  bool got_data = false;
  if (SSL_connect(ssl) == 1) {
    const std::string line = std::string(policy::kTunnelGlooMethod) + "\n";
    SSL_write(ssl, line.data(), static_cast<int>(line.size()));
    char buf[64];
    got_data = SSL_read(ssl, buf, sizeof buf) > 0;  // TLS 1.3: the refusal comes here
  }
  EXPECT_FALSE(got_data);
  SSL_free(ssl);
  ::close(fd);
  SSL_CTX_free(ctx);
  EXPECT_TRUE(eventually([&] {
    return metric(*r0_reg_, "shardguard_tls_handshake_failures_total", {{"reason", "no_certificate"}}) == 1;
  }));
  EXPECT_EQ(gloo_.connections(), 0);
}

// A peer needs no certificate to hold an inbound tunnel's handshake: one address holds
// at most kMaxTunnelHandshakesPerSource of them; the next is closed at once and counted,
// and the slots come back when those connections end.
TEST_F(TunnelTest, OneAddressHoldsOnlyAFewHandshakesAtOnce) {
  Proxy& r0 = start_replica0(map_line(rid(0, 1), gloo_.address()));
  Proxy& r1 = start_dialler(rid(0, 1), 0, 1, r0);
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  ASSERT_NE(ctx, nullptr);
  SSL_CTX_set_alpn_protos(ctx, reinterpret_cast<const unsigned char*>("\x0bsg-tunnel/1"), 12);
  constexpr size_t kPerSource = 16;  // kMaxTunnelHandshakesPerSource (sidecar/src/tunnel.h)
  const auto open = [&] { return metric(*r0_reg_, "shardguard_tunnels_open", {}); };
  std::vector<std::pair<SSL*, int>> stalled;
  for (size_t k = 0; k <= kPerSource; ++k) {
    const int fd = connect_port(r0.inbound_port());
    ASSERT_GE(fd, 0);
    // The client's first flight only, made in memory and written to the socket by hand;
    // nothing of the server's answer is ever fed back, so the handshake stalls however
    // fast the sidecar answers.
    SSL* ssl = SSL_new(ctx);
    BIO* in = BIO_new(BIO_s_mem());
    BIO* out = BIO_new(BIO_s_mem());
    SSL_set_bio(ssl, in, out);
    SSL_set_connect_state(ssl);
    ASSERT_EQ(SSL_do_handshake(ssl), -1);
    ASSERT_EQ(SSL_get_error(ssl, -1), SSL_ERROR_WANT_READ);
    char* hello = nullptr;
    const long hello_len = BIO_get_mem_data(out, &hello);
    ASSERT_GT(hello_len, 0);
    ASSERT_EQ(::write(fd, hello, static_cast<size_t>(hello_len)), hello_len);
    stalled.emplace_back(ssl, fd);
    if (k + 1 == kPerSource) {
      // Every slot taken by a stalled handshake before the next connection comes.
      ASSERT_TRUE(eventually([&] { return open() == static_cast<double>(kPerSource); })) << open();
    }
  }
  // Not with a blocking read: the refused connection is closed by the sidecar.
  EXPECT_TRUE(eventually([&] {
    return metric(*r0_reg_, "shardguard_tunnel_refused_total", {{"direction", "inbound"}, {"reason", "source_limit"}}) ==
           1;
  }));
  EXPECT_EQ(gloo_.connections(), 0);
  for (auto& [ssl, fd] : stalled) {
    SSL_free(ssl);
    ::close(fd);
  }
  SSL_CTX_free(ctx);
  // Their slots are back: a real tunnel from the same address goes through.
  EXPECT_TRUE(eventually([&] { return open() == 0; })) << open();
  const Exchange ex = exchange(r1.tunnel_port(1), "after");
  EXPECT_EQ(ex.reply, transformed("after"));
}

TEST_F(TunnelTest, ConfigErrorsNameTheFlagAndValue) {
  const auto error_of = [&](ProxyConfig c) -> std::string {
    try {
      Proxy p(std::move(c), std::make_shared<prometheus::Registry>());
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "";
  };
  ProxyConfig base = config(rid(0, 1), 0, 1);
  base.peers[rid(0, 0)] = "127.0.0.1:7443";
  ProxyConfig c = base;
  c.tunnels.push_back({"nccl", "127.0.0.1:7200", rid(0, 0)});
  EXPECT_NE(error_of(c).find("--tunnel \"nccl@127.0.0.1:7200="), std::string::npos) << error_of(c);
  c = base;
  c.tunnels.push_back({"gloo", "0.0.0.0:7200", rid(0, 0)});
  EXPECT_NE(error_of(c).find("\"0.0.0.0:7200\" must be a loopback"), std::string::npos) << error_of(c);
  c = base;
  c.tunnels.push_back({"gloo", "127.0.0.1:7200", rid(1, 1)});
  EXPECT_NE(error_of(c).find(rid(1, 1) + "\" is not given as --peer"), std::string::npos) << error_of(c);
  c = base;
  c.tunnel_store = "10.0.0.1:7100";
  EXPECT_NE(error_of(c).find("--tunnel-store \"10.0.0.1:7100\""), std::string::npos) << error_of(c);
  c = base;
  c.data_plane = DataPlane::grpc;
  c.tunnels.push_back({"gloo", "127.0.0.1:7200", rid(0, 0)});
  EXPECT_NE(error_of(c).find("--tunnel \"gloo@127.0.0.1:7200=" + rid(0, 0) + "\": tunnels need --data-plane h2"),
            std::string::npos)
      << error_of(c);
  c = base;
  c.data_plane = DataPlane::grpc;
  c.tunnel_map_file = "/tmp/map";
  EXPECT_NE(error_of(c).find("--tunnel-map \"/tmp/map\""), std::string::npos) << error_of(c);
  EXPECT_THROW(parse_tunnel_flag("gloo127.0.0.1:7200=" + rid(0, 0)), std::invalid_argument);
  EXPECT_THROW(parse_tunnel_flag("gloo@127.0.0.1:0=" + rid(0, 0)), std::invalid_argument);
  const auto t = parse_tunnel_flag("store@[::1]:7100=" + rid(0, 0));
  EXPECT_EQ(t.service, "store");
  EXPECT_EQ(t.listen, "[::1]:7100");
  EXPECT_EQ(t.peer_id, rid(0, 0));
}

// The binary: the same errors, on stderr, exit status 2.
TEST_F(TunnelTest, TheBinaryNamesTheFlagInItsErrors) {
  const std::string bin = std::string(SHARDGUARD_BIN_DIR) + "/shard-sidecar";
  const std::string common = " --cert a --key b --ca c --policy d --metrics off --peer " + rid(0, 0) + "=127.0.0.1:7443";
  const auto run = [&](const std::string& args, int* status) {
    std::string out;
    FILE* f = ::popen((bin + common + args + " 2>&1").c_str(), "r");
    char buf[512];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
    *status = ::pclose(f);
    return out;
  };
  int status = 0;
  std::string out = run(" --data-plane grpc --tunnel gloo@127.0.0.1:7200=" + rid(0, 0), &status);
  EXPECT_EQ(WEXITSTATUS(status), 2) << out;
  EXPECT_NE(out.find("--tunnel \"gloo@127.0.0.1:7200="), std::string::npos) << out;
  EXPECT_NE(out.find("--data-plane h2"), std::string::npos) << out;
  out = run(" --tunnel mpi@127.0.0.1:7200=" + rid(0, 0), &status);
  EXPECT_EQ(WEXITSTATUS(status), 2) << out;
  EXPECT_NE(out.find("service \"mpi\""), std::string::npos) << out;
  out = run(" --tunnel gloo@10.0.0.1:7200=" + rid(0, 0), &status);
  EXPECT_EQ(WEXITSTATUS(status), 2) << out;
  EXPECT_NE(out.find("10.0.0.1:7200"), std::string::npos) << out;
  out = run(" --tunnel gloo@127.0.0.1:7200=" + rid(0, 1), &status);
  EXPECT_EQ(WEXITSTATUS(status), 2) << out;
  EXPECT_NE(out.find("is not given as --peer"), std::string::npos) << out;
}

}  // namespace
}  // namespace shardguard::sidecar
