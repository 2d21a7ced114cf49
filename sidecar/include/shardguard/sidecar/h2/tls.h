// Non-blocking byte streams for the HTTP/2 relay (issue 17): plaintext TCP, or TLS on
// OpenSSL 3 with ALPN "h2", TLS 1.2 or 1.3 (AEAD cipher suites only), 16 KiB records
// and mutual authentication through a verifier the caller supplies (the sidecar's is
// common/pki verify_svid). OpenSSL objects stay inside tls.cpp and the transport.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace shardguard::sidecar::h2 {

// The ALPN protocol of the sidecar's L4 tunnels (docs/sidecar.md "Tunnels").
inline constexpr const char* kTunnelAlpn = "sg-tunnel/1";

// What the verifier says about the leaf certificate the peer presented.
struct PeerVerdict {
  bool ok = false;
  std::string spiffe_id;  // the peer's identity, when ok
  std::string reason;     // a bounded token when refused (e.g. verify_svid's reasons)
};
// Gets the peer's leaf certificate as PEM; called once per handshake on the loop
// thread. Must be pure or thread-safe.
using PeerVerifier = std::function<PeerVerdict(const std::string& leaf_pem)>;

// An SSL_CTX for one side. Immutable once made; shared by every connection made from it
// (rotation: make a new one and hand it to the relay).
class TlsContext {
 public:
  enum class Side { server, client };
  // Throws std::runtime_error naming what OpenSSL refused (certificate, key, ...).
  // `alpn`: the one protocol this context negotiates, "h2" (the relay) or kTunnelAlpn
  // (the sidecar's L4 tunnels); a server refuses a client that does not offer it.
  static std::shared_ptr<TlsContext> create(Side side, const std::string& cert_pem, const std::string& key_pem,
                                            PeerVerifier verifier, const std::string& alpn = "h2");
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;
  Side side() const { return side_; }
  void* native() const { return ctx_; }  // SSL_CTX*
  const PeerVerifier& verifier() const { return verifier_; }
  const std::string& alpn() const { return alpn_; }

 private:
  TlsContext(Side side, void* ctx, PeerVerifier verifier, std::string alpn)
      : side_(side), ctx_(ctx), verifier_(std::move(verifier)), alpn_(std::move(alpn)) {}
  Side side_;
  void* ctx_;
  PeerVerifier verifier_;
  std::string alpn_;
};

// A connected, non-blocking socket. The transport never closes the fd.
class Transport {
 public:
  enum class Io { ok, want_read, want_write, closed, error };
  virtual ~Transport() = default;
  // One step of the handshake (plaintext: ok at once).
  virtual Io handshake() = 0;
  // Reads up to cap bytes (*n set when ok).
  virtual Io read(uint8_t* buf, size_t cap, size_t* n) = 0;
  // After a read that returned `got` of `cap` bytes: true when nothing more can be read
  // without waiting, as far as the transport knows — the caller then goes back to the
  // (level-triggered) poller instead of reading again only to hear EAGAIN.
  virtual bool drained(size_t got, size_t cap) const = 0;
  // Writes up to len bytes (*n set when ok; may be short).
  virtual Io write(const uint8_t* buf, size_t len, size_t* n) = 0;
  // The verified peer identity ("" for plaintext).
  virtual std::string peer_id() const = 0;
  // Why the last error happened (for logs; bounded).
  virtual std::string error() const = 0;
  // After a failed handshake: a bounded token — the verifier's reason when it refused
  // the peer's certificate, "alpn" when h2 was not negotiated, else "tls".
  virtual std::string failure_reason() const { return "tls"; }
  // TLS: sends close_notify, best effort.
  virtual void close_notify() {}
  // TLS: sends close_notify and leaves the reading side open (a half-close; TLS 1.3
  // lets the peer go on sending). ok once it is sent, want_write while it waits for
  // room in the socket (call again), error when it cannot be sent. Plaintext: ok.
  virtual Io shutdown_write() { return Io::ok; }
};

std::unique_ptr<Transport> make_plain_transport(int fd);
std::unique_ptr<Transport> make_tls_transport(std::shared_ptr<TlsContext> ctx, int fd);

}  // namespace shardguard::sidecar::h2
