// The decode/validate kit (common/decode.h): paths, the rules for null and whole
// floats, and the one wording of each kind of refusal.
#include "shardguard/common/decode.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

namespace shardguard {
namespace {

using json = nlohmann::json;
using decode::Reader;

const Reader::Rules kJobRules{/*null_is_absent=*/true, /*whole_floats_are_integers=*/true};
const Reader::Rules kStrictRules{/*null_is_absent=*/false, /*whole_floats_are_integers=*/false};

std::string only_error(const Reader& r) {
  EXPECT_EQ(r.errors.size(), 1u);
  return r.errors.empty() ? "" : r.errors[0].str();
}

TEST(Decode, PathsAndRequiredFields) {
  EXPECT_EQ(decode::child("", "spec"), "spec");
  EXPECT_EQ(decode::child("spec", "model"), "spec.model");
  // An empty key still gets a path that points somewhere (policy_fuzz found the root's).
  EXPECT_EQ(decode::child("", ""), "[\"\"]");
  EXPECT_EQ(decode::child("spec", ""), "spec[\"\"]");
  EXPECT_EQ(decode::at("ingress", 3), "ingress[3]");
  Reader r(kStrictRules);
  const json obj = {{"a", 1}};
  EXPECT_NE(r.require(obj, "spec", "a"), nullptr);
  EXPECT_EQ(r.require(obj, "spec", "b"), nullptr);
  EXPECT_EQ(only_error(r), "spec.b: required, got nothing");
  EXPECT_TRUE(r.covers("spec.b.c"));
  EXPECT_TRUE(r.covers("spec.b[0]"));
  EXPECT_FALSE(r.covers("spec.bc"));
}

TEST(Decode, NullIsAbsentOnlyWhenTheRulesSaySo) {
  const json obj = {{"a", nullptr}};
  Reader job(kJobRules);
  EXPECT_EQ(job.find(obj, "a"), nullptr);
  EXPECT_EQ(job.string(job.find(obj, "a"), "a"), std::nullopt);
  EXPECT_TRUE(job.errors.empty());
  Reader strict(kStrictRules);
  EXPECT_EQ(strict.string(strict.find(obj, "a"), "a"), std::nullopt);
  EXPECT_EQ(only_error(strict), "a: expected a string, got null");
}

TEST(Decode, IntegersFitTheirTypeAndWholeFloatsOnlyWhenAllowed) {
  Reader job(kJobRules);
  const json two = 2.0;
  EXPECT_EQ(job.integer<int>(&two, "n"), 2);
  const json half = 2.5;
  EXPECT_EQ(job.integer<int>(&half, "n"), std::nullopt);
  EXPECT_EQ(only_error(job), "n: expected an integer, got number 2.5");

  Reader strict(kStrictRules);
  EXPECT_EQ(strict.integer<int>(&two, "n"), std::nullopt);
  EXPECT_EQ(only_error(strict), "n: expected an integer, got number 2.0");

  Reader range(kStrictRules);
  const json big = 3000000000LL;
  EXPECT_EQ(range.integer<int>(&big, "n"), std::nullopt);
  EXPECT_EQ(only_error(range), "n: out of range [-2147483648, 2147483647], got 3000000000");
  EXPECT_EQ(range.integer<int64_t>(&big, "n"), 3000000000LL);
  const json min = std::numeric_limits<int64_t>::min();
  EXPECT_EQ(range.integer<int64_t>(&min, "n"), std::numeric_limits<int64_t>::min());
  const json huge = std::numeric_limits<uint64_t>::max();
  Reader over(kStrictRules);
  EXPECT_EQ(over.integer<int64_t>(&huge, "n"), std::nullopt);
  EXPECT_EQ(only_error(over),
            "n: out of range [-9223372036854775808, 9223372036854775807], got 18446744073709551615");
  Reader unsigned_(kStrictRules);
  const json minus = -1;
  EXPECT_EQ(unsigned_.integer<uint64_t>(&minus, "n"), std::nullopt);
  EXPECT_EQ(only_error(unsigned_), "n: expected a non-negative integer, got integer -1");
}

TEST(Decode, UnknownFieldsSuggestTheClosestName) {
  Reader r(kStrictRules);
  r.known_fields(json{{"hiden", 1}, {"hidden", 2}, {"zzz", 3}}, "spec.model", {"hidden", "depth"});
  ASSERT_EQ(r.errors.size(), 2u);
  EXPECT_EQ(r.errors[0].str(), "spec.model.hiden: unknown field \"hiden\" (did you mean \"hidden\"?)");
  EXPECT_EQ(r.errors[1].str(), "spec.model.zzz: unknown field \"zzz\" (known fields: hidden, depth)");
}

TEST(Decode, ValuesInMessagesAreSafeAndShort) {
  EXPECT_EQ(decode::quote("a\"b"), "\"a\\\"b\"");
  EXPECT_EQ(decode::quote("\xff"), "\"\\ufffd\"");        // invalid UTF-8 replaced
  EXPECT_EQ(decode::quote("\xc3\xa9"), "\"\\u00e9\"");    // ASCII only
  const std::string cut = decode::quote(std::string(500, 'x'));
  EXPECT_EQ(cut, "\"" + std::string(160, 'x') + "\"... (500 bytes)");
  EXPECT_EQ(decode::got(json(nullptr)), "got null");
  EXPECT_EQ(decode::got(json("64")), "got string \"64\"");
  EXPECT_EQ(decode::show(json(std::string(200, 'y'))).size(), 83u);
}

TEST(Decode, EnumsLabelsAndSpiffeIds) {
  Reader r(kStrictRules);
  EXPECT_TRUE(r.one_of("p", "b", "value", {"a", "b"}));
  EXPECT_FALSE(r.one_of("p", "c", "value", {"a", "b"}));
  EXPECT_FALSE(r.one_of("p", "", "value", {"a", "b"}));
  EXPECT_TRUE(r.dns_label("l", "ok-1"));
  EXPECT_FALSE(r.dns_label("l", "Not_OK"));
  EXPECT_FALSE(r.dns_label("l", std::string(64, 'a')));
  EXPECT_TRUE(r.spiffe_id("s", "spiffe://td/x"));
  EXPECT_FALSE(r.spiffe_id("s", "spiffe://td"));
  ASSERT_EQ(r.errors.size(), 5u);
  EXPECT_EQ(r.errors[0].str(), "p: unsupported value \"c\" (expected one of: \"a\", \"b\")");
  EXPECT_EQ(r.errors[1].str(), "p: required, got nothing (expected one of: \"a\", \"b\")");
  EXPECT_EQ(r.errors[2].str(),
            "l: must be a DNS-1123 label (lower-case letters, digits and '-', starting and ending "
            "with a letter or digit), got \"Not_OK\"");
  EXPECT_EQ(r.errors[3].str(), "l: must be at most 63 characters, got 64");
  EXPECT_EQ(r.errors[4].str(),
            "s: must be a SPIFFE ID (spiffe://<trust-domain>/<path>): path is empty (workload IDs "
            "need a path), got \"spiffe://td\"");
}

TEST(Decode, ErrorListsEveryProblem) {
  const DecodeError plain("", {{"a", "x"}, {"b", "y"}});
  EXPECT_STREQ(plain.what(), "a: x\nb: y");
  const DecodeError headed("invalid thing:", {{"a", "x"}});
  EXPECT_STREQ(headed.what(), "invalid thing:\n  a: x");
  EXPECT_EQ(headed.errors().size(), 1u);
}

}  // namespace
}  // namespace shardguard
