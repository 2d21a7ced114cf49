// The shard-sidecar proxy. See proxy.h for what it does; this file is the I/O around
// the pure parts (policy decide, verify_svid, classify_client_hello).
#include "shardguard/sidecar/proxy.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_certificate_verifier.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <grpcpp/support/byte_buffer.h>
#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>

#include "shardguard/common/files.h"
#include "shardguard/common/log.h"
#include "shardguard/common/metrics_server.h"
#include "shardguard/common/pki.h"
#include "shardguard/common/crypto.h"
#include "shardguard/sidecar/audit.h"
#include "shardguard/sidecar/ledger.h"
#include "shardguard/v1/pipeline.pb.h"
#include "shardguard/policy/policy.h"
#include "shardguard/sidecar/policy_store.h"
#include <set>

#include "h2_plane.h"
#include "tunnel.h"
#include "proxy_core.h"

namespace shardguard::sidecar {

namespace {

using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------
// Small helpers

// A loopback address (is_loopback_address; IPv6 also in brackets) or "localhost" — not
// any name that merely starts with "127.".
bool is_loopback_host(const std::string& host) {
  if (host == "localhost") return true;
  const bool bracketed = host.size() > 2 && host.front() == '[' && host.back() == ']';
  return is_loopback_address(bracketed ? host.substr(1, host.size() - 2) : host);
}

grpc::ChannelArguments relay_channel_args() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return args;
}

}  // namespace

DataPlane parse_data_plane(const std::string& text) {
  if (text == "grpc") return DataPlane::grpc;
  if (text == "h2") return DataPlane::h2;
  throw std::invalid_argument("--data-plane \"" + text + "\": expected grpc or h2");
}

const char* data_plane_name(DataPlane plane) { return plane == DataPlane::h2 ? "h2" : "grpc"; }

std::pair<std::string, std::string> parse_peer_flag(const std::string& text) {
  const auto eq = text.rfind('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == text.size()) {
    throw std::invalid_argument("--peer \"" + text + "\": expected SPIFFE-ID=host:port");
  }
  std::string id = text.substr(0, eq);
  std::string addr = text.substr(eq + 1);
  if (!is_spiffe_id(id)) {
    throw std::invalid_argument("--peer \"" + text + "\": \"" + id + "\" is not a SPIFFE ID");
  }
  try {
    const auto hp = split_host_port(addr);
    if (hp.second == 0) throw std::invalid_argument("port 0");
  } catch (const std::exception&) {
    throw std::invalid_argument("--peer \"" + text + "\": \"" + addr + "\" is not host:port");
  }
  return {id, addr};
}

ProxyConfig::Tunnel parse_tunnel_flag(const std::string& text) {
  // SERVICE@LISTEN=PEER_ID: the peer ID holds no '@' before its path and LISTEN no '='.
  const auto at = text.find('@');
  const auto eq = at == std::string::npos ? std::string::npos : text.find('=', at);
  if (at == std::string::npos || eq == std::string::npos || at == 0 || eq == at + 1 || eq + 1 == text.size()) {
    throw std::invalid_argument("--tunnel \"" + text + "\": expected SERVICE@LISTEN=PEER_ID (SERVICE store or gloo)");
  }
  ProxyConfig::Tunnel t{text.substr(0, at), text.substr(at + 1, eq - at - 1), text.substr(eq + 1)};
  // The flag names a fixed port (the local shardd must know it); ProxyConfig also takes
  // port 0 (any free port, Proxy::tunnel_port), which tests use.
  try {
    if (split_host_port(t.listen).second == 0) {
      throw std::invalid_argument("--tunnel \"" + text + "\": listen address \"" + t.listen + "\" needs a non-zero port");
    }
  } catch (const std::invalid_argument& e) {
    if (std::string(e.what()).rfind("--tunnel", 0) == 0) throw;
    throw std::invalid_argument("--tunnel \"" + text + "\": \"" + t.listen + "\" is not host:port");
  }
  return t;
}

// ---------------------------------------------------------------------------
// Impl

class SvidVerifier;
class AsyncRelay;

// Sees every message of a call before it is forwarded; a non-OK status stops the
// call with that status and the message is not forwarded.
class MessageGuard {
 public:
  virtual ~MessageGuard() = default;
  virtual grpc::Status request(const grpc::ByteBuffer& message) = 0;
  virtual grpc::Status response(const grpc::ByteBuffer& message) = 0;
  // Called once the call is over (possibly twice: must be idempotent).
  virtual void done(grpc::StatusCode code) = 0;
};

std::string buffer_bytes(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  out.reserve(buffer.Length());
  for (const auto& sl : slices) out.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  return out;
}

// Where a call goes, decided once when it arrives (Impl::route_inbound / route_outbound).
struct Route {
  bool allow = false;
  grpc::Status refusal;  // when !allow
  grpc::GenericStub* stub = nullptr;
  std::string peer;  // the peer's SPIFFE ID, also the metrics label
  std::unique_ptr<MessageGuard> guard;
};


struct Proxy::Impl : ProxyCore {
  Impl(ProxyConfig c, std::shared_ptr<prometheus::Registry> r) : ProxyCore(std::move(c), std::move(r)) {}

  // --- the gRPC plane (config.data_plane == grpc) ------------------------------
  std::shared_ptr<grpc::experimental::FileWatcherCertificateProvider> cert_provider;
  std::shared_ptr<grpc::Channel> upstream_channel;
  std::unique_ptr<grpc::GenericStub> upstream_stub;
  struct Peer {
    std::string address;
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<grpc::GenericStub> stub;
  };
  std::map<std::string, Peer> peers;  // by SPIFFE ID; fixed after start()

  // One gRPC server per listener, served by one thread on one completion queue:
  // both halves of every relay (the server call and its upstream client call) use
  // that queue, so a message crosses the sidecar without a thread hand-off.
  struct Listener {
    explicit Listener(const char* d) : direction(d) {}
    const char* direction;  // "inbound" | "outbound"
    std::atomic<int> live{0};  // relays of this listener (accept slots included)
    grpc::AsyncGenericService service;
    std::unique_ptr<grpc::ServerCompletionQueue> cq;
    std::thread thread;
  };
  Listener inbound_listener{"inbound"};
  Listener outbound_listener{"outbound"};
  std::atomic<bool> accepting{false};
  std::unique_ptr<grpc::Server> inbound_server;
  std::unique_ptr<grpc::Server> outbound_server;
  std::unique_ptr<grpc::experimental::ExternalConnectionAcceptor> acceptor;
  int listen_fd = -1;
  int wake_fd = -1;
  int inbound_port = 0;
  int outbound_port = 0;
  std::thread accept_thread;
  std::thread maintenance_thread;
  std::mutex maintenance_mu;
  std::condition_variable maintenance_cv;
  bool stopping = false;
  std::atomic<bool> started{false};
  std::atomic<bool> certs_ok{false};
  bool cert_parses = false;  // maintenance thread (and start) only
  // The HTTP/2 plane (config.data_plane == h2); null on the gRPC plane.
  std::unique_ptr<H2Plane> h2;
  bool h2_tls_stale = false;  // a rotation failed: retried on every check until it works
  uint64_t seen_reloads_ok = 0;
  uint64_t seen_reload_errors = 0;
  std::string own_id;                // the SPIFFE ID of the sidecar's own certificate, "" until it verifies
  prometheus::Labels published_self;  // the labels of the own-principal exposure series, once set

