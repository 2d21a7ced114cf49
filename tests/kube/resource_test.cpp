#include "shardguard/kube/resource.h"

#include <gtest/gtest.h>

namespace shardguard::kube {
namespace {

TEST(ResourceTest, CorePaths) {
  EXPECT_EQ(kPods.api_version(), "v1");
  EXPECT_EQ(kPods.path("ns1"), "/api/v1/namespaces/ns1/pods");
  EXPECT_EQ(kPods.path(""), "/api/v1/pods");
  EXPECT_EQ(kPods.path("ns1", "p"), "/api/v1/namespaces/ns1/pods/p");
  EXPECT_EQ(kPods.path("ns1", "p", "status"), "/api/v1/namespaces/ns1/pods/p/status");
  EXPECT_EQ(kPods.path("ns1", "", "status"), "/api/v1/namespaces/ns1/pods");  // no name, no subresource
  EXPECT_EQ(kSecrets.path("a", "s"), "/api/v1/namespaces/a/secrets/s");
  EXPECT_EQ(kConfigMaps.path("a"), "/api/v1/namespaces/a/configmaps");
  EXPECT_EQ(kServices.path("a", "svc"), "/api/v1/namespaces/a/services/svc");
  EXPECT_EQ(kEvents.path("a"), "/api/v1/namespaces/a/events");
}

TEST(ResourceTest, ClusterScopedIgnoresNamespace) {
  EXPECT_FALSE(kNodes.namespaced);
  EXPECT_EQ(kNodes.path("ignored", "n1"), "/api/v1/nodes/n1");
  EXPECT_EQ(kNodes.path(""), "/api/v1/nodes");
}

TEST(ResourceTest, GroupPaths) {
  EXPECT_EQ(kLeases.api_version(), "coordination.k8s.io/v1");
  EXPECT_EQ(kLeases.path("kube-system", "op"), "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/op");
  EXPECT_EQ(kShardedTrainingJobs.api_version(), "shardguard.io/v1alpha1");
  EXPECT_EQ(kShardedTrainingJobs.kind, "ShardedTrainingJob");
  EXPECT_EQ(kShardedTrainingJobs.path("", ""), "/apis/shardguard.io/v1alpha1/shardedtrainingjobs");
  EXPECT_EQ(kShardedTrainingJobs.path("team", "j", "status"),
            "/apis/shardguard.io/v1alpha1/namespaces/team/shardedtrainingjobs/j/status");
}

}  // namespace
}  // namespace shardguard::kube
