// The hash-chained audit log: line format, appending through real temp files,
// continuing a chain on reopen, and verify_audit_log() against edits of the bytes.
#include "shardguard/sidecar/audit.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "support/temp_dir.h"

namespace shardguard::sidecar {
namespace {

const std::string kPeer = "spiffe://shardguard.local/ns/ml/job/j/role/exporter";

AuditEvent event(uint64_t bytes, const std::string& decision = "allow") {
  AuditEvent e;
  e.ts = "2024-05-01T12:00:00.000Z";
  e.peer = kPeer;
  e.method = "/shardguard.v1.ShardExport/Export";
  e.rule = decision == "allow" ? "export" : "export-denied";
  e.decision = decision;
  e.bytes = bytes;
  e.ranges_digest = ranges_digest({{0, bytes}});
  return e;
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size() - 1;
    out.push_back(text.substr(pos, nl + 1 - pos));
    pos = nl + 1;
  }
  return out;
}

std::string join(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& l : lines) out += l;
  return out;
}

TEST(AuditFormat, LineShapeAndHash) {
  const std::string line = format_audit_line(event(4096), 1, kAuditGenesis);
  ASSERT_EQ(line.back(), '\n');
  EXPECT_EQ(line.find('\n'), line.size() - 1);
  const std::string body_prefix = R"({"ts":"2024-05-01T12:00:00.000Z","seq":1,"peer":")" + kPeer +
                                  R"(","method":"/shardguard.v1.ShardExport/Export","rule":"export",)"
                                  R"("decision":"allow","bytes":4096,"ranges_digest":")";
  ASSERT_EQ(line.compare(0, body_prefix.size(), body_prefix), 0) << line;
  const auto hash_at = line.find(",\"hash\":\"");
  ASSERT_NE(hash_at, std::string::npos);
  const std::string body = line.substr(0, hash_at) + "}";
  const std::string hash = line.substr(hash_at + 9, 64);
  EXPECT_EQ(hash, sha256_hex(std::string(kAuditGenesis) + body));
  EXPECT_EQ(line.substr(hash_at + 9 + 64), "\"}\n");
}

TEST(AuditFormat, HostileStringsStayOnOnePrintableLine) {
  AuditEvent e = event(1, "deny");
  e.method = std::string("/a\nb\"c\\d\xff\xfe\x01/\xc3\xa9");  // newline, quote, invalid UTF-8
  const std::string line = format_audit_line(e, 1, kAuditGenesis);
  EXPECT_EQ(line.find('\n'), line.size() - 1);
  for (size_t i = 0; i + 1 < line.size(); ++i) {
    EXPECT_TRUE(line[i] >= 0x20 && line[i] < 0x7f) << "byte " << i;
  }
  EXPECT_TRUE(verify_audit_text(line).ok) << verify_audit_text(line).reason;
}

TEST(AuditFormat, RangesDigest) {
  EXPECT_EQ(ranges_digest({}), "");
  EXPECT_EQ(ranges_digest({{0, 10}, {20, 30}}), sha256_hex("0-10,20-30"));
  EXPECT_NE(ranges_digest({{0, 10}, {20, 30}}), ranges_digest({{20, 30}, {0, 10}}));
}

TEST(AuditFormat, TimestampShape) {
  const std::string ts = audit_timestamp_now();
  ASSERT_EQ(ts.size(), 24u) << ts;
  EXPECT_EQ(ts[4], '-');
  EXPECT_EQ(ts[10], 'T');
  EXPECT_EQ(ts[19], '.');
  EXPECT_EQ(ts[23], 'Z');
}

TEST(AuditVerify, EmptyTextIsAValidEmptyLog) {
  const AuditVerifyResult r = verify_audit_text("");
  EXPECT_TRUE(r.ok);
  EXPECT_EQ(r.lines, 0u);
  EXPECT_EQ(r.last_hash, kAuditGenesis);
}

class AuditFile : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = dir_ + "/audit.log";
  }

  // Writes n events through an AuditLog and returns the file's lines.
  std::vector<std::string> write_events(int n) {
    {
      AuditLog log(path_);
      for (int i = 0; i < n; ++i) {
        std::string err;
        EXPECT_TRUE(log.append(event(100 + i, i % 2 ? "deny" : "allow"), &err)) << err;
      }
    }
    return split_lines(read_file(path_));
  }

  void put(const std::vector<std::string>& lines) { write_file_atomic(path_, join(lines), 0600); }

  AuditVerifyResult verify() { return verify_audit_log(path_); }

  const testsupport::TempDir tmp_{"audit_test"};
  const std::string dir_ = tmp_.str();
  std::string path_;
};

