// A small JSON REST client for tests that talk to an API server over HTTPS: the real
// Kubernetes API server of the `realapi` fixture (client certificate) or the test API
// server (bearer token, CA in memory). One keep-alive connection, thread-safe; every
// answer keeps its status, body and Warning headers.
#pragma once

#include "shardguard/common/httplib.h"
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <strings.h>

#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "support/realapi.h"

namespace shardguard::testsupport {

struct RestResponse {
  int code = 0;                       // 0: no answer (see error)
  nlohmann::json body;                // parsed JSON; null when the body is not JSON
  std::string raw;                    // the body as received
  std::vector<std::string> warnings;  // values of the Warning headers
  std::string error;                  // transport error, when code is 0
  std::string message() const { return body.is_object() ? body.value("message", "") : raw; }
};

class RestClient {
 public:
  // The real API server, with the fixture's admin client certificate.
  explicit RestClient(const RealApi& api) : cli_(api.client()) { cli_->set_keep_alive(true); }

  // A server with bearer-token auth whose serving certificate `ca_pem` signed.
  RestClient(int port, const std::string& ca_pem, std::string token)
      : cli_(std::make_unique<httplib::SSLClient>("127.0.0.1", port)), token_(std::move(token)) {
    X509_STORE* store = X509_STORE_new();
    BIO* bio = BIO_new_mem_buf(ca_pem.data(), static_cast<int>(ca_pem.size()));
    X509* ca = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
    BIO_free(bio);
    if (!ca || X509_STORE_add_cert(store, ca) != 1) {
      X509_free(ca);
      X509_STORE_free(store);
      throw std::runtime_error("RestClient: cannot load the CA");
    }
    X509_free(ca);
    cli_->set_ca_cert_store(store);  // owned by the client's SSL context now
    cli_->enable_server_certificate_verification(true);
    cli_->set_connection_timeout(std::chrono::seconds(5));
    cli_->set_read_timeout(std::chrono::seconds(30));
    cli_->set_keep_alive(true);
  }

  RestResponse get(const std::string& path) { return request("GET", path); }
  RestResponse post(const std::string& path, const nlohmann::json& body) {
    return request("POST", path, body.dump(), "application/json");
  }
  RestResponse put(const std::string& path, const nlohmann::json& body) {
    return request("PUT", path, body.dump(), "application/json");
  }
  RestResponse patch(const std::string& path, const std::string& body, const std::string& content_type) {
    return request("PATCH", path, body, content_type);
  }
  RestResponse del(const std::string& path, const std::string& body = "") {
    return request("DELETE", path, body, "application/json");
  }

  RestResponse request(const std::string& method, const std::string& path, const std::string& body = "",
                       const std::string& content_type = "application/json") {
    std::lock_guard<std::mutex> lock(mu_);
    httplib::Headers h = {{"Accept", "application/json"}};
    if (!token_.empty()) h.emplace("Authorization", "Bearer " + token_);
    auto send = [&]() -> httplib::Result {
      if (method == "GET") return cli_->Get(path.c_str(), h);
      if (method == "POST") return cli_->Post(path.c_str(), h, body, content_type.c_str());
      if (method == "PUT") return cli_->Put(path.c_str(), h, body, content_type.c_str());
      if (method == "PATCH") return cli_->Patch(path.c_str(), h, body, content_type.c_str());
      if (method == "DELETE") return cli_->Delete(path.c_str(), h, body, content_type.c_str());
      throw std::invalid_argument("RestClient: unknown method " + method);
    };
    httplib::Result r = send();
    RestResponse out;
    if (!r) {
      out.error = httplib::to_string(r.error());
      return out;
    }
    out.code = r->status;
    out.raw = r->body;
    out.body = nlohmann::json::parse(r->body, nullptr, false);
    if (out.body.is_discarded()) out.body = nullptr;
    for (const auto& [k, v] : r->headers)
      if (strcasecmp(k.c_str(), "Warning") == 0) out.warnings.push_back(v);
    return out;
  }

 private:
  std::mutex mu_;
  std::unique_ptr<httplib::SSLClient> cli_;
  std::string token_;
};

}  // namespace shardguard::testsupport
