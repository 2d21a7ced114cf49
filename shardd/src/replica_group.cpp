#include "replica_group.h"

#include <chrono>
#include <set>
#include <thread>
#include <stdexcept>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "shardguard/common/crypto.h"
#include "shardguard/common/kv_store.h"
#include "shardguard/common/log.h"
#include "shardguard/common/metrics_server.h"
#include "shardguard/common/replica_tunnel.h"
#include "clock.h"
#include "shardguard/shardd/gloo_addresses.h"

namespace shardguard::shardd {

struct ReplicaGroup::State {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> group;
};

namespace {

std::chrono::milliseconds millis(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

// The group's keys (a PrefixStore) with Gloo's addresses sent through the sidecars:
// this replica's own listeners go to its sidecar's --tunnel-map before they are
// published (so before any peer can connect), and every peer's published addresses
// are read as that peer's tunnel listener in the local sidecar. The addresses keep
// their order, since every replica binds gloo_tunnel_host(replica): the greater
// replica connects, through its sidecar, and the lesser accepts from its own sidecar.
class TunnelStore : public c10d::PrefixStore {
 public:
  TunnelStore(const std::string& prefix, c10::intrusive_ptr<c10d::Store> store, int rank, int size,
              const std::map<int, ReplicaTunnel>& tunnels, std::string map_file)
      : PrefixStore(prefix, std::move(store)), rank_(rank), size_(size), tunnels_(tunnels),
        map_file_(std::move(map_file)) {}

  void set(const std::string& key, const std::vector<uint8_t>& value) override {
    if (is_addresses(key, value) && *gloo_address_key_rank(key) == rank_) {
      // Only the pairs this replica accepts: Gloo's greater replica connects, so the
      // lesser ones' listeners are never a peer's to reach (and the policy agrees).
      std::map<std::string, std::string> lines;
      for (const auto& [peer, address] : gloo_listeners(value, rank_, size_)) {
        if (peer > rank_) lines[tunnels_.at(peer).peer_id] = address;
      }
      write_tunnel_map(map_file_, lines);
      published_ = true;
    }
    PrefixStore::set(key, value);
  }

  std::vector<uint8_t> get(const std::string& key) override {
    auto value = PrefixStore::get(key);
    if (!is_addresses(key, value)) return value;
    const int peer = *gloo_address_key_rank(key);
    if (peer == rank_) return value;
    auto [host, port] = split_host_port(tunnels_.at(peer).address);
    rewritten_.insert(peer);
    return rewrite_gloo_addresses(value, peer, size_, host, port);
  }

  // Whether Gloo's rendezvous went through this store as expected: our listeners
  // published, every peer's addresses rewritten. Otherwise Gloo would have connected
  // around the sidecars, and the group must not be used.
  void check_tunnelled() const {
    if (!published_ || static_cast<int>(rewritten_.size()) != size_ - 1) {
      throw std::runtime_error("the replica tunnels did not see Gloo's addresses (" +
                               std::string(published_ ? "" : "own addresses not published; ") +
                               std::to_string(rewritten_.size()) + " of " + std::to_string(size_ - 1) +
                               " peers' addresses rewritten): this Gloo's rendezvous is not the one shardd knows");
    }
  }

 private:
  // Gloo's address keys are "<device>/<rank>" below this store; one of another size
  // means another Gloo, found here rather than after Gloo waited for its connections.
  bool is_addresses(const std::string& key, const std::vector<uint8_t>& value) const {
    const auto rank = gloo_address_key_rank(key);
    const size_t slash = key.find('/');
    if (!rank || *rank < 0 || *rank >= size_ || slash == std::string::npos || slash == 0 ||
        key.find_first_not_of("0123456789") != slash) {
      return false;
    }
    if (value.size() != static_cast<size_t>(size_ - 1) * kGlooAddressBytes) {
      throw std::runtime_error("Gloo's key \"" + key + "\" holds " + std::to_string(value.size()) + " bytes, not " +
                               std::to_string(size_ - 1) + " addresses of " + std::to_string(kGlooAddressBytes) +
                               ": a Gloo this shardd does not know; the replica tunnels cannot rewrite it");
    }
    return true;
  }

  const int rank_, size_;
  const std::map<int, ReplicaTunnel> tunnels_;
  const std::string map_file_;
  bool published_ = false;
  std::set<int> rewritten_;
};

// The prefix of the group's keys: 128 bits of SHA-256 over the stage's secret.
std::string group_prefix(const std::string& secret) {
  if (secret.empty()) throw std::invalid_argument("replica group: no stage secret (the checkpoint key) to name its keys");
  return "group-" + sha256_hex(std::string("shardguard replica group keys\n") + secret).substr(0, 32);
}

// The group's store as c10d sees it: a KvClient (common/kv_store.h) to replica 0's
// KvServer, which replica 0's own store also holds and serves on its --replica-store
// address only (LibTorch 1.13's TCPStore would listen on every interface).
class GroupStore : public c10d::Store {
 public:
  GroupStore(std::unique_ptr<KvServer> server, const std::string& host, int port, std::chrono::milliseconds timeout)
      : Store(timeout), server_(std::move(server)), client_(host, port, timeout),
        where_(host + ":" + std::to_string(port)) {}

  void set(const std::string& key, const std::vector<uint8_t>& value) override { client_.set(key, value); }
  std::vector<uint8_t> compareSet(const std::string& key, const std::vector<uint8_t>& expected,
                                  const std::vector<uint8_t>& desired) override {
    return client_.compare_set(key, expected, desired);
  }
  std::vector<uint8_t> get(const std::string& key) override {
    const std::chrono::milliseconds limit = blocking(timeout_);
    auto value = client_.get(key, limit);
    if (!value) {
      throw std::runtime_error("replica group store " + where_ + ": key not set within " +
                               std::to_string(limit.count()) + " ms");
    }
    return *value;
  }
  int64_t add(const std::string& key, int64_t value) override { return client_.add(key, value); }
  bool deleteKey(const std::string& key) override { return client_.remove(key); }
  bool check(const std::vector<std::string>& keys) override { return client_.check(keys); }
  int64_t getNumKeys() override { return client_.size(); }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    if (!client_.wait(keys, blocking(timeout))) {
      throw std::runtime_error("replica group store " + where_ + ": " + std::to_string(keys.size()) +
                               " key(s) not set within " + std::to_string(blocking(timeout).count()) + " ms");
    }
  }

 private:
  // c10d's kNoTimeout (0) means "no limit", as TCPStore reads it: the longest the store
  // blocks a request (an hour).
  static std::chrono::milliseconds blocking(std::chrono::milliseconds t) { return t == kNoTimeout ? kMaxKvWait : t; }

  std::unique_ptr<KvServer> server_;  // replica 0's; outlives client_ (declared first)
  KvClient client_;
  std::string where_;
};

// The group's store. Replica 0 serves it and connects to it at once. Another replica
// retries until timeout_s (backing off from 50 ms to 1 s), each try with a read that
// changes nothing: replica 0 may not be up yet (a refused connection) or, through a
// tunnel, the local sidecar accepts at once and closes the connection again while
// replica 0's store is not up.
c10::intrusive_ptr<GroupStore> connect_store(const std::string& host, int port, bool serve, bool through_tunnel,
                                             double timeout_s, std::function<void()> on_refused) {
  const std::string where = host + ":" + std::to_string(port);
  if (serve) {
    return c10::make_intrusive<GroupStore>(std::make_unique<KvServer>(host, port, std::move(on_refused)), host, port,
                                           millis(timeout_s));
  }
  const auto deadline = Clock::now() + millis(timeout_s);
  auto pause = std::chrono::milliseconds(50);
  for (int attempt = 1;; ++attempt) {
    try {
      auto store = c10::make_intrusive<GroupStore>(nullptr, host, port, millis(timeout_s));
      store->check({"probe"});
      return store;
    } catch (const std::exception& e) {
      // Through a tunnel, a refusal by either sidecar (policy, no --tunnel-store, a wrong
      // certificate) looks the same from here as a store that is not up yet: its log
      // line says which.
      if (attempt == 1 || attempt % 10 == 0) {
        log::warn(through_tunnel ? "replica group store not reachable through the store tunnel yet"
                                 : "replica group store not reachable yet",
                  {{"store", where}, {"attempt", attempt}, {"error", e.what()}});
      }
      if (Clock::now() + pause >= deadline) {
        throw std::runtime_error(
            (through_tunnel ? "the store tunnel at " + where + " never reached replica 0's store in "
                            : "replica 0's store at " + where + " did not answer in ") +
            std::to_string(attempt) + " attempts (" + e.what() +
            (through_tunnel ? "; the sidecars' logs and shardguard_tunnel_refused_total say whether they refused it)"
                            : ")"));
      }
      std::this_thread::sleep_for(pause);  // backoff between connection attempts
      pause = std::min(pause * 2, std::chrono::milliseconds(1000));
    }
  }
}

// Every other replica has a tunnel, named after it, listening on its Gloo host.
void check_tunnels(int stage, int replica, int replicas, const std::map<int, ReplicaTunnel>& tunnels,
                   const std::string& map_file, const std::string& own_host) {
  if (map_file.empty()) throw std::invalid_argument("--replica-tunnel-map: required with --replica-tunnel");
  if (!own_host.empty() && own_host != gloo_tunnel_host(replica)) {
    throw std::invalid_argument("--replica-host \"" + own_host + "\": with --replica-tunnel replica " +
                                std::to_string(replica) + "'s Gloo binds " + gloo_tunnel_host(replica));
  }
  for (int r = 0; r < replicas; ++r) {
    if (r == replica) continue;
    const auto it = tunnels.find(r);
    if (it == tunnels.end()) {
      throw std::invalid_argument("--replica-tunnel: none for replica " + std::to_string(r) + " of stage " +
                                  std::to_string(stage) + " (every other replica needs one)");
    }
    auto [host, port] = split_host_port(it->second.address);
    if (host != gloo_tunnel_host(r) || port <= 0 || port > 65535) {
      throw std::invalid_argument("--replica-tunnel " + it->second.peer_id + "=" + it->second.address +
                                  ": replica " + std::to_string(r) + "'s tunnel must listen on " +
                                  gloo_tunnel_host(r) + ":<port>");
    }
  }
  for (const auto& [r, t] : tunnels) {
    if (r == replica || r < 0 || r >= replicas) {
      throw std::invalid_argument("--replica-tunnel " + t.peer_id + ": replica " + std::to_string(r) +
                                  " is not another replica of stage " + std::to_string(stage) + " (0.." +
                                  std::to_string(replicas - 1) + ", this is " + std::to_string(replica) + ")");
    }
  }
}

}  // namespace

ReplicaGroup::ReplicaGroup(int stage, int replica, int replicas, const std::string& store_address,
                           const std::string& own_host, const std::map<int, ReplicaTunnel>& tunnels,
                           const std::string& tunnel_map, const std::string& group_secret, double timeout_s,
                           std::function<void()> on_store_refused)
    : state_(std::make_unique<State>()), stage_(stage), replica_(replica), replicas_(replicas) {
  const std::string who = "stage " + std::to_string(stage) + " replica " + std::to_string(replica) + " of " +
                          std::to_string(replicas);
  if (replica < 0 || replica >= replicas) throw std::invalid_argument("--replica: " + who + " is out of range");
  auto [host, port] = split_host_port(store_address);
  if (port <= 0 || port > 65535) {
    throw std::invalid_argument("--replica-store: \"" + store_address + "\" is not host:port with a port in 1..65535");
  }
  const bool tunnelled = !tunnels.empty();
  if (tunnelled) check_tunnels(stage, replica, replicas, tunnels, tunnel_map, own_host);
  try {
    state_->store = connect_store(host, port, replica == 0, tunnelled && replica != 0, timeout_s,
                                  std::move(on_store_refused));
    auto options = c10d::ProcessGroupGloo::Options::create(millis(timeout_s));
    // Each replica's own address: replica 0's (the store's host) is not another pod's.
    const std::string gloo_host = tunnelled ? gloo_tunnel_host(replica) : own_host.empty() ? host : own_host;
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(gloo_host));
    options->threads = 1;
    // Every join counts itself: the k-th join (from 1) belongs to incarnation (k-1) / R,
    // whose keys live under their own prefix. A replica restarted while an old member
    // still serves the store therefore never reads the addresses of a group that is gone.
    // Every key lives under a prefix only the stage's replicas can name (from the
    // stage's checkpoint key): whatever else reaches the store's port (only loopback in
    // a pod) must not be able to count a join, read the group's addresses or overwrite
    // them (docs/pipeline.md#the-replica-tunnels).
    auto keys = c10::make_intrusive<c10d::PrefixStore>(group_prefix(group_secret), state_->store);
    const int64_t joins = keys->add("joins", 1);
    incarnation_ = (joins - 1) / replicas;
    const std::string prefix = "incarnation/" + std::to_string(incarnation_);
    if (tunnelled) {
      auto scoped = c10::make_intrusive<TunnelStore>(prefix, keys, replica, replicas, tunnels, tunnel_map);
      state_->group = c10::make_intrusive<c10d::ProcessGroupGloo>(scoped, replica, replicas, options);
      scoped->check_tunnelled();
    } else {
      auto scoped = c10::make_intrusive<c10d::PrefixStore>(prefix, keys);
      state_->group = c10::make_intrusive<c10d::ProcessGroupGloo>(scoped, replica, replicas, options);
    }
  } catch (const std::exception& e) {
    throw std::runtime_error(who + ": cannot join the replica group at " + store_address + ": " + e.what());
  }
}