TEST_F(AuditFile, AppendThenVerify) {
  const auto lines = write_events(5);
  ASSERT_EQ(lines.size(), 5u);
  const AuditVerifyResult r = verify();
  EXPECT_TRUE(r.ok) << r.reason;
  EXPECT_EQ(r.lines, 5u);
  EXPECT_EQ(r.first_bad_line, 0u);
  EXPECT_EQ(r.reason, "");
  struct stat st {};
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

// --audit-stdout: every line appended to the file also goes, byte for byte, to the
// mirror descriptor (a pipe here, stdout in the sidecar).
TEST_F(AuditFile, MirrorGetsTheSameLines) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  {
    AuditLog log(path_, fds[1]);
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(log.append(event(10 + i, "deny")));
  }
  ::close(fds[1]);
  std::string mirrored;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) mirrored.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  EXPECT_EQ(mirrored, read_file(path_));
  EXPECT_TRUE(verify_audit_text(mirrored).ok);
}

TEST_F(AuditFile, FillsInTimestamp) {
  AuditLog log(path_);
  AuditEvent e = event(1);
  e.ts.clear();
  ASSERT_TRUE(log.append(e));
  EXPECT_NE(read_file(path_).find("\"ts\":\"20"), std::string::npos);
}

TEST_F(AuditFile, ReopenContinuesTheChain) {
  write_events(3);
  {
    AuditLog log(path_);
    EXPECT_EQ(log.last_seq(), 3u);
    EXPECT_EQ(log.last_hash(), verify().last_hash);
    ASSERT_TRUE(log.append(event(7)));
    EXPECT_EQ(log.last_seq(), 4u);
  }
  const auto lines = split_lines(read_file(path_));
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_NE(lines[3].find("\"seq\":4,"), std::string::npos);
  const AuditVerifyResult r = verify();
  EXPECT_TRUE(r.ok) << r.reason;
  EXPECT_EQ(r.lines, 4u);
}

TEST_F(AuditFile, EditedLineIsDetected) {
  auto lines = write_events(4);
  const auto at = lines[2].find("\"bytes\":102");
  ASSERT_NE(at, std::string::npos);
  lines[2].replace(at, 11, "\"bytes\":999");
  put(lines);
  const AuditVerifyResult r = verify();
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.first_bad_line, 3u);
  EXPECT_EQ(r.lines, 2u);
  EXPECT_NE(r.reason.find("hash mismatch"), std::string::npos) << r.reason;
}

TEST_F(AuditFile, EditedDecisionIsDetected) {
  auto lines = write_events(2);
  const auto at = lines[1].find("\"deny\"");
  ASSERT_NE(at, std::string::npos);
  lines[1].replace(at, 6, "\"allo\"");
  put(lines);
  EXPECT_EQ(verify().first_bad_line, 2u);
}

TEST_F(AuditFile, EditWithRecomputedHashBreaksTheNextLine) {
  auto lines = write_events(3);
  // Rewrite line 2 consistently (new hash), but leave line 3's prev alone.
  lines[1] = format_audit_line(event(5000), 2, verify_audit_text(lines[0]).last_hash);
  put(lines);
  const AuditVerifyResult r = verify();
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.first_bad_line, 3u);
  EXPECT_NE(r.reason.find("prev does not match"), std::string::npos) << r.reason;
}

TEST_F(AuditFile, WhitespaceEditIsDetected) {
  auto lines = write_events(2);
  lines[0].insert(1, " ");
  put(lines);
  const AuditVerifyResult r = verify();
  EXPECT_EQ(r.first_bad_line, 1u);
  EXPECT_NE(r.reason.find("canonical"), std::string::npos) << r.reason;
}

TEST_F(AuditFile, DroppedLineIsDetected) {
  auto lines = write_events(4);
  lines.erase(lines.begin() + 1);
  put(lines);
  const AuditVerifyResult r = verify();
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.first_bad_line, 2u);
  EXPECT_EQ(r.lines, 1u);
  EXPECT_NE(r.reason.find("seq 3, expected 2"), std::string::npos) << r.reason;
}

TEST_F(AuditFile, DroppedFirstLineIsDetected) {
  auto lines = write_events(2);
  lines.erase(lines.begin());
  put(lines);
  EXPECT_EQ(verify().first_bad_line, 1u);
}

TEST_F(AuditFile, ReorderedLinesAreDetected) {
  auto lines = write_events(4);
  std::swap(lines[1], lines[2]);
  put(lines);
  const AuditVerifyResult r = verify();
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.first_bad_line, 2u);
  EXPECT_NE(r.reason.find("seq"), std::string::npos) << r.reason;
}

TEST_F(AuditFile, DuplicatedLineIsDetected) {
  auto lines = write_events(3);
  lines.insert(lines.begin() + 2, lines[1]);
  put(lines);
  EXPECT_EQ(verify().first_bad_line, 3u);
}

