// Job CA, leaf SVIDs and X509-SVID validation (common/pki.h).
#include "shardguard/common/pki.h"

#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "support/cert_factory.h"

namespace shardguard {
namespace {

using testsupport::build_leaf;
using testsupport::cert_from_pem;
using testsupport::key_from_pem;
using testsupport::LeafSpec;
using testsupport::TBio;
using testsupport::TCert;
using testsupport::TKey;
using std::chrono::hours;
using std::chrono::seconds;
using Clock = std::chrono::system_clock;

// ---- fixture ---------------------------------------------------------------------

class PkiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ca_ = new CaBundle(create_ca("job-ca", hours(24 * 10)));
    other_ca_ = new CaBundle(create_ca("other-ca", hours(24 * 10)));
  }
  static void TearDownTestSuite() {
    delete ca_;
    delete other_ca_;
    ca_ = other_ca_ = nullptr;
  }
  SvidCheck check(const std::string& leaf_pem, Clock::time_point now = Clock::now()) {
    return verify_svid(leaf_pem, ca_->cert_pem, now);
  }
  static CaBundle* ca_;
  static CaBundle* other_ca_;
  const std::string id_ = "spiffe://shardguard.local/ns/default/job/j/shard/0";
};
CaBundle* PkiTest::ca_ = nullptr;
CaBundle* PkiTest::other_ca_ = nullptr;

#define EXPECT_REFUSED(check_expr, want_reason)          \
  do {                                                   \
    const SvidCheck r_ = (check_expr);                   \
    EXPECT_FALSE(r_.ok) << r_.message;                   \
    EXPECT_EQ(r_.reason, want_reason) << r_.message;     \
    EXPECT_TRUE(r_.spiffe_id.empty());                   \
    EXPECT_FALSE(r_.message.empty());                    \
  } while (0)

// ---- issuance and the happy path --------------------------------------------------

TEST_F(PkiTest, PkiIssuedLeafVerifiesAndYieldsSpiffeId) {
  const std::string id = spiffe_id_for_shard("shardguard.local", "default", "llama", 3);
  const Leaf leaf = issue_leaf(*ca_, id, hours(24));
  const SvidCheck r = check(leaf.cert_pem);
  EXPECT_TRUE(r.ok) << r.reason << ": " << r.message;
  EXPECT_EQ(r.reason, "ok");
  EXPECT_EQ(r.spiffe_id, id);
  const SvidCheck as_server = verify_svid(leaf.cert_pem, ca_->cert_pem, Clock::now(), SvidRole::server);
  EXPECT_TRUE(as_server.ok) << as_server.message;
  // The key PEM is the leaf's own key.
  TCert cert = cert_from_pem(leaf.cert_pem);
  TKey key = key_from_pem(leaf.key_pem);
  EXPECT_EQ(X509_check_private_key(cert.get(), key.get()), 1);
}

TEST_F(PkiTest, PkiClientOnlyLeafIsRefusedAsServer) {
  const Leaf leaf = issue_leaf(*ca_, id_, hours(1), /*server_auth=*/false);
  EXPECT_TRUE(check(leaf.cert_pem).ok);
  EXPECT_REFUSED(verify_svid(leaf.cert_pem, ca_->cert_pem, Clock::now(), SvidRole::server), "no_server_auth");
}