  // --- certificates ---------------------------------------------------------
  // Re-reads cert, key and CA when they change; updates the expiry gauge.
  void refresh_certs() {
    try {
      bool c1 = false, c2 = false, c3 = false;
      const std::string cert = cert_file.get(&c1);
      key_file.get(&c2);
      const std::string ca = ca_file.get(&c3);
      // The principal this sidecar's shardd is (its own SVID's ID: a replica's when the
      // stage has replicas), for the exposure series of what it holds.
      if (c1 || c3) {
        const SvidCheck own = verify_svid(cert, ca, std::chrono::system_clock::now());
        own_id = own.ok ? own.spiffe_id : "";
      }
      if (c1) {
        // A certificate that does not parse leaves the sidecar not ready until the
        // file changes again (PkiError below).
        cert_parses = false;
        metrics.cert_expiry.Set(static_cast<double>(
            std::chrono::duration_cast<std::chrono::seconds>(not_after(cert).time_since_epoch()).count()));
        cert_parses = true;
      }
      if (!cert_parses) {
        certs_ok = false;
        return;
      }
      // The h2 plane's TLS contexts are made from the files (gRPC's watch them itself).
      if (h2 && (c1 || c2 || c3 || h2_tls_stale)) h2_tls_stale = !h2->rotate();
      if (certs_ok.load() && (c1 || c2 || c3)) {
        metrics.cert_reloads.Increment();
        log::info("certificate files changed; new handshakes use them",
                  {{"cert", config.cert_file}, {"ca", config.ca_file}});
      }
      certs_ok = true;
    } catch (const std::exception& e) {
      certs_ok = false;
      log::error("cannot read or parse the certificate files", {{"error", e.what()}});
    }
  }
  void refresh_policy_metrics() {
    const uint64_t ok = policy->reloads_ok(), err = policy->reload_errors();
    if (ok > seen_reloads_ok) metrics.reloads_ok->Increment(static_cast<double>(ok - seen_reloads_ok));
    if (err > seen_reload_errors) metrics.reloads_error->Increment(static_cast<double>(err - seen_reload_errors));
    seen_reloads_ok = ok;
    seen_reload_errors = err;
    metrics.policy_generation.Set(static_cast<double>(policy->generation()));
    // The shard's own principal holds the whole shard (DESIGN.md §5, held(D)): with
    // the export principals' shares this makes shardguard_exposure_ratio the
    // per-shard half of every principal's exposure (docs/sidecar.md gives the query).
    // That principal is the sidecar's own SVID where it is the shard's ID or one of its
    // replicas' (spec.sharding.replicas > 1: each replica holds the whole shard),
    // else the shard's ID.
    if (auto p = policy->current()) {
      const std::string shard_id =
          spiffe_id_for_shard(p->trust_domain(), p->ns(), p->job(), static_cast<uint32_t>(p->shard()));
      const auto own_replica = parse_replica_spiffe_id(own_id);
      const bool own_is_replica = own_replica && own_replica->shard_id == shard_id;
      const prometheus::Labels self{{"peer", own_is_replica ? own_id : shard_id}, {"shard", std::to_string(p->shard())}};
      if (!published_self.empty() && self != published_self) {
        metrics.exposure_ratio.Remove(&metrics.exposure_ratio.Add(published_self));
      }
      published_self = self;
      metrics.exposure_ratio.Add(self).Set(1.0);
      // Every export principal the policy names has its series from the start, at 0
      // until it receives bytes: dashboards show it, and increase() sees the first export.
      if (p->exports().allowed) {
        for (const auto& e : p->exports().principals) {
          const prometheus::Labels l{{"peer", e.peer}, {"shard", std::to_string(p->shard())}};
          metrics.exposed.Add(l);
          metrics.exposure_ratio.Add(l);
        }
      }
    }
  }
  void maintenance_loop() {
    std::unique_lock<std::mutex> lock(maintenance_mu);
    while (!stopping) {
      maintenance_cv.wait_for(lock, config.reload_interval, [&] { return stopping; });
      if (stopping) break;
      lock.unlock();
      if (policy->changed_on_disk()) {
        const auto r = policy->reload();
        AuditEvent ev;
        ev.peer = "";  // a local change, no caller
        ev.method = config.policy_file;
        ev.rule = "policy-reload";
        if (r.ok) {
          log::info("policy reloaded", {{"file", config.policy_file}, {"generation", r.generation}});
          ev.decision = "allow";
        } else {
          log::error("policy reload failed; keeping the last good policy",
                     {{"file", config.policy_file}, {"error", r.error}});
          ev.decision = "deny";
        }
        audit_event(ev);
      }
      refresh_certs();  // first: the exposure series name the sidecar's own SVID
      refresh_policy_metrics();
      log_suppressed();
      lock.lock();
    }
  }

  // --- inbound acceptor -----------------------------------------------------
  void accept_loop();
  void start_acceptor();

  // --- relays ---------------------------------------------------------------
  Route route_inbound(grpc::GenericServerContext* ctx);
  Route route_outbound(grpc::GenericServerContext* ctx);
  void serve(Listener& l);

  void start_grpc_plane();
  std::shared_ptr<grpc::ChannelCredentials> peer_credentials(const std::string& expected_id);
  std::shared_ptr<grpc::ServerCredentials> inbound_credentials();
};

// ---------------------------------------------------------------------------
// Certificate verification inside the TLS handshake (both directions)

class SvidVerifier : public grpc::experimental::ExternalCertificateVerifier {
 public:
  SvidVerifier(Proxy::Impl* impl, SvidRole role, std::string expected_id)
      : impl_(impl), role_(role), expected_id_(std::move(expected_id)) {}

  bool Verify(grpc::experimental::TlsCustomVerificationCheckRequest* request,
              std::function<void(grpc::Status)> /*callback*/, grpc::Status* sync_status) override {
    const std::string pem(request->peer_cert().data(), request->peer_cert().size());
    const char* who = role_ == SvidRole::client ? "client" : "server";
    if (pem.empty()) {
      impl_->count_handshake_failure("no_certificate", std::string("the ") + who + " sent no certificate");
      *sync_status = grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "no certificate");
      return true;
    }
    std::string ca;
    try {
      ca = impl_->ca_pem();
    } catch (const std::exception& e) {
      impl_->count_handshake_failure("no_ca", e.what());
      *sync_status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "CA bundle unreadable");
      return true;
    }
    const SvidCheck check = verify_svid(pem, ca, std::chrono::system_clock::now(), role_);
    if (!check.ok) {
      impl_->count_handshake_failure(check.reason, std::string(who) + " certificate: " + check.message);
      *sync_status = grpc::Status(grpc::StatusCode::UNAUTHENTICATED, check.message);
      return true;
    }
    if (!expected_id_.empty() && check.spiffe_id != expected_id_) {
      impl_->count_handshake_failure("wrong_peer", "dialled " + expected_id_ + " but the server is " +
                                                       check.spiffe_id);
      *sync_status = grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "unexpected peer identity");
      return true;
    }
    *sync_status = grpc::Status::OK;
    return true;
  }
  void Cancel(grpc::experimental::TlsCustomVerificationCheckRequest*) override {}

 private:
  Proxy::Impl* impl_;
  SvidRole role_;
  std::string expected_id_;
};

