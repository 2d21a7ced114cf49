#include "shardguard/sidecar/h2/tls.h"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

namespace shardguard::sidecar::h2 {

namespace {

constexpr unsigned char kAlpnH2[] = {2, 'h', '2'};
constexpr unsigned char kAlpnTunnel[] = {11, 's', 'g', '-', 't', 'u', 'n', 'n', 'e', 'l', '/', '1'};
// TLS 1.2: ECDHE with AEAD only; TLS 1.3 suites are AEAD by definition.
constexpr const char* kTls12Ciphers =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
    "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305";

std::string openssl_error(const std::string& what) {
  unsigned long e = ERR_get_error();
  std::string msg = what;
  if (e != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    msg += ": ";
    msg += buf;
  }
  ERR_clear_error();
  return msg;
}

// The verdict of one connection's handshake, kept on the SSL object.
struct TlsState {
  const TlsContext* ctx = nullptr;
  PeerVerdict verdict;
  bool verified = false;
  bool alpn_refused = false;
};
int state_index() {
  static int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

int verify_certificate(X509_STORE_CTX* store, void*) {
  auto* ssl = static_cast<SSL*>(X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx()));
  auto* state = ssl ? static_cast<TlsState*>(SSL_get_ex_data(ssl, state_index())) : nullptr;
  X509* leaf = X509_STORE_CTX_get0_cert(store);
  if (!state || !leaf) return 0;
  BIO* bio = BIO_new(BIO_s_mem());
  if (!bio) return 0;
  std::string pem;
  if (PEM_write_bio_X509(bio, leaf) == 1) {
    char* data = nullptr;
    long len = BIO_get_mem_data(bio, &data);
    if (len > 0) pem.assign(data, static_cast<size_t>(len));
  }
  BIO_free(bio);
  state->verdict = state->ctx->verifier() ? state->ctx->verifier()(pem) : PeerVerdict{false, "", "no_verifier"};
  state->verified = true;
  if (!state->verdict.ok) {
    X509_STORE_CTX_set_error(store, X509_V_ERR_APPLICATION_VERIFICATION);
    return 0;
  }
  return 1;
}

// `arg`: the server's one protocol in wire format (kAlpnH2 or kAlpnTunnel).
int select_alpn(SSL* ssl, const unsigned char** out, unsigned char* outlen, const unsigned char* in, unsigned int inlen,
                void* arg) {
  const auto* ours = static_cast<const unsigned char*>(arg);
  unsigned char* selected = nullptr;
  if (SSL_select_next_proto(&selected, outlen, ours, ours[0] + 1u, in, inlen) != OPENSSL_NPN_NEGOTIATED) {
    if (auto* state = static_cast<TlsState*>(SSL_get_ex_data(ssl, state_index()))) state->alpn_refused = true;
    return SSL_TLSEXT_ERR_ALERT_FATAL;  // our protocol not offered: no connection
  }
  *out = selected;
  return SSL_TLSEXT_ERR_OK;
}

// A socket BIO that writes with MSG_NOSIGNAL: a peer that goes away must give EPIPE,
// never SIGPIPE (OpenSSL's own socket BIO uses write(2)).
int bio_write(BIO* bio, const char* data, int len) {
  BIO_clear_retry_flags(bio);
  ssize_t n = ::send(static_cast<int>(reinterpret_cast<intptr_t>(BIO_get_data(bio))), data, static_cast<size_t>(len),
                     MSG_NOSIGNAL);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_write(bio);
  return static_cast<int>(n);
}
int bio_read(BIO* bio, char* data, int len) {
  BIO_clear_retry_flags(bio);
  ssize_t n = ::recv(static_cast<int>(reinterpret_cast<intptr_t>(BIO_get_data(bio))), data, static_cast<size_t>(len), 0);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) BIO_set_retry_read(bio);
  return static_cast<int>(n);
}
long bio_ctrl(BIO*, int cmd, long, void*) { return cmd == BIO_CTRL_FLUSH ? 1 : 0; }
int bio_create(BIO* bio) {
  BIO_set_init(bio, 1);
  return 1;
}
BIO_METHOD* socket_method() {
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "shardguard h2 socket");
    BIO_meth_set_write(m, bio_write);
    BIO_meth_set_read(m, bio_read);
    BIO_meth_set_ctrl(m, bio_ctrl);
    BIO_meth_set_create(m, bio_create);
    return m;
  }();
  return method;
}

