// The plane-independent half of shard-sidecar (proxy_core.h).
#include "proxy_core.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include "shardguard/common/files.h"
#include "shardguard/common/log.h"
#include "shardguard/common/pki.h"
#include "shardguard/v1/pipeline.pb.h"

namespace shardguard::sidecar {

std::string source_address(const sockaddr_storage& sa) {
  char text[INET6_ADDRSTRLEN] = "?";
  if (sa.ss_family == AF_INET) {
    ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in&>(sa).sin_addr, text, sizeof text);
  } else if (sa.ss_family == AF_INET6) {
    const auto& a6 = reinterpret_cast<const sockaddr_in6&>(sa).sin6_addr;
    if (IN6_IS_ADDR_V4MAPPED(&a6)) {  // a dual-stack listener: one IPv4 client, one key
      ::inet_ntop(AF_INET, a6.s6_addr + 12, text, sizeof text);
    } else {
      ::inet_ntop(AF_INET6, &a6, text, sizeof text);
    }
  }
  return text;
}

using Clock = std::chrono::steady_clock;

std::string grpc_code_name(int code) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  if (code < 0 || code >= static_cast<int>(sizeof kNames / sizeof kNames[0])) return "UNKNOWN";
  return kNames[code];
}

std::string WatchedFile::get(bool* changed) {
  struct stat st {};
  std::lock_guard<std::mutex> lock(mu_);
  if (changed) *changed = false;
  if (::stat(path_.c_str(), &st) == 0) {
    const auto stamp = std::make_tuple(st.st_ino, st.st_size, st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
    if (!loaded_ || stamp != stamp_) {
      try {
        contents_ = read_file(path_);
        stamp_ = stamp;
        loaded_ = true;
        if (changed) *changed = true;
      } catch (const FileError&) {
        if (!loaded_) throw;
      }
    }
  } else if (!loaded_) {
    throw FileError(path_ + ": " + std::strerror(errno));
  }
  return contents_;
}

SidecarMetrics::SidecarMetrics(prometheus::Registry& r)
    : decisions(prometheus::BuildCounter()
                    .Name("shardguard_authz_decisions_total")
                    .Help("Shard access policy decisions by outcome, rule, method and peer")
                    .Register(r)),
      requests(prometheus::BuildCounter()
                   .Name("shardguard_proxy_requests_total")
                   .Help("Calls relayed or refused by the sidecar, by method and gRPC status code")
                   .Register(r)),
      duration(prometheus::BuildHistogram()
                   .Name("shardguard_proxy_request_duration_seconds")
                   .Help("Duration of calls through the sidecar, from the call's arrival to its status")
                   .Register(r)),
      bytes(prometheus::BuildCounter()
                .Name("shardguard_proxy_bytes_total")
                .Help("gRPC message payload bytes through the sidecar, sent to or received from a peer")
                .Register(r)),
      refusals(prometheus::BuildCounter()
                   .Name("shardguard_proxy_refused_requests_total")
                   .Help("Requests refused for their size before any decision, by listener and reason")
                   .Register(r)),
      handshake_failures(prometheus::BuildCounter()
                             .Name("shardguard_tls_handshake_failures_total")
                             .Help("Refused TLS connections by reason")
                             .Register(r)),
      cert_expiry(prometheus::BuildGauge()
                      .Name("shardguard_cert_expiry_timestamp_seconds")
                      .Help("notAfter of this sidecar's certificate, Unix seconds")
                      .Register(r)
                      .Add({})),
      reloads(prometheus::BuildCounter()
                  .Name("shardguard_policy_reloads_total")
                  .Help("Policy file loads by result (ok, error)")
                  .Register(r)),
      policy_generation(prometheus::BuildGauge()
                            .Name("shardguard_policy_generation")
                            .Help("Successful policy loads so far; 0 = no policy, everything is refused")
                            .Register(r)
                            .Add({})),
      exposed(prometheus::BuildCounter()
                  .Name("shardguard_param_bytes_exposed_total")
                  .Help("Unique parameter bytes of a shard a principal has received through export")
                  .Register(r)),
      exposure_ratio(prometheus::BuildGauge()
                         .Name("shardguard_exposure_ratio")
                         .Help("Share of a shard's parameters a principal holds: 1 for the shard's own principal, "
                               "the unique bytes received through export for an export principal")
                         .Register(r)),
      cert_reloads(prometheus::BuildCounter()
                       .Name("shardguard_cert_reloads_total")
                       .Help("Certificate, key or CA bundle file changes picked up")
                       .Register(r)
                       .Add({})),
      ledger_sequence(prometheus::BuildGauge()
                          .Name("shardguard_ledger_sequence")
                          .Help("Sequence of the exposure ledger: raised by every save, read at start from the file "
                                "(0: no file)")
                          .Register(r)),
      ledger_min_sequence(prometheus::BuildGauge()
                              .Name("shardguard_ledger_min_sequence")
                              .Help("The lowest ledger sequence this sidecar accepts (--ledger-min-sequence); "
                                    "a ledger_sequence below it means exports are refused")
                              .Register(r)) {
  for (const char* d : {"inbound", "outbound"}) {
    duration_by_direction[d] = &duration.Add(
        {{"direction", d}}, prometheus::Histogram::BucketBoundaries{
                                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10});
  }
  reloads_ok = &reloads.Add({{"result", "ok"}});
  reloads_error = &reloads.Add({{"result", "error"}});
}

ProxyCore::ProxyCore(ProxyConfig c, std::shared_ptr<prometheus::Registry> r)
    : config(std::move(c)),
      registry(std::move(r)),
      metrics(*registry),
      ca_file(config.ca_file),
      cert_file(config.cert_file),
      key_file(config.key_file) {}

void ProxyCore::count_handshake_failure(const std::string& reason, const std::string& detail,
                                        const std::string& source) {
  metrics.handshake_failures.Add({{"reason", reason}}).Increment();
  uint64_t suppressed = 0;
  if (!log_limiter.allow("tls:" + reason, Clock::now(), &suppressed)) return;
  nlohmann::json fields{{"reason", reason}, {"detail", bounded_text(detail)}};
  if (!source.empty()) fields["source"] = source;
  if (suppressed > 0) fields["suppressed"] = suppressed;
  log::warn("TLS connection refused", fields);
}

void ProxyCore::count_size_refusal(const char* direction, const char* reason, const char* msg,
                                   nlohmann::json fields) {
  metrics.refusals.Add({{"direction", direction}, {"reason", reason}}).Increment();
  uint64_t suppressed = 0;
  if (!log_limiter.allow(std::string("size:") + reason, Clock::now(), &suppressed)) return;
  fields["direction"] = direction;
  if (suppressed > 0) fields["suppressed"] = suppressed;
  log::warn(msg, fields);
}

void ProxyCore::log_suppressed() {
  for (const auto& [key, n] : log_limiter.take_suppressed(Clock::now())) {
    const auto colon = key.find(':');
    log::warn("repeated refusals not logged",
              {{"kind", key.substr(0, colon)}, {"reason", key.substr(colon + 1)}, {"count", n}});
  }
}

std::string ProxyCore::method_label(const std::string& method) const {
  if (method == policy::kForwardMethod || method == policy::kBackwardMethod || method == policy::kExportMethod ||
      method == policy::kTunnelStoreMethod || method == policy::kTunnelGlooMethod) {
    return method;
  }
  if (auto p = policy->current()) {
    for (const auto* rules : {&p->ingress(), &p->egress()}) {
      for (const auto& rule : *rules) {
        if (std::find(rule.methods.begin(), rule.methods.end(), method) != rule.methods.end()) return method;
      }
    }
  }
  return "other";
}

prometheus::Counter& CounterCache::get(std::initializer_list<Label> labels) {
  // The values joined by '\n', which occurs in none of them (methods as labelled, rule
  // names, SPIFFE IDs, codes, directions).
  std::string key;
  for (const auto& [name, value] : labels) key.append(value).push_back('\n');
  std::lock_guard<std::mutex> lock(mu_);
  auto it = counters_.find(key);
  if (it == counters_.end()) {
    prometheus::Labels all;
    for (const auto& [name, value] : labels) all.emplace(name, std::string(value));
    it = counters_.emplace(std::move(key), &family_.Add(all)).first;
  }
  return *it->second;
}

void ProxyCore::count_decision(const policy::Decision& d, const std::string& method, const std::string& peer) {
  metrics.decisions_by_label
      .get({{"decision", d.allow ? "allow" : "deny"}, {"rule", d.rule}, {"method", method_label(method)}, {"peer", peer}})
      .Increment();
}

void ProxyCore::count_request(const std::string& method, int code, const char* direction,
                              Clock::time_point started_at) {
  metrics.requests_by_label.get({{"method", method_label(method)}, {"code", grpc_code_name(code)}}).Increment();
  metrics.duration_by_direction.find(direction)->second->Observe(std::chrono::duration<double>(Clock::now() - started_at).count());
}

prometheus::Counter& ProxyCore::bytes_counter(const char* direction, const std::string& peer) {
  return metrics.bytes_by_label.get({{"direction", direction}, {"peer", peer}});
}

void ProxyCore::audit_deny(const policy::Decision& d, const std::string& peer, const std::string& method) {
  log::warn("call refused", {{"peer", bounded_text(peer)},
                             {"method", bounded_text(method)},
                             {"rule", d.rule},
                             {"reason", bounded_text(d.reason, 2 * kLoggedPrefixBytes)}});
  if (!audit) return;
  AuditEvent e;
  e.peer = bounded_text(peer);
  e.method = bounded_text(method);
  e.rule = d.rule;
  e.decision = "deny";
  std::string error;
  if (!audit->append(e, &error)) log::error("audit log append failed", {{"error", error}});
}

void ProxyCore::audit_event(AuditEvent e) {
  if (!audit) return;
  std::string error;
  if (!audit->append(e, &error)) log::error("audit log append failed", {{"error", error}});
}

void ProxyCore::publish_exposure(const std::string& principal, uint32_t shard, uint64_t newly) {
  const prometheus::Labels l{{"peer", principal}, {"shard", std::to_string(shard)}};
  auto& c = metrics.exposed.Add(l);
  if (newly > 0) c.Increment(static_cast<double>(newly));
  metrics.exposure_ratio.Add(l).Set(ledger->ratio(principal, shard));
}

// ---------------------------------------------------------------------------
// Routing

RouteDecision ProxyCore::decide_inbound(const std::string& peer, const std::string& method) {
  RouteDecision route;
  policy::Decision d;
  if (peer.empty()) {
    d.allow = false;
    d.rule = policy::kRuleBadPeer;
    d.reason = "the TLS handshake established no SPIFFE identity";
  } else {
    d = policy->decide(policy::Direction::kIngress, peer, method);
  }
  if (d.allow && method == policy::kExportMethod && !ledger) {
    d.allow = false;
    d.rule = policy::kRuleExportDenied;
    d.reason = "this sidecar keeps no exposure ledger (--ledger, --ledger-key), so it exports nothing";
  } else if (d.allow && method == policy::kExportMethod && !ledger_refused.empty()) {
    d.allow = false;
    d.rule = policy::kRuleLedgerRolledBack;
    d.reason = ledger_refused;
  }
  const bool export_call = d.allow && method == policy::kExportMethod;
  if (!export_call) count_decision(d, method, peer);  // an export is counted by its guard
  if (!d.allow) {
    audit_deny(d, peer, method);
    route.code = kPermissionDenied;
    route.message = bounded_text(d.reason, 2 * kLoggedPrefixBytes) + " (rule " + d.rule + ")";
    return route;
  }
  if (export_call) {
    const auto p = policy->current();
    route.export_call = true;
    route.export_budget = d.export_budget_bytes;
    route.shard = static_cast<uint32_t>(p ? p->shard() : 0);
  }
  route.allow = true;
  route.peer = peer;
  return route;
}

RouteDecision ProxyCore::decide_outbound(const std::string& requested, const std::string& method) {
  RouteDecision route;
  const auto& peers = config.peers;
  // Candidates: configured peers the egress policy lets this method go to.
  std::vector<std::string> allowed;
  policy::Decision last;
  last.rule = policy::kRuleDefaultDeny;
  last.reason = "no configured peer may receive " + method;
  for (const auto& entry : peers) {
    const std::string& id = entry.first;
    if (!requested.empty() && id != requested) continue;
    policy::Decision d = policy->decide(policy::Direction::kEgress, id, method);
    if (d.allow) {
      allowed.push_back(id);
      last = d;
    } else if (allowed.empty()) {
      last = d;
    }
  }
  std::string deny_reason;
  if (!requested.empty() && peers.count(requested) == 0) {
    last.allow = false;
    last.rule = policy::kRuleDefaultDeny;
    deny_reason = "target " + bounded_text(requested) + " is not a configured peer";
  } else if (allowed.empty()) {
    last.allow = false;
    deny_reason = last.reason;
  } else if (allowed.size() > 1) {
    last.allow = false;
    last.rule = policy::kRuleDefaultDeny;
    deny_reason = std::to_string(allowed.size()) + " peers may receive " + bounded_text(method) + "; name one in the " +
                  kTargetHeader + " header";
  }
  // Labels stay bounded: only configured peers, or "unknown" for anything else the
  // local shardd may put in the header.
  const std::string peer_label =
      allowed.size() == 1 ? allowed[0] : (peers.count(requested) ? requested : std::string("unknown"));
  if (!deny_reason.empty()) {
    last.reason = deny_reason;
    count_decision(last, method, peer_label);
    audit_deny(last, peer_label, method);
    route.code = kPermissionDenied;
    route.message = bounded_text(deny_reason, 2 * kLoggedPrefixBytes) + " (rule " + last.rule + ")";
    return route;
  }
  count_decision(last, method, peer_label);
  route.allow = true;
  route.peer = peer_label;
  return route;
}

// ---------------------------------------------------------------------------
// The export guard

MessageVerdict ExportLedgerGuard::request(const std::string& message) {
  v1::ExportRequest req;
  if (seen_request_) return refuse(kInvalidArgument, "an export carries exactly one request", 0);
  seen_request_ = true;
  if (!req.ParseFromString(message)) return refuse(kInvalidArgument, "the request is not an ExportRequest", 0);
  begin_ = req.offset();
  if (req.length() == 0 || req.length() > UINT64_MAX - req.offset()) {
    return refuse(kInvalidArgument,
                  "ExportRequest.length " + std::to_string(req.length()) + " must be > 0 and fit after offset " +
                      std::to_string(req.offset()),
                  0);
  }
  end_ = begin_ + req.length();
  std::lock_guard<std::mutex> lock(core_->ledger_mu);
  if (core_->ledger->would_exceed(principal_, budget_, shard_, begin_, end_)) {
    const uint64_t had = core_->ledger->exposed_bytes(principal_);
    return refuse(kPermissionDenied,
                  "export of bytes [" + std::to_string(begin_) + ", " + std::to_string(end_) + ") would take " +
                      principal_ + " beyond its export budget of " + std::to_string(budget_) +
                      " bytes (already received " + std::to_string(had) + ")",
                  req.length());
  }
  policy::Decision d;
  d.allow = true;
  d.rule = policy::kRuleExport;
  core_->count_decision(d, policy::kExportMethod, principal_);
  accepted_ = true;
  return {};
}

MessageVerdict ExportLedgerGuard::response(const std::string& message) {
  v1::ExportChunk chunk;
  if (!chunk.ParseFromString(message)) {
    return {kInternal, "shardd sent something that is not an ExportChunk; nothing forwarded"};
  }
  const uint64_t b = chunk.offset(), e = b + chunk.data().size();
  if (b < begin_ || e > end_ || e < b) {
    return {kInternal, "shardd sent bytes outside the requested range; nothing forwarded"};
  }
  std::lock_guard<std::mutex> lock(core_->ledger_mu);
  if (chunk.total_bytes() > 0) core_->ledger->set_shard_bytes(shard_, chunk.total_bytes());
  const auto newly = core_->ledger->try_record(principal_, budget_, shard_, b, e);
  if (!newly) {  // another export of the same principal took the budget meanwhile
    return {kPermissionDenied, "export budget of " + principal_ + " used up during the call"};
  }
  core_->publish_exposure(principal_, shard_, *newly);
  // Persisted before the bytes go out: a crash after this point over-counts, never
  // under-counts what the principal received.
  try {
    core_->ledger->save(core_->config.ledger_file, core_->ledger_key);
  } catch (const std::exception& ex) {
    log::error("cannot save the exposure ledger; export stopped",
               {{"file", core_->config.ledger_file}, {"error", ex.what()}});
    return {kInternal, "the exposure ledger cannot be saved; nothing more is exported"};
  }
  // Published only once on disk: the operator records it as the lowest sequence a
  // restarted sidecar may accept.
  core_->ledger_sequence->Set(static_cast<double>(core_->ledger->sequence()));
  bytes_ += e - b;
  ranges_.push_back({b, e});
  return {};
}

void ExportLedgerGuard::done() {
  if (!accepted_ || audited_) return;
  audited_ = true;
  AuditEvent ev;
  ev.peer = principal_;
  ev.method = policy::kExportMethod;
  ev.rule = policy::kRuleExport;
  ev.decision = "allow";
  ev.bytes = bytes_;
  ev.ranges_digest = ranges_digest(ranges_);
  core_->audit_event(ev);
}

MessageVerdict ExportLedgerGuard::refuse(int code, const std::string& reason, uint64_t asked) {
  policy::Decision d;
  d.rule = policy::kRuleExportDenied;
  d.reason = reason;
  core_->count_decision(d, policy::kExportMethod, principal_);
  log::warn("export refused", {{"peer", principal_}, {"reason", reason}});
  AuditEvent ev;
  ev.peer = principal_;
  ev.method = policy::kExportMethod;
  ev.rule = policy::kRuleExportDenied;
  ev.decision = "deny";
  ev.bytes = asked;
  if (end_ > begin_) ev.ranges_digest = ranges_digest({{begin_, end_}});
  core_->audit_event(ev);
  return {code, reason + " (rule " + policy::kRuleExportDenied + ")"};
}

}  // namespace shardguard::sidecar
