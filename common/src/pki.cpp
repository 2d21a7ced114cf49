// Job CA, leaf X509-SVIDs and SVID validation over OpenSSL 3 (see pki.h).
#include "shardguard/common/pki.h"

#include "shardguard/common/crypto.h"

#include <climits>
#include <cstdio>
#include <ctime>
#include <memory>
#include <string>
#include <vector>

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

namespace shardguard {
namespace {

template <typename T, void (*FreeFn)(T*)>
struct OsslDeleter {
  void operator()(T* p) const { FreeFn(p); }
};
using PKey = std::unique_ptr<EVP_PKEY, OsslDeleter<EVP_PKEY, EVP_PKEY_free>>;
using Cert = std::unique_ptr<X509, OsslDeleter<X509, X509_free>>;
using Bio = std::unique_ptr<BIO, OsslDeleter<BIO, BIO_free_all>>;
using Bignum = std::unique_ptr<BIGNUM, OsslDeleter<BIGNUM, BN_free>>;
using Extension = std::unique_ptr<X509_EXTENSION, OsslDeleter<X509_EXTENSION, X509_EXTENSION_free>>;
using Store = std::unique_ptr<X509_STORE, OsslDeleter<X509_STORE, X509_STORE_free>>;
using StoreCtx = std::unique_ptr<X509_STORE_CTX, OsslDeleter<X509_STORE_CTX, X509_STORE_CTX_free>>;
using GeneralNames = std::unique_ptr<GENERAL_NAMES, OsslDeleter<GENERAL_NAMES, GENERAL_NAMES_free>>;
using GeneralName = std::unique_ptr<GENERAL_NAME, OsslDeleter<GENERAL_NAME, GENERAL_NAME_free>>;
using Ia5String = std::unique_ptr<ASN1_IA5STRING, OsslDeleter<ASN1_IA5STRING, ASN1_IA5STRING_free>>;

constexpr long kClockSkewSeconds = 60;
// Upper bound on a lifetime, so now + lifetime cannot overflow time_t.
constexpr std::chrono::seconds kMaxLifetime{std::chrono::hours(24) * 365 * 100};
constexpr const char* kSpiffePrefix = "spiffe://";
constexpr size_t kSpiffePrefixLen = 9;
constexpr size_t kMaxTrustDomainBytes = 255;

[[noreturn]] void fail(const std::string& what) { throw PkiError(what + ": " + openssl_error()); }

// Shortened for messages, so a 2 KiB ID does not flood a log line.
// Control and non-ASCII bytes become '?', since IDs from a peer end up in log lines.
std::string shown(const std::string& s) {
  constexpr size_t kMax = 120;
  std::string out = "\"";
  for (size_t i = 0; i < s.size() && i < kMax; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    out += (c >= 0x20 && c < 0x7f && c != '"') ? static_cast<char>(c) : '?';
  }
  out += "\"";
  if (s.size() > kMax) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

Bio read_bio(const std::string& pem) {
  if (pem.size() > static_cast<size_t>(INT_MAX)) return nullptr;
  return Bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// First certificate in pem, or null (error queue cleared).
Cert parse_cert(const std::string& pem) {
  Bio bio = read_bio(pem);
  Cert cert;
  if (bio) cert.reset(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  ERR_clear_error();
  return cert;
}

// Every certificate in pem; empty when there is none or when any block is corrupt.
std::vector<Cert> parse_certs(const std::string& pem) {
  std::vector<Cert> certs;
  ERR_clear_error();
  Bio bio = read_bio(pem);
  if (!bio) return certs;
  while (X509* raw = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    certs.emplace_back(raw);
  }
  // A clean end of input leaves exactly "no start line"; anything else is corruption.
  const unsigned long err = ERR_peek_last_error();
  const bool clean_end = ERR_GET_LIB(err) == ERR_LIB_PEM && ERR_GET_REASON(err) == PEM_R_NO_START_LINE;
  ERR_clear_error();
  if (!clean_end) certs.clear();
  return certs;
}

PKey parse_key(const std::string& pem) {
  Bio bio = read_bio(pem);
  PKey key;
  if (bio) key.reset(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  ERR_clear_error();
  return key;
}

std::string bio_text(BIO* bio) {
  char* data = nullptr;
  const long len = BIO_get_mem_data(bio, &data);
  if (len < 0 || (len > 0 && data == nullptr)) fail("reading PEM from memory BIO");
  return std::string(data, static_cast<size_t>(len));
}

std::string cert_to_pem(X509* cert) {
  Bio bio(BIO_new(BIO_s_mem()));
  if (!bio) fail("allocating BIO");
  if (PEM_write_bio_X509(bio.get(), cert) != 1) fail("writing certificate PEM");
  return bio_text(bio.get());
}

std::string key_to_pem(EVP_PKEY* key) {
  Bio bio(BIO_new(BIO_s_mem()));
  if (!bio) fail("allocating BIO");
  if (PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1) {
    fail("writing private key PEM");
  }
  return bio_text(bio.get());
}

PKey generate_p256() {
  PKey key(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
  if (!key) fail("generating ECDSA P-256 key");
  return key;
}

void set_random_serial(X509* cert) {
  unsigned char buf[16];
  Bignum bn;
  do {
    if (RAND_bytes(buf, sizeof buf) != 1) fail("drawing random serial number");
    bn.reset(BN_bin2bn(buf, sizeof buf, nullptr));
    if (!bn) fail("converting serial number");
  } while (BN_is_zero(bn.get()));
  if (BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert)) == nullptr) fail("setting serial number");
}

time_t cert_not_after(const X509* cert) {
  struct tm tm {};
  if (ASN1_TIME_to_tm(X509_get0_notAfter(cert), &tm) != 1) fail("reading notAfter");
  return timegm(&tm);
}

void check_lifetime(std::chrono::seconds lifetime) {
  if (lifetime.count() <= 0) throw PkiError("certificate lifetime must be positive, got " +
                                            std::to_string(lifetime.count()) + " s");
  if (lifetime > kMaxLifetime) throw PkiError("certificate lifetime of " + std::to_string(lifetime.count()) +
                                              " s exceeds 100 years");
}

// Valid from one minute ago (clock skew) until now + lifetime, but never past cap.
void set_validity(X509* cert, std::chrono::seconds lifetime, time_t cap = 0) {
  const time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  time_t end = now + static_cast<time_t>(lifetime.count());
  if (cap != 0 && cap < end) end = cap;
  if (ASN1_TIME_set(X509_getm_notBefore(cert), now - kClockSkewSeconds) == nullptr) fail("setting notBefore");
  if (ASN1_TIME_set(X509_getm_notAfter(cert), end) == nullptr) fail("setting notAfter");
}

void add_name_entry(X509_NAME* name, const char* field, const std::string& value) {
  if (X509_NAME_add_entry_by_txt(name, field, MBSTRING_UTF8, reinterpret_cast<const unsigned char*>(value.c_str()),
                                 static_cast<int>(value.size()), -1, 0) != 1) {
    fail(std::string("setting subject ") + field);
  }
}

// Adds an extension given in openssl-config syntax, e.g. "critical,CA:TRUE".
void add_ext(X509* subject, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, issuer, subject, nullptr, nullptr, 0);
  Extension ext(X509V3_EXT_conf_nid(nullptr, &ctx, nid, value));
  if (!ext) fail(std::string("building extension ") + OBJ_nid2sn(nid) + "=" + value);
  if (X509_add_ext(subject, ext.get(), -1) != 1) fail(std::string("adding extension ") + OBJ_nid2sn(nid));
}

void add_uri_san(X509* cert, const std::string& uri) {
  GeneralNames names(GENERAL_NAMES_new());
  GeneralName name(GENERAL_NAME_new());
  Ia5String value(ASN1_IA5STRING_new());
  if (!names || !name || !value) fail("allocating subjectAltName");
  if (ASN1_STRING_set(value.get(), uri.data(), static_cast<int>(uri.size())) != 1) fail("setting URI SAN");
  GENERAL_NAME_set0_value(name.get(), GEN_URI, value.release());
  if (sk_GENERAL_NAME_push(names.get(), name.get()) <= 0) fail("building subjectAltName");
  name.release();  // now owned by names
  if (X509_add1_ext_i2d(cert, NID_subject_alt_name, names.get(), 0, X509V3_ADD_DEFAULT) != 1) {
    fail("adding subjectAltName");
  }
}

void sign(X509* cert, EVP_PKEY* key) {
  if (X509_sign(cert, key, EVP_sha256()) <= 0) fail("signing certificate");
}

void new_v3(Cert& cert) {
  cert.reset(X509_new());
  if (!cert) fail("allocating certificate");
  if (X509_set_version(cert.get(), X509_VERSION_3) != 1) fail("setting certificate version");
  set_random_serial(cert.get());
}

bool allowed_char(char c, bool trust_domain) {
  if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_') return true;
  return !trust_domain && c >= 'A' && c <= 'Z';
}

std::string bad_char(char c, const char* where) {
  const std::string w(where);
  switch (c) {
    case '?': return "query is not allowed";
    case '#': return "fragment is not allowed";
    case '%': return "percent-encoding is not allowed in the " + w;
    case ':': return w == "trust domain" ? "port is not allowed in the trust domain" : "':' is not allowed in the path";
    case '@': return w == "trust domain" ? "userinfo is not allowed in the trust domain" : "'@' is not allowed in the path";
    default: break;
  }
  if (w == "trust domain" && c >= 'A' && c <= 'Z') return "trust domain must be lower-case";
  if (c > 0x20 && c < 0x7f) return std::string(w) + " contains invalid character '" + c + "'";
  char hex[8];
  std::snprintf(hex, sizeof hex, "0x%02x", static_cast<unsigned char>(c));
  return std::string(w) + " contains invalid byte " + hex;
}

SvidCheck refuse(const char* reason, std::string message) {
  SvidCheck r;
  r.ok = false;
  r.reason = reason;
  r.message = std::move(message);
  return r;
}

// One component of a built ID must be exactly one segment: no '/' may smuggle in more.
void check_component(const char* what, const std::string& value) {
  if (value.empty()) throw PkiError(std::string(what) + " must not be empty");
  if (value.find('/') != std::string::npos) {
    throw PkiError(std::string(what) + " " + shown(value) + " must not contain '/'");
  }
}

std::string make_id(const std::string& td, const std::string& path) {
  std::string id = kSpiffePrefix + td + path;
  const std::string err = validate_spiffe_id(id);
  if (!err.empty()) throw PkiError("invalid SPIFFE ID " + shown(id) + ": " + err);
  return id;
}

}  // namespace

std::string validate_spiffe_id(const std::string& id) {
  if (id.size() > kMaxSpiffeIdBytes) {
    return "longer than " + std::to_string(kMaxSpiffeIdBytes) + " bytes (" + std::to_string(id.size()) + ")";
  }
  if (id.compare(0, kSpiffePrefixLen, kSpiffePrefix) != 0) return "must start with \"spiffe://\"";
  const size_t td_begin = kSpiffePrefixLen;
  size_t td_end = id.find('/', td_begin);
  if (td_end == std::string::npos) td_end = id.size();
  if (td_end == td_begin) return "trust domain is empty";
  for (size_t i = td_begin; i < td_end; ++i) {
    if (!allowed_char(id[i], true)) return bad_char(id[i], "trust domain");
  }
  if (td_end == id.size()) return "path is empty (workload IDs need a path)";
  if (td_end + 1 == id.size()) return "path must not be root \"/\"";
  // Segments between each '/' and the next; an empty one means "//" or a trailing '/'.
  size_t seg_begin = td_end + 1;
  while (true) {
    size_t seg_end = id.find('/', seg_begin);
    if (seg_end == std::string::npos) seg_end = id.size();
    if (seg_end == seg_begin) {
      return seg_end == id.size() ? "trailing '/' is not allowed" : "path has an empty segment (\"//\")";
    }
    for (size_t i = seg_begin; i < seg_end; ++i) {
      if (!allowed_char(id[i], false)) return bad_char(id[i], "path");
    }
    const size_t len = seg_end - seg_begin;
    if ((len == 1 && id[seg_begin] == '.') || (len == 2 && id[seg_begin] == '.' && id[seg_begin + 1] == '.')) {
      return "path segments \".\" and \"..\" are not allowed";
    }
    if (seg_end == id.size()) break;
    seg_begin = seg_end + 1;
  }
  return "";
}

bool is_spiffe_id(const std::string& id) { return validate_spiffe_id(id).empty(); }

std::string spiffe_trust_domain(const std::string& id) {
  if (!is_spiffe_id(id)) return "";
  return id.substr(kSpiffePrefixLen, id.find('/', kSpiffePrefixLen) - kSpiffePrefixLen);
}

std::string validate_trust_domain(const std::string& td) {
  if (td.empty()) return "trust domain is empty";
  if (td.size() > kMaxTrustDomainBytes) {
    return "trust domain longer than " + std::to_string(kMaxTrustDomainBytes) + " bytes (" +
           std::to_string(td.size()) + ")";
  }
  for (char c : td) {
    if (!allowed_char(c, true)) return bad_char(c, "trust domain");
  }
  return "";
}

std::string spiffe_id_for_shard(const std::string& trust_domain, const std::string& ns, const std::string& job,
                                uint32_t index) {
  check_component("trust domain", trust_domain);
  check_component("namespace", ns);
  check_component("job", job);
  return make_id(trust_domain, "/ns/" + ns + "/job/" + job + "/shard/" + std::to_string(index));
}

std::string spiffe_id_for_replica(const std::string& trust_domain, const std::string& ns, const std::string& job,
                                  uint32_t index, uint32_t replica) {
  return spiffe_id_for_shard(trust_domain, ns, job, index) + "/replica/" + std::to_string(replica);
}

std::optional<ReplicaSpiffeId> parse_replica_spiffe_id(const std::string& id) {
  if (!is_spiffe_id(id)) return std::nullopt;
  // The path's segments after the trust domain: ns, <ns>, job, <job>, shard, <i>, replica, <r>.
  std::vector<std::string> seg;
  for (size_t at = id.find('/', kSpiffePrefixLen); at != std::string::npos && seg.size() <= 8;) {
    const size_t next = id.find('/', at + 1);
    seg.push_back(id.substr(at + 1, next == std::string::npos ? std::string::npos : next - at - 1));
    at = next;
  }
  if (seg.size() != 8 || seg[0] != "ns" || seg[2] != "job" || seg[4] != "shard" || seg[6] != "replica") {
    return std::nullopt;
  }
  const auto number = [](const std::string& s) -> std::optional<uint32_t> {
    if (s.empty() || s.size() > 10 || s.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
    const unsigned long long v = std::stoull(s);
    if (v > UINT32_MAX) return std::nullopt;
    return static_cast<uint32_t>(v);
  };
  const auto index = number(seg[5]), replica = number(seg[7]);
  if (!index || !replica) return std::nullopt;
  ReplicaSpiffeId r{spiffe_id_for_shard(spiffe_trust_domain(id), seg[1], seg[3], *index), *index, *replica};
  // Only the canonical spelling ("7", not "07"): the ID must be the one the builder makes.
  if (r.shard_id + "/replica/" + std::to_string(*replica) != id) return std::nullopt;
  return r;
}

std::string spiffe_id_for_exporter(const std::string& trust_domain, const std::string& ns,
                                   const std::string& job) {
  check_component("trust domain", trust_domain);
  check_component("namespace", ns);
  check_component("job", job);
  return make_id(trust_domain, "/ns/" + ns + "/job/" + job + "/role/exporter");
}

std::string job_ca_common_name(const std::string& trust_domain, const std::string& ns,
                               const std::string& job) {
  const std::string full = "ShardGuard CA " + trust_domain + " ns/" + ns + " job/" + job;
  constexpr std::size_t kMax = 64;
  if (full.size() <= kMax) return full;
  return full.substr(0, kMax - 9) + "~" + sha256_hex(full).substr(0, 8);
}

CaBundle create_ca(const std::string& common_name, std::chrono::seconds lifetime) {
  if (common_name.empty()) throw PkiError("CA common name must not be empty");
  if (common_name.size() > 64) {
    throw PkiError("CA common name must be at most 64 bytes, got " + std::to_string(common_name.size()));
  }
  check_lifetime(lifetime);
  PKey key = generate_p256();
  Cert cert;
  new_v3(cert);
  set_validity(cert.get(), lifetime);
  X509_NAME* subject = X509_get_subject_name(cert.get());
  add_name_entry(subject, "O", "ShardGuard");
  add_name_entry(subject, "CN", common_name);
  if (X509_set_issuer_name(cert.get(), subject) != 1) fail("setting CA issuer name");
  if (X509_set_pubkey(cert.get(), key.get()) != 1) fail("setting CA public key");
  // pathlen:0 — leaves sit directly under the job CA; no intermediates.
  add_ext(cert.get(), cert.get(), NID_basic_constraints, "critical,CA:TRUE,pathlen:0");
  add_ext(cert.get(), cert.get(), NID_key_usage, "critical,keyCertSign,cRLSign");
  add_ext(cert.get(), cert.get(), NID_subject_key_identifier, "hash");
  sign(cert.get(), key.get());
  return CaBundle{cert_to_pem(cert.get()), key_to_pem(key.get())};
}

Leaf issue_leaf(const CaBundle& ca, const std::string& spiffe_id, std::chrono::seconds lifetime, bool server_auth) {
  const std::string err = validate_spiffe_id(spiffe_id);
  if (!err.empty()) throw PkiError("refusing to issue a leaf for invalid SPIFFE ID " + shown(spiffe_id) + ": " + err);
  check_lifetime(lifetime);
  Cert ca_cert = parse_cert(ca.cert_pem);
  if (!ca_cert) throw PkiError("CA certificate PEM does not parse");
  PKey ca_key = parse_key(ca.key_pem);
  if (!ca_key) throw PkiError("CA private key PEM does not parse");
  if (X509_check_private_key(ca_cert.get(), ca_key.get()) != 1) {
    ERR_clear_error();
    throw PkiError("CA private key does not match the CA certificate");
  }
  if (X509_check_ca(ca_cert.get()) == 0) throw PkiError("CA certificate is not a CA (basicConstraints CA:FALSE)");

  PKey key = generate_p256();
  Cert cert;
  new_v3(cert);
  // A leaf never outlives the CA that signs it.
  set_validity(cert.get(), lifetime, cert_not_after(ca_cert.get()));
  X509_NAME* subject = X509_get_subject_name(cert.get());
  add_name_entry(subject, "O", "ShardGuard");
  add_name_entry(subject, "CN", "SVID");
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(ca_cert.get())) != 1) fail("setting leaf issuer name");
  if (X509_set_pubkey(cert.get(), key.get()) != 1) fail("setting leaf public key");
  add_ext(cert.get(), ca_cert.get(), NID_basic_constraints, "critical,CA:FALSE");
  add_ext(cert.get(), ca_cert.get(), NID_key_usage, "critical,digitalSignature,keyAgreement");
  add_ext(cert.get(), ca_cert.get(), NID_ext_key_usage, server_auth ? "clientAuth,serverAuth" : "clientAuth");
  add_ext(cert.get(), ca_cert.get(), NID_subject_key_identifier, "hash");
  add_ext(cert.get(), ca_cert.get(), NID_authority_key_identifier, "keyid:always");
  add_uri_san(cert.get(), spiffe_id);
  sign(cert.get(), ca_key.get());
  return Leaf{cert_to_pem(cert.get()), key_to_pem(key.get())};
}

namespace {

// Why a leaf's public key is too weak, or "" when it is strong enough: EC of at least
// 256 bits (P-256), RSA of at least 2048 bits, or Ed25519/Ed448.
std::string weak_key(EVP_PKEY* key) {
  if (key == nullptr) return "leaf public key does not parse";
  const int bits = EVP_PKEY_get_bits(key);
  switch (EVP_PKEY_get_base_id(key)) {
    case EVP_PKEY_EC:
      if (bits < 256) return "leaf key is EC " + std::to_string(bits) + " bits; P-256 or stronger is required";
      return "";
    case EVP_PKEY_RSA:
    case EVP_PKEY_RSA_PSS:
      if (bits < 2048) return "leaf key is RSA " + std::to_string(bits) + " bits; 2048 bits or more are required";
      return "";
    case EVP_PKEY_ED25519:
    case EVP_PKEY_ED448:
      return "";
    default: {
      const char* type = OBJ_nid2sn(EVP_PKEY_get_base_id(key));
      return std::string("leaf key type ") + (type ? type : "(unknown)") +
             " is not allowed (EC P-256+, RSA 2048+, Ed25519 or Ed448)";
    }
  }
}

}  // namespace

SvidCheck verify_svid(const std::string& leaf_pem, const std::string& ca_pem, std::chrono::system_clock::time_point now,
                      SvidRole role) {
  Cert leaf = parse_cert(leaf_pem);
  if (!leaf) return refuse("malformed", "leaf certificate PEM does not parse");
  std::vector<Cert> cas = parse_certs(ca_pem);
  if (cas.empty()) return refuse("malformed", "CA bundle PEM does not parse or holds no certificate");

  const uint32_t flags = X509_get_extension_flags(leaf.get());
  if (flags & EXFLAG_INVALID) {
    ERR_clear_error();
    return refuse("malformed", "leaf has invalid or duplicate extensions");
  }
  const int self_signed = X509_self_signed(leaf.get(), 1);
  ERR_clear_error();
  if (self_signed == 1) return refuse("self_signed", "leaf certificate is self-signed");

  Store store(X509_STORE_new());
  if (!store) return refuse("untrusted", "internal error: allocating X509_STORE");
  for (const Cert& ca : cas) {
    if (X509_STORE_add_cert(store.get(), ca.get()) != 1) {
      ERR_clear_error();
      return refuse("untrusted", "internal error: adding CA certificate to store");
    }
  }
  StoreCtx ctx(X509_STORE_CTX_new());
  if (!ctx || X509_STORE_CTX_init(ctx.get(), store.get(), leaf.get(), nullptr) != 1) {
    ERR_clear_error();
    return refuse("untrusted", "internal error: initialising X509_STORE_CTX");
  }
  X509_VERIFY_PARAM* param = X509_STORE_CTX_get0_param(ctx.get());
  X509_VERIFY_PARAM_set_time(param, std::chrono::system_clock::to_time_t(now));
  X509_VERIFY_PARAM_set_depth(param, 0);  // leaf directly under a trust anchor
  const int verified = X509_verify_cert(ctx.get());
  ERR_clear_error();
  if (verified != 1) {
    const int err = X509_STORE_CTX_get_error(ctx.get());
    const std::string msg = std::string(X509_verify_cert_error_string(err)) + " (depth " +
                            std::to_string(X509_STORE_CTX_get_error_depth(ctx.get())) + ")";
    if (err == X509_V_ERR_CERT_HAS_EXPIRED) return refuse("expired", msg);
    if (err == X509_V_ERR_CERT_NOT_YET_VALID) return refuse("not_yet_valid", msg);
    return refuse("untrusted", msg);
  }

  // Strength, as DESIGN §3 issues: a signature of at least 128 bits of security
  // (SHA-256; SHA-1 counts as 63) and a key of P-256 / RSA-2048 or better. Stricter than
  // `openssl verify -auth_level 2` (which would take P-224), and OpenSSL's default
  // level 1 would accept SHA-1 and RSA-1024 as well.
  int sig_md = 0, sig_pk = 0, sig_bits = 0;
  uint32_t sig_flags = 0;
  if (X509_get_signature_info(leaf.get(), &sig_md, &sig_pk, &sig_bits, &sig_flags) != 1) {
    ERR_clear_error();
    const char* alg = OBJ_nid2sn(X509_get_signature_nid(leaf.get()));
    return refuse("weak_signature", std::string("leaf's signature algorithm ") + (alg ? alg : "(unknown)") +
                                        " cannot be rated; SHA-256 or stronger is required");
  }
  if (sig_bits < 128) {
    const char* md = OBJ_nid2sn(sig_md);
    return refuse("weak_signature", std::string("leaf is signed with ") + (md ? md : "an unknown digest") + " (" +
                                        std::to_string(sig_bits) + " bits of security); SHA-256 or stronger is required");
  }
  if (const std::string weak = weak_key(X509_get0_pubkey(leaf.get())); !weak.empty()) {
    return refuse("weak_key", weak);
  }
  // SPIFFE X509-SVID §4.1: a leaf carries basicConstraints with CA:FALSE; an absent
  // extension leaves its CA status to the verifier's guess.
  if (!(flags & EXFLAG_BCONS)) {
    return refuse("no_basic_constraints", "leaf has no basicConstraints extension (an X509-SVID must carry CA:FALSE)");
  }
  if (flags & EXFLAG_CA) return refuse("leaf_is_ca", "leaf has basicConstraints CA:TRUE");
  if (flags & EXFLAG_KUSAGE) {
    const uint32_t ku = X509_get_key_usage(leaf.get());
    if (ku & KU_KEY_CERT_SIGN) return refuse("key_cert_sign", "leaf has keyUsage keyCertSign");
    if (ku & KU_CRL_SIGN) return refuse("key_cert_sign", "leaf has keyUsage cRLSign");
    if (!(ku & KU_DIGITAL_SIGNATURE)) return refuse("no_digital_signature", "leaf keyUsage lacks digitalSignature");
  }
  const bool client = role == SvidRole::client;
  const uint32_t needed = client ? XKU_SSL_CLIENT : XKU_SSL_SERVER;
  if (!(flags & EXFLAG_XKUSAGE) || !(X509_get_extended_key_usage(leaf.get()) & needed)) {
    return client ? refuse("no_client_auth", "leaf lacks extendedKeyUsage clientAuth")
                  : refuse("no_server_auth", "leaf lacks extendedKeyUsage serverAuth");
  }

  int crit = 0;
  GeneralNames names(static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(leaf.get(), NID_subject_alt_name, &crit, nullptr)));
  ERR_clear_error();
  if (!names && crit != -1) return refuse("malformed", "leaf subjectAltName is duplicated or does not parse");
  const ASN1_IA5STRING* uri = nullptr;
  int uri_count = 0;
  bool spiffe_in_dns = false;
  const int n = names ? sk_GENERAL_NAME_num(names.get()) : 0;
  for (int i = 0; i < n; ++i) {
    const GENERAL_NAME* gn = sk_GENERAL_NAME_value(names.get(), i);
    if (gn->type == GEN_URI) {
      uri = gn->d.uniformResourceIdentifier;
      ++uri_count;
    } else if (gn->type == GEN_DNS) {
      const ASN1_IA5STRING* dns = gn->d.dNSName;
      const std::string s(reinterpret_cast<const char*>(ASN1_STRING_get0_data(dns)),
                          static_cast<size_t>(ASN1_STRING_length(dns)));
      if (s.compare(0, kSpiffePrefixLen, kSpiffePrefix) == 0) spiffe_in_dns = true;
    }
  }
  if (uri_count == 0) {
    return refuse("no_uri_san", spiffe_in_dns ? "leaf has no URI SAN (a SPIFFE ID in a DNS SAN does not count)"
                                              : "leaf has no URI SAN");
  }
  if (uri_count > 1) return refuse("multiple_uri_sans", "leaf has " + std::to_string(uri_count) + " URI SANs");
  const std::string id(reinterpret_cast<const char*>(ASN1_STRING_get0_data(uri)),
                       static_cast<size_t>(ASN1_STRING_length(uri)));
  const size_t colon = id.find(':');
  std::string scheme = id.substr(0, colon == std::string::npos ? 0 : colon);
  for (char& c : scheme) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  if (scheme != "spiffe") return refuse("not_spiffe", "URI SAN " + shown(id) + " is not a spiffe:// URI");
  const std::string err = validate_spiffe_id(id);
  if (!err.empty()) return refuse("invalid_spiffe_id", "URI SAN " + shown(id) + ": " + err);

  SvidCheck ok;
  ok.ok = true;
  ok.spiffe_id = id;
  ok.reason = "ok";
  ok.message = "valid X509-SVID";
  return ok;
}

std::chrono::system_clock::time_point not_after(const std::string& cert_pem) {
  using Clock = std::chrono::system_clock;
  Cert cert = parse_cert(cert_pem);
  if (!cert) throw PkiError("certificate PEM does not parse");
  // Clock counts nanoseconds (years 1677..2262), a certificate's time goes to 9999
  // (RFC 5280's 99991231235959Z means "no expiry"): clamp instead of overflowing.
  const time_t t = cert_not_after(cert.get());
  if (t >= std::chrono::duration_cast<std::chrono::seconds>(Clock::duration::max()).count()) {
    return Clock::time_point::max();
  }
  if (t <= std::chrono::duration_cast<std::chrono::seconds>(Clock::duration::min()).count()) {
    return Clock::time_point::min();
  }
  return Clock::from_time_t(t);
}

}  // namespace shardguard
