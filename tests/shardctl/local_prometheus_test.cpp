// shardctl run --prometheus (shardctl/local_prometheus.h): the generated config is one
// promtool accepts, with every target and its labels, and the exposure query parses
// as PromQL with and without the range form. promtool comes from the Debian package
// prometheus (make deps).
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "shardguard/common/files.h"
#include "shardguard/shardctl/local_prometheus.h"
#include "support/temp_dir.h"

namespace shardguard::shardctl {
namespace {

namespace fs = std::filesystem;

class LocalPrometheusTest : public ::testing::Test {
 protected:
  void SetUp() override {
    promtool_ = find_in_path("promtool");
    if (promtool_.empty()) GTEST_SKIP() << "promtool not in PATH (Debian package prometheus; run `make deps`)";
  }

  // promtool's exit code and output for `args`.
  int promtool(const std::string& args, std::string* out) {
    const std::string log = dir_ + "/promtool.out";
    const int rc = std::system((promtool_ + " " + args + " >" + log + " 2>&1").c_str());
    *out = read_file(log);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  }

  const shardguard::testsupport::TempDir tmp_{"shardguard-prom"};
  const std::string dir_ = tmp_.str();
  std::string promtool_;
};

TEST_F(LocalPrometheusTest, ConfigIsAcceptedByPromtoolAndCarriesEveryTargetsLabels) {
  const std::vector<ScrapeTarget> targets = {
      {"127.0.0.1:40001", {{"namespace", "ml"}, {"job", "fm"}, {"shard", "0"}, {"container", "shardd"}}},
      {"127.0.0.1:40002", {{"namespace", "ml"}, {"job", "fm \"quoted\""}, {"shard", "0"}, {"container", "sidecar"}}}};
  const std::string yml = prometheus_config(targets, std::chrono::milliseconds(500));
  write_file_atomic(dir_ + "/prometheus.yml", yml);
  std::string out;
  EXPECT_EQ(promtool("check config " + dir_ + "/prometheus.yml", &out), 0) << out << "\n" << yml;
  EXPECT_NE(yml.find("scrape_interval: 500ms"), std::string::npos) << yml;
  EXPECT_NE(yml.find("honor_labels: true"), std::string::npos) << yml;
  EXPECT_NE(yml.find("- targets: [\"127.0.0.1:40002\"]"), std::string::npos) << yml;
  EXPECT_NE(yml.find("job: \"fm \\\"quoted\\\"\""), std::string::npos) << yml;
}

TEST_F(LocalPrometheusTest, ExposureQueryParsesAsPromQL) {
  for (const std::string range : {"", "90s"}) {
    SCOPED_TRACE("range \"" + range + "\"");
    const std::string q = principal_exposure_query("namespace=\"ml\", job=\"fm\"", range);
    EXPECT_EQ(q.find("last_over_time") != std::string::npos, !range.empty()) << q;
    std::ofstream(dir_ + "/rules.yml") << "groups:\n  - name: g\n    rules:\n      - record: shardguard:exposure\n"
                                       << "        expr: '" << q << "'\n";
    std::string out;
    EXPECT_EQ(promtool("check rules " + dir_ + "/rules.yml", &out), 0) << out << "\n" << q;
  }
}

}  // namespace
}  // namespace shardguard::shardctl