std::shared_ptr<grpc::ServerCredentials> Proxy::Impl::inbound_credentials() {
  grpc::experimental::TlsServerCredentialsOptions options(cert_provider);
  options.watch_identity_key_cert_pairs();
  // Chain and SVID rules are ours (SvidVerifier), so that each refusal has a reason;
  // gRPC still requires the client to prove possession of the certificate's key.
  options.set_cert_request_type(GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_BUT_DONT_VERIFY);
  options.set_certificate_verifier(
      grpc::experimental::ExternalCertificateVerifier::Create<SvidVerifier>(this, SvidRole::client, ""));
  options.set_check_call_host(false);
  return grpc::experimental::TlsServerCredentials(options);
}

std::shared_ptr<grpc::ChannelCredentials> Proxy::Impl::peer_credentials(const std::string& expected_id) {
  grpc::experimental::TlsChannelCredentialsOptions options;
  options.set_certificate_provider(cert_provider);
  options.watch_identity_key_cert_pairs();
  options.set_verify_server_certs(false);  // SvidVerifier does it, and checks the ID
  options.set_certificate_verifier(
      grpc::experimental::ExternalCertificateVerifier::Create<SvidVerifier>(this, SvidRole::server,
                                                                            expected_id));
  options.set_check_call_host(false);
  return grpc::experimental::TlsCredentials(options);
}

// ---------------------------------------------------------------------------
// The relay: one downstream call (server side) ⇄ one upstream call (client side)

// One relayed call: the downstream call on a listener (server side) and the
// upstream call it opens (client side), both on the listener's completion queue and
// so both handled by its one serving thread — no locks, no thread hand-offs. At most
// one read and one write are in flight per direction, and the next read in a
// direction starts only when the previous message was written on the other side:
// gRPC's flow control reaches from one end to the other.
class AsyncRelay {
 public:
  AsyncRelay(Proxy::Impl* impl, Proxy::Impl::Listener* l) : impl_(impl), l_(l), stream_(&ctx_) {
    l_->live++;
    ctx_.AsyncNotifyWhenDone(&done_tag_);
    ++ops_;
    l_->service.RequestCall(&ctx_, &stream_, l_->cq.get(), l_->cq.get(), &accept_tag_);
  }

  // A completion-queue tag: the relay and the step to run.
  struct Tag {
    AsyncRelay* relay;
    void (AsyncRelay::*step)(bool);
    void run(bool ok) { (relay->*step)(ok); }
  };

 private:
  ~AsyncRelay() { l_->live--; }