TEST_F(PkiTest, PkiCaCertificateHasCaExtensions) {
  TCert ca = cert_from_pem(ca_->cert_pem);
  TKey key = key_from_pem(ca_->key_pem);
  EXPECT_EQ(X509_check_private_key(ca.get(), key.get()), 1);
  EXPECT_GT(X509_check_ca(ca.get()), 0);
  const uint32_t flags = X509_get_extension_flags(ca.get());
  ASSERT_TRUE(flags & EXFLAG_KUSAGE);
  EXPECT_EQ(X509_get_key_usage(ca.get()), static_cast<uint32_t>(KU_KEY_CERT_SIGN | KU_CRL_SIGN));
  const int bc = X509_get_ext_by_NID(ca.get(), NID_basic_constraints, -1);
  ASSERT_GE(bc, 0);
  EXPECT_EQ(X509_EXTENSION_get_critical(X509_get_ext(ca.get(), bc)), 1);
  const int ku = X509_get_ext_by_NID(ca.get(), NID_key_usage, -1);
  ASSERT_GE(ku, 0);
  EXPECT_EQ(X509_EXTENSION_get_critical(X509_get_ext(ca.get(), ku)), 1);
  EXPECT_NE(X509_get0_subject_key_id(ca.get()), nullptr);
  char group[64] = {};
  size_t group_len = 0;
  ASSERT_EQ(EVP_PKEY_get_group_name(key.get(), group, sizeof group, &group_len), 1);
  EXPECT_STREQ(group, "prime256v1");
  // 128-bit random serials: two CAs differ and the serial is large.
  TCert other = cert_from_pem(other_ca_->cert_pem);
  EXPECT_NE(ASN1_INTEGER_cmp(X509_get0_serialNumber(ca.get()), X509_get0_serialNumber(other.get())), 0);
  EXPECT_GE(ASN1_STRING_length(X509_get0_serialNumber(ca.get())), 14);
}

TEST_F(PkiTest, PkiLeafCertificateHasSvidExtensions) {
  const Leaf leaf = issue_leaf(*ca_, id_, hours(1));
  TCert cert = cert_from_pem(leaf.cert_pem);
  TCert ca = cert_from_pem(ca_->cert_pem);
  const uint32_t flags = X509_get_extension_flags(cert.get());
  EXPECT_FALSE(flags & EXFLAG_CA);
  ASSERT_TRUE(flags & EXFLAG_BCONS);
  EXPECT_EQ(X509_get_key_usage(cert.get()), static_cast<uint32_t>(KU_DIGITAL_SIGNATURE | KU_KEY_AGREEMENT));
  EXPECT_EQ(X509_get_extended_key_usage(cert.get()), static_cast<uint32_t>(XKU_SSL_CLIENT | XKU_SSL_SERVER));
  for (int nid : {NID_basic_constraints, NID_key_usage}) {
    const int at = X509_get_ext_by_NID(cert.get(), nid, -1);
    ASSERT_GE(at, 0);
    EXPECT_EQ(X509_EXTENSION_get_critical(X509_get_ext(cert.get(), at)), 1) << OBJ_nid2sn(nid);
  }
  // Authority key id names the CA's subject key id.
  const ASN1_OCTET_STRING* akid = X509_get0_authority_key_id(cert.get());
  ASSERT_NE(akid, nullptr);
  EXPECT_EQ(ASN1_OCTET_STRING_cmp(akid, X509_get0_subject_key_id(ca.get())), 0);
  // Exactly one SAN, a URI equal to the ID.
  GENERAL_NAMES* names =
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert.get(), NID_subject_alt_name, nullptr, nullptr));
  ASSERT_NE(names, nullptr);
  ASSERT_EQ(sk_GENERAL_NAME_num(names), 1);
  const GENERAL_NAME* gn = sk_GENERAL_NAME_value(names, 0);
  EXPECT_EQ(gn->type, GEN_URI);
  const ASN1_IA5STRING* uri = gn->d.uniformResourceIdentifier;
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(uri)), ASN1_STRING_length(uri)), id_);
  GENERAL_NAMES_free(names);
}

TEST_F(PkiTest, PkiLeafValidityAllowsClockSkewAndMatchesLifetime) {
  const auto before = Clock::now();
  const Leaf leaf = issue_leaf(*ca_, id_, hours(24));
  const auto end = not_after(leaf.cert_pem);
  EXPECT_GE(end, before + hours(24) - seconds(2));
  EXPECT_LE(end, Clock::now() + hours(24) + seconds(1));
  // notBefore is a minute in the past: a peer whose clock is 30 s behind accepts it,
  // one that is 5 minutes behind does not.
  EXPECT_TRUE(check(leaf.cert_pem, before - seconds(30)).ok);
  EXPECT_REFUSED(check(leaf.cert_pem, before - std::chrono::minutes(5)), "not_yet_valid");
}

