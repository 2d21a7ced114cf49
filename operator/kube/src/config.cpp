#include "shardguard/kube/config.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include <openssl/evp.h>
#include <yaml-cpp/yaml.h>

#include "shardguard/common/crypto.h"
#include "shardguard/common/strings.h"

namespace shardguard::kube {
namespace {

bool read_file(const std::string& path, std::string& out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return false;
  out = ss.str();
  return true;
}

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

// Standard base64 with whitespace ignored (kubeconfig *-data fields may be wrapped).
bool base64_decode(const std::string& in, std::string& out) {
  std::string s;
  s.reserve(in.size());
  for (char c : in) {
    if (c != ' ' && c != '\n' && c != '\r' && c != '\t') s.push_back(c);
  }
  return shardguard::base64_decode(s, out);
}

std::string dir_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

class KubeconfigReader {
 public:
  KubeconfigReader(std::string path) : path_(std::move(path)), dir_(dir_of(path_)) {}

  [[noreturn]] void fail(const std::string& field, const std::string& msg) const {
    throw ConfigError("kubeconfig " + path_ + ": " + field + ": " + msg);
  }

  std::string resolve(const std::string& p) const { return (!p.empty() && p[0] == '/') ? p : dir_ + "/" + p; }

  std::string scalar(const YAML::Node& node, const std::string& key, const std::string& field) const {
    const YAML::Node v = node[key];
    if (!v) return "";
    if (!v.IsScalar()) fail(field + "." + key, "must be a string");
    return v.as<std::string>();
  }

  // Reads `key-data` (base64) or `key` (a file path) of `node`; "" when neither.
  std::string data_or_file(const YAML::Node& node, const std::string& key, const std::string& field) const {
    const std::string data = scalar(node, key + "-data", field);
    if (!data.empty()) {
      std::string out;
      if (!base64_decode(data, out)) fail(field + "." + key + "-data", "not valid base64");
      return out;
    }
    const std::string file = scalar(node, key, field);
    if (file.empty()) return "";
    std::string out;
    const std::string full = resolve(file);
    if (!read_file(full, out)) fail(field + "." + key, "cannot read \"" + full + "\"");
    return out;
  }

  // The `inner` map of the entry named `name` in the list `list_key`.
  YAML::Node named(const YAML::Node& root, const std::string& list_key, const std::string& inner,
                   const std::string& name, const std::string& referrer) const {
    const YAML::Node list = root[list_key];
    if (list && !list.IsSequence()) fail(list_key, "must be a list");
    if (list) {
      for (const auto& entry : list) {
        if (entry.IsMap() && entry["name"] && entry["name"].IsScalar() &&
            entry["name"].as<std::string>() == name) {
          const YAML::Node n = entry[inner];
          if (!n) return YAML::Node(YAML::NodeType::Map);
          if (!n.IsMap()) fail(list_key + "[" + name + "]." + inner, "must be a map");
          return n;
        }
      }
    }
    fail(referrer, "\"" + name + "\" not found in " + list_key);
  }