  // ---- arrival and decision ------------------------------------------------------
  void on_accept(bool ok) {
    --ops_;
    if (!ok) return maybe_delete();  // the server is shutting down; no call came
    accepted_ = true;
    ++ops_;  // the done tag is delivered for every call that started
    if (impl_->accepting.load()) new AsyncRelay(impl_, l_);  // the next call's slot
    started_at_ = Clock::now();
    method_ = ctx_.method();
    // The size of the header list is checked before anything about the call is
    // logged, decided or audited.
    const size_t header_bytes = request_header_bytes();
    if (static_cast<int64_t>(header_bytes) > impl_->config.max_header_list_bytes) {
      impl_->count_size_refusal(l_->direction, "header_list_too_large",
                                "request headers over the size limit refused",
                                {{"method", bounded_text(method_)},
                                 {"bytes", header_bytes},
                                 {"limit", impl_->config.max_header_list_bytes}});
      finish_down(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                               "request headers of " + std::to_string(header_bytes) +
                                   " bytes exceed the sidecar's limit of " +
                                   std::to_string(impl_->config.max_header_list_bytes) + " bytes"));
      return maybe_delete();
    }
    Route r = std::strcmp(l_->direction, "inbound") == 0 ? impl_->route_inbound(&ctx_) : impl_->route_outbound(&ctx_);
    if (!r.allow) {
      finish_down(r.refusal);  // nothing was read from the call, nothing goes anywhere
      return maybe_delete();
    }
    stub_ = r.stub;
    peer_ = std::move(r.peer);
    guard_ = std::move(r.guard);
    // Bytes from the pod's point of view: inbound requests are received from the peer,
    // outbound requests are sent to it (and the replies the other way).
    out_bytes_ = &impl_->bytes_counter(inbound() ? "received" : "sent", peer_);
    back_bytes_ = &impl_->bytes_counter(inbound() ? "sent" : "received", peer_);
    for (const auto& kv : ctx_.client_metadata()) {
      const std::string key(kv.first.data(), kv.first.size());
      if (key.empty() || key[0] == ':' || key.rfind("grpc-", 0) == 0 || key == "user-agent" || key == "te" ||
          key == "content-type" || key == kTargetHeader) {
        continue;
      }
      cctx_.AddMetadata(key, std::string(kv.second.data(), kv.second.size()));
    }
    if (ctx_.deadline() != std::chrono::system_clock::time_point::max()) cctx_.set_deadline(ctx_.deadline());
    read_down();
    maybe_delete();
  }

  // ---- requests: downstream → upstream ---------------------------------------------
  void read_down() {
    ++ops_;
    stream_.Read(&request_, &down_read_tag_);
  }

  void on_down_read(bool ok) {
    --ops_;
    if (finishing_down_) return maybe_delete();
    if (ok) {
      const size_t size = request_.Length();
      grpc::Status refused;
      if (static_cast<int64_t>(size) > impl_->config.max_message_bytes) {
        refused = grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                               "message of " + std::to_string(size) + " bytes exceeds the sidecar's limit of " +
                                   std::to_string(impl_->config.max_message_bytes) + " bytes");
        impl_->count_size_refusal(l_->direction, "message_too_large", "message over the size limit refused",
                                  {{"peer", bounded_text(peer_)},
                                   {"method", bounded_text(method_)},
                                   {"bytes", size},
                                   {"limit", impl_->config.max_message_bytes}});
      } else if (guard_) {
        refused = guard_->request(request_);
      }
      if (!refused.ok()) {
        stop_with(refused);
        return maybe_delete();
      }
      request_size_ = size;
      if (!up_started_) {
        start_up();
        pending_write_ = true;  // written once the call has started
      } else {
        write_up();
      }
    } else if (!up_started_) {  // half-closed (or cancelled) before any message
      if (ctx_.IsCancelled()) {
        finish_down(grpc::Status::CANCELLED);
        return maybe_delete();
      }
      start_up();
      pending_writes_done_ = true;
    } else if (up_ready_) {
      if (!up_finishing_) {
        ++ops_;
        call_->WritesDone(&up_writes_done_tag_);
      }
    } else {
      pending_writes_done_ = true;
    }
    maybe_delete();
  }

  void start_up() {
    up_started_ = true;
    call_ = stub_->PrepareCall(&cctx_, method_, l_->cq.get());
    ++ops_;
    call_->StartCall(&up_start_tag_);
  }

  void on_up_start(bool ok) {
    --ops_;
    up_ready_ = true;
    if (!ok) {  // the call could not start; Finish says why
      finish_up();
      return maybe_delete();
    }
    read_up();
    if (!override_.ok()) {  // stopped meanwhile: the read fails and Finish follows
      pending_write_ = pending_writes_done_ = false;
    } else if (pending_write_) {
      pending_write_ = false;
      write_up();
    } else if (pending_writes_done_) {
      pending_writes_done_ = false;
      ++ops_;
      call_->WritesDone(&up_writes_done_tag_);
    }
    maybe_delete();
  }

  void write_up() {
    ++ops_;
    call_->Write(request_, &up_write_tag_);
  }

  void on_up_write(bool ok) {
    --ops_;
    if (ok) {
      count_out(request_size_);
      if (!finishing_down_ && !up_reads_ended_ && override_.ok()) read_down();
    }
    // Not ok: the upstream call is broken; its pending read fails and Finish says why.
    maybe_delete();
  }

  void on_up_writes_done(bool) {
    --ops_;
    maybe_delete();
  }

  // ---- replies: upstream → downstream ---------------------------------------------
  void read_up() {
    ++ops_;
    call_->Read(&response_, &up_read_tag_);
  }

  void on_up_read(bool ok) {
    --ops_;
    if (!ok) {  // the reply stream ended: the status follows
      up_reads_ended_ = true;
      finish_up();
      return maybe_delete();
    }
    if (guard_) {
      grpc::Status refused = guard_->response(response_);
      if (!refused.ok()) {  // not forwarded
        up_reads_ended_ = true;
        stop_with(refused);
        return maybe_delete();
      }
    }
    if (!sent_initial_metadata_) {
      sent_initial_metadata_ = true;
      for (const auto& kv : cctx_.GetServerInitialMetadata()) {
        const std::string key(kv.first.data(), kv.first.size());
        if (key.empty() || key[0] == ':' || key.rfind("grpc-", 0) == 0 || key == "content-type") continue;
        ctx_.AddInitialMetadata(key, std::string(kv.second.data(), kv.second.size()));
      }
    }
    response_size_ = response_.Length();
    down_writing_ = true;
    ++ops_;
    stream_.Write(response_, &down_write_tag_);
    maybe_delete();
  }

  void on_down_write(bool ok) {
    --ops_;
    down_writing_ = false;
    if (ok) {
      count_back(response_size_);
      if (!up_reads_ended_ && !finishing_down_) read_up();
    } else {  // the caller is gone
      cctx_.TryCancel();
      up_reads_ended_ = true;
      finish_up();
    }
    if (finish_after_write_) {
      finish_after_write_ = false;
      finish_down(final_status_);
    }
    maybe_delete();
  }

  // ---- the end ---------------------------------------------------------------------
  // Stops the call with `status` (a refusal after the decision: size, guard).
  void stop_with(const grpc::Status& status) {
    override_ = status;
    if (up_started_) {
      cctx_.TryCancel();  // the upstream call ends; its Finish then finishes ours
      if (up_ready_ && !up_reads_ended_) return;  // the pending read fails and calls finish_up
      if (up_ready_) finish_up();
      return;
    }
    finish_down(status);
  }

  void finish_up() {
    if (up_finishing_) return;
    up_finishing_ = true;
    ++ops_;
    call_->Finish(&up_status_, &up_finish_tag_);
  }

  void on_up_finish(bool) {
    --ops_;
    const grpc::Status status = override_.ok() ? up_status_ : override_;
    if (guard_) guard_->done(status.error_code());  // persisted before the caller sees the status
    for (const auto& kv : cctx_.GetServerTrailingMetadata()) {
      const std::string key(kv.first.data(), kv.first.size());
      if (key.empty() || key[0] == ':' || key.rfind("grpc-", 0) == 0) continue;
      ctx_.AddTrailingMetadata(key, std::string(kv.second.data(), kv.second.size()));
    }
    if (down_writing_) {  // the last reply goes out first
      finish_after_write_ = true;
      final_status_ = status;
    } else {
      finish_down(status);
    }
    maybe_delete();
  }

  void finish_down(const grpc::Status& status) {
    if (finishing_down_) return;
    finishing_down_ = true;
    final_code_ = status.error_code();
    ++ops_;
    stream_.Finish(status, &down_finish_tag_);
  }

  void on_down_finish(bool) {
    --ops_;
    maybe_delete();
  }

  void on_done(bool) {
    --ops_;
    // The caller cancelled (or the deadline passed): tear the upstream call down too.
    if (ctx_.IsCancelled() && up_started_) cctx_.TryCancel();
    maybe_delete();
  }

  void maybe_delete() {
    if (ops_ != 0) return;
    if (accepted_) {
      if (guard_) guard_->done(final_code_);
      impl_->count_request(method_, static_cast<int>(final_code_), l_->direction, started_at_);
    }
    delete this;
  }

  bool inbound() const { return std::strcmp(l_->direction, "inbound") == 0; }
  // HTTP/2's size of the request's header list (RFC 9113 §6.5.2: name + value + 32
  // per field) over what gRPC hands us: :path, :authority and the request metadata.
  size_t request_header_bytes() const {
    constexpr size_t kField = 32;
    size_t n = (kField + 5 + method_.size()) + (kField + 10 + ctx_.host().size());
    for (const auto& kv : ctx_.client_metadata()) n += kField + kv.first.size() + kv.second.size();
    return n;
  }
  void count_out(size_t n) { out_bytes_->Increment(static_cast<double>(n)); }
  void count_back(size_t n) { back_bytes_->Increment(static_cast<double>(n)); }

  Proxy::Impl* impl_;
  Proxy::Impl::Listener* l_;
  grpc::GenericServerContext ctx_;
  grpc::GenericServerAsyncReaderWriter stream_;
  grpc::ClientContext cctx_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call_;
  grpc::GenericStub* stub_ = nullptr;
  std::unique_ptr<MessageGuard> guard_;
  prometheus::Counter* out_bytes_ = nullptr;   // set when the call is routed
  prometheus::Counter* back_bytes_ = nullptr;
  std::string method_;
  std::string peer_;
  Clock::time_point started_at_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
  size_t request_size_ = 0;
  size_t response_size_ = 0;
  grpc::Status up_status_;
  grpc::Status override_ = grpc::Status::OK;
  grpc::Status final_status_;
  grpc::StatusCode final_code_ = grpc::StatusCode::OK;
  int ops_ = 0;  // operations in flight on the queue; the relay is deleted at 0
  bool accepted_ = false;
  bool up_started_ = false;
  bool up_ready_ = false;
  bool pending_write_ = false;
  bool pending_writes_done_ = false;
  bool up_reads_ended_ = false;
  bool up_finishing_ = false;
  bool down_writing_ = false;
  bool finishing_down_ = false;
  bool finish_after_write_ = false;
  bool sent_initial_metadata_ = false;

  Tag accept_tag_{this, &AsyncRelay::on_accept};
  Tag done_tag_{this, &AsyncRelay::on_done};
  Tag down_read_tag_{this, &AsyncRelay::on_down_read};
  Tag down_write_tag_{this, &AsyncRelay::on_down_write};
  Tag down_finish_tag_{this, &AsyncRelay::on_down_finish};
  Tag up_start_tag_{this, &AsyncRelay::on_up_start};
  Tag up_read_tag_{this, &AsyncRelay::on_up_read};
  Tag up_write_tag_{this, &AsyncRelay::on_up_write};
  Tag up_writes_done_tag_{this, &AsyncRelay::on_up_writes_done};
  Tag up_finish_tag_{this, &AsyncRelay::on_up_finish};
};

