// See grpc_echo.h.
#include "support/grpc_echo.h"

#include <condition_variable>

#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>

namespace shardguard::testsupport {

grpc::ByteBuffer to_buffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

std::string from_buffer(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

void EchoServer::record(grpc::GenericCallbackServerContext* ctx) {
  calls_++;
  std::lock_guard<std::mutex> lock(mu_);
  methods_.push_back(ctx->method());
  last_metadata_.clear();
  for (const auto& kv : ctx->client_metadata()) {
    std::string key(kv.first.data(), kv.first.size());
    if (key.rfind("grpc-", 0) == 0 || key == "user-agent") continue;
    last_metadata_.emplace(key, std::string(kv.second.data(), kv.second.size()));
  }
}

// Every message back as it came.
class EchoServer::Reactor : public grpc::ServerGenericBidiReactor {
 public:
  explicit Reactor(EchoServer* server) : server_(server) { StartRead(&buf_); }
  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status::OK);
      return;
    }
    server_->messages_++;
    StartWrite(&buf_);
  }
  void OnWriteDone(bool ok) override {
    if (ok) {
      StartRead(&buf_);
    } else {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "write failed"));
    }
  }
  void OnDone() override { delete this; }

 private:
  EchoServer* server_;
  grpc::ByteBuffer buf_;
};

// kEchoReplyHeader "ack": a cumulative count instead of the messages.
class EchoServer::Acker : public grpc::ServerGenericBidiReactor {
 public:
  explicit Acker(EchoServer* server) : server_(server) { StartRead(&in_); }
  void OnReadDone(bool ok) override {
    bool write = false, finish = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!ok) {
        reads_done_ = true;
        finish = !writing_ && !finished_;
        finished_ = finished_ || finish;
      } else {
        ++received_;
        if (!writing_) write = writing_ = true;
      }
    }
    if (ok) server_->messages_++;
    if (write) write_ack();
    if (ok) StartRead(&in_);
    if (finish) Finish(grpc::Status::OK);
  }
  void OnWriteDone(bool ok) override {
    bool write = false, finish = false;
    grpc::Status status = grpc::Status::OK;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok) {
        status = grpc::Status(grpc::StatusCode::CANCELLED, "write failed");
        finish = !finished_;
      } else if (acked_ < received_) {
        write = writing_ = true;
      } else if (reads_done_) {
        finish = !finished_;
      }
      finished_ = finished_ || finish;
    }
    if (write) write_ack();
    if (finish) Finish(status);
  }
  void OnDone() override { delete this; }

 private:
  void write_ack() {
    uint64_t n = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      n = acked_ = received_;
    }
    char bytes[8];
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    ack_ = to_buffer(std::string(bytes, 8));
    StartWrite(&ack_);
  }
  EchoServer* server_;
  std::mutex mu_;
  uint64_t received_ = 0;
  uint64_t acked_ = 0;
  bool writing_ = false;
  bool reads_done_ = false;
  bool finished_ = false;
  grpc::ByteBuffer in_;
  grpc::ByteBuffer ack_;
};

class EchoServer::Service : public grpc::CallbackGenericService {
 public:
  explicit Service(EchoServer* s) : s_(s) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    s_->record(ctx);
    for (const auto& kv : ctx->client_metadata()) {
      if (kv.first == kEchoReplyHeader && kv.second == "ack") return new Acker(s_);
    }
    return new Reactor(s_);
  }

 private:
  EchoServer* s_;
};

EchoServer::EchoServer() : service_(std::make_unique<Service>(this)) {
  grpc::ServerBuilder b;
  b.RegisterCallbackGenericService(service_.get());
  b.SetMaxReceiveMessageSize(-1);
  b.SetMaxSendMessageSize(-1);
  b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
  server_ = b.BuildAndStart();
  if (!server_ || port_ == 0) throw std::runtime_error("echo server: cannot listen");
}

EchoServer::~EchoServer() {
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  server_->Wait();
}

std::vector<std::string> EchoServer::methods() const {
  std::lock_guard<std::mutex> lock(mu_);
  return methods_;
}

std::multimap<std::string, std::string> EchoServer::last_metadata() const {
  std::lock_guard<std::mutex> lock(mu_);
  return last_metadata_;
}

CallResult unary_call(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                      const std::string& payload, const std::multimap<std::string, std::string>& metadata,
                      std::chrono::milliseconds timeout) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  for (const auto& [k, v] : metadata) ctx.AddMetadata(k, v);
  grpc::ByteBuffer request = to_buffer(payload), response;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  CallResult result;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &request, &response, [&](grpc::Status status) {
    std::lock_guard<std::mutex> lock(mu);
    result.status = std::move(status);
    done = true;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });
  if (result.status.ok()) result.reply = from_buffer(response);
  return result;
}

namespace {

// Accepts any server certificate and records it.
class RecordingVerifier : public grpc::experimental::ExternalCertificateVerifier {
 public:
  explicit RecordingVerifier(std::shared_ptr<std::string> seen) : seen_(std::move(seen)) {}
  bool Verify(grpc::experimental::TlsCustomVerificationCheckRequest* request, std::function<void(grpc::Status)>,
              grpc::Status* sync_status) override {
    if (seen_) *seen_ = std::string(request->peer_cert().data(), request->peer_cert().size());
    *sync_status = grpc::Status::OK;
    return true;
  }
  void Cancel(grpc::experimental::TlsCustomVerificationCheckRequest*) override {}

 private:
  std::shared_ptr<std::string> seen_;
};

}  // namespace

std::shared_ptr<grpc::Channel> tls_channel(const std::string& address, const std::string& cert_pem,
                                           const std::string& key_pem,
                                           std::shared_ptr<std::string> server_cert_seen) {
  grpc::experimental::TlsChannelCredentialsOptions options;
  if (!cert_pem.empty()) {
    options.set_certificate_provider(std::make_shared<grpc::experimental::StaticDataCertificateProvider>(
        std::vector<grpc::experimental::IdentityKeyCertPair>{{key_pem, cert_pem}}));
    options.watch_identity_key_cert_pairs();
  }
  options.set_verify_server_certs(false);
  options.set_certificate_verifier(
      grpc::experimental::ExternalCertificateVerifier::Create<RecordingVerifier>(std::move(server_cert_seen)));
  options.set_check_call_host(false);
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(-1);
  args.SetMaxReceiveMessageSize(-1);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(address, grpc::experimental::TlsCredentials(options), args);
}

}  // namespace shardguard::testsupport