class PlainTransport : public Transport {
 public:
  explicit PlainTransport(int fd) : fd_(fd) {}
  Io handshake() override { return Io::ok; }
  Io read(uint8_t* buf, size_t cap, size_t* n) override {
    ssize_t r = ::recv(fd_, buf, cap, 0);
    if (r > 0) {
      *n = static_cast<size_t>(r);
      return Io::ok;
    }
    if (r == 0) return Io::closed;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return Io::want_read;
    error_ = std::strerror(errno);
    return Io::error;
  }
  // A short recv took everything the socket had.
  bool drained(size_t got, size_t cap) const override { return got < cap; }
  Io write(const uint8_t* buf, size_t len, size_t* n) override {
    ssize_t r = ::send(fd_, buf, len, MSG_NOSIGNAL);
    if (r >= 0) {
      *n = static_cast<size_t>(r);
      return Io::ok;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return Io::want_write;
    error_ = std::strerror(errno);
    return Io::error;
  }
  std::string peer_id() const override { return ""; }
  std::string error() const override { return error_; }

 private:
  int fd_;
  std::string error_;
};

class TlsTransport : public Transport {
 public:
  TlsTransport(std::shared_ptr<TlsContext> ctx, int fd) : ctx_(std::move(ctx)) {
    ssl_ = SSL_new(static_cast<SSL_CTX*>(ctx_->native()));
    if (!ssl_) throw std::runtime_error(openssl_error("SSL_new"));
    state_.ctx = ctx_.get();
    SSL_set_ex_data(ssl_, state_index(), &state_);
    BIO* bio = BIO_new(socket_method());
    if (!bio) {
      SSL_free(ssl_);
      throw std::runtime_error(openssl_error("BIO_new"));
    }
    BIO_set_data(bio, reinterpret_cast<void*>(static_cast<intptr_t>(fd)));
    SSL_set_bio(ssl_, bio, bio);
    if (ctx_->side() == TlsContext::Side::server)
      SSL_set_accept_state(ssl_);
    else
      SSL_set_connect_state(ssl_);
  }
  ~TlsTransport() override { SSL_free(ssl_); }

  Io handshake() override {
    ERR_clear_error();
    int r = SSL_do_handshake(ssl_);
    if (r == 1) {
      const unsigned char* alpn = nullptr;
      unsigned int alpn_len = 0;
      SSL_get0_alpn_selected(ssl_, &alpn, &alpn_len);
      const std::string& want = ctx_->alpn();
      if (alpn_len != want.size() || std::memcmp(alpn, want.data(), want.size()) != 0) {
        error_ = "alpn: " + want + " not negotiated";
        failure_reason_ = "alpn";
        return Io::error;
      }
      if (!state_.verified || !state_.verdict.ok) {
        error_ = "peer certificate not verified";
        failure_reason_ = "no_certificate";
        return Io::error;
      }
      return Io::ok;
    }
    return classify(r);
  }
  Io read(uint8_t* buf, size_t cap, size_t* n) override {
    ERR_clear_error();
    size_t got = 0;
    int r = SSL_read_ex(ssl_, buf, cap, &got);
    if (r == 1) {
      *n = got;
      return Io::ok;
    }
    return classify(r);
  }
  // SSL_read returns one record at a time; with read-ahead, OpenSSL's own buffer holds
  // whatever else the last recv brought.
  bool drained(size_t, size_t) const override { return SSL_has_pending(ssl_) == 0; }
  Io write(const uint8_t* buf, size_t len, size_t* n) override {
    ERR_clear_error();
    size_t put = 0;
    int r = SSL_write_ex(ssl_, buf, len, &put);
    if (r == 1) {
      *n = put;
      return Io::ok;
    }
    return classify(r);
  }
  std::string peer_id() const override { return state_.verdict.ok ? state_.verdict.spiffe_id : ""; }
  std::string error() const override { return error_; }
  std::string failure_reason() const override { return failure_reason_; }
  void close_notify() override {
    ERR_clear_error();
    SSL_shutdown(ssl_);
    ERR_clear_error();
  }
  Io shutdown_write() override {
    ERR_clear_error();
    const int r = SSL_shutdown(ssl_);  // 0: ours sent, the peer's not yet received
    if (r >= 0) return Io::ok;
    return classify(r);
  }

