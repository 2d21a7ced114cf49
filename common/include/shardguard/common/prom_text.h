// Reading a Prometheus text exposition page (format 0.0.4, what every /metrics here
// serves): the one parser for shardctl run's summaries, the integration tests and
// the benchmarks.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace shardguard {

struct PromSample {
  std::string name;                           // e.g. "shardguard_proxy_bytes_total"
  std::map<std::string, std::string> labels;  // values unescaped (\\, \", \n)
  double value = 0;                           // NaN, +Inf and -Inf as written
};

// Every sample line of `page`: `name[{label="value",...}] value [timestamp]`. Comments
// (# HELP, # TYPE) and blank lines are passed over; a line that is not a well-formed
// sample is passed over too (the caller asks for named series, and a line it cannot
// read is not one of them).
std::vector<PromSample> parse_prometheus_text(const std::string& page);

// The labels of `{...}` text, or `a="1",b="2"` without the braces; nullopt when it
// does not parse.
std::optional<std::map<std::string, std::string>> parse_prometheus_labels(const std::string& text);

// The samples of `name` (exactly) whose labels include every pair of `want`.
std::vector<PromSample> prometheus_samples(const std::string& page, const std::string& name,
                                           const std::map<std::string, std::string>& want = {});
// Their sum (0 when there are none).
double prometheus_sum(const std::string& page, const std::string& name,
                      const std::map<std::string, std::string>& want = {});

}  // namespace shardguard
