// See cert_factory.h.
#include "support/cert_factory.h"

#include <memory>
#include <stdexcept>
#include <string>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

namespace shardguard::testsupport {

Leaf build_leaf_with_key(const CaBundle& ca, const LeafSpec& spec) {
  TCert ca_cert = cert_from_pem(ca.cert_pem);
  TKey ca_key = key_from_pem(ca.key_pem);
  const auto colon = spec.key.find(':');
  must(colon != std::string::npos, "LeafSpec.key \"" + spec.key + "\" is not TYPE:PARAM");
  const std::string type = spec.key.substr(0, colon), param = spec.key.substr(colon + 1);
  TKey key(type == "RSA" ? EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", static_cast<size_t>(std::stoul(param)))
                         : EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", param.c_str()));
  must(key != nullptr, "keygen " + spec.key);
  TCert cert(X509_new());
  must(cert != nullptr, "X509_new");
  must(X509_set_version(cert.get(), X509_VERSION_3) == 1, "version");
  must(ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), 4242) == 1, "serial");
  must(X509_gmtime_adj(X509_getm_notBefore(cert.get()), spec.not_before) != nullptr, "notBefore");
  must(X509_gmtime_adj(X509_getm_notAfter(cert.get()), spec.not_after) != nullptr, "notAfter");
  X509_NAME* subject = X509_get_subject_name(cert.get());
  must(X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("test-leaf"),
                                  -1, -1, 0) == 1,
       "CN");
  must(X509_set_issuer_name(cert.get(), spec.self_signed ? subject : X509_get_subject_name(ca_cert.get())) == 1,
       "issuer");
  must(X509_set_pubkey(cert.get(), key.get()) == 1, "pubkey");
  X509* issuer = spec.self_signed ? cert.get() : ca_cert.get();
  auto add = [&](int nid, const std::string& value) {
    if (value.empty()) return;
    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, issuer, cert.get(), nullptr, nullptr, 0);
    TExt ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
    must(ext != nullptr, "extension " + value);
    must(X509_add_ext(cert.get(), ext.get(), -1) == 1, "add extension " + value);
  };
  add(NID_basic_constraints, spec.basic_constraints);
  add(NID_key_usage, spec.key_usage);
  add(NID_ext_key_usage, spec.eku);
  add(NID_subject_key_identifier, "hash");
  if (!spec.self_signed) add(NID_authority_key_identifier, "keyid:always");
  add(NID_subject_alt_name, spec.san);
  const EVP_MD* md = EVP_get_digestbyname(spec.digest.c_str());
  must(md != nullptr, "digest " + spec.digest);
  must(X509_sign(cert.get(), spec.self_signed ? key.get() : ca_key.get(), md) > 0, "sign with " + spec.digest);
  TBio out(BIO_new(BIO_s_mem()));
  must(out != nullptr && PEM_write_bio_X509(out.get(), cert.get()) == 1, "write PEM");
  char* data = nullptr;
  const long len = BIO_get_mem_data(out.get(), &data);
  Leaf leaf;
  leaf.cert_pem.assign(data, static_cast<size_t>(len));
  TBio key_out(BIO_new(BIO_s_mem()));
  must(key_out != nullptr &&
           PEM_write_bio_PrivateKey(key_out.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr) == 1,
       "write key PEM");
  const long key_len = BIO_get_mem_data(key_out.get(), &data);
  leaf.key_pem.assign(data, static_cast<size_t>(key_len));
  return leaf;
}


}  // namespace shardguard::testsupport