void Proxy::Impl::serve(Listener& l) {
  constexpr int kAcceptSlots = 4;  // calls that can arrive at once; each re-arms itself
  for (int i = 0; i < kAcceptSlots; ++i) new AsyncRelay(this, &l);
  bool queue_shut = false;
  for (;;) {
    void* tag = nullptr;
    bool ok = false;
    const auto got = l.cq->AsyncNext(&tag, &ok, std::chrono::system_clock::now() + std::chrono::milliseconds(100));
    if (got == grpc::CompletionQueue::SHUTDOWN) break;
    if (got == grpc::CompletionQueue::GOT_EVENT) static_cast<AsyncRelay::Tag*>(tag)->run(ok);
    // Shutting down: once the server has cancelled what was open and every relay of
    // this listener is gone, no operation can be started on the queue any more.
    if (!queue_shut && !accepting.load() && l.live.load() == 0) {
      l.cq->Shutdown();
      queue_shut = true;
    }
  }
}
// The exposure ledger at work on one export call (see proxy.h): ExportLedgerGuard
// (proxy_core.h) on gRPC messages.
class ExportGuard : public MessageGuard {
 public:
  ExportGuard(Proxy::Impl* impl, const RouteDecision& r) : guard_(impl, r.peer, r.export_budget, r.shard) {}
  grpc::Status request(const grpc::ByteBuffer& message) override { return status(guard_.request(buffer_bytes(message))); }
  grpc::Status response(const grpc::ByteBuffer& message) override {
    return status(guard_.response(buffer_bytes(message)));
  }
  void done(grpc::StatusCode) override { guard_.done(); }

 private:
  static grpc::Status status(const MessageVerdict& v) {
    return v.ok() ? grpc::Status::OK : grpc::Status(static_cast<grpc::StatusCode>(v.code), v.message);
  }
  ExportLedgerGuard guard_;
};

Route Proxy::Impl::route_inbound(grpc::GenericServerContext* ctx) {
  Route route;
  // The identity is the one the handshake verified (SvidVerifier ran; gRPC exposes the
  // single URI SAN as the peer's SPIFFE ID). Never a header.
  std::string peer;
  const auto auth = ctx->auth_context();
  if (auth) {
    const auto ids = auth->FindPropertyValues("peer_spiffe_id");
    if (ids.size() == 1) peer.assign(ids[0].data(), ids[0].size());
  }
  const RouteDecision r = decide_inbound(peer, ctx->method());
  if (!r.allow) {
    route.refusal = grpc::Status(static_cast<grpc::StatusCode>(r.code), r.message);
    return route;
  }
  if (r.export_call) route.guard = std::make_unique<ExportGuard>(this, r);
  route.allow = true;
  route.stub = upstream_stub.get();
  route.peer = r.peer;
  return route;
}

Route Proxy::Impl::route_outbound(grpc::GenericServerContext* ctx) {
  Route route;
  std::string requested;
  for (const auto& kv : ctx->client_metadata()) {
    if (kv.first == kTargetHeader) requested.assign(kv.second.data(), kv.second.size());
  }
  const RouteDecision r = decide_outbound(requested, ctx->method());
  if (!r.allow) {
    route.refusal = grpc::Status(static_cast<grpc::StatusCode>(r.code), r.message);
    return route;
  }
  route.allow = true;
  route.stub = peers.at(r.peer).stub.get();
  route.peer = r.peer;
  return route;
}

// ---------------------------------------------------------------------------
// The inbound acceptor: classify the first bytes, then hand the socket to gRPC.

void Proxy::Impl::start_acceptor() {
  const auto [host, port] = split_host_port(config.inbound_listen);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port_text = std::to_string(port);
  const int rc = ::getaddrinfo(host.c_str(), port_text.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    throw std::runtime_error("inbound listener \"" + config.inbound_listen + "\": " + ::gai_strerror(rc));
  }
  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  const int one = 1;
  if (fd >= 0) ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (fd < 0 || ::bind(fd, res->ai_addr, res->ai_addrlen) != 0 || ::listen(fd, SOMAXCONN) != 0) {
    const std::string err = std::strerror(errno);
    if (fd >= 0) ::close(fd);
    ::freeaddrinfo(res);
    throw std::runtime_error("inbound listener \"" + config.inbound_listen + "\": " + err);
  }
  ::freeaddrinfo(res);
  sockaddr_storage bound{};
  socklen_t len = sizeof bound;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  inbound_port = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                                   : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  listen_fd = fd;
  wake_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  accept_thread = std::thread([this] { accept_loop(); });
}

