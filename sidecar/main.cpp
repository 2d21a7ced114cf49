// shard-sidecar: the mTLS proxy in front of and behind one shardd (see proxy.h).
#include <malloc.h>
#include <pthread.h>

#include <csignal>
#include <cstring>
#include <iostream>

#include <CLI/CLI.hpp>

#include "shardguard/common/log.h"
#include "shardguard/common/metrics_server.h"
#include "shardguard/common/process.h"
#include "shardguard/proto/grpc_log.h"
#include "shardguard/sidecar/proxy.h"

namespace {

using namespace shardguard;

struct Flags {
  sidecar::ProxyConfig proxy;
  std::vector<std::string> peers;
  std::vector<std::string> tunnels;
  double handshake_timeout_s = 10;
  double first_bytes_timeout_s = 2;
  double peer_keepalive_s = 15;
  double reload_interval_s = 1;
  std::string metrics = "127.0.0.1:9101";
  std::string data_plane = "h2";
};

int RunSidecar(Flags flags) {
  flags.proxy.data_plane = sidecar::parse_data_plane(flags.data_plane);
  for (const auto& text : flags.peers) {
    auto [id, address] = sidecar::parse_peer_flag(text);
    if (!flags.proxy.peers.emplace(id, address).second) {
      throw std::invalid_argument("--peer " + id + " is given twice");
    }
  }
  for (const auto& text : flags.tunnels) flags.proxy.tunnels.push_back(sidecar::parse_tunnel_flag(text));
  if (!(flags.handshake_timeout_s > 0) || !(flags.reload_interval_s > 0) || !(flags.first_bytes_timeout_s > 0)) {
    throw std::invalid_argument("--handshake-timeout, --first-bytes-timeout and --reload-interval must be positive");
  }
  flags.proxy.handshake_timeout = std::chrono::milliseconds(static_cast<int64_t>(flags.handshake_timeout_s * 1000));
  if (!(flags.peer_keepalive_s >= 0 && flags.peer_keepalive_s <= 3600)) {
    throw std::invalid_argument("--peer-keepalive must be between 0 (off) and 3600 seconds, got " +
                                std::to_string(flags.peer_keepalive_s));
  }
  flags.proxy.peer_keepalive = std::chrono::milliseconds(static_cast<int64_t>(flags.peer_keepalive_s * 1000));
  flags.proxy.first_bytes_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(flags.first_bytes_timeout_s * 1000));
  flags.proxy.reload_interval = std::chrono::milliseconds(static_cast<int64_t>(flags.reload_interval_s * 1000));

  // SIGTERM / SIGINT are taken by sigwait below (no work in a handler).
  sigset_t signals = block_stop_signals();

