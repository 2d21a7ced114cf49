// The exposure ledger: IntervalSet (pure), ExposureLedger (pure) and its HMAC'd
// persistence through real temp files, with tampering done on the file's bytes.
#include "shardguard/sidecar/ledger.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/common/files.h"
#include "support/temp_dir.h"

namespace shardguard::sidecar {
namespace {

constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
const std::string kAlice = "spiffe://shardguard.local/ns/ml/job/j/role/exporter";
const std::string kBob = "spiffe://shardguard.local/ns/ml/job/j/shard/1";
const std::string kKey(32, 'k');

// ---- IntervalSet -------------------------------------------------------------

TEST(LedgerIntervalSet, EmptySet) {
  IntervalSet s;
  EXPECT_TRUE(s.empty());
  EXPECT_EQ(s.covered(), 0u);
  EXPECT_FALSE(s.contains(0));
  EXPECT_FALSE(s.contains(kMax));
  EXPECT_TRUE(s.contains(5, 5));  // empty range
  EXPECT_EQ(s.uncovered(10, 20), 10u);
}

TEST(LedgerIntervalSet, EmptyAndInvertedRangesAddNothing) {
  IntervalSet s;
  EXPECT_EQ(s.add(5, 5), 0u);
  EXPECT_EQ(s.add(9, 3), 0u);
  EXPECT_TRUE(s.empty());
  EXPECT_EQ(s.uncovered(9, 3), 0u);
  EXPECT_EQ(s.uncovered(7, 7), 0u);
}

TEST(LedgerIntervalSet, AddCountsOnlyNewBytes) {
  IntervalSet s;
  EXPECT_EQ(s.add(0, 100), 100u);
  EXPECT_EQ(s.add(0, 100), 0u);  // re-sent: not counted again
  EXPECT_EQ(s.add(50, 150), 50u);
  EXPECT_EQ(s.covered(), 150u);
  EXPECT_EQ(s.ranges(), (std::vector<ByteRange>{{0, 150}}));
}

TEST(LedgerIntervalSet, HalfOpen) {
  IntervalSet s;
  s.add(10, 20);
  EXPECT_FALSE(s.contains(9));
  EXPECT_TRUE(s.contains(10));
  EXPECT_TRUE(s.contains(19));
  EXPECT_FALSE(s.contains(20));
  EXPECT_TRUE(s.contains(10, 20));
  EXPECT_FALSE(s.contains(10, 21));
  EXPECT_FALSE(s.contains(9, 20));
}

TEST(LedgerIntervalSet, AdjacentRangesMerge) {
  IntervalSet s;
  EXPECT_EQ(s.add(10, 20), 10u);
  EXPECT_EQ(s.add(20, 30), 10u);  // touches on the right
  EXPECT_EQ(s.add(0, 10), 10u);   // touches on the left
  EXPECT_EQ(s.ranges(), (std::vector<ByteRange>{{0, 30}}));
  EXPECT_EQ(s.covered(), 30u);
}

TEST(LedgerIntervalSet, DisjointRangesStaySeparate) {
  IntervalSet s;
  s.add(40, 50);
  s.add(0, 10);
  s.add(20, 30);
  EXPECT_EQ(s.ranges(), (std::vector<ByteRange>{{0, 10}, {20, 30}, {40, 50}}));
  EXPECT_EQ(s.covered(), 30u);
  EXPECT_FALSE(s.contains(15));
  EXPECT_EQ(s.uncovered(5, 45), 20u);  // gaps [10,20) and [30,40)
}

TEST(LedgerIntervalSet, BridgingRangeMergesMany) {
  IntervalSet s;
  s.add(0, 10);
  s.add(20, 30);
  s.add(40, 50);
  s.add(60, 70);
  EXPECT_EQ(s.uncovered(5, 65), 30u);
  EXPECT_EQ(s.add(5, 65), 30u);
  EXPECT_EQ(s.ranges(), (std::vector<ByteRange>{{0, 70}}));
  EXPECT_EQ(s.covered(), 70u);
}

TEST(LedgerIntervalSet, NestedRanges) {
  IntervalSet s;
  EXPECT_EQ(s.add(0, 100), 100u);
  EXPECT_EQ(s.add(10, 20), 0u);  // inside
  EXPECT_EQ(s.add(0, 100), 0u);  // equal
  EXPECT_EQ(s.uncovered(30, 40), 0u);
  IntervalSet t;
  t.add(40, 50);
  t.add(60, 70);
  EXPECT_EQ(t.add(0, 100), 80u);  // contains both
  EXPECT_EQ(t.ranges(), (std::vector<ByteRange>{{0, 100}}));
}

TEST(LedgerIntervalSet, PartialOverlapOnBothSides) {
  IntervalSet s;
  s.add(10, 20);
  s.add(30, 40);
  EXPECT_EQ(s.uncovered(15, 35), 10u);
  EXPECT_EQ(s.add(15, 35), 10u);
  EXPECT_EQ(s.ranges(), (std::vector<ByteRange>{{10, 40}}));
}

TEST(LedgerIntervalSet, HugeValuesDoNotOverflow) {
  IntervalSet s;
  EXPECT_EQ(s.add(kMax - 10, kMax), 10u);
  EXPECT_TRUE(s.contains(kMax - 1));
  EXPECT_FALSE(s.contains(kMax));  // half-open: UINT64_MAX itself can never be covered
  EXPECT_EQ(s.add(kMax - 20, kMax - 10), 10u);
  EXPECT_EQ(s.ranges(), (std::vector<ByteRange>{{kMax - 20, kMax}}));
  EXPECT_EQ(s.uncovered(0, kMax), kMax - 20);
  EXPECT_EQ(s.add(0, kMax), kMax - 20);
  EXPECT_EQ(s.covered(), kMax);
  EXPECT_EQ(s.add(0, kMax), 0u);
  EXPECT_EQ(s.uncovered(0, kMax), 0u);
  EXPECT_TRUE(s.contains(0, kMax));
}

// ---- ExposureLedger ------------------------------------------------------------

TEST(LedgerExposure, RecordCountsUniqueBytesPerPrincipalAndShard) {
  ExposureLedger l;
  EXPECT_EQ(l.record(kAlice, 0, 0, 1000), 1000u);
  EXPECT_EQ(l.record(kAlice, 0, 0, 1000), 0u);
  EXPECT_EQ(l.record(kAlice, 0, 500, 1500), 500u);
  EXPECT_EQ(l.record(kAlice, 1, 0, 1000), 1000u);  // another shard counts separately
  EXPECT_EQ(l.record(kBob, 0, 0, 1000), 1000u);    // another principal too
  EXPECT_EQ(l.record(kBob, 0, 7, 7), 0u);
  EXPECT_EQ(l.exposed_bytes(kAlice, 0), 1500u);
  EXPECT_EQ(l.exposed_bytes(kAlice, 1), 1000u);
  EXPECT_EQ(l.exposed_bytes(kAlice), 2500u);
  EXPECT_EQ(l.exposed_bytes(kBob), 1000u);
  EXPECT_EQ(l.exposed_bytes("spiffe://nobody", 0), 0u);
  EXPECT_EQ(l.ranges("spiffe://nobody", 0), nullptr);
}

TEST(LedgerExposure, Ratio) {
  ExposureLedger l;
  l.record(kAlice, 0, 0, 250);
  EXPECT_EQ(l.ratio(kAlice, 0), 0.0);  // size unknown
  l.set_shard_bytes(0, 1000);
  EXPECT_DOUBLE_EQ(l.ratio(kAlice, 0), 0.25);
  l.record(kAlice, 0, 0, 5000);  // beyond the shard: the proxy should have refused; clamped
  EXPECT_DOUBLE_EQ(l.ratio(kAlice, 0), 1.0);
  l.set_shard_bytes(1, 0);
  l.record(kAlice, 1, 0, 10);
  EXPECT_EQ(l.ratio(kAlice, 1), 0.0);
  EXPECT_EQ(l.ratio(kBob, 0), 0.0);
}

TEST(LedgerExposure, BudgetCountsOnlyNewBytesOverAllShards) {
  ExposureLedger l;
  l.record(kAlice, 0, 0, 600);
  l.record(kAlice, 1, 0, 300);  // 900 of a 1000 budget used
  EXPECT_FALSE(l.would_exceed(kAlice, 1000, 0, 0, 600));    // all already received
  EXPECT_FALSE(l.would_exceed(kAlice, 1000, 0, 500, 700));  // 100 new: exactly at budget
  EXPECT_TRUE(l.would_exceed(kAlice, 1000, 0, 500, 701));
  EXPECT_TRUE(l.would_exceed(kAlice, 1000, 2, 0, 101));     // a new shard counts too
  EXPECT_FALSE(l.would_exceed(kBob, 1000, 0, 0, 1000));
  EXPECT_TRUE(l.would_exceed(kBob, 0, 0, 0, 1));
  EXPECT_FALSE(l.would_exceed(kBob, 0, 0, 1, 1));
  EXPECT_TRUE(l.would_exceed(kAlice, kMax - 1, 3, 0, kMax));  // 900 + (2^64-1) saturates, no wrap
}

TEST(LedgerExposure, TryRecordIsCheckThenRecord) {
  ExposureLedger l;
  EXPECT_EQ(l.try_record(kAlice, 100, 0, 0, 80), 80u);
  EXPECT_EQ(l.try_record(kAlice, 100, 0, 50, 130), std::nullopt);
  EXPECT_EQ(l.exposed_bytes(kAlice), 80u);  // nothing recorded on refusal
  EXPECT_EQ(l.try_record(kAlice, 100, 0, 0, 100), 20u);
  EXPECT_EQ(l.try_record(kAlice, 100, 0, 0, 100), 0u);  // re-sending is free
}

TEST(LedgerExposure, Entries) {
  ExposureLedger l;
  l.set_shard_bytes(1, 100);
  l.record(kBob, 1, 0, 50);
  l.record(kAlice, 1, 0, 10);
  l.record(kAlice, 0, 0, 5);
  auto e = l.entries();
  ASSERT_EQ(e.size(), 3u);
  EXPECT_EQ(e[0].principal, kAlice);
  EXPECT_EQ(e[0].shard, 0u);
  EXPECT_EQ(e[0].exposed_bytes, 5u);
  EXPECT_EQ(e[1].shard, 1u);
  EXPECT_DOUBLE_EQ(e[1].ratio, 0.1);
  EXPECT_EQ(e[2].principal, kBob);
  EXPECT_DOUBLE_EQ(e[2].ratio, 0.5);
}

TEST(LedgerHmac, KnownAnswerRfc4231Case2) {
  EXPECT_EQ(hmac_sha256_hex("Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

// ---- persistence ---------------------------------------------------------------

class LedgerFile : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_ + "/ledger.json";
  }

  static ExposureLedger sample() {
    ExposureLedger l;
    l.set_shard_bytes(0, 1 << 20);
    l.set_shard_bytes(1, kMax);
    l.record(kAlice, 0, 0, 4096);
    l.record(kAlice, 0, 8192, 12288);
    l.record(kAlice, 1, kMax - 5, kMax);
    l.record(kBob, 0, 100, 200);
    return l;
  }

  // Replaces the first occurrence of from by to in the file's bytes.
  void edit(const std::string& from, const std::string& to) {
    std::string text = read_file(path_);
    auto pos = text.find(from);
    ASSERT_NE(pos, std::string::npos) << from;
    text.replace(pos, from.size(), to);
    write_file_atomic(path_, text, 0600);
  }

  // The LedgerError message of load(), or "" if it loaded.
  std::string load_error(const std::string& key = kKey) {
    try {
      ExposureLedger::load(path_, key);
    } catch (const LedgerError& e) {
      return e.what();
    }
    return "";
  }

  const testsupport::TempDir tmp_{"ledger_test"};
  const std::string dir_ = tmp_.str();
  std::string path_;
};

TEST_F(LedgerFile, MissingFileIsEmpty) {
  ExposureLedger l = ExposureLedger::load(path_, kKey);
  EXPECT_TRUE(l.entries().empty());
  EXPECT_TRUE(l == ExposureLedger{});
}

TEST_F(LedgerFile, RoundTripWithMode0600) {
  ExposureLedger l = sample();
  l.save(path_, kKey);
  struct stat st {};
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ExposureLedger back = ExposureLedger::load(path_, kKey);
  EXPECT_TRUE(back == l);
  EXPECT_EQ(back.exposed_bytes(kAlice, 0), 8192u);
  EXPECT_EQ(back.exposed_bytes(kAlice, 1), 5u);
  EXPECT_EQ(back.shard_bytes(1), kMax);
  // A restart does not reset the budget.
  EXPECT_TRUE(back.would_exceed(kAlice, 8197, 0, 4096, 4097));
  EXPECT_EQ(back.sequence(), 1u);
  // Saving again over the old file works and is deterministic.
  back.save(path_, kKey);
  l.set_sequence(2);
  EXPECT_EQ(read_file(path_), l.serialize(kKey));
}

TEST_F(LedgerFile, EverySaveRaisesTheSealedSequence) {
  ExposureLedger l = sample();
  EXPECT_EQ(l.sequence(), 0u);
  l.save(path_, kKey);
  const std::string first = read_file(path_);
  l.record(kBob, 0, 0, 1);
  l.save(path_, kKey);
  l.save(path_, kKey);  // nothing new recorded: still a new sequence
  EXPECT_EQ(l.sequence(), 3u);
  EXPECT_EQ(ExposureLedger::load(path_, kKey).sequence(), 3u);
  // An older copy put back verifies (it is genuine), with its older sequence: only
  // the sequence tells it apart.
  write_file_atomic(path_, first, 0600);
  EXPECT_EQ(load_error(), "");
  EXPECT_EQ(ExposureLedger::load(path_, kKey).sequence(), 1u);
  // The sequence is under the HMAC: raising it by hand breaks the seal.
  edit("\"sequence\": 1", "\"sequence\": 9");
  EXPECT_NE(load_error().find("HMAC does not verify"), std::string::npos);
}

TEST_F(LedgerFile, LoadExistingTellsMissingFromEmpty) {
  EXPECT_FALSE(ExposureLedger::load_existing(path_, kKey));
  ExposureLedger{}.save(path_, kKey);
  const auto found = ExposureLedger::load_existing(path_, kKey);
  ASSERT_TRUE(found);
  EXPECT_EQ(found->sequence(), 1u);
  EXPECT_TRUE(found->entries().empty());
}

TEST_F(LedgerFile, FailedSaveStillUsesUpItsSequence) {
  ExposureLedger l = sample();
  l.save(path_, kKey);
  EXPECT_THROW(l.save(dir_ + "/no/such/dir/ledger.json", kKey), FileError);
  EXPECT_EQ(l.sequence(), 2u);
  l.save(path_, kKey);
  EXPECT_EQ(ExposureLedger::load(path_, kKey).sequence(), 3u);
  l.set_sequence(UINT64_MAX);
  EXPECT_THROW(l.save(path_, kKey), LedgerError);
  EXPECT_EQ(ExposureLedger::load(path_, kKey).sequence(), 3u);
}

TEST_F(LedgerFile, VersionOneWithoutSequenceReadsAsZero) {
  // A ledger written before the sequence existed still loads, as sequence 0.
  const nlohmann::json body = nlohmann::json::parse(
      R"({"version":1,"exposure":[{"principal":"p","shard":0,"ranges":[[0,10]]}],"shards":[]})");
  const nlohmann::json doc = {
      {"body", body}, {"hmac", hmac_sha256_hex(kKey, std::string("shardguard-exposure-ledger-v1\n") + body.dump())}};
  write_file_atomic(path_, doc.dump(), 0600);
  ExposureLedger l = ExposureLedger::load(path_, kKey);
  EXPECT_EQ(l.sequence(), 0u);
  EXPECT_EQ(l.exposed_bytes("p", 0), 10u);
  l.save(path_, kKey);  // written back as version 2, sequence 1
  EXPECT_NE(read_file(path_).find("\"version\": 2"), std::string::npos) << read_file(path_);
  EXPECT_EQ(ExposureLedger::load(path_, kKey).sequence(), 1u);
}

TEST_F(LedgerFile, WrongKeyIsRefused) {
  sample().save(path_, kKey);
  const std::string err = load_error(std::string(32, 'x'));
  EXPECT_NE(err.find(path_), std::string::npos) << err;
  EXPECT_NE(err.find("HMAC does not verify"), std::string::npos) << err;
}

TEST_F(LedgerFile, ShortKeyIsRefused) {
  EXPECT_THROW(sample().save(path_, "short"), LedgerError);
  EXPECT_NE(load_error("short").find("at least"), std::string::npos);
}

TEST_F(LedgerFile, EditedNumberIsRefused) {
  sample().save(path_, kKey);
  edit("4096", "4095");  // shrink a range to give back budget
  const std::string err = load_error();
  EXPECT_NE(err.find(path_), std::string::npos) << err;
  EXPECT_NE(err.find("HMAC does not verify"), std::string::npos) << err;
}

TEST_F(LedgerFile, EditedPrincipalIsRefused) {
  sample().save(path_, kKey);
  edit("role/exporter", "role/exporteR");
  EXPECT_NE(load_error().find("HMAC does not verify"), std::string::npos);
}

TEST_F(LedgerFile, EditedHmacIsRefused) {
  sample().save(path_, kKey);
  std::string text = read_file(path_);
  const auto pos = text.find("\"hmac\": \"") + 9;
  text[pos] = text[pos] == '0' ? '1' : '0';
  write_file_atomic(path_, text, 0600);
  EXPECT_NE(load_error().find("HMAC does not verify"), std::string::npos);
}

TEST_F(LedgerFile, DroppedEntryIsRefused) {
  ExposureLedger l;
  l.record(kAlice, 0, 0, 10);
  l.record(kBob, 0, 0, 10);
  l.save(path_, kKey);
  std::string text = read_file(path_);
  // Cut Bob's whole entry out, keeping the JSON valid.
  const auto bob = text.find(kBob);
  const auto open = text.rfind('{', bob);
  const auto comma = text.rfind(',', open);
  const auto close = text.find('}', bob);
  ASSERT_NE(bob, std::string::npos);
  text.erase(comma, close + 1 - comma);
  write_file_atomic(path_, text, 0600);
  EXPECT_NE(load_error().find("HMAC does not verify"), std::string::npos) << read_file(path_);
}

TEST_F(LedgerFile, ReformattedButEqualJsonStillLoads) {
  // The HMAC covers the canonical body, not the whitespace.
  sample().save(path_, kKey);
  std::string text = read_file(path_);
  std::string squeezed;
  for (char c : text) {
    if (c != '\n' && c != ' ') squeezed += c;
  }
  write_file_atomic(path_, squeezed, 0600);
  EXPECT_EQ(load_error(), "");
}

TEST_F(LedgerFile, GarbageAndTruncationAreRefused) {
  write_file_atomic(path_, "\x01\x02 not json", 0600);
  EXPECT_NE(load_error().find("not valid JSON"), std::string::npos);
  sample().save(path_, kKey);
  std::string text = read_file(path_);
  write_file_atomic(path_, text.substr(0, text.size() / 2), 0600);
  EXPECT_NE(load_error().find(path_), std::string::npos);
  write_file_atomic(path_, "", 0600);
  EXPECT_NE(load_error().find("not valid JSON"), std::string::npos);
  write_file_atomic(path_, "[1,2]", 0600);
  EXPECT_NE(load_error().find("not a ledger"), std::string::npos);
}

TEST_F(LedgerFile, ValidHmacOverInvalidContentIsRefused) {
  // Whoever holds the key could still write nonsense; it must not load partially.
  const std::string bodies[] = {
      R"({"version":2,"exposure":[],"shards":[]})",
      R"({"version":1,"exposure":[{"principal":"p","shard":0,"ranges":[[5,5]]}],"shards":[]})",
      R"({"version":1,"exposure":[{"principal":"p","shard":0,"ranges":[[0,1]]},{"principal":"p","shard":0,"ranges":[[2,3]]}],"shards":[]})",
      R"({"version":1,"exposure":[{"principal":"p","shard":-1,"ranges":[]}],"shards":[]})",
      R"({"version":1,"exposure":[],"shards":[{"shard":0,"bytes":1},{"shard":0,"bytes":2}]})",
      R"({"version":1,"exposure":[],"shards":[],"extra":1})",
      R"({"version":1,"exposure":[],"shards":[],"sequence":1})",
      R"({"version":2,"exposure":[],"shards":[],"sequence":-1})",
      R"({"version":2,"exposure":[],"shards":[],"sequence":"1"})",
      R"({"version":2,"exposure":[],"shards":[],"sequence":1,"extra":1})",
      R"({"version":3,"exposure":[],"shards":[],"sequence":1})",
  };
  for (const std::string& b : bodies) {
    const nlohmann::json body = nlohmann::json::parse(b);
    const nlohmann::json doc = {
        {"body", body},
        {"hmac", hmac_sha256_hex(kKey, std::string("shardguard-exposure-ledger-v1\n") + body.dump())}};
    write_file_atomic(path_, doc.dump(), 0600);
    const std::string err = load_error();
    EXPECT_NE(err, "") << b;
    EXPECT_EQ(err.find("HMAC"), std::string::npos) << err;  // got past the MAC
    EXPECT_NE(err.find(path_), std::string::npos) << err;
  }
}

TEST_F(LedgerFile, UnreadablePathIsAnError) {
  // A directory where the file should be: not "missing", so not an empty ledger.
  std::filesystem::create_directory(path_);
  EXPECT_NE(load_error().find(path_), std::string::npos);
}

}  // namespace
}  // namespace shardguard::sidecar