// Accepts every connection as it comes (the backlog is drained on each wakeup and
// accepting never pauses), holds it until its first bytes decide it, and hands the
// ones that start with an acceptable ClientHello to gRPC. What waits is bounded: per
// source address, in all, and in time (first_bytes_timeout); over a cap the oldest
// connection that has not sent a decidable ClientHello is closed. One thread, epoll.
void Proxy::Impl::accept_loop() {
  constexpr uint64_t kWake = 0, kListener = 1, kFirstId = 2;  // epoll data: kFirstId + pending id
  constexpr int kAcceptBatch = 256;  // then the pending connections get their turn
  // Enough for a ClientHello of kMaxClientHelloBytes in records of 512 bytes or more.
  constexpr size_t kPeekBytes = kMaxClientHelloBytes + kMaxClientHelloBytes / 512 * 5 + 64;
  const int ep = ::epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) {
    log::error("inbound acceptor cannot start", {{"error", std::strerror(errno)}});
    return;
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kWake;
  ::epoll_ctl(ep, EPOLL_CTL_ADD, wake_fd, &ev);
  ev.data.u64 = kListener;
  ::epoll_ctl(ep, EPOLL_CTL_ADD, listen_fd, &ev);
  // Held so that, out of file descriptors, a connection can still be accepted and closed
  // instead of spinning on a listener that stays readable.
  int reserve_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  PendingConnections pending(static_cast<size_t>(config.max_pending_connections),
                             static_cast<size_t>(config.max_pending_per_source));
  std::vector<uint8_t> peek(kPeekBytes);

  const auto refuse = [&](uint64_t id, const std::string& reason, const std::string& detail) {
    const auto e = pending.remove(id);
    count_handshake_failure(reason, detail, e.source);
    ::close(e.fd);  // also leaves the epoll set
  };
  // Looks at a pending connection's first bytes; true when that decided it (handed to
  // gRPC or refused), false while it has not sent enough to tell.
  const auto try_decide = [&](uint64_t id) {
    const auto* e = pending.find(id);
    if (e == nullptr) return true;
    const ssize_t got = ::recv(e->fd, peek.data(), peek.size(), MSG_PEEK | MSG_DONTWAIT);
    if (got == 0 || (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      refuse(id, "closed", "connection closed before a ClientHello");
      return true;
    }
    if (got < 0) return false;
    HelloClass c = classify_client_hello(peek.data(), static_cast<size_t>(got));
    if (!c.complete && static_cast<size_t>(got) == peek.size()) {
      c.complete = true;
      c.reason = "not_tls";
      c.detail = "no whole ClientHello in the first " + std::to_string(peek.size()) + " bytes";
    }
    if (!c.complete) return false;
    if (!c.reason.empty()) {
      refuse(id, c.reason, c.detail);
      return true;
    }
    if (c.tunnel && !h2) {
      refuse(id, "alpn", "ALPN offers only sg-tunnel/1: tunnels need --data-plane h2");
      return true;
    }
    const auto taken = pending.remove(id);
    ::epoll_ctl(ep, EPOLL_CTL_DEL, taken.fd, nullptr);
    if (h2) {
      if (c.tunnel) {
        h2->adopt_tunnel(taken.fd);  // the tunnel handler owns it from here
      } else {
        h2->adopt(taken.fd);  // the relay owns it from here
      }
      return true;
    }
    grpc::experimental::ExternalConnectionAcceptor::NewConnectionParameters params;
    params.listener_fd = listen_fd;
    params.fd = taken.fd;  // non-blocking since accept4, as gRPC's own acceptor makes them
    acceptor->HandleNewConnection(&params);
    return true;
  };
  const auto accept_some = [&] {
    for (int i = 0; i < kAcceptBatch; ++i) {
      sockaddr_storage sa{};
      socklen_t len = sizeof sa;
      const int cfd = ::accept4(listen_fd, reinterpret_cast<sockaddr*>(&sa), &len, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (cfd < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          if (const auto old = pending.oldest()) {
            if (!try_decide(*old)) refuse(*old, "fd_limit", "out of file descriptors: the oldest waiting connection closed");
            continue;
          }
          if (reserve_fd >= 0) {
            ::close(reserve_fd);
            const int dropped = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
            if (dropped >= 0) {
              ::close(dropped);
              count_handshake_failure("fd_limit", "out of file descriptors: a new connection closed");
            }
            reserve_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
            continue;
          }
        }
        return;  // EAGAIN: the backlog is empty
      }
      const int one = 1;
      ::setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      std::string source = source_address(sa);
      // Over a cap: the oldest connection of the source (or of all) goes, unless it has
      // sent its ClientHello meanwhile, in which case it is decided instead.
      while (const auto v = pending.victim_for(source)) {
        if (try_decide(v->id)) continue;
        refuse(v->id, v->reason,
               std::string(std::strcmp(v->reason, "source_limit") == 0
                               ? "too many connections from one address waiting for their first bytes"
                               : "too many connections waiting for their first bytes") +
                   ": the oldest closed");
      }
      const uint64_t id = pending.add(cfd, std::move(source), Clock::now() + config.first_bytes_timeout);
      epoll_event cev{};
      cev.events = EPOLLIN | EPOLLRDHUP | EPOLLET;  // a wakeup per arrival, not per poll
      cev.data.u64 = kFirstId + id;
      if (::epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev) != 0) refuse(id, "closed", std::strerror(errno));
    }
  };

  std::vector<epoll_event> events(256);
  for (bool stop = false; !stop;) {
    int timeout_ms = -1;
    if (const auto old = pending.oldest()) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(pending.find(*old)->deadline -
                                                                              Clock::now()).count();
      timeout_ms = static_cast<int>(std::clamp<int64_t>(left + 1, 0, 60000));
    }
    const int n = ::epoll_wait(ep, events.data(), static_cast<int>(events.size()), timeout_ms);
    if (n < 0 && errno != EINTR) {
      log::error("inbound acceptor stopped", {{"error", std::strerror(errno)}});
      break;
    }
    bool listener_ready = false;
    for (int i = 0; i < n; ++i) {
      const uint64_t tag = events[i].data.u64;
      if (tag == kWake) stop = true;
      else if (tag == kListener) listener_ready = true;
      else try_decide(tag - kFirstId);  // already gone when an earlier step closed it
    }
    if (stop) break;
    if (listener_ready) accept_some();
    // The first-bytes deadline: arrival order is deadline order.
    const auto now = Clock::now();
    while (const auto old = pending.oldest()) {
      if (pending.find(*old)->deadline > now) break;
      if (!try_decide(*old)) refuse(*old, "first_bytes_timeout", "no whole ClientHello within the first-bytes timeout");
    }
  }
  for (const int fd : pending.fds()) ::close(fd);
  if (reserve_fd >= 0) ::close(reserve_fd);
  ::close(ep);
}

// ---------------------------------------------------------------------------
// Proxy

