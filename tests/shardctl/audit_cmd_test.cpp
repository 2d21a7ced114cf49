#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "shardguard/common/files.h"
#include "shardguard/shardctl/commands.h"
#include "shardguard/sidecar/audit.h"
#include "support/temp_dir.h"

namespace shardguard::shardctl {
namespace {

class AuditCmdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_ + "/audit.log";
    sidecar::AuditLog log(path_);
    for (int i = 0; i < 3; ++i) {
      sidecar::AuditEvent e;
      e.peer = "spiffe://shardguard.local/ns/default/job/j/shard/" + std::to_string(i);
      e.method = "/shardguard.v1.Pipeline/Forward";
      e.rule = "default-deny";
      e.decision = "deny";
      ASSERT_TRUE(log.append(e));
    }
  }
  const shardguard::testsupport::TempDir tmp_{"shardguard-audit"};
  const std::string dir_ = tmp_.str();
  std::string path_;
};

TEST_F(AuditCmdTest, IntactLogPasses) {
  ::testing::internal::CaptureStdout();
  EXPECT_EQ(RunAuditVerify(path_), 0);
  EXPECT_NE(::testing::internal::GetCapturedStdout().find("intact, 3 lines"), std::string::npos);
}

TEST_F(AuditCmdTest, EditedLineIsReportedWithItsNumber) {
  std::string text = read_file(path_);
  const auto pos = text.find("shard/1");
  ASSERT_NE(pos, std::string::npos);
  text[pos + 6] = '2';  // the second line now claims another peer
  write_file_atomic(path_, text);
  ::testing::internal::CaptureStdout();
  EXPECT_EQ(RunAuditVerify(path_), 1);
  EXPECT_NE(::testing::internal::GetCapturedStdout().find("BROKEN at line 2"), std::string::npos);
}

TEST_F(AuditCmdTest, MissingFileIsAnError) {
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(RunAuditVerify(dir_ + "/nope.log"), 2);
  EXPECT_NE(::testing::internal::GetCapturedStderr().find("nope.log"), std::string::npos);
}

}  // namespace
}  // namespace shardguard::shardctl
