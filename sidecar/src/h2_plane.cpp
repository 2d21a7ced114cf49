// The HTTP/2 data plane of shard-sidecar (h2_plane.h).
#include "h2_plane.h"

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include "shardguard/common/log.h"
#include "shardguard/common/pki.h"
#include "shardguard/sidecar/h2/relay.h"
#include "tunnel.h"

namespace shardguard::sidecar {

namespace {

constexpr const char* kShardd = "shardd";  // the inbound relay's only upstream

// gRPC message payload bytes of a direction: the DATA payload less the 5-byte prefix
// of each message (the gRPC plane counts messages, not frames).
uint64_t message_bytes(uint64_t data_bytes, uint64_t messages) {
  const uint64_t prefixes = 5 * messages;
  return data_bytes > prefixes ? data_bytes - prefixes : 0;
}

// A client certificate the verifier refused is counted by the verifier itself, inside
// the handshake and so before the client hears of the refusal (as on the gRPC plane);
// the relay then reports the failed handshake on the same worker thread, right after,
// with the verifier's reason, which is not counted again.
thread_local std::string t_counted_refusal;

}  // namespace

struct H2Plane::State {
  explicit State(ProxyCore& c) : core(c) {}

  ProxyCore& core;
  std::unique_ptr<h2::Relay> inbound;
  std::unique_ptr<h2::Relay> outbound;
  std::unique_ptr<Tunnels> tunnels;
  std::mutex guards_mu;
  std::map<uint64_t, std::unique_ptr<ExportLedgerGuard>> guards;  // by inbound call id

  // The whole certificate check of both directions: verify_svid against the current
  // CA bundle, and on an upstream the SPIFFE ID of the peer dialled. Every refusal is
  // counted here, under its reason.
  h2::PeerVerdict verify(const std::string& pem, SvidRole role, const std::string& expected) {
    const char* who = role == SvidRole::client ? "client" : "server";
    const auto refuse = [&](const std::string& reason, const std::string& detail) {
      core.count_handshake_failure(reason, detail);
      if (role == SvidRole::client) t_counted_refusal = reason;
      h2::PeerVerdict v;
      v.reason = reason;
      return v;
    };
    if (pem.empty()) return refuse("no_certificate", std::string("the ") + who + " sent no certificate");
    std::string ca;
    try {
      ca = core.ca_pem();
    } catch (const std::exception& e) {
      return refuse("no_ca", e.what());
    }
    const SvidCheck check = verify_svid(pem, ca, std::chrono::system_clock::now(), role);
    if (!check.ok) return refuse(check.reason, std::string(who) + " certificate: " + check.message);
    if (!expected.empty() && check.spiffe_id != expected) {
      return refuse("wrong_peer", "dialled " + expected + " but the server is " + check.spiffe_id);
    }
    h2::PeerVerdict v;
    v.ok = true;
    v.spiffe_id = check.spiffe_id;
    return v;
  }

  std::shared_ptr<h2::TlsContext> server_tls() {
    return h2::TlsContext::create(h2::TlsContext::Side::server, core.cert_file.get(), core.key_file.get(),
                                  [this](const std::string& pem) { return verify(pem, SvidRole::client, ""); });
  }
  std::shared_ptr<h2::TlsContext> client_tls(const std::string& peer_id) {
    return h2::TlsContext::create(h2::TlsContext::Side::client, core.cert_file.get(), core.key_file.get(),
                                  [this, peer_id](const std::string& pem) {
                                    return verify(pem, SvidRole::server, peer_id);
                                  });
  }

  // The tunnels' contexts: the same certificate and checks, ALPN sg-tunnel/1.
  Tunnels::Tls tunnel_tls() {
    Tunnels::Tls t;
    t.server = h2::TlsContext::create(
        h2::TlsContext::Side::server, core.cert_file.get(), core.key_file.get(),
        [this](const std::string& pem) { return verify(pem, SvidRole::client, ""); }, h2::kTunnelAlpn);
    for (const auto& entry : core.config.peers) {
      const std::string id = entry.first;
      t.clients[id] = h2::TlsContext::create(
          h2::TlsContext::Side::client, core.cert_file.get(), core.key_file.get(),
          [this, id](const std::string& pem) { return verify(pem, SvidRole::server, id); }, h2::kTunnelAlpn);
    }
    return t;
  }
  // A failed inbound handshake, counted once (the verifier counts its own refusals).
  void handshake_failure(const std::string& reason, const std::string& detail) {
    const bool counted = !t_counted_refusal.empty() && reason == t_counted_refusal;
    t_counted_refusal.clear();
    if (!counted) core.count_handshake_failure(reason, detail);
  }

