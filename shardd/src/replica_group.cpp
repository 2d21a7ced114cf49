#include "replica_group.h"

#include <chrono>
#include <stdexcept>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "shardguard/common/metrics_server.h"
#include "clock.h"

namespace shardguard::shardd {

struct ReplicaGroup::State {
  c10::intrusive_ptr<c10d::TCPStore> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> group;
};

namespace {

std::chrono::milliseconds millis(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

}  // namespace

ReplicaGroup::ReplicaGroup(int stage, int replica, int replicas, const std::string& store_address,
                           const std::string& own_host, double timeout_s)
    : state_(std::make_unique<State>()), stage_(stage), replica_(replica), replicas_(replicas) {
  const std::string who = "stage " + std::to_string(stage) + " replica " + std::to_string(replica) + " of " +
                          std::to_string(replicas);
  if (replica < 0 || replica >= replicas) throw std::invalid_argument("--replica: " + who + " is out of range");
  auto [host, port] = split_host_port(store_address);
  if (port <= 0 || port > 65535) {
    throw std::invalid_argument("--replica-store: \"" + store_address + "\" is not host:port with a port in 1..65535");
  }
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(port);
    so.isServer = replica == 0;
    so.numWorkers = replicas;
    so.waitWorkers = false;
    so.timeout = millis(timeout_s);
    state_->store = c10::make_intrusive<c10d::TCPStore>(host, so);
    auto options = c10d::ProcessGroupGloo::Options::create(millis(timeout_s));
    // Each replica's own address: replica 0's (the store's host) is not another pod's.
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(own_host.empty() ? host : own_host));
    options->threads = 1;
    // Every join counts itself: the k-th join (from 1) belongs to incarnation (k-1) / R,
    // whose keys live under their own prefix. A replica restarted while an old member
    // still serves the store therefore never reads the addresses of a group that is gone.
    const int64_t joins = state_->store->add("joins", 1);
    incarnation_ = (joins - 1) / replicas;
    auto scoped = c10::make_intrusive<c10d::PrefixStore>("incarnation/" + std::to_string(incarnation_),
                                                         state_->store);
    state_->group = c10::make_intrusive<c10d::ProcessGroupGloo>(scoped, replica, replicas, options);
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
