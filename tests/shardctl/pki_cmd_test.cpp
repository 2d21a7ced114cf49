// shardctl pki init|issue|verify, called as library functions on a temp directory.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>

#include <gtest/gtest.h>

#include "shardguard/common/files.h"
#include "shardguard/common/pki.h"
#include "shardguard/shardctl/commands.h"
#include "support/temp_dir.h"

namespace shardguard::shardctl {
namespace {

using testing::internal::CaptureStderr;
using testing::internal::CaptureStdout;
using testing::internal::GetCapturedStderr;
using testing::internal::GetCapturedStdout;

struct Captured {
  int rc;
  std::string out;
  std::string err;
};

template <typename F>
Captured capture(F&& f) {
  CaptureStdout();
  CaptureStderr();
  const int rc = f();
  Captured c{rc, "", ""};
  c.out = GetCapturedStdout();
  c.err = GetCapturedStderr();
  return c;
}

unsigned file_mode(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return 0xFFFFFFFFu;
  return st.st_mode & 07777;
}

class PkiCmdTest : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = root_ + "/pki";
  }

  PkiInitOptions init_options() const {
    PkiInitOptions o;
    o.dir = dir_;
    o.job = "fmnist";
    return o;
  }
  PkiIssueOptions issue_options(int64_t shard) const {
    PkiIssueOptions o;
    o.dir = dir_;
    o.job = "fmnist";
    o.shard = shard;
    return o;
  }

  const shardguard::testsupport::TempDir tmp_{"shardctl-pki"};
  const std::string root_ = tmp_.str();
  std::string dir_;
};

TEST_F(PkiCmdTest, InitThenIssueShardVerifies) {
  const Captured init = capture([&] { return RunPkiInit(init_options()); });
  ASSERT_EQ(init.rc, 0) << init.err;
  EXPECT_EQ(file_mode(dir_ + "/ca.crt"), 0644u);
  EXPECT_EQ(file_mode(dir_ + "/ca.key"), 0600u);

  const Captured issue = capture([&] { return RunPkiIssue(issue_options(2)); });
  ASSERT_EQ(issue.rc, 0) << issue.err;
  const std::string id = "spiffe://shardguard.local/ns/default/job/fmnist/shard/2";
  EXPECT_NE(issue.out.find(id), std::string::npos) << issue.out;
  EXPECT_NE(issue.out.find("not after"), std::string::npos) << issue.out;
  EXPECT_EQ(file_mode(dir_ + "/shard-2.key"), 0600u);
  EXPECT_EQ(file_mode(dir_ + "/shard-2.crt"), 0644u);

  const SvidCheck check = verify_svid(read_file(dir_ + "/shard-2.crt"), read_file(dir_ + "/ca.crt"),
                                      std::chrono::system_clock::now());
  EXPECT_TRUE(check.ok) << check.reason << ": " << check.message;
  EXPECT_EQ(check.spiffe_id, id);
  // Default leaf lifetime 24h.
  const auto left = not_after(read_file(dir_ + "/shard-2.crt")) - std::chrono::system_clock::now();
  EXPECT_GT(left, std::chrono::hours(23));
  EXPECT_LE(left, std::chrono::hours(24));

  PkiVerifyOptions v;
  v.ca_file = dir_ + "/ca.crt";
  v.cert_file = dir_ + "/shard-2.crt";
  const Captured verified = capture([&] { return RunPkiVerify(v); });
  EXPECT_EQ(verified.rc, 0) << verified.out << verified.err;
  EXPECT_EQ(verified.out.substr(0, id.size() + 1), id + "\n");
}

TEST_F(PkiCmdTest, IssueExporterToOutDir) {
  ASSERT_EQ(capture([&] { return RunPkiInit(init_options()); }).rc, 0);
  PkiIssueOptions o = issue_options(-1);
  o.exporter = true;
  o.ns = "ml";
  o.lifetime = "90m";
  o.out_dir = root_ + "/out";
  const Captured issue = capture([&] { return RunPkiIssue(o); });
  ASSERT_EQ(issue.rc, 0) << issue.err;
  EXPECT_EQ(file_mode(root_ + "/out/exporter.key"), 0600u);
  const SvidCheck check = verify_svid(read_file(root_ + "/out/exporter.crt"), read_file(dir_ + "/ca.crt"),
                                      std::chrono::system_clock::now());
  EXPECT_TRUE(check.ok) << check.message;
  EXPECT_EQ(check.spiffe_id, "spiffe://shardguard.local/ns/ml/job/fmnist/role/exporter");
  const auto left = not_after(read_file(root_ + "/out/exporter.crt")) - std::chrono::system_clock::now();
  EXPECT_LE(left, std::chrono::minutes(90));
  EXPECT_GT(left, std::chrono::minutes(85));
}