Proxy::Proxy(ProxyConfig config, std::shared_ptr<prometheus::Registry> registry) {
  auto need = [](const std::string& value, const char* field) {
    if (value.empty()) throw std::invalid_argument(std::string(field) + " is required");
  };
  need(config.cert_file, "cert file (--cert)");
  need(config.key_file, "key file (--key)");
  need(config.ca_file, "CA bundle (--ca)");
  need(config.policy_file, "policy file (--policy)");
  if (config.ledger_file.empty() != config.ledger_key_file.empty()) {
    throw std::invalid_argument("--ledger and --ledger-key go together (ledger \"" + config.ledger_file +
                                "\", key \"" + config.ledger_key_file + "\")");
  }
  if (config.ledger_min_sequence > 0 && config.ledger_file.empty()) {
    throw std::invalid_argument("--ledger-min-sequence " + std::to_string(config.ledger_min_sequence) +
                                " needs --ledger and --ledger-key");
  }
  auto address = [](const std::string& value, const char* field) {
    try {
      return split_host_port(value);
    } catch (const std::exception&) {
      throw std::invalid_argument(std::string(field) + " \"" + value + "\" is not host:port");
    }
  };
  address(config.inbound_listen, "inbound listen address (--inbound)");
  const auto out = address(config.outbound_listen, "outbound listen address (--outbound)");
  if (!is_loopback_host(out.first)) {
    throw std::invalid_argument("outbound listen address (--outbound) \"" + config.outbound_listen +
                                "\" must be a loopback address: only the local shardd may use it");
  }
  const auto up = address(config.upstream, "upstream address (--upstream)");
  if (!is_loopback_host(up.first) || up.second == 0) {
    throw std::invalid_argument("upstream address (--upstream) \"" + config.upstream +
                                "\" must be the local shardd on a loopback address with a port");
  }
  if (config.max_message_bytes < 1 || config.max_message_bytes > INT_MAX / 2) {
    throw std::invalid_argument("max message bytes (--max-message-bytes) " +
                                std::to_string(config.max_message_bytes) + " must be in 1.." +
                                std::to_string(INT_MAX / 2));
  }
  if (config.handshake_timeout.count() <= 0) {
    throw std::invalid_argument("handshake timeout must be positive, not " +
                                std::to_string(config.handshake_timeout.count()) + " ms");
  }
  if (config.max_header_list_bytes < kMinHeaderListBytes || config.max_header_list_bytes > kMaxHeaderListBytes) {
    throw std::invalid_argument("max header list bytes (--max-header-bytes) " +
                                std::to_string(config.max_header_list_bytes) + " must be in " +
                                std::to_string(kMinHeaderListBytes) + ".." + std::to_string(kMaxHeaderListBytes));
  }
  if (config.data_plane == DataPlane::grpc) {
    const auto grpc_only = [](const std::string& flag, const std::string& value) {
      return std::invalid_argument(flag + " \"" + value + "\": tunnels need --data-plane h2");
    };
    if (!config.tunnels.empty()) {
      const auto& t = config.tunnels.front();
      throw grpc_only("--tunnel", t.service + "@" + t.listen + "=" + t.peer_id);
    }
    if (!config.tunnel_store.empty()) throw grpc_only("--tunnel-store", config.tunnel_store);
    if (!config.tunnel_map_file.empty()) throw grpc_only("--tunnel-map", config.tunnel_map_file);
  }
  std::set<std::string> tunnel_listens;
  for (const auto& t : config.tunnels) {
    const std::string value = "--tunnel \"" + t.service + "@" + t.listen + "=" + t.peer_id + "\"";
    if (t.service != "store" && t.service != "gloo") {
      throw std::invalid_argument(value + ": service \"" + t.service + "\" is not store or gloo");
    }
    std::pair<std::string, int> hp;
    try {
      hp = split_host_port(t.listen);
    } catch (const std::exception&) {
      throw std::invalid_argument(value + ": \"" + t.listen + "\" is not host:port");
    }
    if (!is_loopback_address(hp.first)) {
      throw std::invalid_argument(value + ": listen address \"" + t.listen +
                                  "\" must be a loopback address (127.0.0.0/8 or [::1])");
    }
    if (hp.second != 0 && !tunnel_listens.insert(hp.first + " " + std::to_string(hp.second)).second) {
      throw std::invalid_argument(value + ": listen address \"" + t.listen + "\" is used by another --tunnel");
    }
    if (config.peers.count(t.peer_id) == 0) {
      throw std::invalid_argument(value + ": peer \"" + t.peer_id +
                                  "\" is not given as --peer PEER_ID=host:port (where the tunnel dials)");
    }
  }
  if (!config.tunnel_store.empty()) {
    std::pair<std::string, int> hp;
    try {
      hp = split_host_port(config.tunnel_store);
    } catch (const std::exception&) {
      throw std::invalid_argument("--tunnel-store \"" + config.tunnel_store + "\" is not host:port");
    }
    if (!is_loopback_address(hp.first) || hp.second == 0) {
      throw std::invalid_argument("--tunnel-store \"" + config.tunnel_store +
                                  "\" must be a loopback address (127.0.0.0/8 or [::1]) with a non-zero port");
    }
  }
  if (config.first_bytes_timeout.count() <= 0) {
    throw std::invalid_argument("first-bytes timeout (--first-bytes-timeout) must be positive, not " +
                                std::to_string(config.first_bytes_timeout.count()) + " ms");
  }
  if (config.max_pending_connections < 1 || config.max_pending_connections > 1000000) {
    throw std::invalid_argument("pending connections (--max-pending-connections) " +
                                std::to_string(config.max_pending_connections) + " must be in 1..1000000");
  }
  if (config.max_pending_per_source < 1 || config.max_pending_per_source > config.max_pending_connections) {
    throw std::invalid_argument("pending connections per source (--max-pending-per-source) " +
                                std::to_string(config.max_pending_per_source) + " must be in 1.." +
                                std::to_string(config.max_pending_connections) + " (--max-pending-connections)");
  }
  if (config.reload_interval.count() <= 0) {
    throw std::invalid_argument("reload interval must be positive, not " +
                                std::to_string(config.reload_interval.count()) + " ms");
  }
  impl_ = std::make_unique<Impl>(std::move(config), std::move(registry));
}

Proxy::~Proxy() { shutdown(); }

// The gRPC plane: the certificate provider, the upstream channels, one gRPC server per
// listener (the inbound one fed by the acceptor) and their serving threads.
void Proxy::Impl::start_grpc_plane() {
  Impl& m = *this;
  const unsigned refresh_s = static_cast<unsigned>(
      std::max<int64_t>(1, std::chrono::duration_cast<std::chrono::seconds>(m.config.reload_interval).count()));
  m.cert_provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      m.config.key_file, m.config.cert_file, m.config.ca_file, refresh_s);

  m.upstream_channel =
      grpc::CreateCustomChannel(m.config.upstream, grpc::InsecureChannelCredentials(), relay_channel_args());
  m.upstream_stub = std::make_unique<grpc::GenericStub>(m.upstream_channel);
  for (const auto& [id, address] : m.config.peers) {
    Impl::Peer p;
    p.address = address;
    p.channel = grpc::CreateCustomChannel(address, m.peer_credentials(id), relay_channel_args());
    p.stub = std::make_unique<grpc::GenericStub>(p.channel);
    m.peers.emplace(id, std::move(p));
  }

  const int grpc_limit = static_cast<int>(m.config.max_message_bytes * 2);  // ours is counted first
  // gRPC's header list limit (its SETTINGS_MAX_HEADER_LIST_SIZE; 8 KiB by default)
  // is twice ours, so that the sidecar sees, counts and refuses requests up to that;
  // a larger header list is refused by gRPC itself (docs/sidecar.md, limits).
  const int grpc_header_limit = static_cast<int>(m.config.max_header_list_bytes * 2);
  {
    grpc::ServerBuilder b;
    b.RegisterAsyncGenericService(&m.inbound_listener.service);
    b.SetMaxReceiveMessageSize(grpc_limit);
    b.SetMaxSendMessageSize(-1);
    b.AddChannelArgument(GRPC_ARG_MAX_METADATA_SIZE, grpc_header_limit);
    b.AddChannelArgument(GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS,
                         static_cast<int>(m.config.handshake_timeout.count()));
    m.acceptor = b.experimental().AddExternalConnectionAcceptor(
        grpc::ServerBuilder::experimental_type::ExternalConnectionType::FROM_FD, m.inbound_credentials());
    m.inbound_listener.cq = b.AddCompletionQueue();
    m.inbound_server = b.BuildAndStart();
    if (!m.inbound_server) throw std::runtime_error("cannot start the inbound gRPC server");
  }
  {
    grpc::ServerBuilder b;
    b.RegisterAsyncGenericService(&m.outbound_listener.service);
    b.SetMaxReceiveMessageSize(grpc_limit);
    b.SetMaxSendMessageSize(-1);
    b.AddChannelArgument(GRPC_ARG_MAX_METADATA_SIZE, grpc_header_limit);
    b.AddListeningPort(m.config.outbound_listen, grpc::InsecureServerCredentials(), &m.outbound_port);
    m.outbound_listener.cq = b.AddCompletionQueue();
    m.outbound_server = b.BuildAndStart();
    if (!m.outbound_server || m.outbound_port == 0) {
      m.inbound_server->Shutdown();
      m.inbound_listener.cq->Shutdown();
      void* tag = nullptr;
      bool ok = false;
      while (m.inbound_listener.cq->Next(&tag, &ok)) {
      }
      m.inbound_server.reset();
      throw std::runtime_error("outbound listener \"" + m.config.outbound_listen + "\": cannot bind");
    }
  }
  m.accepting = true;
  for (Impl::Listener* l : {&m.inbound_listener, &m.outbound_listener}) {
    l->thread = std::thread([&m, l] { m.serve(*l); });
  }
}