TEST_F(PkiTest, PkiLeafNeverOutlivesItsCa) {
  const CaBundle short_ca = create_ca("short", hours(1));
  const Leaf leaf = issue_leaf(short_ca, id_, hours(24));
  EXPECT_LE(not_after(leaf.cert_pem), not_after(short_ca.cert_pem));
  EXPECT_GT(not_after(leaf.cert_pem), Clock::now() + std::chrono::minutes(50));
}

TEST_F(PkiTest, PkiIssueRefusesBadInput) {
  EXPECT_THROW(issue_leaf(*ca_, "spiffe://shardguard.local/", hours(1)), PkiError);
  EXPECT_THROW(issue_leaf(*ca_, "https://shardguard.local/x", hours(1)), PkiError);
  EXPECT_THROW(issue_leaf(*ca_, "spiffe://Shardguard.local/x", hours(1)), PkiError);
  EXPECT_THROW(issue_leaf(*ca_, id_, seconds(0)), PkiError);
  EXPECT_THROW(issue_leaf(*ca_, id_, seconds(-5)), PkiError);
  // Key from another CA.
  EXPECT_THROW(issue_leaf(CaBundle{ca_->cert_pem, other_ca_->key_pem}, id_, hours(1)), PkiError);
  EXPECT_THROW(issue_leaf(CaBundle{"garbage", ca_->key_pem}, id_, hours(1)), PkiError);
  EXPECT_THROW(issue_leaf(CaBundle{ca_->cert_pem, "garbage"}, id_, hours(1)), PkiError);
  // A leaf is not a CA and cannot issue.
  const Leaf leaf = issue_leaf(*ca_, id_, hours(1));
  EXPECT_THROW(issue_leaf(CaBundle{leaf.cert_pem, leaf.key_pem}, id_, hours(1)), PkiError);
  try {
    issue_leaf(*ca_, "spiffe://td/a?x=1", hours(1));
    FAIL() << "expected PkiError";
  } catch (const PkiError& e) {
    EXPECT_NE(std::string(e.what()).find("query"), std::string::npos) << e.what();
  }
  // Peer-controlled bytes never reach a message raw (log injection).
  try {
    issue_leaf(*ca_, "spiffe://td/a\nforged log line", hours(1));
    FAIL() << "expected PkiError";
  } catch (const PkiError& e) {
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
  }
}

TEST_F(PkiTest, PkiCreateCaRefusesBadInput) {
  EXPECT_THROW(create_ca("", hours(1)), PkiError);
  EXPECT_THROW(create_ca(std::string(65, 'x'), hours(1)), PkiError);
  EXPECT_THROW(create_ca("ca", seconds(0)), PkiError);
}

TEST_F(PkiTest, PkiNotAfterOfGarbageThrows) {
  EXPECT_THROW(not_after("not a certificate"), PkiError);
  EXPECT_THROW(not_after(""), PkiError);
}

// Found by tests/fuzz/svid_fuzz: a notAfter past 2262 overflowed system_clock's
// nanoseconds in from_time_t (undefined behaviour; RFC 5280 even recommends
// 99991231235959Z for "no expiry"). Such dates are clamped to the clock's range.
TEST_F(PkiTest, PkiNotAfterClampsDatesTheClockCannotHold) {
  // A leaf with its notAfter rewritten (not re-signed: not_after reads, it does not verify).
  auto with_not_after = [&](const char* generalized_time) {
    TCert cert = cert_from_pem(issue_leaf(*ca_, id_, hours(1)).cert_pem);
    std::unique_ptr<ASN1_TIME, void (*)(ASN1_TIME*)> t(ASN1_TIME_new(), ASN1_TIME_free);
    EXPECT_EQ(ASN1_TIME_set_string(t.get(), generalized_time), 1) << generalized_time;
    EXPECT_EQ(X509_set1_notAfter(cert.get(), t.get()), 1);
    EXPECT_GT(i2d_re_X509_tbs(cert.get(), nullptr), 0);  // drop the cached encoding
    TBio bio(BIO_new(BIO_s_mem()));
    EXPECT_EQ(PEM_write_bio_X509(bio.get(), cert.get()), 1);
    char* data = nullptr;
    const long len = BIO_get_mem_data(bio.get(), &data);
    return std::string(data, static_cast<size_t>(len));
  };
  EXPECT_EQ(not_after(with_not_after("99991231235959Z")), Clock::time_point::max());
  EXPECT_EQ(not_after(with_not_after("25260101000000Z")), Clock::time_point::max());
  EXPECT_EQ(not_after(with_not_after("16000101000000Z")), Clock::time_point::min());
  EXPECT_EQ(not_after(with_not_after("22000101000000Z")), Clock::from_time_t(7258118400));  // 2200
}

