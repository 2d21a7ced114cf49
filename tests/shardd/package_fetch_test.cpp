// fetch_package's stop (FetchOptions::stop_wait): a stop asked for between attempts
// ends the fetch at once with FetchStopped, instead of sleeping out the backoff and
// trying again; without a stop the same fetch is retried and reported unavailable.
#include "shardguard/shardd/package_fetch.h"

#include <gtest/gtest.h>

#include <chrono>
#include <vector>

#include "shardguard/common/process.h"

namespace shardguard::shardd {
namespace {

model::PackageManifest one_shard_manifest() {
  model::PackageManifest m;
  m.shards.resize(1);
  m.shards[0].bytes = 1024;
  return m;
}

// Nothing listens on the port: every attempt is refused (transient, retried).
std::string refused_prefix() { return "http://127.0.0.1:" + std::to_string(pick_free_port()) + "/pkg/"; }

TEST(PackageFetch, AStopBetweenAttemptsEndsTheFetchInsteadOfTheBackoff) {
  FetchOptions o;
  o.timeout_s = 5;
  o.retries = 3;
  o.backoff_s = 30;  // what the fetch would sleep without the stop
  std::vector<double> asked;
  o.stop_wait = [&](double seconds) {
    asked.push_back(seconds);
    return seconds > 0;  // no stop during the attempt; a stop in the first backoff
  };
  const std::string prefix = refused_prefix();
  const auto t0 = std::chrono::steady_clock::now();
  try {
    fetch_package(prefix, one_shard_manifest(), 0, o);
    FAIL() << "fetched from a closed port";
  } catch (const FetchStopped& e) {
    EXPECT_EQ(std::string(e.what()), "package fetch of shard 0 stopped: GET " + prefix + "shard-0.sgpkg");
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 25);
  ASSERT_FALSE(asked.empty());
  EXPECT_EQ(asked.back(), 30) << "the backoff is waited through stop_wait, not slept";
}

TEST(PackageFetch, WithoutAStopARefusedFetchIsRetriedThenUnavailable) {
  FetchOptions o;
  o.timeout_s = 5;
  o.retries = 1;
  o.backoff_s = 0;
  try {
    fetch_package(refused_prefix(), one_shard_manifest(), 0, o);
    FAIL() << "fetched from a closed port";
  } catch (const model::PackageUnavailable& e) {
    EXPECT_NE(std::string(e.what()).find("(2 attempts)"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace shardguard::shardd
