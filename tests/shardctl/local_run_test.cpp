// `shardctl run`'s guards before anything starts, called as library functions: one
// run per workdir (issue 16 item 10) and no new key for a shard whose checkpoints or
// ledger need the old one (item 9). The runs themselves are process-level tests in
// tests/integration/.
#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "shardguard/common/files.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/shard_files.h"
#include "shardguard/shardctl/job_pki.h"
#include "shardguard/shardctl/local_run.h"
#include "support/temp_dir.h"

namespace shardguard::shardctl {
namespace {

namespace fs = std::filesystem;

const std::string kJobFile = std::string(SHARDGUARD_SOURCE_DIR) + "/examples/fashion-mnist-mlp.yaml";

class LocalRunGuards : public ::testing::Test {
 protected:
  void SetUp() override { job_ = load_job_file(kJobFile); }

  LocalRunOptions options() const {
    LocalRunOptions o;
    o.job_file = kJobFile;
    o.workdir = (dir_ / "work").string();
    o.shardd = "/bin/true";  // never started: every case here ends before any process
    o.sidecar = "/bin/true";
    return o;
  }
  // A checkpoint file of shard `stage`, as shardd names it.
  void plant_checkpoint(int stage, int step) {
    fs::create_directories(dir_ / "work" / "checkpoints");
    char num[16];
    std::snprintf(num, sizeof num, "%012d", step);
    std::ofstream(dir_ / "work" / "checkpoints" / (checkpoint_file_prefix(job_.name, stage) + num + kCheckpointSuffix))
        << "sealed";
  }

  const testsupport::TempDir tmp_{"shardguard-local-run"};
  const fs::path dir_ = tmp_.path();
  JobSpec job_;
};

// A second run on a workdir in use exits 2 naming the holder, before it reads or
// changes anything there (not even with --fresh).
TEST_F(LocalRunGuards, SecondRunOnALockedWorkdirIsRefused) {
  plant_checkpoint(0, 4);
  fs::create_directories(dir_ / "work");
  FileLock held((dir_ / "work" / "run.lock").string());
  LocalRunOptions o = options();
  o.fresh = true;
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(RunLocal(o), 2);
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("in use by another shardctl run (pid " + std::to_string(::getpid()) + ","), std::string::npos)
      << err;
  EXPECT_EQ(fs::directory_iterator(dir_ / "work" / "checkpoints")->path().filename().string(),
            checkpoint_file_prefix(job_.name, 0) + "000000000004" + kCheckpointSuffix)
      << "--fresh of the refused run deleted the live run's checkpoints";
  EXPECT_FALSE(fs::exists(dir_ / "work" / "pki")) << "the refused run wrote a CA";
}

// A missing checkpoint key with that shard's checkpoints present stops the run,
// naming the shard, the key file and how to recover; no key is made.
TEST_F(LocalRunGuards, MissingKeyWithCheckpointsStopsTheResume) {
  plant_checkpoint(1, 4);
  plant_checkpoint(1, 6);
  LocalRunOptions o = options();
  o.resume = true;
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(RunLocal(o), 2);
  const std::string err = ::testing::internal::GetCapturedStderr();
  const std::string key = o.workdir + "/keys/shard-1.key";
  EXPECT_NE(err.find("shard 1: its checkpoint key " + key + " is missing"), std::string::npos) << err;
  EXPECT_NE(err.find(checkpoint_file_prefix(job_.name, 1) + "000000000004"), std::string::npos) << err;
  EXPECT_NE(err.find("Restore " + key + " from a backup, or start over with --fresh"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(key)) << "a key was made that can never read the checkpoints";
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_ / "work" / "checkpoints"), fs::directory_iterator()), 2)
      << "checkpoints were touched";
}

// The same for the sealed ledger and its key; and with nothing to protect (no
// checkpoints, or --fresh) missing keys are simply made.
TEST_F(LocalRunGuards, KeysAreMadeOnlyWhenNothingNeedsTheOldOnes) {
  const std::string work = (dir_ / "work").string();
  const std::string ckpt = work + "/checkpoints";
  fs::create_directories(ckpt);
  // The ledger in its sidecar's state directory (its place since issue 16 item 2)...
  const std::string state = local_sidecar_state_dir(work, 2);
  EXPECT_EQ(state, work + "/logs/sidecar-state-2");
  fs::create_directories(state);
  std::ofstream(state + "/" + ledger_file_name(job_.name, 2)) << "{}";
  try {
    load_or_create_local_pki(job_, work, true, ckpt);
    FAIL() << "made a ledger key beside a sealed ledger";
  } catch (const LocalPkiError& e) {
    EXPECT_NE(std::string(e.what()).find("shard 2: its ledger key"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("but " + state + " holds"), std::string::npos) << e.what();
  }
  // ...and where runs before it kept the ledger, beside the checkpoints.
  fs::remove_all(state);
  std::ofstream(ckpt + "/" + ledger_file_name(job_.name, 1)) << "{}";
  try {
    load_or_create_local_pki(job_, work, true, ckpt);
    FAIL() << "made a ledger key beside a sealed ledger";
  } catch (const LocalPkiError& e) {
    EXPECT_NE(std::string(e.what()).find("shard 1: its ledger key"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("but " + ckpt + " holds"), std::string::npos) << e.what();
  }
  const LocalPki fresh = load_or_create_local_pki(job_, (dir_ / "work").string(), true, "");
  ASSERT_EQ(fresh.shards.size(), static_cast<size_t>(job_.sharding.shards));
  EXPECT_EQ(fresh.shards[2].ledger_key.size(), 32u);
}

// `shardctl generate` prints byte tokens that form valid UTF-8 as they are, and
// escapes what a terminal would misread: stray bytes, control characters, ids >= 256.
TEST(PrintableText, KeepsValidUtf8AndEscapesEverythingElse) {
  auto tokens = [](const std::string& bytes) {
    std::vector<uint16_t> out;
    for (const unsigned char c : bytes) out.push_back(c);
    return out;
  };
  EXPECT_EQ(printable_text(tokens("caf\xc3\xa9 \xe2\x82\xac\n\tok")), "caf\xc3\xa9 \xe2\x82\xac\n\tok");
  EXPECT_EQ(printable_text(tokens("a\xc3")), "a\\xc3");            // cut short
  EXPECT_EQ(printable_text(tokens("\xc0\xafz")), "\\xc0\\xafz");  // overlong
  EXPECT_EQ(printable_text(tokens("\xed\xa0\x80")), "\\xed\\xa0\\x80");  // a surrogate
  EXPECT_EQ(printable_text(tokens("\x1b[2J\x7f")), "\\x1b[2J\\x7f");  // a terminal escape, DEL
  EXPECT_EQ(printable_text({104, 300, 105}), "h<300>i");
}

}  // namespace
}  // namespace shardguard::shardctl
