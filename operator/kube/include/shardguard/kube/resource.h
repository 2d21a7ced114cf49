// A Kubernetes resource type (group, version, plural) and its REST paths.
#pragma once

#include <string>

namespace shardguard::kube {

struct Resource {
  std::string group;  // "" = core
  std::string version;
  std::string plural;
  std::string kind;
  bool namespaced = true;

  // "v1" for the core group, else "group/version".
  std::string api_version() const;
  // /api/v1/namespaces/NS/pods/NAME/SUB or /apis/G/V/...; ns "" (or a cluster-scoped
  // resource) leaves out the namespace part (for a collection: all namespaces).
  // subresource is used only with a name.
  std::string path(const std::string& ns, const std::string& name = "",
                   const std::string& subresource = "") const;
};

extern const Resource kPods, kSecrets, kConfigMaps, kServices, kEvents;  // core v1
extern const Resource kNodes;                                             // core v1, cluster-scoped
extern const Resource kLeases;                // coordination.k8s.io/v1
extern const Resource kShardedTrainingJobs;   // shardguard.io/v1alpha1

}  // namespace shardguard::kube
