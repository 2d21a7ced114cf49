// test-apiserver: the test Kubernetes API server as a process, for kubectl checks and
// the benchmark. Serves until SIGTERM or SIGINT.
//
//   test-apiserver [--port N] [--kubeconfig PATH] [--ready-file PATH] [--token T]
//                  [--namespace NS]
//                  [--route PREFIX=https://127.0.0.1:PORT --route-ca F --route-cert F --route-key F]
//
// --route forwards every request under PREFIX (e.g. /apis/shardguard.io) to another API
// server (the real one of tests/realapi), with the client certificate of --route-cert /
// --route-key, trusting --route-ca; the flags after a --route apply to it.
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>

#include "kube_apiserver.h"
#include "shardguard/common/process.h"

int main(int argc, char** argv) {
  shardguard::testing::KubeApiServer::Options opt;
  std::string kubeconfig, ready_file, ns = "default";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "test-apiserver: " << a << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--port") opt.port = std::atoi(next().c_str());
    else if (a == "--kubeconfig") kubeconfig = next();
    else if (a == "--ready-file") ready_file = next();
    else if (a == "--token") opt.token = next();
    else if (a == "--namespace") ns = next();
    else if (a == "--route") {
      const std::string v = next();
      const auto eq = v.find('=');
      const std::string url = eq == std::string::npos ? "" : v.substr(eq + 1);
      const std::string scheme = "https://127.0.0.1:";
      if (eq == std::string::npos || url.rfind(scheme, 0) != 0) {
        std::cerr << "test-apiserver: --route wants PREFIX=https://127.0.0.1:PORT, got " << v << "\n";
        return 2;
      }
      shardguard::testing::KubeApiRoute r;
      r.prefix = v.substr(0, eq);
      r.port = std::atoi(url.c_str() + scheme.size());
      opt.routes.push_back(r);
    } else if (a == "--route-ca" || a == "--route-cert" || a == "--route-key") {
      if (opt.routes.empty()) {
        std::cerr << "test-apiserver: " << a << " must follow a --route\n";
        return 2;
      }
      auto& r = opt.routes.back();
      (a == "--route-ca" ? r.ca_file : a == "--route-cert" ? r.cert_file : r.key_file) = next();
    }
    else if (a == "--help" || a == "-h") {
      std::cout << "usage: test-apiserver [--port N] [--kubeconfig PATH] [--ready-file PATH] "
                   "[--token T] [--namespace NS]\n"
                   "       [--route PREFIX=https://127.0.0.1:PORT --route-ca F --route-cert F --route-key F]\n";
      return 0;
    } else {
      std::cerr << "test-apiserver: unknown argument " << a << "\n";
      return 2;
    }
  }
  sigset_t stop = shardguard::block_stop_signals();
  try {
    shardguard::testing::KubeApiServer server(opt);
    if (!kubeconfig.empty()) server.write_kubeconfig(kubeconfig, ns);
    if (!ready_file.empty()) {
      // Written under a temporary name and renamed, so a reader never sees half of it.
      std::string tmp = ready_file + ".tmp";
      std::ofstream(tmp) << server.url() << "\n";
      std::rename(tmp.c_str(), ready_file.c_str());
    }
    std::cerr << "test-apiserver: serving " << server.url() << std::endl;
    int sig = 0;
    sigwait(&stop, &sig);
    std::cerr << "test-apiserver: signal " << sig << ", stopping" << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "test-apiserver: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
