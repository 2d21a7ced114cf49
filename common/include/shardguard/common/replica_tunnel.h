// The fixed addresses of a replica group's traffic when it goes through the sidecars
// (issue 20; docs/pipeline.md#the-replica-tunnels). Shared by shardd, which rewrites
// Gloo's addresses to them, and by whoever configures the sidecars (the operator and
// `shardctl run`), so that both sides name the same loopback ports.
#pragma once

#include <stdexcept>
#include <string>

namespace shardguard {

// Replica r's Gloo device binds 127.77.0.<r+1>: a loopback address of its own, so that
// the order of two replicas' addresses (which Gloo uses to decide which side of a pair
// connects) is the order of their replica indices, whatever ports the tunnels use. The
// whole of 127.0.0.0/8 is loopback on Linux; spec.sharding.replicas is at most 16.
inline std::string gloo_tunnel_host(int replica) {
  if (replica < 0 || replica > 253) throw std::out_of_range("gloo_tunnel_host: replica " + std::to_string(replica));
  return "127.77.0." + std::to_string(replica + 1);
}

// In a pod: the sidecar's tunnel to replica r's Gloo listens on
// gloo_tunnel_host(r):kGlooTunnelPort, and the tunnel to replica 0's rendezvous store on
// 127.0.0.1:<the store port>, where replica 0's own shardd serves it.
inline constexpr int kGlooTunnelPort = 7101;

}  // namespace shardguard
