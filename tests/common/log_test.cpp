#include "shardguard/common/log.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

namespace shardguard::log {
namespace {

using nlohmann::json;

// Redirects stderr (fd 2) into an anonymous temp file for its lifetime.
class CaptureStderr {
 public:
  CaptureStderr() {
    file_ = std::tmpfile();
    if (file_ == nullptr) throw std::runtime_error("tmpfile failed");
    saved_ = ::dup(STDERR_FILENO);
    if (saved_ < 0 || ::dup2(::fileno(file_), STDERR_FILENO) < 0) throw std::runtime_error("dup2 failed");
  }
  ~CaptureStderr() {
    restore();
    std::fclose(file_);
  }
  // Restores stderr and returns everything written while captured.
  std::string take() {
    restore();
    std::string out;
    char buf[4096];
    ssize_t n;
    off_t off = 0;
    while ((n = ::pread(::fileno(file_), buf, sizeof buf, off)) > 0) {
      out.append(buf, static_cast<size_t>(n));
      off += n;
    }
    return out;
  }

 private:
  void restore() {
    if (saved_ >= 0) {
      ::dup2(saved_, STDERR_FILENO);
      ::close(saved_);
      saved_ = -1;
    }
  }
  std::FILE* file_ = nullptr;
  int saved_ = -1;
};

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

class LogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    set_component("log-test");
    set_min_level(Level::kDebug);
  }
  void TearDown() override { set_min_level(Level::kInfo); }
};

TEST_F(LogTest, FormatLineIsOneJsonObjectWithCoreFieldsFirst) {
  const std::string line = format_line(Level::kWarn, "shard moved", {{"shard", 3}, {"peer", "spiffe://x"}});
  ASSERT_FALSE(line.empty());
  EXPECT_EQ(line.back(), '\n');
  EXPECT_EQ(line.find('\n'), line.size() - 1);
  const json j = json::parse(line);
  EXPECT_EQ(j["level"], "warn");
  EXPECT_EQ(j["msg"], "shard moved");
  EXPECT_EQ(j["component"], "log-test");
  EXPECT_EQ(j["shard"], 3);
  EXPECT_EQ(j["peer"], "spiffe://x");
  EXPECT_EQ(line.rfind("{\"ts\":\"", 0), 0u) << line;
  EXPECT_LT(line.find("\"level\""), line.find("\"msg\""));
  EXPECT_LT(line.find("\"msg\""), line.find("\"component\""));
  EXPECT_LT(line.find("\"component\""), line.find("\"peer\""));
}

TEST_F(LogTest, TimestampIsRfc3339UtcWithMilliseconds) {
  const json j = json::parse(format_line(Level::kInfo, "x", json::object()));
  const std::string ts = j["ts"];
  // Shape 2026-11-25T19:20:01.123Z: 'd' is a digit, anything else is literal.
  const std::string shape = "dddd-dd-ddTdd:dd:dd.dddZ";
  ASSERT_EQ(ts.size(), shape.size()) << ts;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == 'd') {
      EXPECT_TRUE(ts[i] >= '0' && ts[i] <= '9') << ts;
    } else {
      EXPECT_EQ(ts[i], shape[i]) << ts;
    }
  }
}

TEST_F(LogTest, EscapesQuotesNewlinesAndControlCharacters) {
  const std::string msg = "say \"hi\"\nsecond line\tand \\ and \x01";
  const std::string line = format_line(Level::kError, msg, {{"path", "a\"b\nc"}});
  EXPECT_EQ(line.find('\n'), line.size() - 1) << "raw newline inside the line";
  const json j = json::parse(line);
  EXPECT_EQ(j["msg"], msg);
  EXPECT_EQ(j["path"], "a\"b\nc");
  EXPECT_EQ(j["level"], "error");
}

TEST_F(LogTest, InvalidUtf8DoesNotThrow) {
  std::string line;
  EXPECT_NO_THROW(line = format_line(Level::kInfo, "bad \xff\xfe bytes", {{"f", "\xc3"}}));
  EXPECT_NO_THROW(json::parse(line));
}

TEST_F(LogTest, FieldsCannotOverwriteCoreKeys) {
  const json j = json::parse(format_line(Level::kInfo, "real", {{"msg", "fake"}, {"level", "error"}}));
  EXPECT_EQ(j["msg"], "real");
  EXPECT_EQ(j["level"], "info");
  EXPECT_EQ(j["field.msg"], "fake");
}

TEST_F(LogTest, WriteEmitsOneLineOnStderr) {
  CaptureStderr cap;
  info("hello", {{"n", 1}});
  const auto lines = lines_of(cap.take());
  ASSERT_EQ(lines.size(), 1u);
  const json j = json::parse(lines[0]);
  EXPECT_EQ(j["msg"], "hello");
  EXPECT_EQ(j["level"], "info");
  EXPECT_EQ(j["n"], 1);
}

TEST_F(LogTest, MinLevelFiltersLowerLevels) {
  set_min_level(Level::kWarn);
  CaptureStderr cap;
  debug("d");
  info("i");
  warn("w");
  error("e");
  const auto lines = lines_of(cap.take());
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(json::parse(lines[0])["msg"], "w");
  EXPECT_EQ(json::parse(lines[1])["msg"], "e");
}

TEST_F(LogTest, LinesFromManyThreadsNeverInterleave) {
  constexpr int kThreads = 8;
  constexpr int kPerThread = 200;
  const std::string padding(300, 'p');  // long lines make interleaving likelier
  CaptureStderr cap;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) info("tick", {{"thread", t}, {"i", i}, {"pad", padding}});
    });
  }
  for (auto& th : threads) th.join();
  const auto lines = lines_of(cap.take());
  ASSERT_EQ(lines.size(), static_cast<size_t>(kThreads * kPerThread));
  std::vector<int> next(kThreads, 0);
  for (const auto& line : lines) {
    const json j = json::parse(line);  // throws, failing the test, on a torn line
    const int t = j["thread"];
    EXPECT_EQ(j["i"], next[t]++);
  }
}

TEST(LogLevel, ParseLevel) {
  EXPECT_EQ(parse_level("debug"), Level::kDebug);
  EXPECT_EQ(parse_level("info"), Level::kInfo);
  EXPECT_EQ(parse_level("warn"), Level::kWarn);
  EXPECT_EQ(parse_level("warning"), Level::kWarn);
  EXPECT_EQ(parse_level("error"), Level::kError);
  EXPECT_EQ(parse_level("INFO"), std::nullopt);
  EXPECT_EQ(parse_level(""), std::nullopt);
}

// In a fresh process (the death test re-executes the binary), the first log call
// reads SHARDGUARD_LOG_LEVEL. The child exits 0 only when warn is filtered and
// error is not.
void child_with_env_level() {
  ::setenv("SHARDGUARD_LOG_LEVEL", "error", 1);
  std::string out;
  {
    CaptureStderr cap;
    warn("hidden");
    error("shown");
    out = cap.take();
  }
  const auto lines = lines_of(out);
  const bool ok = lines.size() == 1 && json::parse(lines[0])["msg"] == "shown";
  std::_Exit(ok ? 0 : 1);
}

TEST(LogLevelDeathTest, EnvironmentSetsDefaultMinLevel) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(child_with_env_level(), ::testing::ExitedWithCode(0), "");
}

}  // namespace
}  // namespace shardguard::log
