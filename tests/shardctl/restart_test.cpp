// The restart policy of `shardctl run` (issue 16 item 11): exponential backoff,
// no restart for bad input, and the whole last error line of the log.
#include "shardguard/model/package.h"
#include "shardguard/shardctl/restart.h"

#include <gtest/gtest.h>

namespace shardguard::shardctl {
namespace {

using std::chrono::milliseconds;

ExitStatus exited(int code) {
  ExitStatus s;
  s.exited = true;
  s.code = code;
  return s;
}

ExitStatus killed(int sig) {
  ExitStatus s;
  s.exited = false;
  s.code = sig;
  return s;
}

TEST(RestartPolicy, DelaysDoubleFromOneSecondUpToAMinute) {
  EXPECT_EQ(restart_delay(1), milliseconds(1000));
  EXPECT_EQ(restart_delay(2), milliseconds(2000));
  EXPECT_EQ(restart_delay(3), milliseconds(4000));
  EXPECT_EQ(restart_delay(6), milliseconds(32000));
  EXPECT_EQ(restart_delay(7), milliseconds(60000));
  EXPECT_EQ(restart_delay(1000), milliseconds(60000));
  EXPECT_EQ(restart_delay(0), milliseconds(1000));
}

TEST(RestartPolicy, FailuresAreRestartedWithBackoffUntilTheLimit) {
  for (const ExitStatus& st : {exited(1), killed(9), exited(134)}) {
    SCOPED_TRACE(st.str());
    RestartDecision d = decide_restart(st, 0, 3);
    EXPECT_TRUE(d.restart);
    EXPECT_EQ(d.delay, milliseconds(1000));
    d = decide_restart(st, 2, 3);
    EXPECT_TRUE(d.restart);
    EXPECT_EQ(d.delay, milliseconds(4000));
    d = decide_restart(st, 3, 3);
    EXPECT_FALSE(d.restart);
    EXPECT_NE(d.why_not.find("after 3 restart(s), the job's runPolicy.backoffLimit"), std::string::npos);
  }
  EXPECT_FALSE(decide_restart(exited(1), 0, 0).restart) << "backoffLimit 0: never restarted";
}

TEST(RestartPolicy, BadInputIsNotRestarted) {
  const RestartDecision d = decide_restart(exited(kBadInputExit), 0, 3);
  EXPECT_FALSE(d.restart);
  EXPECT_NE(d.why_not.find("status 2 (bad input"), std::string::npos) << d.why_not;
  EXPECT_TRUE(decide_restart(killed(2), 0, 3).restart) << "killed by SIGINT is not exit status 2";
}

TEST(RestartPolicy, RefusedPackageIsNotRestarted) {
  const RestartDecision d = decide_restart(exited(model::kExitPackageRefused), 0, 3);
  EXPECT_FALSE(d.restart);
  EXPECT_NE(d.why_not.find("refused its package"), std::string::npos) << d.why_not;
}

// A package that could not be fetched (spec.model.package.url) may be there later.
TEST(RestartPolicy, UnavailablePackageIsRestartedWithinTheLimit) {
  EXPECT_TRUE(decide_restart(exited(model::kExitPackageUnavailable), 0, 3).restart);
  EXPECT_FALSE(decide_restart(exited(model::kExitPackageUnavailable), 3, 3).restart);
}

TEST(RestartPolicy, LastErrorLineIsWholeAndTheLastOne) {
  const std::string cause(5000, 'x');
  const std::string log = R"({"ts":"t","level":"info","msg":"started"})" "\n"
                          R"({"ts":"t","level":"error","msg":"first"})" "\n"
                          R"({"ts":"t","level":"error","msg":"cannot write checkpoint","error":")" + cause + "\"}\n" +
                          R"({"ts":"t","level":"info","msg":"stopping"})" "\n"
                          "not json at all\n";
  const std::string line = last_error_line(log);
  EXPECT_NE(line.find("cannot write checkpoint"), std::string::npos);
  EXPECT_NE(line.find(cause), std::string::npos) << "the line must not be cut";
  EXPECT_EQ(last_error_line("shardd: invalid job /x.yaml:\n  spec.model: bad\n"), "shardd: invalid job /x.yaml:");
  EXPECT_EQ(last_error_line(R"({"level":"info","msg":"ok"})" "\n"), "");
  EXPECT_EQ(last_error_line(""), "");
}

}  // namespace
}  // namespace shardguard::shardctl