 private:
  Io classify(int r) {
    int e = SSL_get_error(ssl_, r);
    switch (e) {
      case SSL_ERROR_WANT_READ:
        return Io::want_read;
      case SSL_ERROR_WANT_WRITE:
        return Io::want_write;
      case SSL_ERROR_ZERO_RETURN:
        return Io::closed;
      case SSL_ERROR_SYSCALL:
        if (ERR_peek_error() == 0 && (errno == 0 || errno == ECONNRESET || errno == EPIPE)) {
          error_ = "connection closed";
          return Io::closed;
        }
        error_ = openssl_error(std::string("tls: ") + std::strerror(errno));
        return Io::error;
      default:
        if (state_.verified && !state_.verdict.ok) {
          error_ = "peer certificate refused: " + state_.verdict.reason;
          failure_reason_ = state_.verdict.reason.empty() ? "refused" : state_.verdict.reason;
        } else if (state_.alpn_refused) {
          error_ = "alpn: the client does not offer " + ctx_->alpn();
          failure_reason_ = "alpn";
        } else {
          unsigned long e = ERR_peek_error();
          if (ERR_GET_LIB(e) == ERR_LIB_SSL && ERR_GET_REASON(e) == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE)
            failure_reason_ = "no_certificate";
          error_ = openssl_error("tls");
        }
        return Io::error;
    }
  }
  std::shared_ptr<TlsContext> ctx_;
  SSL* ssl_ = nullptr;
  TlsState state_;
  std::string error_;
  std::string failure_reason_ = "tls";
};

}  // namespace

std::shared_ptr<TlsContext> TlsContext::create(Side side, const std::string& cert_pem, const std::string& key_pem,
                                               PeerVerifier verifier, const std::string& alpn) {
  const unsigned char* alpn_wire = nullptr;
  if (alpn == "h2") {
    alpn_wire = kAlpnH2;
  } else if (alpn == kTunnelAlpn) {
    alpn_wire = kAlpnTunnel;
  } else {
    throw std::runtime_error("unsupported ALPN protocol \"" + alpn + "\"");
  }
  SSL_CTX* ctx = SSL_CTX_new(side == Side::server ? TLS_server_method() : TLS_client_method());
  if (!ctx) throw std::runtime_error(openssl_error("SSL_CTX_new"));
  auto fail = [&](const std::string& what) {
    std::string msg = openssl_error(what);
    SSL_CTX_free(ctx);
    throw std::runtime_error(msg);
  };
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  if (SSL_CTX_set_cipher_list(ctx, kTls12Ciphers) != 1) fail("cipher list");
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_max_send_fragment(ctx, 16384);
  // Read-ahead: one recv fills OpenSSL's 64 KiB buffer with as many records as have
  // arrived, instead of two recvs (header, then body) per record.
  SSL_CTX_set_read_ahead(ctx, 1);
  SSL_CTX_set_default_read_buffer_len(ctx, 64 * 1024);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  if (side == Side::server) SSL_CTX_set_num_tickets(ctx, 0);  // no resumption: no TLS 1.3 tickets to send
  {
    BIO* bio = BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size()));
    X509* cert = bio ? PEM_read_bio_X509(bio, nullptr, nullptr, nullptr) : nullptr;
    BIO_free(bio);
    if (!cert) fail("certificate PEM");
    int ok = SSL_CTX_use_certificate(ctx, cert);
    X509_free(cert);
    if (ok != 1) fail("certificate");
  }
  {
    BIO* bio = BIO_new_mem_buf(key_pem.data(), static_cast<int>(key_pem.size()));
    EVP_PKEY* key = bio ? PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr) : nullptr;
    BIO_free(bio);
    if (!key) fail("private key PEM");
    int ok = SSL_CTX_use_PrivateKey(ctx, key);
    EVP_PKEY_free(key);
    if (ok != 1 || SSL_CTX_check_private_key(ctx) != 1) fail("private key does not match the certificate");
  }
  // Mutual authentication: the whole chain check is the caller's verifier.
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  SSL_CTX_set_cert_verify_callback(ctx, verify_certificate, nullptr);
  if (side == Side::server) {
    SSL_CTX_set_alpn_select_cb(ctx, select_alpn, const_cast<unsigned char*>(alpn_wire));
  } else if (SSL_CTX_set_alpn_protos(ctx, alpn_wire, alpn_wire[0] + 1u) != 0) {
    fail("alpn");
  }
  return std::shared_ptr<TlsContext>(new TlsContext(side, ctx, std::move(verifier), alpn));
}

TlsContext::~TlsContext() { SSL_CTX_free(static_cast<SSL_CTX*>(ctx_)); }

std::unique_ptr<Transport> make_plain_transport(int fd) { return std::make_unique<PlainTransport>(fd); }
std::unique_ptr<Transport> make_tls_transport(std::shared_ptr<TlsContext> ctx, int fd) {
  return std::make_unique<TlsTransport>(std::move(ctx), fd);
}

}  // namespace shardguard::sidecar::h2