  auto registry = std::make_shared<prometheus::Registry>();
  sidecar::Proxy proxy(flags.proxy, registry);
  MetricsServer metrics(registry);
  if (flags.metrics != "off") {
    auto [host, port] = split_host_port(flags.metrics);
    metrics.start(host, port);
  }
  proxy.start();
  // /readyz follows the proxy: no policy or no certificates → not ready, with the reason.
  std::atomic<bool> done{false};
  std::thread readiness([&] {
    while (!done.load()) {
      std::string why;
      const bool ok = proxy.ready(&why);
      metrics.set_ready(ok, why);
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  });
  log::info("listening", {{"inbound_port", proxy.inbound_port()}, {"outbound_port", proxy.outbound_port()},
                          {"metrics_port", metrics.port()}});
  int sig = 0;
  sigwait(&signals, &sig);
  log::info("stopping", {{"signal", strsignal(sig)}});
  done = true;
  readiness.join();
  metrics.set_ready(false, "stopping");
  proxy.shutdown();
  metrics.stop();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Two malloc arenas instead of one per thread: gRPC's threads otherwise each keep
  // freed 1 MiB message buffers, which doubled the peak RSS while streaming.
  mallopt(M_ARENA_MAX, 2);
  // The HTTP/2 relay allocates and frees its 64 KiB DATA chunks at the pace of the
  // stream: fixed thresholds keep up to 4 MiB of freed heap instead of returning it to
  // the kernel after every burst and taking page faults to get it back (glibc's default
  // trims at 128 KiB). Blocks from 1 MiB up are mmapped and returned at once.
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  mallopt(M_TRIM_THRESHOLD, 4 << 20);
  shardguard::log::set_component("shard-sidecar");
  shardguard::proto::route_grpc_logs_to_json();  // stderr stays JSON lines
  CLI::App app{"shard-sidecar: mTLS proxy that enforces the shard access policy in front of and behind shardd"};
  Flags f;
  app.add_option("--inbound", f.proxy.inbound_listen, "mTLS listen address for peers")->capture_default_str();
  app.add_option("--outbound", f.proxy.outbound_listen, "loopback listen address for the local shardd")
      ->capture_default_str();
  app.add_option("--upstream", f.proxy.upstream, "the local shardd's gRPC address")->capture_default_str();
  app.add_option("--cert", f.proxy.cert_file, "this pod's certificate (PEM), reloaded on change")->required();
  app.add_option("--key", f.proxy.key_file, "its private key (PEM), reloaded on change")->required();
  app.add_option("--ca", f.proxy.ca_file, "the job CA bundle (PEM), reloaded on change")->required();
  app.add_option("--policy", f.proxy.policy_file, "shard access policy (JSON), reloaded on change")->required();
  app.add_option("--peer", f.peers, "SPIFFE-ID=host:port of a peer sidecar's inbound listener (repeatable)");
  app.add_option("--tunnel", f.tunnels,
                 "SERVICE@LISTEN=PEER_ID (h2 plane, repeatable): carry plain TCP accepted on the loopback LISTEN "
                 "host:port over mTLS to PEER_ID (a --peer) as SERVICE store or gloo");
  app.add_option("--tunnel-store", f.proxy.tunnel_store,
                 "h2 plane: loopback host:port where allowed inbound Store tunnels go (the local rendezvous store)");
  app.add_option("--tunnel-map", f.proxy.tunnel_map_file,
                 "h2 plane: file of lines '<peer SPIFFE ID> <loopback host:port>' saying where each peer's inbound "
                 "Gloo tunnels go (re-read for every tunnel)");
  app.add_option("--max-message-bytes", f.proxy.max_message_bytes, "largest message relayed")->capture_default_str();
  app.add_option("--max-header-bytes", f.proxy.max_header_list_bytes, "largest request header list")
      ->capture_default_str();
  app.add_option("--handshake-timeout", f.handshake_timeout_s, "seconds a client has to complete TLS")
      ->capture_default_str();
  app.add_option("--peer-keepalive", f.peer_keepalive_s,
                 "h2 plane: seconds a peer connection with waiting calls may stay silent before it is sent a PING "
                 "(closed if nothing answers within 10 s more); 0 = off")
      ->capture_default_str();
  app.add_option("--first-bytes-timeout", f.first_bytes_timeout_s,
                 "seconds a new inbound connection has to send its ClientHello")
      ->capture_default_str();
  app.add_option("--max-pending-connections", f.proxy.max_pending_connections,
                 "inbound connections that may wait for their ClientHello")
      ->capture_default_str();
  app.add_option("--max-pending-per-source", f.proxy.max_pending_per_source,
                 "of those, from one source address")
      ->capture_default_str();
  app.add_option("--reload-interval", f.reload_interval_s, "seconds between checks of the watched files")
      ->capture_default_str();
  auto* audit_log = app.add_option("--audit-log", f.proxy.audit_file, "hash-chained audit log (JSON lines)");
  app.add_flag("--audit-stdout", f.proxy.audit_stdout, "also write each audit line to stdout (needs --audit-log)")
      ->needs(audit_log);
  app.add_option("--ledger", f.proxy.ledger_file, "exposure ledger file (HMAC-sealed); needed for parameter export");
  app.add_option("--ledger-key", f.proxy.ledger_key_file, "32-byte HMAC key file of the ledger");
  app.add_option("--ledger-min-sequence", f.proxy.ledger_min_sequence,
                 "refuse every export if the ledger's sequence is lower (or it is missing while this is > 0)")
      ->capture_default_str();
  app.add_option("--data-plane", f.data_plane,
                 "the relay engine: grpc (gRPC server and client stacks) or h2 (HTTP/2 relay, issue 17)")
      ->check(CLI::IsMember({"grpc", "h2"}))
      ->capture_default_str();
  app.add_option("--metrics", f.metrics, "metrics and health address host:port, or off")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    return RunSidecar(std::move(f));
  } catch (const std::exception& e) {
    shardguard::log::error("cannot start", {{"error", e.what()}});
    std::cerr << "shard-sidecar: " << e.what() << "\n";
    return 2;
  }
}
