// Test support: X.509 leaves built with OpenSSL directly, including deliberately
// malformed ones (two URI SANs, CA=true, expired, self-signed, ...) that
// common/pki's issue_leaf refuses to make. Used by the PKI unit tests and by the
// sidecar's security tests through real TLS.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "shardguard/common/pki.h"

namespace shardguard::testsupport {

// RAII owners for OpenSSL objects, and PEM parsing that throws.
template <typename T, void (*FreeFn)(T*)>
struct Del {
  void operator()(T* p) const { FreeFn(p); }
};
using TKey = std::unique_ptr<EVP_PKEY, Del<EVP_PKEY, EVP_PKEY_free>>;
using TCert = std::unique_ptr<X509, Del<X509, X509_free>>;
using TBio = std::unique_ptr<BIO, Del<BIO, BIO_free_all>>;
using TExt = std::unique_ptr<X509_EXTENSION, Del<X509_EXTENSION, X509_EXTENSION_free>>;

inline void must(bool ok, const std::string& what) {
  if (!ok) {
    ERR_print_errors_fp(stderr);
    throw std::runtime_error("test helper: " + what);
  }
}

inline TCert cert_from_pem(const std::string& pem) {
  TBio bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  must(bio != nullptr, "BIO_new_mem_buf");
  TCert cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  must(cert != nullptr, "PEM_read_bio_X509");
  return cert;
}

inline TKey key_from_pem(const std::string& pem) {
  TBio bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  must(bio != nullptr, "BIO_new_mem_buf");
  TKey key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  must(key != nullptr, "PEM_read_bio_PrivateKey");
  return key;
}


struct LeafSpec {
  std::string san = "URI:spiffe://shardguard.local/ns/default/job/j/shard/0";  // "" = no SAN
  std::string basic_constraints = "critical,CA:FALSE";
  std::string key_usage = "critical,digitalSignature,keyAgreement";
  std::string eku = "clientAuth,serverAuth";  // "" = no EKU extension
  bool self_signed = false;
  std::string key = "EC:P-256";  // "EC:<curve>" or "RSA:<bits>": the leaf's own key
  std::string digest = "SHA256";  // what the issuer signs with ("SHA1" for a weak leaf)
  long not_before = -60;  // seconds relative to now
  long not_after = 3600;
};

// A leaf signed by ca (or by its own key when self_signed), with a fresh key of spec.key.
// Throws std::runtime_error when OpenSSL refuses a step.
Leaf build_leaf_with_key(const CaBundle& ca, const LeafSpec& spec);
// The certificate only.
inline std::string build_leaf(const CaBundle& ca, const LeafSpec& spec) {
  return build_leaf_with_key(ca, spec).cert_pem;
}

}  // namespace shardguard::testsupport