ReplicaGroup::~ReplicaGroup() = default;

void ReplicaGroup::check_step(int64_t step) {
  auto t = torch::tensor({step, -step}, torch::kInt64);
  std::vector<torch::Tensor> v{t};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::MAX;
  const auto t0 = Clock::now();
  state_->group->allreduce(v, o)->wait();
  seconds_ += seconds_since(t0);
  const int64_t highest = t[0].item<int64_t>(), lowest = -t[1].item<int64_t>();
  if (highest != step || lowest != step) {
    throw std::runtime_error("replica group of stage " + std::to_string(stage_) + ": replica " +
                             std::to_string(replica_) + " is at step " + std::to_string(step) +
                             " but another replica is at step " + std::to_string(highest != step ? highest : lowest));
  }
}

void ReplicaGroup::average_gradients(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> grads;
  for (const auto& p : params) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  if (grads.empty()) return;
  std::vector<torch::Tensor> flat_parts;
  flat_parts.reserve(grads.size());
  for (const auto& g : grads) flat_parts.push_back(g.detach().to(torch::kCPU, torch::kFloat32).reshape({-1}));
  auto flat = torch::cat(flat_parts);
  std::vector<torch::Tensor> v{flat};
  const auto t0 = Clock::now();
  state_->group->allreduce(v)->wait();  // SUM
  seconds_ += seconds_since(t0);
  bytes_ += static_cast<uint64_t>(flat.numel()) * sizeof(float);
  flat.div_(static_cast<double>(replicas_));
  int64_t offset = 0;
  torch::NoGradGuard no_grad;
  for (auto& g : grads) {
    const int64_t n = g.numel();
    g.copy_(flat.narrow(0, offset, n).view(g.sizes()));
    offset += n;
  }
}

std::vector<double> ReplicaGroup::sum(const std::vector<double>& values) {
  auto t = torch::tensor(values, torch::kFloat64);
  std::vector<torch::Tensor> v{t};
  const auto t0 = Clock::now();
  state_->group->allreduce(v)->wait();
  seconds_ += seconds_since(t0);
  std::vector<double> out(values.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = t[static_cast<int64_t>(i)].item<double>();
  return out;
}

}  // namespace shardguard::shardd
