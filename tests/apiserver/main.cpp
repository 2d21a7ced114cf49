// test-apiserver: the test Kubernetes API server as a process, for kubectl checks and
// the benchmark. Serves until SIGTERM or SIGINT.
//
//   test-apiserver [--port N] [--kubeconfig PATH] [--ready-file PATH] [--token T]
//                  [--namespace NS]
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
    else if (a == "--help" || a == "-h") {
      std::cout << "usage: test-apiserver [--port N] [--kubeconfig PATH] [--ready-file PATH] "
                   "[--token T] [--namespace NS]\n";
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
