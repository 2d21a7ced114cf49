// What the pipeline tests (over gRPC and in memory) check results with.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <prometheus/registry.h>

#include "shardguard/shardd/trainer.h"

namespace shardguard::testing {

// Value of a sample of a metric family, selected by one label (or the first sample).
inline double metric(prometheus::Registry& registry, const std::string& name, const std::string& label = "",
                     const std::string& value = "") {
  for (const auto& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const auto& m : family.metric) {
      bool match = label.empty();
      for (const auto& l : m.label) match = match || (l.name == label && l.value == value);
      if (!match) continue;
      if (family.type == prometheus::MetricType::Counter) return m.counter.value;
      if (family.type == prometheus::MetricType::Gauge) return m.gauge.value;
      if (family.type == prometheus::MetricType::Histogram) return static_cast<double>(m.histogram.sample_count);
    }
  }
  return -1;
}

// The pipeline's per-step losses equal the single-process reference's to
// floating-point rounding (1e-5 relative).
inline void expect_same_losses(const std::vector<double>& pipeline, const shardd::MonolithicResult& mono,
                               const std::string& what) {
  ASSERT_EQ(pipeline.size(), mono.steps.size()) << what;
  for (size_t s = 0; s < pipeline.size(); ++s) {
    EXPECT_NEAR(pipeline[s], mono.steps[s].loss, 1e-5 * std::max(1.0, std::abs(mono.steps[s].loss)))
        << what << " step " << s;
  }
}

}  // namespace shardguard::testing