  h2::RelayLimits limits() const {
    h2::RelayLimits l;
    l.max_header_list_bytes = static_cast<size_t>(core.config.max_header_list_bytes);
    l.max_message_bytes = static_cast<uint64_t>(core.config.max_message_bytes);
    l.handshake_timeout = core.config.handshake_timeout;
    return l;
  }

  static h2::Decision refusal(const RouteDecision& r) {
    return h2::Decision::refuse(static_cast<h2::GrpcCode>(r.code), r.message);
  }

  h2::Decision decide_inbound(const h2::RequestInfo& r) {
    const RouteDecision d = core.decide_inbound(std::string(r.peer_id), std::string(r.path));
    if (!d.allow) return refusal(d);
    if (!d.export_call) return h2::Decision::allow_to(kShardd);
    std::lock_guard<std::mutex> lock(guards_mu);
    guards[r.call_id] = std::make_unique<ExportLedgerGuard>(&core, d.peer, d.export_budget, d.shard);
    return h2::Decision::allow_to(kShardd, /*inspect=*/true);
  }

  h2::Decision decide_outbound(const h2::RequestInfo& r) {
    std::string requested;
    for (const auto& [name, value] : r.headers) {
      if (name == kTargetHeader) requested = value;
    }
    const RouteDecision d = core.decide_outbound(requested, std::string(r.path));
    if (!d.allow) return refusal(d);
    return h2::Decision::allow_to(d.peer);
  }

  ExportLedgerGuard* guard_of(uint64_t call_id) {
    std::lock_guard<std::mutex> lock(guards_mu);
    const auto it = guards.find(call_id);
    return it == guards.end() ? nullptr : it->second.get();
  }

  // Every whole message of an export, both ways, before it is forwarded.
  h2::Decision on_message(const h2::CallInfo& info, h2::Direction dir, const h2::GrpcMessage& m) {
    ExportLedgerGuard* guard = guard_of(info.id);
    if (!guard) return h2::Decision::refuse(h2::GrpcCode::internal, "export call without its guard");
    if (m.compressed) {
      return h2::Decision::refuse(h2::GrpcCode::invalid_argument,
                                  "compressed export messages are not accepted (the guard reads every message)");
    }
    const MessageVerdict v = dir == h2::Direction::request ? guard->request(m.payload) : guard->response(m.payload);
    if (!v.ok()) return h2::Decision::refuse(static_cast<h2::GrpcCode>(v.code), v.message);
    return h2::Decision::allow_to(info.upstream, true);
  }

  void call_end(bool inbound_call, const h2::CallEnd& e) {
    const char* direction = inbound_call ? "inbound" : "outbound";  // the metric label
    const std::string& path = e.info.path;
    if (e.refused_by_relay && e.refusal_reason == "header_list_too_large") {
      core.count_size_refusal(direction, "header_list_too_large", "request headers over the size limit refused",
                              {{"method", bounded_text(path)}, {"limit", core.config.max_header_list_bytes}});
    } else if (e.refused_by_relay && e.refusal_reason == "message_too_large") {
      core.count_size_refusal(direction, "message_too_large", "message over the size limit refused",
                              {{"peer", bounded_text(e.info.peer_id)},
                               {"method", bounded_text(path)},
                               {"limit", core.config.max_message_bytes}});
    }
    if (!e.info.upstream.empty()) {  // relayed (allowed): bytes from the pod's point of view
      const std::string& peer = inbound_call ? e.info.peer_id : e.info.upstream;
      const uint64_t req = message_bytes(e.request_bytes, e.request_messages);
      const uint64_t resp = message_bytes(e.response_bytes, e.response_messages);
      core.bytes_counter(inbound_call ? "received" : "sent", peer).Increment(static_cast<double>(req));
      core.bytes_counter(inbound_call ? "sent" : "received", peer).Increment(static_cast<double>(resp));
    }
    std::unique_ptr<ExportLedgerGuard> guard;
    {
      std::lock_guard<std::mutex> lock(guards_mu);
      const auto it = guards.find(e.info.id);
      if (it != guards.end()) {
        guard = std::move(it->second);
        guards.erase(it);
      }
    }
    if (guard) guard->done();
    // A stream that ended with RST_STREAM instead of a status: cancelled.
    core.count_request(path, e.grpc_status >= 0 ? e.grpc_status : kCancelled, direction, e.info.started);
  }

