// The pure parts of the inbound acceptor (sidecar/acceptor.h, issue 16 items 6, 7,
// 8b): the ClientHello classifier on real OpenSSL ClientHellos, the bookkeeping of
// pending connections with its two caps, the log rate limiter and bounded prefixes.
#include "shardguard/sidecar/acceptor.h"

#include <gtest/gtest.h>

#include <openssl/bio.h>
#include <openssl/ssl.h>

#include <string>

namespace shardguard::sidecar {
namespace {

using namespace std::chrono_literals;

HelloClass cls(const std::string& s) {
  return classify_client_hello(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

// The first flight of a real OpenSSL client (its ClientHello records), offering the
// ALPN protocols `alpn` (wire format; "" = no ALPN extension).
std::string openssl_client_hello(const std::string& alpn, int max_version = TLS1_3_VERSION) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_max_proto_version(ctx, max_version);
  if (!alpn.empty()) {
    SSL_CTX_set_alpn_protos(ctx, reinterpret_cast<const unsigned char*>(alpn.data()),
                            static_cast<unsigned>(alpn.size()));
  }
  SSL* ssl = SSL_new(ctx);
  BIO* in = BIO_new(BIO_s_mem());
  BIO* out = BIO_new(BIO_s_mem());
  SSL_set_bio(ssl, in, out);
  SSL_connect(ssl);  // wants to read the ServerHello: the ClientHello is in `out`
  char* data = nullptr;
  const long n = BIO_get_mem_data(out, &data);
  std::string hello(data, static_cast<size_t>(n));
  SSL_free(ssl);
  SSL_CTX_free(ctx);
  return hello;
}

// The same handshake bytes, re-cut into records of at most `piece` bytes.
std::string split_records(const std::string& hello, size_t piece) {
  const std::string body = hello.substr(5, (static_cast<uint8_t>(hello[3]) << 8) | static_cast<uint8_t>(hello[4]));
  std::string out;
  for (size_t at = 0; at < body.size(); at += piece) {
    const size_t n = std::min(piece, body.size() - at);
    out += std::string("\x16\x03\x01", 3) + static_cast<char>(n >> 8) + static_cast<char>(n & 0xff) + body.substr(at, n);
  }
  return out;
}

TEST(ClassifyClientHello, RefusesWhatIsNotATlsClientHello) {
  EXPECT_FALSE(cls("").complete);
  EXPECT_EQ(cls("PRI * HTTP/2.0\r\n").reason, "plaintext");
  EXPECT_EQ(cls("GET / HTTP/1.1\r\n").reason, "plaintext");
  EXPECT_EQ(cls(std::string("\x00\x01", 2)).reason, "not_tls");
  EXPECT_FALSE(cls(std::string("\x16\x03\x01\x00", 4)).complete);  // not enough yet
  EXPECT_EQ(cls(std::string("\x16\x03\x01\x00\x10\x02", 6)).reason, "not_tls");  // ServerHello
  EXPECT_EQ(cls(std::string("\x16\x03\x01\x00\x00", 5)).reason, "not_tls");      // empty record
  const std::string hello11("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x02", 11);
  EXPECT_EQ(cls(hello11).reason, "tls_version");
  // A ClientHello that claims more than the acceptor reassembles.
  EXPECT_EQ(cls(std::string("\x16\x03\x01\x00\x04\x01\x01\x00\x00", 9)).reason, "not_tls");
  // A body too short for a client_version is refused on its length, not by whatever
  // bytes come after it (hello_fuzz: the decision flipped with one more byte).
  const std::string empty_hello("\x16\x03\x01\x00\xc7\x01\x00\x00\x00\x03\x00", 11);
  EXPECT_EQ(cls(empty_hello.substr(0, 9)).reason, "not_tls");
  EXPECT_EQ(cls(empty_hello.substr(0, 10)).reason, "not_tls");
  EXPECT_EQ(cls(empty_hello).reason, "not_tls");
}

TEST(ClassifyClientHello, AcceptsARealHelloOfferingH2OnlyWhenWhole) {
  for (const std::string& alpn : {std::string("\x02h2", 3), std::string("\x08grpc-exp\x02h2", 12),
                                 std::string("\x08http/1.1\x02h2", 12)}) {
    for (const int version : {TLS1_2_VERSION, TLS1_3_VERSION}) {
      const std::string hello = openssl_client_hello(alpn, version);
      ASSERT_GT(hello.size(), 50u);
      const HelloClass c = cls(hello);
      EXPECT_TRUE(c.complete);
      EXPECT_EQ(c.reason, "") << c.detail;
      // Every shorter prefix is undecided: the acceptor waits for the rest.
      for (size_t n = 0; n < hello.size(); ++n) {
        const HelloClass p = cls(hello.substr(0, n));
        ASSERT_FALSE(p.complete) << "prefix of " << n << " bytes: " << p.reason << " " << p.detail;
      }
      // Spread over several records it is the same ClientHello.
      const std::string split = split_records(hello, 40);
      EXPECT_EQ(cls(split).reason, "");
      EXPECT_TRUE(cls(split).complete);
      EXPECT_FALSE(cls(split.substr(0, split.size() - 1)).complete);
    }
  }
}

// Issue 16 item 8b: HTTP/1.1 over TLS (ALPN http/1.1, or no ALPN at all) is refused
// before gRPC, which would complete TLS and close the connection without a word.
TEST(ClassifyClientHello, RefusesAHelloWithoutH2InAlpn) {
  const HelloClass http11 = cls(openssl_client_hello(std::string("\x08http/1.1", 9)));
  EXPECT_TRUE(http11.complete);
  EXPECT_EQ(http11.reason, "alpn");
  EXPECT_NE(http11.detail.find("http/1.1"), std::string::npos) << http11.detail;
  const HelloClass none = cls(openssl_client_hello(""));
  EXPECT_EQ(none.reason, "alpn");
  EXPECT_NE(none.detail.find("without ALPN"), std::string::npos) << none.detail;
  EXPECT_EQ(cls(split_records(openssl_client_hello(""), 7)).reason, "alpn");
}

// Issue 20: the sidecar's L4 tunnels offer exactly "sg-tunnel/1"; such a ClientHello
// is accepted and marked for the tunnel handler, one that also offers h2 goes to the
// HTTP/2 relay, and look-alike names stay refused.
TEST(ClassifyClientHello, AcceptsTheTunnelProtocolAndMarksIt) {
  for (const int version : {TLS1_2_VERSION, TLS1_3_VERSION}) {
    const std::string hello = openssl_client_hello(std::string("\x0bsg-tunnel/1", 12), version);
    const HelloClass c = cls(hello);
    EXPECT_TRUE(c.complete);
    EXPECT_EQ(c.reason, "") << c.detail;
    EXPECT_TRUE(c.tunnel);
    for (size_t n = 0; n < hello.size(); ++n) ASSERT_FALSE(cls(hello.substr(0, n)).complete) << n;
    EXPECT_TRUE(cls(split_records(hello, 40)).tunnel);
  }
  const HelloClass both = cls(openssl_client_hello(std::string("\x0bsg-tunnel/1\x02h2", 15)));
  EXPECT_EQ(both.reason, "");
  EXPECT_FALSE(both.tunnel);
  EXPECT_FALSE(cls(openssl_client_hello(std::string("\x02h2", 3))).tunnel);
  for (const std::string& alpn : {std::string("\x0bsg-tunnel/2", 12), std::string("\x0asg-tunnel/", 11),
                                 std::string("\x0bSG-TUNNEL/1", 12)}) {
    const HelloClass c = cls(openssl_client_hello(alpn));
    EXPECT_EQ(c.reason, "alpn") << alpn;
    EXPECT_FALSE(c.tunnel);
  }
}

TEST(ClassifyClientHello, RefusesMalformedExtensions) {
  const std::string hello = openssl_client_hello(std::string("\x02h2", 3));
  // Corrupt the handshake length so that the message ends inside an extension.
  std::string shorter = hello;
  const size_t body = (static_cast<uint8_t>(hello[6]) << 16) | (static_cast<uint8_t>(hello[7]) << 8) |
                      static_cast<uint8_t>(hello[8]);
  shorter[7] = static_cast<char>((body - 3) >> 8);
  shorter[8] = static_cast<char>((body - 3) & 0xff);
  EXPECT_EQ(cls(shorter).reason, "not_tls");
  // A record of another type in the middle of the ClientHello.
  std::string split = split_records(hello, 40);
  split[45] = 0x17;
  EXPECT_EQ(cls(split).reason, "not_tls");
}

TEST(PendingConnections, CapsPerSourceAndInAllOldestFirst) {
  PendingConnections p(4, 2);
  const auto t = PendingConnections::Clock::now();
  EXPECT_FALSE(p.victim_for("a"));
  const uint64_t a1 = p.add(10, "a", t + 1s);
  const uint64_t b1 = p.add(11, "b", t + 2s);
  const uint64_t a2 = p.add(12, "a", t + 3s);
  // "a" is at its cap: its oldest goes, whatever else waits.
  auto v = p.victim_for("a");
  ASSERT_TRUE(v);
  EXPECT_EQ(v->id, a1);
  EXPECT_STREQ(v->reason, "source_limit");
  EXPECT_FALSE(p.victim_for("b"));
  p.add(13, "c", t + 4s);
  // Full in all: the oldest of all goes for a new source.
  v = p.victim_for("d");
  ASSERT_TRUE(v);
  EXPECT_EQ(v->id, a1);
  EXPECT_STREQ(v->reason, "pending_limit");
  EXPECT_EQ(p.remove(a1).fd, 10);
  EXPECT_EQ(p.count("a"), 1u);
  EXPECT_EQ(*p.oldest(), b1);
  EXPECT_EQ(p.find(a2)->fd, 12);
  EXPECT_EQ(p.find(a1), nullptr);
  EXPECT_EQ(p.remove(a1).fd, -1);  // twice: nothing
  EXPECT_EQ(p.size(), 3u);
  EXPECT_EQ(p.fds(), (std::vector<int>{11, 12, 13}));
}

TEST(LogLimiter, WritesABurstPerWindowAndReportsTheRest) {
  LogLimiter l(2, 10s);
  const auto t = LogLimiter::Clock::now();
  uint64_t held = 99;
  EXPECT_TRUE(l.allow("x", t, &held));
  EXPECT_EQ(held, 0u);
  EXPECT_TRUE(l.allow("x", t, &held));
  for (int i = 0; i < 1000; ++i) EXPECT_FALSE(l.allow("x", t + 1s, &held));
  EXPECT_TRUE(l.allow("y", t + 1s, &held));  // keys are independent
  EXPECT_TRUE(l.take_suppressed(t + 5s).empty());  // the window is still open
  const auto report = l.take_suppressed(t + 10s);
  ASSERT_EQ(report.size(), 1u);
  EXPECT_EQ(report[0], (std::pair<std::string, uint64_t>("x", 1000)));
  EXPECT_FALSE(l.allow("x", t + 9s, &held));
  EXPECT_TRUE(l.allow("x", t + 11s, &held));  // a new window; one held back since the report
  EXPECT_EQ(held, 1u);
}

TEST(BoundedText, KeepsShortTextAndCutsLongTextWithItsSize) {
  EXPECT_EQ(bounded_text("abc"), "abc");
  EXPECT_EQ(bounded_text(std::string(256, 'a')), std::string(256, 'a'));
  const std::string cut = bounded_text(std::string(1 << 20, 'a'));
  EXPECT_EQ(cut, std::string(256, 'a') + "\xE2\x80\xA6(1048576 bytes)");
  // A multi-byte character at the cut is left out whole.
  const std::string e = "\xC3\xA9";  // é
  EXPECT_EQ(bounded_text(std::string(3, 'a') + e + "bb", 4), "aaa\xE2\x80\xA6(7 bytes)");
}

}  // namespace
}  // namespace shardguard::sidecar
