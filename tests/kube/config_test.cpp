#include "shardguard/kube/config.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <openssl/evp.h>

#include "support/temp_dir.h"

namespace shardguard::kube {
namespace {

namespace fs = std::filesystem;

std::string b64(const std::string& s) {
  std::string out(4 * ((s.size() + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(s.data()), static_cast<int>(s.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

void write(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
}

// Sets an environment variable for the test's lifetime, then restores it.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    if (old) old_ = old;
    had_ = old != nullptr;
    if (value) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (had_) {
      setenv(name_.c_str(), old_.c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }

 private:
  std::string name_, old_;
  bool had_ = false;
};

class ConfigTest : public ::testing::Test {
 protected:

  std::string kubeconfig(const std::string& text, const std::string& rel = "kubeconfig") {
    const fs::path p = dir_ / rel;
    write(p, text);
    return p.string();
  }

  const testsupport::TempDir tmp_{"kube_config_test"};
  const fs::path dir_ = tmp_.path();
};

TEST_F(ConfigTest, TokenInlineCaAndContextNamespace) {
  const std::string path = kubeconfig(R"(apiVersion: v1
kind: Config
current-context: dev
clusters:
- name: c1
  cluster:
    server: https://10.1.2.3:6443
    certificate-authority-data: )" + b64("CA PEM\n") + R"(
contexts:
- name: dev
  context: {cluster: c1, user: u1, namespace: team-a}
users:
- name: u1
  user:
    token: abc.def
)");
  const Config c = kubeconfig_config(path);
  EXPECT_EQ(c.server, "https://10.1.2.3:6443");
  EXPECT_EQ(c.ca_pem, "CA PEM\n");
  EXPECT_EQ(c.token, "abc.def");
  EXPECT_TRUE(c.token_file.empty());
  EXPECT_EQ(c.ns, "team-a");
  EXPECT_FALSE(c.insecure_skip_verify);
  EXPECT_TRUE(c.client_cert_pem.empty());
}

TEST_F(ConfigTest, ClientCertificateInlineDataAndInsecure) {
  const std::string path = kubeconfig(R"(current-context: x
clusters:
- name: c
  cluster: {server: "https://k8s.example:443", insecure-skip-tls-verify: true}
contexts:
- name: x
  context: {cluster: c, user: u}
users:
- name: u
  user:
    client-certificate-data: )" + b64("CERT") + R"(
    client-key-data: )" + b64("KEY!") + R"(
)");
  const Config c = kubeconfig_config(path);
  EXPECT_TRUE(c.insecure_skip_verify);
  EXPECT_EQ(c.client_cert_pem, "CERT");
  EXPECT_EQ(c.client_key_pem, "KEY!");
  EXPECT_EQ(c.ns, "default");  // no namespace in the context
}

TEST_F(ConfigTest, FilesResolveRelativeToTheKubeconfigDirectory) {
  write(dir_ / "conf" / "pki" / "ca.crt", "CA FROM FILE");
  write(dir_ / "conf" / "pki" / "client.crt", "CERT FROM FILE");
  write(dir_ / "conf" / "pki" / "client.key", "KEY FROM FILE");
  write(dir_ / "conf" / "token", "tok-from-file\n");
  const std::string path = kubeconfig(R"(current-context: x
clusters:
- name: c
  cluster:
    server: https://h:6443
    certificate-authority: pki/ca.crt
contexts:
- name: x
  context: {cluster: c, user: u}
users:
- name: u
  user:
    tokenFile: token
    client-certificate: pki/client.crt
    client-key: )" + (dir_ / "conf" / "pki" / "client.key").string() + R"(
)", "conf/kubeconfig");
  const Config c = kubeconfig_config(path);
  EXPECT_EQ(c.ca_pem, "CA FROM FILE");
  EXPECT_EQ(c.client_cert_pem, "CERT FROM FILE");
  EXPECT_EQ(c.client_key_pem, "KEY FROM FILE");
  EXPECT_EQ(c.token, "tok-from-file");
  EXPECT_EQ(c.token_file, (dir_ / "conf" / "token").string());
}

constexpr const char* kTwoContexts = R"(current-context: a
clusters:
- {name: ca, cluster: {server: "https://a:1"}}
- {name: cb, cluster: {server: "https://[fd00::1]:6443"}}
contexts:
- {name: a, context: {cluster: ca, user: ua}}
- {name: b, context: {cluster: cb, user: ub, namespace: nb}}
users:
- {name: ua, user: {token: ta}}
- {name: ub, user: {token: tb}}
)";

TEST_F(ConfigTest, ExplicitContextWinsOverCurrentContext) {
  const std::string path = kubeconfig(kTwoContexts);
  EXPECT_EQ(kubeconfig_config(path).token, "ta");
  const Config b = kubeconfig_config(path, "b");
  EXPECT_EQ(b.server, "https://[fd00::1]:6443");
  EXPECT_EQ(b.token, "tb");
  EXPECT_EQ(b.ns, "nb");
}

void expect_config_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "no ConfigError";
  } catch (const ConfigError& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what() << " lacks " << n;
  }
}

TEST_F(ConfigTest, MissingContextNamesIt) {
  const std::string path = kubeconfig(kTwoContexts);
  expect_config_error([&] { kubeconfig_config(path, "nope"); }, {path, "\"nope\"", "contexts"});
}

TEST_F(ConfigTest, ErrorsNameFileFieldAndValue) {
  expect_config_error([&] { kubeconfig_config((dir_ / "absent").string()); }, {(dir_ / "absent").string()});
  const std::string no_current = kubeconfig("clusters: []\n", "a");
  expect_config_error([&] { kubeconfig_config(no_current); }, {no_current, "current-context"});
  const std::string missing_cluster = kubeconfig(R"(current-context: x
contexts: [{name: x, context: {cluster: gone, user: u}}]
users: [{name: u, user: {token: t}}]
)", "b");
  expect_config_error([&] { kubeconfig_config(missing_cluster); }, {"\"gone\"", "clusters"});
  const std::string bad_b64 = kubeconfig(R"(current-context: x
clusters: [{name: c, cluster: {server: "https://h", certificate-authority-data: "!!notbase64"}}]
contexts: [{name: x, context: {cluster: c}}]
)", "c");
  expect_config_error([&] { kubeconfig_config(bad_b64); }, {"clusters[c].cluster.certificate-authority-data"});
  const std::string missing_file = kubeconfig(R"(current-context: x
clusters: [{name: c, cluster: {server: "https://h", certificate-authority: missing.crt}}]
contexts: [{name: x, context: {cluster: c}}]
)", "d");
  expect_config_error([&] { kubeconfig_config(missing_file); }, {(dir_ / "missing.crt").string()});
  const std::string bad_server = kubeconfig(R"(current-context: x
clusters: [{name: c, cluster: {server: "ftp://h"}}]
contexts: [{name: x, context: {cluster: c}}]
)", "e");
  expect_config_error([&] { kubeconfig_config(bad_server); }, {"server", "ftp://h"});
  const std::string exec_user = kubeconfig(R"(current-context: x
clusters: [{name: c, cluster: {server: "https://h"}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
users: [{name: u, user: {exec: {command: aws}}}]
)", "f");
  expect_config_error([&] { kubeconfig_config(exec_user); }, {"users[u]", "exec"});
  const std::string not_yaml = kubeconfig("a: [unclosed\n", "g");
  expect_config_error([&] { kubeconfig_config(not_yaml); }, {not_yaml});
}

TEST_F(ConfigTest, InClusterFromServiceAccountDir) {
  write(dir_ / "sa" / "token", "sa-token\n");
  write(dir_ / "sa" / "ca.crt", "SA CA");
  write(dir_ / "sa" / "namespace", "prod\n");
  ScopedEnv host("KUBERNETES_SERVICE_HOST", "10.96.0.1");
  ScopedEnv port("KUBERNETES_SERVICE_PORT", "443");
  const Config c = in_cluster_config((dir_ / "sa").string());
  EXPECT_EQ(c.server, "https://10.96.0.1:443");
  EXPECT_EQ(c.token, "sa-token");
  EXPECT_EQ(c.token_file, (dir_ / "sa" / "token").string());
  EXPECT_EQ(c.ca_pem, "SA CA");
  EXPECT_EQ(c.ns, "prod");
}

TEST_F(ConfigTest, InClusterBracketsIpv6AndDefaultsNamespace) {
  write(dir_ / "sa" / "token", "t");
  write(dir_ / "sa" / "ca.crt", "CA");
  ScopedEnv host("KUBERNETES_SERVICE_HOST", "fd00:10:96::1");
  ScopedEnv port("KUBERNETES_SERVICE_PORT", "6443");
  const Config c = in_cluster_config((dir_ / "sa").string());
  EXPECT_EQ(c.server, "https://[fd00:10:96::1]:6443");
  EXPECT_EQ(c.ns, "default");
}

TEST_F(ConfigTest, InClusterErrors) {
  {
    ScopedEnv host("KUBERNETES_SERVICE_HOST", nullptr);
    ScopedEnv port("KUBERNETES_SERVICE_PORT", nullptr);
    expect_config_error([&] { in_cluster_config((dir_ / "sa").string()); }, {"KUBERNETES_SERVICE_HOST"});
  }
  ScopedEnv host("KUBERNETES_SERVICE_HOST", "10.0.0.1");
  ScopedEnv port("KUBERNETES_SERVICE_PORT", "443");
  expect_config_error([&] { in_cluster_config((dir_ / "sa").string()); }, {(dir_ / "sa" / "token").string()});
}

TEST_F(ConfigTest, LoadConfigPrefersFlagThenKubeconfigEnv) {
  const std::string a = kubeconfig(kTwoContexts, "a.yaml");
  std::string b_text = kTwoContexts;
  b_text.replace(b_text.find("current-context: a"), 18, "current-context: b");
  const std::string b = kubeconfig(b_text, "b.yaml");
  ScopedEnv env("KUBECONFIG", (b + ":" + a).c_str());
  EXPECT_EQ(load_config(a).token, "ta");  // the flag
  EXPECT_EQ(load_config("").token, "tb");  // first entry of KUBECONFIG
}

TEST_F(ConfigTest, LoadConfigFallsBackToHomeKubeConfig) {
  kubeconfig(kTwoContexts, "home/.kube/config");
  ScopedEnv env("KUBECONFIG", nullptr);
  ScopedEnv host("KUBERNETES_SERVICE_HOST", nullptr);
  ScopedEnv home("HOME", (dir_ / "home").c_str());
  EXPECT_EQ(load_config("").token, "ta");
}

}  // namespace
}  // namespace shardguard::kube