  h2::RelayHooks hooks(bool inbound) {
    h2::RelayHooks h;
    if (inbound) {
      h.decide = [this](const h2::RequestInfo& r) { return decide_inbound(r); };
      h.on_message = [this](const h2::CallInfo& info, h2::Direction dir, const h2::GrpcMessage& m) {
        return on_message(info, dir, m);
      };
      h.on_handshake_failure = [this](std::string_view reason, std::string_view detail) {
        const bool counted = !t_counted_refusal.empty() && reason == t_counted_refusal;
        t_counted_refusal.clear();
        if (!counted) core.count_handshake_failure(std::string(reason), std::string(detail));
      };
    } else {
      h.decide = [this](const h2::RequestInfo& r) { return decide_outbound(r); };
    }
    h.on_call_end = [this, inbound](const h2::CallEnd& e) { call_end(inbound, e); };
    return h;
  }
};

H2Plane::H2Plane(ProxyCore& core) : s_(std::make_unique<State>(core)) {}

H2Plane::~H2Plane() { shutdown(std::chrono::milliseconds(0)); }

void H2Plane::start() {
  State& s = *s_;
  const ProxyConfig& config = s.core.config;
  h2::RelayConfig in;
  try {
    in.server_tls = s.server_tls();
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("certificate or key (--cert, --key) not usable for TLS: ") + e.what());
  }
  h2::UpstreamConfig shardd;
  shardd.address = config.upstream;  // plaintext HTTP/2 to the local shardd
  in.upstreams[kShardd] = shardd;
  in.drop_request_headers = {kTargetHeader};
  in.limits = s.limits();

  h2::RelayConfig out;
  out.plaintext_peer_id = "local";  // the loopback listener's client is the local shardd
  for (const auto& [id, address] : config.peers) {
    h2::UpstreamConfig peer;
    peer.address = address;
    peer.tls = s.client_tls(id);
    out.upstreams[id] = peer;
  }
  out.drop_request_headers = {kTargetHeader};
  out.limits = s.limits();
  // Peers are other sidecars (nghttp2 answers PINGs itself, with no ping-abuse policy);
  // the inbound relay's upstream is the local shardd, a gRPC server, never pinged.
  out.limits.keepalive_interval = config.peer_keepalive;  // the timeout: RelayLimits' 10 s

  s.inbound = std::make_unique<h2::Relay>("", std::move(in), s.hooks(/*inbound=*/true), 1);
  s.outbound = std::make_unique<h2::Relay>(config.outbound_listen, std::move(out), s.hooks(/*inbound=*/false), 1);
  Tunnels::Tls tunnel_tls;
  try {
    tunnel_tls = s.tunnel_tls();
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("certificate or key (--cert, --key) not usable for TLS: ") + e.what());
  }
  s.tunnels = std::make_unique<Tunnels>(
      s.core, [&s](const std::string& reason, const std::string& detail) { s.handshake_failure(reason, detail); });
  s.inbound->start();
  try {
    s.outbound->start();
  } catch (const std::exception& e) {
    s.inbound->shutdown(std::chrono::milliseconds(0));
    throw std::runtime_error("outbound listener \"" + config.outbound_listen + "\": " + e.what());
  }
  try {
    s.tunnels->start(std::move(tunnel_tls));
  } catch (const std::exception&) {
    s.outbound->shutdown(std::chrono::milliseconds(0));
    s.inbound->shutdown(std::chrono::milliseconds(0));
    throw;
  }
}

void H2Plane::adopt_tunnel(int fd) { s_->tunnels->adopt(fd); }

int H2Plane::tunnel_port(size_t i) const { return s_->tunnels ? s_->tunnels->listen_port(i) : 0; }

int H2Plane::outbound_port() const { return s_->outbound ? s_->outbound->port() : 0; }

void H2Plane::adopt(int fd) { s_->inbound->adopt(fd); }

bool H2Plane::rotate() {
  State& s = *s_;
  if (!s.inbound || !s.outbound) return false;
  try {
    auto server = s.server_tls();
    std::map<std::string, std::shared_ptr<h2::TlsContext>> clients;
    for (const auto& entry : s.core.config.peers) clients[entry.first] = s.client_tls(entry.first);
    Tunnels::Tls tunnel_tls = s.tunnel_tls();
    s.inbound->set_server_tls(std::move(server));
    for (auto& [id, tls] : clients) s.outbound->set_upstream_tls(id, std::move(tls));
    if (s.tunnels) s.tunnels->set_tls(std::move(tunnel_tls));
    return true;
  } catch (const std::exception& e) {
    log::error("the certificate files do not make a TLS context (yet); new connections keep the previous one",
               {{"error", e.what()}});
    return false;
  }
}

void H2Plane::shutdown(std::chrono::milliseconds grace) {
  State& s = *s_;
  if (s.tunnels) s.tunnels->shutdown();  // a tunnel has no end to wait for: closed at once
  if (s.outbound) s.outbound->shutdown(grace);
  if (s.inbound) s.inbound->shutdown(grace);
  std::lock_guard<std::mutex> lock(s.guards_mu);
  s.guards.clear();
}

}  // namespace shardguard::sidecar
