#include "shardguard/kube/resource.h"

namespace shardguard::kube {

std::string Resource::api_version() const { return group.empty() ? version : group + "/" + version; }

std::string Resource::path(const std::string& ns, const std::string& name,
                           const std::string& subresource) const {
  std::string p = group.empty() ? "/api/" + version : "/apis/" + group + "/" + version;
  if (namespaced && !ns.empty()) p += "/namespaces/" + ns;
  p += "/" + plural;
  if (!name.empty()) {
    p += "/" + name;
    if (!subresource.empty()) p += "/" + subresource;
  }
  return p;
}

const Resource kPods{"", "v1", "pods", "Pod", true};
const Resource kSecrets{"", "v1", "secrets", "Secret", true};
const Resource kConfigMaps{"", "v1", "configmaps", "ConfigMap", true};
const Resource kServices{"", "v1", "services", "Service", true};
const Resource kEvents{"", "v1", "events", "Event", true};
const Resource kNodes{"", "v1", "nodes", "Node", false};
const Resource kLeases{"coordination.k8s.io", "v1", "leases", "Lease", true};
const Resource kShardedTrainingJobs{"shardguard.io", "v1alpha1", "shardedtrainingjobs",
                                    "ShardedTrainingJob", true};

}  // namespace shardguard::kube
