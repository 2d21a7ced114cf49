#include "shardguard/common/process.h"

#include <gtest/gtest.h>
#include <signal.h>

#include <cstdio>
#include <future>
#include <thread>
#include <set>
#include <string>

#include "shardguard/common/files.h"

#include "support/temp_dir.h"

namespace shardguard {
namespace {

using namespace std::chrono_literals;

// A stop signal reaches wait() whichever thread the kernel hands it to: one sent to the
// process, and one sent to a thread that blocks nothing (as OpenBLAS's threads, started
// before main(), do not); wake() ends a wait with 0.
TEST(StopSignalsTest, ASignalToAnyThreadReachesWait) {
  StopSignals stops;
  EXPECT_THROW(StopSignals second, std::logic_error);
  std::promise<void> release;
  std::thread other([f = release.get_future()]() mutable { f.wait(); });
  ASSERT_EQ(::kill(::getpid(), SIGTERM), 0);
  EXPECT_EQ(stops.wait(), SIGTERM);
  ASSERT_EQ(::pthread_kill(other.native_handle(), SIGINT), 0);
  EXPECT_EQ(stops.wait(), SIGINT);
  release.set_value();
  other.join();
  stops.wake();
  EXPECT_EQ(stops.wait(), 0);
}

TEST(StopSignalsTest, AnotherInstanceAfterTheFirstIsGone) {
  { StopSignals first; }
  StopSignals again;
  again.wake();
  EXPECT_EQ(again.wait(), 0);
}

TEST(ProcessTest, CapturesStderrLinesAndExitCode) {
  SpawnOptions o;
  o.argv = {"/bin/sh", "-c", "echo one >&2; echo two >&2; exit 3"};
  o.capture_stderr = true;
  Process p(o);
  EXPECT_EQ(p.read_line(10s).value_or(""), "one");
  EXPECT_EQ(p.read_line(10s).value_or(""), "two");
  EXPECT_FALSE(p.read_line(10s).has_value());
  EXPECT_TRUE(p.eof());
  const auto st = p.wait();
  EXPECT_TRUE(st.exited);
  EXPECT_EQ(st.code, 3);
  EXPECT_EQ(st.str(), "exit code 3");
}

TEST(ProcessTest, EnvironmentAndLogFile) {
  const testsupport::TempDir dir("shardguard-proc");
  const std::string log = dir.file("out.log");
  SpawnOptions o;
  o.argv = {"/bin/sh", "-c", "echo \"value=$SHARDGUARD_TEST_VAR\""};
  o.env = {{"SHARDGUARD_TEST_VAR", "42"}};
  o.log_file = log;
  Process p(o);
  EXPECT_EQ(p.wait().code, 0);
  EXPECT_EQ(read_file(log), "value=42\n");
}

TEST(ProcessTest, TerminateStopsALongRunningChild) {
  SpawnOptions o;
  o.argv = {"/bin/sleep", "300"};
  Process p(o);
  EXPECT_TRUE(p.running());
  EXPECT_FALSE(p.wait_for(50ms).has_value());
  const auto st = p.terminate(5s);
  EXPECT_FALSE(st.exited);
  EXPECT_EQ(st.code, SIGTERM);
  EXPECT_FALSE(p.running());
}

TEST(ProcessTest, MissingProgramIsAClearError) {
  SpawnOptions o;
  o.argv = {"/nonexistent/shardd"};
  try {
    Process p(o);
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/shardd"), std::string::npos) << e.what();
  }
}

TEST(ProcessTest, FreePortIsOnLoopback) {
  const int a = pick_free_port();
  EXPECT_GT(a, 0);
  EXPECT_LT(a, 65536);
  EXPECT_FALSE(self_dir().empty());
}

// Below the ephemeral range (where outgoing connections take their source ports) and
// bindable on 127.0.0.1 right after.
TEST(ProcessTest, ListenPortIsBelowTheEphemeralRangeAndFree) {
  int lo = 32768;
  if (FILE* f = std::fopen("/proc/sys/net/ipv4/ip_local_port_range", "r")) {
    ASSERT_EQ(std::fscanf(f, "%d", &lo), 1);
    std::fclose(f);
  }
  if (lo < 21000) GTEST_SKIP() << "the ephemeral range starts at " << lo << ": pick_listen_port is pick_free_port there";
  std::set<int> seen;
  for (int i = 0; i < 20; ++i) {
    const int p = pick_listen_port();
    EXPECT_GE(p, 20000);
    EXPECT_LT(p, lo);
    EXPECT_TRUE(port_free(p)) << p;
    seen.insert(p);
  }
  EXPECT_GT(seen.size(), 1u);  // random, not the same port for every caller
}

TEST(FindInPathTest, FindsExecutablesAndRejectsMissingOnes) {
  // A directory is not an executable, whatever its mode bits say.
  EXPECT_EQ(find_in_path("/tmp"), "");
  EXPECT_EQ(find_in_path("sh").empty(), false);
  EXPECT_EQ(find_in_path("/bin/sh"), "/bin/sh");
  EXPECT_EQ(find_in_path("/no/such/binary"), "");
  EXPECT_EQ(find_in_path("shardguard-no-such-binary"), "");
}

}  // namespace
}  // namespace shardguard