TEST_F(PkiTest, PkiVerifiesAgainstMultiCaBundle) {
  const Leaf leaf = issue_leaf(*ca_, id_, hours(1));
  const SvidCheck r = verify_svid(leaf.cert_pem, other_ca_->cert_pem + ca_->cert_pem, Clock::now());
  EXPECT_TRUE(r.ok) << r.message;
  // A corrupt second block invalidates the whole bundle rather than being skipped.
  std::string corrupt = ca_->cert_pem;
  corrupt[corrupt.size() / 2] = '!';
  EXPECT_REFUSED(verify_svid(leaf.cert_pem, ca_->cert_pem + corrupt, Clock::now()), "malformed");
}

// ---- refusals ----------------------------------------------------------------------

TEST_F(PkiTest, PkiHelperDefaultLeafVerifies) {
  // Control: each refusal below changes exactly one property of this leaf.
  const SvidCheck r = check(build_leaf(*ca_, LeafSpec{}));
  EXPECT_TRUE(r.ok) << r.reason << ": " << r.message;
  EXPECT_EQ(r.spiffe_id, id_);
}

TEST_F(PkiTest, PkiRefusesLeafFromAnotherCa) {
  EXPECT_REFUSED(check(issue_leaf(*other_ca_, id_, hours(1)).cert_pem), "untrusted");
  EXPECT_REFUSED(check(build_leaf(*other_ca_, LeafSpec{})), "untrusted");
}

TEST_F(PkiTest, PkiRefusesSelfSignedLeaf) {
  LeafSpec spec;
  spec.self_signed = true;
  const std::string leaf = build_leaf(*ca_, spec);
  EXPECT_REFUSED(check(leaf), "self_signed");
  // Even when the peer also offers it as its own trust anchor.
  EXPECT_REFUSED(verify_svid(leaf, leaf, Clock::now()), "self_signed");
  EXPECT_REFUSED(verify_svid(leaf, ca_->cert_pem + leaf, Clock::now()), "self_signed");
}

TEST_F(PkiTest, PkiRefusesExpiredLeaf) {
  const Leaf leaf = issue_leaf(*ca_, id_, hours(1));
  EXPECT_TRUE(check(leaf.cert_pem, not_after(leaf.cert_pem) - seconds(1)).ok);
  EXPECT_REFUSED(check(leaf.cert_pem, not_after(leaf.cert_pem) + seconds(1)), "expired");
  LeafSpec spec;
  spec.not_before = -7200;
  spec.not_after = -3600;
  EXPECT_REFUSED(check(build_leaf(*ca_, spec)), "expired");
}

TEST_F(PkiTest, PkiRefusesNotYetValidLeaf) {
  LeafSpec spec;
  spec.not_before = 3600;
  spec.not_after = 7200;
  const std::string leaf = build_leaf(*ca_, spec);
  EXPECT_REFUSED(check(leaf), "not_yet_valid");
  EXPECT_TRUE(check(leaf, Clock::now() + std::chrono::minutes(90)).ok);
}

TEST_F(PkiTest, PkiRefusesTwoUriSans) {
  LeafSpec spec;
  spec.san = "URI:" + id_ + ",URI:spiffe://shardguard.local/ns/default/job/j/shard/1";
  EXPECT_REFUSED(check(build_leaf(*ca_, spec)), "multiple_uri_sans");
}

TEST_F(PkiTest, PkiRefusesNonSpiffeUriSan) {
  LeafSpec spec;
  spec.san = "URI:https://shardguard.local/ns/default/job/j/shard/0";
  EXPECT_REFUSED(check(build_leaf(*ca_, spec)), "not_spiffe");
}

