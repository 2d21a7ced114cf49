// The replicas of one stage (spec.sharding.replicas > 1) as a c10d Gloo process
// group: after every step they average their gradients, so that R pipelines of
// batch B train like one of batch B × R. Rendezvous through a TCPStore that
// replica 0 serves at the group's store address. Gloo's own connections are TCP,
// either through the sidecars (tunnels: each replica binds gloo_tunnel_host(replica)
// and the addresses the others publish are rewritten to its sidecar's tunnel
// listeners) or directly from the replica's own address (--replica-host: a pod's IP;
// by default the store's host). docs/pipeline.md.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/types.h>

#include "shardguard/shardd/stage.h"

namespace shardguard::shardd {

class ReplicaGroup {
 public:
  // Blocks until every replica of the stage has joined (at most timeout_s);
  // throws std::runtime_error naming the stage, the replica and the store.
  // own_host: the address this replica's Gloo connections use ("" = the store's host).
  // tunnels / tunnel_map: StageOptions::replica_tunnels and replica_tunnel_map (empty:
  // no tunnels); with tunnels every other replica must have one. group_secret: what
  // every replica of the stage holds and nothing else does (the stage's checkpoint key);
  // the group's keys in the store are named after it. on_store_refused (replica 0,
  // optional): runs for each connection its store refused (a malformed request, too many).
  ReplicaGroup(int stage, int replica, int replicas, const std::string& store_address, const std::string& own_host,
               const std::map<int, ReplicaTunnel>& tunnels, const std::string& tunnel_map,
               const std::string& group_secret, double timeout_s, std::function<void()> on_store_refused = {});
  ~ReplicaGroup();
  ReplicaGroup(const ReplicaGroup&) = delete;
  ReplicaGroup& operator=(const ReplicaGroup&) = delete;

  // Every replica must be at the same step: throws naming both when not (a replica
  // that resumed elsewhere would otherwise average gradients of different steps).
  void check_step(int64_t step);
  // Replaces every defined gradient of `params` by its mean over the replicas (one
  // all-reduce of all of them, flattened to float32).
  void average_gradients(const std::vector<torch::Tensor>& params);
  // Element-wise sums of `values` over the replicas (a step's loss and counts).
  std::vector<double> sum(const std::vector<double>& values);

  int replicas() const { return replicas_; }
  int64_t incarnation() const { return incarnation_; }  // how many complete groups met at this store before
  double seconds() const { return seconds_; }      // spent in collectives
  uint64_t bytes() const { return bytes_; }        // payload bytes all-reduced (this replica's input)

 private:
  struct State;
  std::unique_ptr<State> state_;
  const int stage_, replica_, replicas_;
  int64_t incarnation_ = 0;
  double seconds_ = 0;
  uint64_t bytes_ = 0;
};

}  // namespace shardguard::shardd