TEST_F(PkiCmdTest, InitTwiceWithoutForceFailsAndKeepsTheCa) {
  ASSERT_EQ(capture([&] { return RunPkiInit(init_options()); }).rc, 0);
  const std::string cert = read_file(dir_ + "/ca.crt");
  const std::string key = read_file(dir_ + "/ca.key");

  const Captured again = capture([&] { return RunPkiInit(init_options()); });
  EXPECT_EQ(again.rc, 1);
  EXPECT_NE(again.err.find(dir_ + "/ca.crt"), std::string::npos) << again.err;
  EXPECT_NE(again.err.find("--force"), std::string::npos) << again.err;
  EXPECT_EQ(read_file(dir_ + "/ca.crt"), cert);
  EXPECT_EQ(read_file(dir_ + "/ca.key"), key);

  // Only the key left: still refused, naming the key.
  std::filesystem::remove(dir_ + "/ca.crt");
  const Captured key_only = capture([&] { return RunPkiInit(init_options()); });
  EXPECT_EQ(key_only.rc, 1);
  EXPECT_NE(key_only.err.find(dir_ + "/ca.key"), std::string::npos) << key_only.err;
  EXPECT_EQ(read_file(dir_ + "/ca.key"), key);

  PkiInitOptions forced = init_options();
  forced.force = true;
  ASSERT_EQ(capture([&] { return RunPkiInit(forced); }).rc, 0);
  EXPECT_NE(read_file(dir_ + "/ca.key"), key);
  EXPECT_EQ(file_mode(dir_ + "/ca.key"), 0600u);
}

TEST_F(PkiCmdTest, IssueWithoutInitSaysToRunInit) {
  const Captured issue = capture([&] { return RunPkiIssue(issue_options(0)); });
  EXPECT_EQ(issue.rc, 1);
  EXPECT_NE(issue.err.find("shardctl pki init"), std::string::npos) << issue.err;
  EXPECT_NE(issue.err.find(dir_ + "/ca.crt"), std::string::npos) << issue.err;
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/shard-0.key"));
}

TEST_F(PkiCmdTest, BadDurationNamesFlagAndValue) {
  PkiInitOptions init = init_options();
  init.lifetime = "3 days";
  const Captured bad_init = capture([&] { return RunPkiInit(init); });
  EXPECT_EQ(bad_init.rc, 2);
  EXPECT_NE(bad_init.err.find("--lifetime"), std::string::npos) << bad_init.err;
  EXPECT_NE(bad_init.err.find("\"3 days\""), std::string::npos) << bad_init.err;
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/ca.key"));

  ASSERT_EQ(capture([&] { return RunPkiInit(init_options()); }).rc, 0);
  PkiIssueOptions issue = issue_options(1);
  issue.lifetime = "24";
  const Captured bad_issue = capture([&] { return RunPkiIssue(issue); });
  EXPECT_EQ(bad_issue.rc, 2);
  EXPECT_NE(bad_issue.err.find("--lifetime: \"24\""), std::string::npos) << bad_issue.err;
}

TEST(ParseDurationTest, UnitsAndErrors) {
  EXPECT_EQ(ParseDuration("--lifetime", "24h"), std::chrono::hours(24));
  EXPECT_EQ(ParseDuration("--lifetime", "90m"), std::chrono::minutes(90));
  EXPECT_EQ(ParseDuration("--lifetime", "3600s"), std::chrono::seconds(3600));
  EXPECT_EQ(ParseDuration("--lifetime", "1h30m"), std::chrono::minutes(90));
  for (const char* bad : {"", "24", "h", "-1h", "0h", "1d", "1.5h", " 1h", "1h ", "99999999999999999999h"}) {
    try {
      ParseDuration("--lifetime", bad);
      ADD_FAILURE() << "accepted \"" << bad << "\"";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("--lifetime: \"" + std::string(bad) + "\""), std::string::npos)
          << e.what();
    }
  }
}

TEST_F(PkiCmdTest, IssueNeedsExactlyOneOfShardAndExporter) {
  ASSERT_EQ(capture([&] { return RunPkiInit(init_options()); }).rc, 0);
  PkiIssueOptions neither = issue_options(-1);
  EXPECT_EQ(capture([&] { return RunPkiIssue(neither); }).rc, 2);
  PkiIssueOptions both = issue_options(1);
  both.exporter = true;
  EXPECT_EQ(capture([&] { return RunPkiIssue(both); }).rc, 2);
}

TEST_F(PkiCmdTest, VerifyRefusesLeafOfAnotherCa) {
  ASSERT_EQ(capture([&] { return RunPkiInit(init_options()); }).rc, 0);
  ASSERT_EQ(capture([&] { return RunPkiIssue(issue_options(0)); }).rc, 0);
  PkiInitOptions other = init_options();
  other.dir = root_ + "/other";
  ASSERT_EQ(capture([&] { return RunPkiInit(other); }).rc, 0);

  PkiVerifyOptions v;
  v.ca_file = root_ + "/other/ca.crt";
  v.cert_file = dir_ + "/shard-0.crt";
  const Captured refused = capture([&] { return RunPkiVerify(v); });
  EXPECT_EQ(refused.rc, 1);
  EXPECT_EQ(refused.out.rfind("refused: untrusted", 0), 0u) << refused.out;

  v.cert_file = dir_ + "/missing.crt";
  const Captured missing = capture([&] { return RunPkiVerify(v); });
  EXPECT_EQ(missing.rc, 2);
  EXPECT_NE(missing.err.find("missing.crt"), std::string::npos) << missing.err;
}

}  // namespace
}  // namespace shardguard::shardctl