TEST_F(PkiTest, PkiRefusesInvalidSpiffeIdInUriSan) {
  for (const char* uri : {"spiffe://shardguard.local/ns/../shard/0", "spiffe://shardguard.local",
                                "spiffe://ShardGuard.local/x", "SPIFFE://shardguard.local/x"}) {
    LeafSpec spec;
    spec.san = std::string("URI:") + uri;
    EXPECT_REFUSED(check(build_leaf(*ca_, spec)), "invalid_spiffe_id");
  }
}

TEST_F(PkiTest, PkiRefusesSpiffeIdOnlyInDnsSan) {
  LeafSpec spec;
  spec.san = "DNS:" + id_;
  const SvidCheck r = check(build_leaf(*ca_, spec));
  EXPECT_REFUSED(r, "no_uri_san");
  EXPECT_NE(r.message.find("DNS"), std::string::npos) << r.message;
  spec.san = "";
  EXPECT_REFUSED(check(build_leaf(*ca_, spec)), "no_uri_san");
  // A DNS SAN next to a valid URI SAN is fine: only URI SANs count.
  spec.san = "DNS:shard-0.local,URI:" + id_;
  EXPECT_TRUE(check(build_leaf(*ca_, spec)).ok);
}

TEST_F(PkiTest, PkiRefusesLeafWithCaTrue) {
  LeafSpec spec;
  spec.basic_constraints = "critical,CA:TRUE";
  spec.key_usage = "critical,digitalSignature";
  EXPECT_REFUSED(check(build_leaf(*ca_, spec)), "leaf_is_ca");
}

// Issue 16 item 5: leaves the job CA did sign, but weakly: each refused with its own
// reason (openssl verify -auth_level 2 refuses the first two as well).
TEST_F(PkiTest, PkiRefusesWeakSignaturesAndKeys) {
  LeafSpec spec;
  spec.digest = "SHA1";
  SvidCheck r = check(build_leaf(*ca_, spec));
  EXPECT_REFUSED(r, "weak_signature");
  EXPECT_NE(r.message.find("SHA1"), std::string::npos) << r.message;
  spec = LeafSpec{};
  spec.key = "RSA:1024";
  r = check(build_leaf(*ca_, spec));
  EXPECT_REFUSED(r, "weak_key");
  EXPECT_NE(r.message.find("RSA 1024 bits"), std::string::npos) << r.message;
  spec.key = "EC:P-224";
  EXPECT_REFUSED(check(build_leaf(*ca_, spec)), "weak_key");
  // What the design issues and what is stronger pass.
  for (const char* key : {"EC:P-256", "EC:P-384", "RSA:2048"}) {
    spec.key = key;
    EXPECT_TRUE(check(build_leaf(*ca_, spec)).ok) << key;
  }
  spec = LeafSpec{};
  spec.digest = "SHA384";
  EXPECT_TRUE(check(build_leaf(*ca_, spec)).ok);
}

TEST_F(PkiTest, PkiRefusesLeafWithoutBasicConstraints) {
  LeafSpec spec;
  spec.basic_constraints = "";
  const SvidCheck r = check(build_leaf(*ca_, spec));
  EXPECT_REFUSED(r, "no_basic_constraints");
  EXPECT_NE(r.message.find("CA:FALSE"), std::string::npos) << r.message;
  spec.basic_constraints = "CA:FALSE";  // present but not critical: allowed
  EXPECT_TRUE(check(build_leaf(*ca_, spec)).ok);
}

TEST_F(PkiTest, PkiRefusesLeafWithKeyCertSign) {
  LeafSpec spec;
  spec.key_usage = "critical,digitalSignature,keyCertSign";
  EXPECT_REFUSED(check(build_leaf(*ca_, spec)), "key_cert_sign");
  spec.key_usage = "critical,digitalSignature,cRLSign";
  EXPECT_REFUSED(check(build_leaf(*ca_, spec)), "key_cert_sign");
  spec.key_usage = "critical,keyAgreement";
  EXPECT_REFUSED(check(build_leaf(*ca_, spec)), "no_digital_signature");
}

TEST_F(PkiTest, PkiRefusesLeafWithoutClientAuth) {
  LeafSpec spec;
  spec.eku = "serverAuth";
  EXPECT_REFUSED(check(build_leaf(*ca_, spec)), "no_client_auth");
  spec.eku = "";  // no EKU extension at all
  EXPECT_REFUSED(check(build_leaf(*ca_, spec)), "no_client_auth");
}

