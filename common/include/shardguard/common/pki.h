// Job PKI (DESIGN §3): a per-job ECDSA P-256 CA, leaf X509-SVIDs carrying exactly one
// SPIFFE URI SAN, and validation of a presented leaf by the SPIFFE X509-SVID rules.
// Everything crosses this API as PEM text; OpenSSL objects stay inside pki.cpp.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

namespace shardguard {

// Any failure to create, parse or sign; the message names what was wrong.
class PkiError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr const char* kDefaultTrustDomain = "shardguard.local";
inline constexpr size_t kMaxSpiffeIdBytes = 2048;

// A CA certificate and its private key (PKCS#8, unencrypted), both PEM.
struct CaBundle {
  std::string cert_pem;
  std::string key_pem;
};

// A leaf certificate and its private key (PKCS#8, unencrypted), both PEM.
struct Leaf {
  std::string cert_pem;
  std::string key_pem;
};

// Creates a self-signed job CA: ECDSA P-256, subject CN=common_name, basicConstraints
// CA:TRUE (critical), keyUsage keyCertSign+cRLSign (critical), subject key id, random
// 128-bit serial, valid from one minute ago for `lifetime`. Throws PkiError.
CaBundle create_ca(const std::string& common_name, std::chrono::seconds lifetime);

// The CN of a job's CA: "ShardGuard CA <td> ns/<ns> job/<job>". X.509 allows 64
// characters and a valid job's names can take 150, so a longer one keeps its first
// 55 characters and ends in "~" + 8 hex digits of the SHA-256 of the whole (unique
// per trust domain, namespace and job, and still readable).
std::string job_ca_common_name(const std::string& trust_domain, const std::string& ns,
                               const std::string& job);

// Issues a leaf SVID signed by `ca`: ECDSA P-256, exactly one URI SAN = spiffe_id,
// basicConstraints CA:FALSE (critical), keyUsage digitalSignature+keyAgreement
// (critical), extendedKeyUsage clientAuth (+serverAuth when server_auth), subject and
// authority key ids, valid from one minute ago (clock skew) for `lifetime`.
// Throws PkiError for an invalid SPIFFE ID, a non-positive lifetime, or a CA whose
// certificate and key do not parse or do not match.
Leaf issue_leaf(const CaBundle& ca, const std::string& spiffe_id, std::chrono::seconds lifetime,
                bool server_auth = true);

// "" when id is a valid SPIFFE ID, otherwise a human-readable reason. Rules: scheme
// "spiffe"; trust domain non-empty, only [a-z0-9._-] (so no upper case, port or
// userinfo); path non-empty and not "/"; every segment non-empty, not "." or "..",
// only [A-Za-z0-9._-] (so no query, fragment, percent-encoding or trailing "/");
// at most kMaxSpiffeIdBytes bytes.
std::string validate_spiffe_id(const std::string& id);

// validate_spiffe_id(id).empty().
bool is_spiffe_id(const std::string& id);

// The trust domain of a valid SPIFFE ID ("" when the ID is not valid).
std::string spiffe_trust_domain(const std::string& id);

// "" when td is a valid SPIFFE trust domain (non-empty, only [a-z0-9._-], at most
// 255 bytes), otherwise the reason; the rule validate_spiffe_id applies to the
// trust domain of an ID.
std::string validate_trust_domain(const std::string& td);

// spiffe://<td>/ns/<namespace>/job/<job>/shard/<index> (DESIGN §3), the one
// builder of a shard's identity. Throws PkiError when the result is not a valid
// SPIFFE ID (e.g. a name containing '/').
std::string spiffe_id_for_shard(const std::string& trust_domain, const std::string& ns,
                                const std::string& job, uint32_t index);

// spiffe://<td>/ns/<namespace>/job/<job>/shard/<index>/replica/<replica> (DESIGN §3):
// replica r of stage i of a job with spec.sharding.replicas > 1. Throws PkiError
// likewise.
std::string spiffe_id_for_replica(const std::string& trust_domain, const std::string& ns,
                                  const std::string& job, uint32_t index, uint32_t replica);

// The parts of a replica's ID: spiffe_id_for_replica's inverse.
struct ReplicaSpiffeId {
  std::string shard_id;  // spiffe://<td>/ns/<namespace>/job/<job>/shard/<index>
  uint32_t index = 0;
  uint32_t replica = 0;
};

// The parts of `id` when it is exactly what spiffe_id_for_replica builds (numbers in
// decimal without sign or leading zero, each below 2^32), else nullopt: the one reader
// of that format, for code that checks which shard and replica an ID names.
std::optional<ReplicaSpiffeId> parse_replica_spiffe_id(const std::string& id);

// spiffe://<td>/ns/<namespace>/job/<job>/role/exporter. Throws PkiError likewise.
std::string spiffe_id_for_exporter(const std::string& trust_domain, const std::string& ns,
                                   const std::string& job);

// Which extended key usage the presented leaf must carry: clientAuth for a peer that
// dialled us (the default), serverAuth for a server we dialled.
enum class SvidRole { client, server };

// Result of verify_svid. `reason` is a short, stable token (a bounded set, safe as a
// metric label): "ok", "malformed", "self_signed", "untrusted", "expired",
// "not_yet_valid", "leaf_is_ca", "key_cert_sign", "no_digital_signature",
// "no_client_auth", "no_server_auth", "no_uri_san", "multiple_uri_sans",
// "not_spiffe", "invalid_spiffe_id". `message` explains it for logs.
struct SvidCheck {
  bool ok = false;
  std::string spiffe_id;  // set only when ok
  std::string reason;
  std::string message;
};

// Verifies leaf_pem (first certificate in it) as an X509-SVID issued by one of the
// CA certificates in ca_pem, at time `now`: the chain verifies, nothing in it is
// expired or not yet valid, the leaf is not self-signed, has CA=false, no
// keyCertSign, digitalSignature if it has a keyUsage at all, the EKU for `role`, and
// exactly one URI SAN which is a valid SPIFFE ID (DNS SANs are ignored). Never throws
// for bad input; a CA bundle that does not parse gives reason "malformed".
SvidCheck verify_svid(const std::string& leaf_pem, const std::string& ca_pem,
                      std::chrono::system_clock::time_point now, SvidRole role = SvidRole::client);

// notAfter of the first certificate in cert_pem. Throws PkiError when it does not parse.
// A notAfter the clock cannot hold (after 2262, e.g. 99991231235959Z for "no expiry",
// or before 1677) gives time_point::max() (or min()).
std::chrono::system_clock::time_point not_after(const std::string& cert_pem);

}  // namespace shardguard