void Proxy::start() {
  Impl& m = *impl_;
  if (m.started.exchange(true)) throw std::logic_error("Proxy::start called twice");
  // Certificates must be readable at start; later changes are picked up live.
  for (const std::string* f : {&m.config.cert_file, &m.config.key_file, &m.config.ca_file}) {
    try {
      read_file(*f);
    } catch (const std::exception& e) {
      throw std::runtime_error(std::string("cannot read ") + e.what());
    }
  }
  m.refresh_certs();
  m.policy = std::make_unique<PolicyStore>(m.config.policy_file);
  if (!m.policy->current()) {
    log::error("no valid policy: refusing every call until the policy file is fixed",
               {{"file", m.config.policy_file}});
  }
  m.refresh_policy_metrics();
  if (!m.config.audit_file.empty()) {
    m.audit = std::make_unique<AuditLog>(m.config.audit_file, m.config.audit_stdout ? STDOUT_FILENO : -1);
  }
  if (!m.config.ledger_file.empty()) {
    try {
      m.ledger_key = load_key_file(m.config.ledger_key_file);
    } catch (const std::exception& e) {
      throw std::runtime_error("ledger key (--ledger-key) \"" + m.config.ledger_key_file + "\": " + e.what());
    }
    // A tampered or foreign ledger stops the start: budgets must survive restarts.
    auto found = ExposureLedger::load_existing(m.config.ledger_file, m.ledger_key);
    const uint64_t min = m.config.ledger_min_sequence;
    const uint64_t seq = found ? found->sequence() : 0;
    // A genuine but older copy (or none) where a later sequence was recorded: the
    // budgets it holds are not the latest. Exports stay refused and the file is kept
    // as it is (never overwritten), for whoever investigates; pipeline traffic goes on.
    if (min > 0 && (!found || seq < min)) {
      m.ledger_refused =
          found ? "exposure ledger " + m.config.ledger_file + " has sequence " + std::to_string(seq) +
                      ", lower than the " + std::to_string(min) +
                      " recorded for this shard (--ledger-min-sequence): an older copy was put back, so its "
                      "export budgets are not the latest; every export is refused"
                : "exposure ledger " + m.config.ledger_file + " is missing, but sequence " + std::to_string(min) +
                      " was recorded for this shard (--ledger-min-sequence): it was deleted or lost, so its export "
                      "budgets are unknown; every export is refused";
      log::error("exposure ledger refused; every export is refused",
                 {{"file", m.config.ledger_file},
                  {"sequence", seq},
                  {"min_sequence", min},
                  {"reason", m.ledger_refused}});
    }
    m.ledger = std::make_unique<ExposureLedger>(found ? std::move(*found) : ExposureLedger{});
    m.ledger_sequence = &m.metrics.ledger_sequence.Add({});
    m.ledger_sequence->Set(static_cast<double>(seq));
    m.metrics.ledger_min_sequence.Add({}).Set(static_cast<double>(min));
    std::lock_guard<std::mutex> lock(m.ledger_mu);
    for (const auto& e : m.ledger->entries()) m.publish_exposure(e.principal, e.shard, e.exposed_bytes);
  }

  if (m.config.data_plane == DataPlane::h2) {
    m.h2 = std::make_unique<H2Plane>(m);
    m.h2->start();
    m.outbound_port = m.h2->outbound_port();
  } else {
    m.start_grpc_plane();
  }
  m.start_acceptor();
  m.maintenance_thread = std::thread([&m] { m.maintenance_loop(); });
  log::info("shard-sidecar listening",
            {{"data_plane", data_plane_name(m.config.data_plane)},
             {"inbound", m.config.inbound_listen}, {"inbound_port", m.inbound_port},
             {"outbound_port", m.outbound_port}, {"upstream", m.config.upstream},
             {"peers", m.config.peers.size()}});
}

void Proxy::shutdown(std::chrono::milliseconds grace) {
  if (!impl_) return;
  Impl& m = *impl_;
  {
    std::lock_guard<std::mutex> lock(m.maintenance_mu);
    if (m.stopping) return;
    m.stopping = true;
  }
  m.maintenance_cv.notify_all();
  if (m.wake_fd >= 0) {
    const uint64_t one = 1;
    (void)!::write(m.wake_fd, &one, sizeof one);
  }
  if (m.accept_thread.joinable()) m.accept_thread.join();
  if (m.maintenance_thread.joinable()) m.maintenance_thread.join();
  // The acceptor is stopped: nothing is handed to the relay any more.
  if (m.h2) m.h2->shutdown(grace);
  const auto deadline = std::chrono::system_clock::now() + grace;
  m.accepting = false;
  // Calls still open after `grace` are cancelled; their relays then wind down on the
  // serving threads, which run until every relay is gone and the queues are drained.
  if (m.inbound_server) m.inbound_server->Shutdown(deadline);
  if (m.outbound_server) m.outbound_server->Shutdown(deadline);
  for (Impl::Listener* l : {&m.inbound_listener, &m.outbound_listener}) {
    if (l->thread.joinable()) l->thread.join();
  }
  if (m.listen_fd >= 0) ::close(m.listen_fd);
  if (m.wake_fd >= 0) ::close(m.wake_fd);
  m.listen_fd = m.wake_fd = -1;
  if (m.policy) m.policy->stop();
}

int Proxy::inbound_port() const { return impl_->inbound_port; }
int Proxy::outbound_port() const { return impl_->outbound_port; }
int Proxy::tunnel_port(size_t i) const { return impl_->h2 ? impl_->h2->tunnel_port(i) : 0; }

bool Proxy::ready(std::string* why_not) const {
  const Impl& m = *impl_;
  auto no = [&](const char* why) {
    if (why_not) *why_not = why;
    return false;
  };
  if (!m.started.load() || m.inbound_port == 0 || m.outbound_port == 0) return no("not listening");
  if (!m.certs_ok.load()) return no("certificates not loaded");
  if (!m.policy || !m.policy->current()) return no("no valid policy");
  return true;
}

}  // namespace shardguard::sidecar