TEST_F(PkiTest, PkiRefusesGarbagePem) {
  const Leaf leaf = issue_leaf(*ca_, id_, hours(1));
  EXPECT_REFUSED(check("garbage"), "malformed");
  EXPECT_REFUSED(check(""), "malformed");
  EXPECT_REFUSED(check("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), "malformed");
  std::string truncated = leaf.cert_pem.substr(0, leaf.cert_pem.size() / 2);
  EXPECT_REFUSED(check(truncated), "malformed");
  EXPECT_REFUSED(verify_svid(leaf.cert_pem, "garbage", Clock::now()), "malformed");
  EXPECT_REFUSED(verify_svid(leaf.cert_pem, "", Clock::now()), "malformed");
  // Nothing left on the OpenSSL error queue for the caller to trip over.
  EXPECT_EQ(ERR_peek_error(), 0UL);
}

// ---- SPIFFE IDs ---------------------------------------------------------------------

TEST(PkiSpiffeId, PkiBuildersFollowDesign) {
  EXPECT_EQ(spiffe_id_for_shard("shardguard.local", "default", "llama", 7),
            "spiffe://shardguard.local/ns/default/job/llama/shard/7");
  EXPECT_EQ(spiffe_id_for_exporter("shardguard.local", "team-a", "llama"),
            "spiffe://shardguard.local/ns/team-a/job/llama/role/exporter");
  EXPECT_EQ(spiffe_id_for_shard(kDefaultTrustDomain, "ns", "j", 4294967295u),
            "spiffe://shardguard.local/ns/ns/job/j/shard/4294967295");
  EXPECT_THROW(spiffe_id_for_shard("shardguard.local", "a/b", "j", 0), PkiError);
  EXPECT_THROW(spiffe_id_for_shard("shardguard.local", "", "j", 0), PkiError);
  EXPECT_THROW(spiffe_id_for_shard("Shardguard.local", "ns", "j", 0), PkiError);
  EXPECT_THROW(spiffe_id_for_exporter("shardguard.local", "ns", ".."), PkiError);
  EXPECT_THROW(spiffe_id_for_exporter("", "ns", "j"), PkiError);
  EXPECT_THROW(spiffe_id_for_exporter("shardguard.local", "ns", "j/role/x"), PkiError);
  EXPECT_THROW(spiffe_id_for_shard("shardguard.local/ns/x", "ns", "j", 0), PkiError);
}

TEST(PkiSpiffeId, ReplicaIdParsesBackToItsBuilder) {
  const std::string shard = "spiffe://shardguard.local/ns/ml/job/fm/shard/3";
  for (uint32_t r : {0u, 1u, 15u, 4294967295u}) {
    const auto p = parse_replica_spiffe_id(spiffe_id_for_replica("shardguard.local", "ml", "fm", 3, r));
    ASSERT_TRUE(p.has_value()) << r;
    EXPECT_EQ(p->shard_id, shard);
    EXPECT_EQ(p->index, 3u);
    EXPECT_EQ(p->replica, r);
  }
  // Anything the builder would not make is no replica's ID.
  for (const std::string& id :
       {shard, shard + "/replica", shard + "/replica/", shard + "/replica/01", shard + "/replica/+1",
        shard + "/replica/-1", shard + "/replica/1x", shard + "/replica/4294967296", shard + "/replica/99999999999",
        shard + "/replica/1/x", std::string("spiffe://shardguard.local/ns/ml/job/fm/shard/03/replica/1"),
        std::string("spiffe://shardguard.local/ns/ml/job/fm/role/exporter"),
        std::string("spiffe://shardguard.local/x/ml/job/fm/shard/3/replica/1"),
        std::string("spiffe://shardguard.local/ns/ml/job/fm/shard/3/replicas/1"),
        std::string("spiffe://shardguard.local/extra/ns/ml/job/fm/shard/3/replica/1"),
        std::string("spiffe://shardguard.local/ns/ml//job/fm/shard/3/replica/1"),
        std::string("http://shardguard.local/ns/ml/job/fm/shard/3/replica/1"), std::string("")}) {
    EXPECT_FALSE(parse_replica_spiffe_id(id).has_value()) << id;
  }
}

TEST(PkiSpiffeId, PkiValidIds) {
  const std::string max_len = "spiffe://td/" + std::string(kMaxSpiffeIdBytes - 12, 'a');
  ASSERT_EQ(max_len.size(), kMaxSpiffeIdBytes);
  for (const std::string& id : {std::string("spiffe://shardguard.local/ns/default/job/j/shard/0"),
                               std::string("spiffe://td/a"), std::string("spiffe://a_b-c.9/X.y-Z_0"),
                               std::string("spiffe://td/..."), std::string("spiffe://td/.a/a."), max_len}) {
    EXPECT_EQ(validate_spiffe_id(id), "") << id;
  }
}

TEST(PkiSpiffeId, PkiInvalidIds) {
  struct Case {
    std::string id;
    std::string expect;  // substring of the error
  };
  const std::vector<Case> cases = {
      {"", "spiffe://"},
      {"http://td/a", "spiffe://"},
      {"SPIFFE://td/a", "spiffe://"},
      {"spiffe:/td/a", "spiffe://"},
      {"spiffe://", "trust domain is empty"},
      {"spiffe:///a", "trust domain is empty"},
      {"spiffe://td", "path is empty"},
      {"spiffe://td/", "root"},
      {"spiffe://td/a/", "trailing"},
      {"spiffe://td//a", "empty segment"},
      {"spiffe://td/a//b", "empty segment"},
      {"spiffe://td/.", "\"..\""},
      {"spiffe://td/a/./b", "\"..\""},
      {"spiffe://td/a/../b", "\"..\""},
      {"spiffe://td/..", "\"..\""},
      {"spiffe://td/a?x=1", "query"},
      {"spiffe://td?x=1", "query"},
      {"spiffe://td/a#frag", "fragment"},
      {"spiffe://td/a?#", "query"},
      {"spiffe://Td/a", "lower-case"},
      {"spiffe://TD.LOCAL/a", "lower-case"},
      {"spiffe://td:8080/a", "port"},
      {"spiffe://user@td/a", "userinfo"},
      {"spiffe://td/a%2Fb", "percent"},
      {"spiffe://td/a b", "invalid byte 0x20"},
      {"spiffe://td/a\\b", "invalid character"},
      {"spiffe://td/caf\xc3\xa9", "invalid byte"},
      {std::string("spiffe://td/a\0b", 15), "invalid byte"},
      {"spiffe://t d/a", "invalid"},
      {"spiffe://td/" + std::string(kMaxSpiffeIdBytes - 11, 'a'), "2048"},
  };
  for (const Case& c : cases) {
    const std::string err = validate_spiffe_id(c.id);
    EXPECT_FALSE(err.empty()) << "accepted: " << c.id;
    EXPECT_NE(err.find(c.expect), std::string::npos) << c.id << " -> " << err;
  }
  // 2049 bytes exactly.
  EXPECT_EQ(cases.back().id.size(), kMaxSpiffeIdBytes + 1);
}

}  // namespace
}  // namespace shardguard

// A job the API server accepts (namespace up to 63, name up to 52 characters) gets a CA
// whose CN fits X.509's 64; two such jobs never share one.
TEST(JobCaName, FitsAndStaysDistinct) {
  EXPECT_EQ(shardguard::job_ca_common_name("shardguard.local", "ml", "fmnist"),
            "ShardGuard CA shardguard.local ns/ml job/fmnist");
  const std::string ns(63, 'n');
  const std::string a = shardguard::job_ca_common_name("shardguard.local", ns, std::string(52, 'a'));
  const std::string b = shardguard::job_ca_common_name("shardguard.local", ns, std::string(51, 'a') + "b");
  EXPECT_EQ(a.size(), 64u);
  EXPECT_EQ(b.size(), 64u);
  EXPECT_NE(a, b);
  EXPECT_EQ(a.rfind("ShardGuard CA shardguard.local ns/", 0), 0u);
  EXPECT_NO_THROW(shardguard::create_ca(a, std::chrono::hours(1)));
}
