// The real kubectl against the test-apiserver process: it installs the CRD and the
// example job with default flags, and `kubectl get stj` shows the printer columns.
// kubectl is looked up as tools/bin/kubectl (what `make deps` installs), then on PATH;
// without it the test is skipped and says why.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "shardguard/common/process.h"
#include "support/realapi.h"
#include "support/temp_dir.h"

namespace {

using shardguard::testsupport::find_kubectl;
std::string read_file(const std::string& path) { return shardguard::testsupport::read_text(path); }

struct KubectlRun {
  int code = -1;
  std::string output;
};

class KubectlCheck : public ::testing::Test {
 protected:
  void SetUp() override {
    kubectl_ = find_kubectl();
    if (kubectl_.empty())
      GTEST_SKIP() << "kubectl not found (looked for " << SHARDGUARD_SOURCE_DIR
                   << "/tools/bin/kubectl and on PATH); `make deps` installs it";
    tmp_ = std::make_unique<shardguard::testsupport::TempDir>("kubectl-check");
    dir_ = tmp_->str();
    kubeconfig_ = dir_ + "/kubeconfig";
    shardguard::SpawnOptions so;
    so.argv = {std::string(SHARDGUARD_BIN_DIR) + "/test-apiserver", "--kubeconfig", kubeconfig_,
               "--ready-file", dir_ + "/ready"};
    so.log_file = dir_ + "/apiserver.log";
    server_ = std::make_unique<shardguard::Process>(so);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (::access((dir_ + "/ready").c_str(), R_OK) != 0 && std::chrono::steady_clock::now() < deadline &&
           server_->running())
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ASSERT_EQ(::access((dir_ + "/ready").c_str(), R_OK), 0)
        << "test-apiserver did not become ready: " << read_file(dir_ + "/apiserver.log");
  }

  void TearDown() override {
    if (server_) {
      auto st = server_->terminate(std::chrono::seconds(10));
      EXPECT_TRUE(st.exited && st.code == 0) << "test-apiserver: " << st.str();
    }
  }

  KubectlRun kubectl(std::vector<std::string> args) {
    shardguard::SpawnOptions so;
    so.argv = {kubectl_, "--kubeconfig", kubeconfig_, "--cache-dir", dir_ + "/cache"};
    so.argv.insert(so.argv.end(), args.begin(), args.end());
    so.env = {{"HOME", dir_}, {"KUBECONFIG", kubeconfig_}};
    std::string out = dir_ + "/kubectl-" + std::to_string(++runs_) + ".out";
    so.log_file = out;
    shardguard::Process p(so);
    KubectlRun r;
    auto st = p.wait_for(std::chrono::seconds(60));
    if (!st) st = p.terminate(std::chrono::seconds(5));
    r.code = st->exited ? st->code : 128 + st->code;
    r.output = read_file(out);
    return r;
  }

  std::unique_ptr<shardguard::testsupport::TempDir> tmp_;  // outlives server_ (declared after)
  std::string kubectl_, dir_, kubeconfig_;
  std::unique_ptr<shardguard::Process> server_;
  int runs_ = 0;
};

TEST_F(KubectlCheck, InstallsTheCrdAndAJobAndShowsPrinterColumns) {
  const std::string src = SHARDGUARD_SOURCE_DIR;
  KubectlRun crd = kubectl({"apply", "-f", src + "/crds/shardedtrainingjobs.shardguard.io.yaml"});
  ASSERT_EQ(crd.code, 0) << crd.output;
  EXPECT_NE(crd.output.find("shardedtrainingjobs.shardguard.io created"), std::string::npos) << crd.output;
  KubectlRun wait = kubectl({"wait", "--for", "condition=Established", "--timeout=30s",
                      "crd/shardedtrainingjobs.shardguard.io"});
  ASSERT_EQ(wait.code, 0) << wait.output;

  KubectlRun job = kubectl({"apply", "-f", src + "/examples/fashion-mnist-cnn.yaml"});
  ASSERT_EQ(job.code, 0) << job.output;
  EXPECT_NE(job.output.find("fmnist-cnn created"), std::string::npos) << job.output;
  KubectlRun again = kubectl({"apply", "-f", src + "/examples/fashion-mnist-cnn.yaml"});
  ASSERT_EQ(again.code, 0) << again.output;
  EXPECT_NE(again.output.find("unchanged"), std::string::npos) << again.output;

  KubectlRun get = kubectl({"get", "stj"});
  ASSERT_EQ(get.code, 0) << get.output;
  std::istringstream lines(get.output);
  std::string header, row;
  std::getline(lines, header);
  std::getline(lines, row);
  std::istringstream hs(header);
  std::vector<std::string> cols;
  for (std::string c; hs >> c;) cols.push_back(c);
  EXPECT_EQ(cols, (std::vector<std::string>{"NAME", "PHASE", "SHARDS", "STEP", "ACCURACY", "EVAL-LOSS", "EXPOSURE", "AGE"}))
      << get.output;
  std::istringstream rs(row);
  std::vector<std::string> cells;
  for (std::string c; rs >> c;) cells.push_back(c);
  ASSERT_GE(cells.size(), 3u) << get.output;
  EXPECT_EQ(cells[0], "fmnist-cnn");
  EXPECT_EQ(cells[1], "4");  // no status yet: PHASE is empty, SHARDS follows the name

  KubectlRun wide = kubectl({"get", "stj", "-o", "wide"});
  ASSERT_EQ(wide.code, 0) << wide.output;
  EXPECT_NE(wide.output.find("EXPOSURE"), std::string::npos) << wide.output;
  EXPECT_NE(wide.output.find("fmnist-cnn"), std::string::npos) << wide.output;

  // The full name, and the defaults the CRD schema applies.
  KubectlRun full = kubectl({"get", "shardedtrainingjobs.shardguard.io", "fmnist-cnn", "-o",
                      "jsonpath={.spec.model.depth} {.spec.sharding.shards} {.metadata.generation}"});
  ASSERT_EQ(full.code, 0) << full.output;
  EXPECT_EQ(full.output, "3 4 1");

  KubectlRun del = kubectl({"delete", "stj", "fmnist-cnn"});
  ASSERT_EQ(del.code, 0) << del.output;
  KubectlRun none = kubectl({"get", "stj"});
  ASSERT_EQ(none.code, 0) << none.output;
  EXPECT_NE(none.output.find("No resources found"), std::string::npos) << none.output;
}

}  // namespace