  Config read(const std::string& context_flag) const {
    YAML::Node root;
    try {
      root = YAML::LoadFile(path_);
    } catch (const YAML::BadFile&) {
      throw ConfigError("kubeconfig " + path_ + ": cannot read the file");
    } catch (const YAML::Exception& e) {
      throw ConfigError("kubeconfig " + path_ + ": not valid YAML: " + e.what());
    }
    if (!root.IsMap()) throw ConfigError("kubeconfig " + path_ + ": not a YAML map");

    std::string ctx_name = context_flag;
    std::string ctx_field = "context";
    if (ctx_name.empty()) {
      ctx_name = scalar(root, "current-context", "kubeconfig");
      ctx_field = "current-context";
      if (ctx_name.empty()) fail("current-context", "not set and no context given");
    }
    const YAML::Node ctx = named(root, "contexts", "context", ctx_name, ctx_field);
    const std::string ctx_path = "contexts[" + ctx_name + "].context";
    const std::string cluster_name = scalar(ctx, "cluster", ctx_path);
    if (cluster_name.empty()) fail(ctx_path + ".cluster", "missing");
    const std::string user_name = scalar(ctx, "user", ctx_path);

    Config cfg;
    const std::string ns = scalar(ctx, "namespace", ctx_path);
    if (!ns.empty()) cfg.ns = ns;

    const YAML::Node cluster = named(root, "clusters", "cluster", cluster_name, ctx_path + ".cluster");
    const std::string cl_path = "clusters[" + cluster_name + "].cluster";
    cfg.server = scalar(cluster, "server", cl_path);
    if (cfg.server.rfind("https://", 0) != 0 && cfg.server.rfind("http://", 0) != 0) {
      fail(cl_path + ".server", "\"" + cfg.server + "\" is not an https:// URL");
    }
    cfg.ca_pem = data_or_file(cluster, "certificate-authority", cl_path);
    const std::string insecure = scalar(cluster, "insecure-skip-tls-verify", cl_path);
    if (insecure == "true") {
      cfg.insecure_skip_verify = true;
    } else if (!insecure.empty() && insecure != "false") {
      fail(cl_path + ".insecure-skip-tls-verify", "\"" + insecure + "\" is not true or false");
    }

    if (!user_name.empty()) {
      const YAML::Node user = named(root, "users", "user", user_name, ctx_path + ".user");
      const std::string u_path = "users[" + user_name + "].user";
      if (user["exec"] || user["auth-provider"]) {
        fail(u_path, "exec and auth-provider credentials are not supported");
      }
      cfg.token = scalar(user, "token", u_path);
      const std::string token_file = scalar(user, "tokenFile", u_path);
      if (!token_file.empty()) {
        cfg.token_file = resolve(token_file);
        std::string t;
        if (!read_file(cfg.token_file, t)) fail(u_path + ".tokenFile", "cannot read \"" + cfg.token_file + "\"");
        cfg.token = trim(t);
      }
      cfg.client_cert_pem = data_or_file(user, "client-certificate", u_path);
      cfg.client_key_pem = data_or_file(user, "client-key", u_path);
      if (cfg.client_cert_pem.empty() != cfg.client_key_pem.empty()) {
        fail(u_path, "client-certificate and client-key must be given together");
      }
    }
    return cfg;
  }

 private:
  const std::string path_;
  const std::string dir_;
};

}  // namespace

Config in_cluster_config(const std::string& sa_dir) {
  const std::string host = env("KUBERNETES_SERVICE_HOST");
  const std::string port = env("KUBERNETES_SERVICE_PORT");
  if (host.empty() || port.empty()) {
    throw ConfigError("in-cluster config: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set (host \"" +
                      host + "\", port \"" + port + "\")");
  }
  Config cfg;
  cfg.server = "https://" + (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + port;
  cfg.token_file = sa_dir + "/token";
  std::string token;
  if (!read_file(cfg.token_file, token)) throw ConfigError("in-cluster config: cannot read \"" + cfg.token_file + "\"");
  cfg.token = trim(token);
  const std::string ca = sa_dir + "/ca.crt";
  if (!read_file(ca, cfg.ca_pem)) throw ConfigError("in-cluster config: cannot read \"" + ca + "\"");
  std::string ns;
  if (read_file(sa_dir + "/namespace", ns) && !trim(ns).empty()) cfg.ns = trim(ns);
  return cfg;
}

Config kubeconfig_config(const std::string& path, const std::string& context) {
  return KubeconfigReader(path).read(context);
}

Config load_config(const std::string& kubeconfig_flag) {
  if (!kubeconfig_flag.empty()) return kubeconfig_config(kubeconfig_flag);
  const std::string list = env("KUBECONFIG");
  if (!list.empty()) {
    std::istringstream in(list);
    std::string first;
    while (std::getline(in, first, ':')) {
      if (!first.empty()) return kubeconfig_config(first);
    }
  }
  if (!env("KUBERNETES_SERVICE_HOST").empty()) return in_cluster_config();
  const std::string home = env("HOME");
  if (home.empty()) throw ConfigError("no kubeconfig: no --kubeconfig flag, KUBECONFIG, in-cluster service or HOME");
  return kubeconfig_config(home + "/.kube/config");
}

}  // namespace shardguard::kube
