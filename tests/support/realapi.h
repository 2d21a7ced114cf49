// The real Kubernetes API server of the ctest fixture `realapi` (tests/realapi):
// Kubernetes' own apiextensions-apiserver + etcd, serving CRDs and custom resources
// exactly as a cluster does (no core kinds). Tests that use it set
// FIXTURES_REQUIRED realapi; the fixture writes RUN_DIR/kubeconfig and RUN_DIR/ports.
// Also: running a command (kubectl) with its output captured.
#pragma once

#include <gtest/gtest.h>
#include "shardguard/common/httplib.h"
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "shardguard/common/process.h"

#include "support/temp_dir.h"

namespace shardguard::testsupport {

inline std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// tools/bin/kubectl (what `make deps` installs), then PATH; "" when neither has it.
inline std::string find_kubectl() {
  const std::string local = std::string(SHARDGUARD_SOURCE_DIR) + "/tools/bin/kubectl";
  if (::access(local.c_str(), X_OK) == 0) return local;
  return find_in_path("kubectl");
}

struct CommandResult {
  int code = -1;       // exit code; -1 when killed or timed out
  std::string output;  // stdout and stderr together
};

// Runs argv (no shell) to completion, at most `timeout`, capturing its output.
inline CommandResult run_command(const std::vector<std::string>& argv,
                                 std::chrono::milliseconds timeout = std::chrono::seconds(60),
                                 const std::map<std::string, std::string>& env = {}) {
  char templ[] = "/tmp/shardguard-cmd-XXXXXX";
  const int fd = ::mkstemp(templ);
  if (fd < 0) return {};
  ::close(fd);
  CommandResult out;
  {
    SpawnOptions so;
    so.argv = argv;
    so.env = env;
    so.log_file = templ;
    Process p(so);
    if (auto st = p.wait_for(timeout)) {
      out.code = st->exited ? st->code : -1;
    } else {
      p.terminate(std::chrono::seconds(2));
      out.output = "[timed out after " + std::to_string(timeout.count()) + " ms]\n";
    }
  }
  out.output += read_text(templ);
  std::remove(templ);
  return out;
}

// The running fixture server: where it listens and the client credentials.
struct RealApi {
  std::string run_dir;
  std::string kubeconfig;
  std::string ca_file, cert_file, key_file;
  int port = 0;

  std::string url() const { return "https://127.0.0.1:" + std::to_string(port); }

  // The fixture's run dir: $SHARDGUARD_REALAPI_RUN, else the build's default.
  static std::string run_dir_default() {
    if (const char* env = std::getenv("SHARDGUARD_REALAPI_RUN"); env && *env) return env;
#ifdef SHARDGUARD_REALAPI_RUN
    return SHARDGUARD_REALAPI_RUN;
#else
    return "";
#endif
  }

  // nullopt, with the reason in *why, when no fixture server is up.
  static std::optional<RealApi> find(std::string* why) {
    RealApi api;
    api.run_dir = run_dir_default();
    if (api.run_dir.empty()) {
      *why = "no real API server run dir (SHARDGUARD_REALAPI_RUN unset)";
      return std::nullopt;
    }
    const std::string ports = read_text(api.run_dir + "/ports");
    const auto at = ports.find("API_PORT=");
    if (at == std::string::npos) {
      *why = "no real API server running: " + api.run_dir +
             "/ports is missing (run the test through ctest, which starts the fixture "
             "realapi.start, or tests/realapi/realapi_fixture.sh start " + api.run_dir + ")";
      return std::nullopt;
    }
    api.port = std::atoi(ports.c_str() + at + 9);
    api.kubeconfig = api.run_dir + "/kubeconfig";
    api.ca_file = api.run_dir + "/pki/ca.crt";
    api.cert_file = api.run_dir + "/pki/admin.crt";
    api.key_file = api.run_dir + "/pki/admin.key";
    return api;
  }

  // An HTTPS client with the admin client certificate (group system:masters).
  std::unique_ptr<httplib::SSLClient> client() const {
    auto cli = std::make_unique<httplib::SSLClient>("127.0.0.1", port, cert_file, key_file);
    cli->set_ca_cert_path(ca_file.c_str());
    cli->enable_server_certificate_verification(true);
    cli->set_connection_timeout(std::chrono::seconds(5));
    cli->set_read_timeout(std::chrono::seconds(30));
    return cli;
  }

  // kubectl --kubeconfig <this server> args...
  CommandResult kubectl(const std::vector<std::string>& args,
                        std::chrono::milliseconds timeout = std::chrono::seconds(60)) const {
    // Its own discovery cache: the default one (~/.kube/cache) is keyed by host:port
    // only, so a server of another run or worktree that had the same port (without
    // the CRD) would make kubectl say the server has no resource type "stj". The
    // fixture makes RUN_DIR afresh at each start, so this cache starts empty too.
    std::vector<std::string> argv = {find_kubectl(), "--kubeconfig", kubeconfig, "--cache-dir",
                                     run_dir + "/kubectl-cache"};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv, timeout);
  }

  // Applies crds/ and waits until the CRD is Established; "" on success, else why not.
  std::string install_crd() const {
    const std::string crd = std::string(SHARDGUARD_SOURCE_DIR) + "/crds/";
    CommandResult r = kubectl({"apply", "-f", crd});
    // Tests set up in parallel (ctest -j) on a fresh server may both find no CRD and
    // both create it; the loser's second apply finds it and patches it.
    if (r.code != 0 && r.output.find("AlreadyExists") != std::string::npos) r = kubectl({"apply", "-f", crd});
    if (r.code != 0) return "kubectl apply -f crds/ failed: " + r.output;
    r = kubectl({"wait", "--for=condition=Established", "--timeout=60s",
                 "crd/shardedtrainingjobs.shardguard.io"},
                std::chrono::seconds(70));
    if (r.code != 0) return "CRD not Established: " + r.output;
    // Established does not mean discovery lists it yet: the API server publishes a new
    // resource asynchronously, and a kubectl that asks too early says the server has
    // no resource type "stj". Each try is a kubectl round trip; bounded by a deadline.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    for (;;) {
      r = kubectl({"get", "stj", "-A", "--request-timeout=10s"}, std::chrono::seconds(20));
      if (r.code == 0) return "";
      if (std::chrono::steady_clock::now() > deadline) return "CRD never listed by discovery: " + r.output;
    }
  }
};

// A test on the fixture's server: SetUp finds it (failing with the reason when it is
// not running), installs crds/ and makes an empty directory; TearDown removes the
// directory unless the test failed (its files then help to see why).
class RealApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    auto api = RealApi::find(&why);
    ASSERT_TRUE(api) << why;
    api_ = *api;
    ASSERT_FALSE(find_kubectl().empty()) << "kubectl not found; `make deps` installs tools/bin/kubectl";
    const std::string err = api_.install_crd();
    ASSERT_EQ(err, "") << err;
    tmp_ = std::make_unique<TempDir>("shardguard-realapi-test");
    dir_ = tmp_->str();
  }
  void TearDown() override {
    if (tmp_ && HasFailure()) tmp_->keep();  // left for a look at what failed
  }
  // Writes `text` to DIR/name and returns the path.
  std::string write(const std::string& name, const std::string& text) const {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path) << text;
    return path;
  }

  RealApi api_;
  std::unique_ptr<TempDir> tmp_;
  std::string dir_;
};

}  // namespace shardguard::testsupport
