// How to reach and authenticate to a Kubernetes API server: from the pod's service
// account (in-cluster) or from a kubeconfig file. Parsed and validated once; a bad
// input throws ConfigError naming the file, the field and the value.
#pragma once

#include <stdexcept>
#include <string>

namespace shardguard::kube {

struct Config {
  std::string server;  // https://host:port (http:// accepted for tests)
  std::string ca_pem;  // PEM bundle to verify the server with; "" = system trust store
  bool insecure_skip_verify = false;
  std::string token;       // bearer token
  std::string token_file;  // when set, re-read periodically (in-cluster tokens rotate); wins over token
  std::string client_cert_pem, client_key_pem;  // client certificate authentication
  std::string ns = "default";  // the namespace of the context / service account
};

class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr const char* kServiceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount";

// The pod's service account: {sa_dir}/token (as token_file, also read now),
// {sa_dir}/ca.crt, {sa_dir}/namespace (optional), and KUBERNETES_SERVICE_HOST /
// KUBERNETES_SERVICE_PORT (an IPv6 host is bracketed in server).
Config in_cluster_config(const std::string& sa_dir = kServiceAccountDir);

// A kubeconfig file: `context` ("" = current-context) → cluster (server,
// certificate-authority(-data), insecure-skip-tls-verify) and user (token, tokenFile,
// client-certificate(-data), client-key(-data)); the context's namespace. Relative
// file paths resolve against the kubeconfig's directory. exec / auth-provider users
// are not supported (ConfigError).
Config kubeconfig_config(const std::string& path, const std::string& context = "");

// The flag if non-empty, else $KUBECONFIG (first entry), else in-cluster when
// KUBERNETES_SERVICE_HOST is set, else ~/.kube/config.
Config load_config(const std::string& kubeconfig_flag);

}  // namespace shardguard::kube