TEST_F(AuditFile, RenumberedLineStillBreaksTheChain) {
  // Drop line 2 and renumber line 3 as 2: seq is fine, prev is not.
  auto lines = write_events(3);
  lines.erase(lines.begin() + 1);
  const auto at = lines[1].find("\"seq\":3,");
  ASSERT_NE(at, std::string::npos);
  lines[1].replace(at, 8, "\"seq\":2,");
  put(lines);
  const AuditVerifyResult r = verify();
  EXPECT_EQ(r.first_bad_line, 2u);
  EXPECT_NE(r.reason.find("prev does not match"), std::string::npos) << r.reason;
}

TEST_F(AuditFile, TruncatedLastLineIsDetected) {
  auto lines = write_events(3);
  lines[2].resize(lines[2].size() / 2);
  put(lines);
  const AuditVerifyResult r = verify();
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.first_bad_line, 3u);
  EXPECT_EQ(r.lines, 2u);
  EXPECT_NE(r.reason.find("truncated"), std::string::npos) << r.reason;
}

TEST_F(AuditFile, MissingFinalNewlineIsDetected) {
  auto lines = write_events(2);
  lines[1].pop_back();
  put(lines);
  const AuditVerifyResult r = verify();
  EXPECT_EQ(r.first_bad_line, 2u);
  EXPECT_NE(r.reason.find("truncated"), std::string::npos) << r.reason;
}

TEST_F(AuditFile, GarbageIsDetected) {
  auto lines = write_events(2);
  lines.insert(lines.begin() + 1, std::string("\x00\xff garbage {\n", 14));
  put(lines);
  const AuditVerifyResult r = verify();
  EXPECT_EQ(r.first_bad_line, 2u);
  EXPECT_NE(r.reason.find("not a JSON object"), std::string::npos) << r.reason;
}

TEST_F(AuditFile, OtherBadShapesAreDetected) {
  const std::string good = format_audit_line(event(1), 1, kAuditGenesis);
  const std::string cases[] = {
      "\n",
      "[]\n",
      "{}\n",
      R"({"ts":"x","seq":1,"peer":"p","method":"m","rule":"r","decision":"d","bytes":-1,"ranges_digest":"","prev":"0","hash":"0"})"
      "\n",
      R"({"ts":"x","seq":1.0,"peer":"p","method":"m","rule":"r","decision":"d","bytes":1,"ranges_digest":"","prev":"0","hash":"0"})"
      "\n",
  };
  for (const auto& c : cases) {
    const AuditVerifyResult r = verify_audit_text(good + c);
    EXPECT_FALSE(r.ok) << c;
    EXPECT_EQ(r.first_bad_line, 2u) << c << r.reason;
  }
  // A first line that does not start from the genesis value.
  const std::string off = format_audit_line(event(1), 1, std::string(64, 'a'));
  EXPECT_NE(verify_audit_text(off).reason.find("prev does not match"), std::string::npos);
}

TEST_F(AuditFile, RefusesToAppendToABrokenChain) {
  auto lines = write_events(3);
  std::swap(lines[0], lines[1]);
  put(lines);
  try {
    AuditLog log(path_);
    FAIL() << "opened a broken chain";
  } catch (const AuditError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path_), std::string::npos) << msg;
    EXPECT_NE(msg.find("broken chain"), std::string::npos) << msg;
    EXPECT_NE(msg.find("line 1"), std::string::npos) << msg;
  }
  EXPECT_EQ(read_file(path_), join(lines));  // untouched
}

TEST_F(AuditFile, UnopenablePathIsAnError) {
  EXPECT_THROW(AuditLog(dir_ + "/no/such/dir/audit.log"), AuditError);
  const AuditVerifyResult r = verify_audit_log(dir_ + "/missing.log");
  EXPECT_FALSE(r.ok);
  EXPECT_EQ(r.first_bad_line, 0u);
  EXPECT_NE(r.reason, "");
}

TEST_F(AuditFile, ConcurrentAppendsKeepOneChain) {
  constexpr int kThreads = 4;
  constexpr int kEach = 50;
  {
    AuditLog log(path_);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&log, t] {
        for (int i = 0; i < kEach; ++i) EXPECT_TRUE(log.append(event(t * 1000 + i)));
      });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(log.last_seq(), static_cast<uint64_t>(kThreads * kEach));
  }
  const AuditVerifyResult r = verify();
  EXPECT_TRUE(r.ok) << r.reason;
  EXPECT_EQ(r.lines, static_cast<uint64_t>(kThreads * kEach));
}

}  // namespace
}  // namespace shardguard::sidecar
