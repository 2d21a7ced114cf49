// Test helpers for the apiserver tests: an HTTPS client that trusts the server's CA and
// sends its bearer token, and a watch stream read on its own thread.
#pragma once

#include "shardguard/common/httplib.h"
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "kube_apiserver.h"

namespace shardguard::testing::apitest {

using json = nlohmann::json;

inline std::unique_ptr<httplib::SSLClient> make_client(const KubeApiServer& s) {
  auto cli = std::make_unique<httplib::SSLClient>("127.0.0.1", s.port());
  X509_STORE* store = X509_STORE_new();
  BIO* bio = BIO_new_mem_buf(s.ca_pem().data(), static_cast<int>(s.ca_pem().size()));
  X509* ca = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  if (!ca || X509_STORE_add_cert(store, ca) != 1) throw std::runtime_error("cannot load the CA");
  X509_free(ca);
  cli->set_ca_cert_store(store);  // the client's SSL context owns it now
  cli->enable_server_certificate_verification(true);
  cli->set_read_timeout(30, 0);
  return cli;
}

struct Resp {
  int code = 0;  // 0 = transport error
  json body;
  std::string raw;
};

class Api {
 public:
  explicit Api(const KubeApiServer& s, std::string token = "") : cli_(make_client(s)) {
    token_ = token.empty() ? s.token() : token;
  }

  Resp get(const std::string& path, const std::string& accept = "application/json") {
    return wrap(cli_->Get(path.c_str(), headers({{"Accept", accept}})));
  }
  Resp post(const std::string& path, const json& body) {
    return post_raw(path, body.dump(), "application/json");
  }
  Resp post_raw(const std::string& path, const std::string& body, const std::string& ctype) {
    return wrap(cli_->Post(path.c_str(), headers(), body, ctype.c_str()));
  }
  Resp put(const std::string& path, const json& body) {
    return wrap(cli_->Put(path.c_str(), headers(), body.dump(), "application/json"));
  }
  Resp patch(const std::string& path, const json& body,
             const std::string& ctype = "application/merge-patch+json") {
    return wrap(cli_->Patch(path.c_str(), headers(), body.dump(), ctype.c_str()));
  }
  Resp del(const std::string& path, const json& body = nullptr) {
    if (body.is_null()) return wrap(cli_->Delete(path.c_str(), headers()));
    return wrap(cli_->Delete(path.c_str(), headers(), body.dump(), "application/json"));
  }

 private:
  httplib::Headers headers(httplib::Headers extra = {}) const {
    extra.emplace("Authorization", "Bearer " + token_);
    extra.emplace("User-Agent", "apiserver-test");
    return extra;
  }
  static Resp wrap(const httplib::Result& r) {
    Resp out;
    if (!r) return out;
    out.code = r->status;
    out.raw = r->body;
    out.body = json::parse(r->body, nullptr, false);
    return out;
  }

  std::unique_ptr<httplib::SSLClient> cli_;
  std::string token_;
};

// A watch request read on its own thread: newline-delimited events collected as JSON.
class WatchStream {
 public:
  WatchStream(const KubeApiServer& s, std::string path, httplib::Headers extra = {})
      : cli_(make_client(s)) {
    cli_->set_read_timeout(60, 0);
    httplib::Headers h = std::move(extra);
    h.emplace("Authorization", "Bearer " + s.token());
    thread_ = std::thread([this, path, h] {
      auto res = cli_->Get(path.c_str(), h, [this](const char* data, size_t n) {
        std::lock_guard<std::mutex> lk(mu_);
        buffer_.append(data, n);
        size_t nl;
        while ((nl = buffer_.find('\n')) != std::string::npos) {
          std::string line = buffer_.substr(0, nl);
          buffer_.erase(0, nl + 1);
          if (!line.empty()) events_.push_back(json::parse(line, nullptr, false));
        }
        return !stop_.load();
      });
      std::lock_guard<std::mutex> lk(mu_);
      status_ = res ? res->status : 0;
      ended_ = true;
    });
  }
  ~WatchStream() {
    stop_ = true;
    cli_->stop();
    thread_.join();
  }
  WatchStream(const WatchStream&) = delete;
  WatchStream& operator=(const WatchStream&) = delete;

  std::vector<json> events() const {
    std::lock_guard<std::mutex> lk(mu_);
    return events_;
  }
  // Events other than BOOKMARK.
  std::vector<json> changes() const {
    std::vector<json> out;
    for (auto& e : events())
      if (e.value("type", "") != "BOOKMARK") out.push_back(e);
    return out;
  }
  bool ended() const {
    std::lock_guard<std::mutex> lk(mu_);
    return ended_;
  }
  int status() const {
    std::lock_guard<std::mutex> lk(mu_);
    return status_;
  }

 private:
  std::unique_ptr<httplib::SSLClient> cli_;
  mutable std::mutex mu_;
  std::string buffer_;
  std::vector<json> events_;
  bool ended_ = false;
  int status_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace shardguard::testing::apitest
