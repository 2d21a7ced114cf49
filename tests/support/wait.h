// Test support: reading a prometheus-cpp registry, and waiting for a condition.
#pragma once

#include <chrono>
#include <map>
#include <string>
#include <thread>

#include <prometheus/registry.h>

namespace shardguard::testsupport {

// Calls f(metric) for every sample of `name` whose labels include every pair of `labels`.
template <typename F>
void for_each_series(prometheus::Registry& registry, const std::string& name,
                     const std::map<std::string, std::string>& labels, F f) {
  for (const auto& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const auto& m : family.metric) {
      bool match = true;
      for (const auto& [k, v] : labels) {
        bool found = false;
        for (const auto& l : m.label) found = found || (l.name == k && l.value == v);
        match = match && found;
      }
      if (match) f(m);
    }
  }
}

// Sum of the samples of `name` whose labels include every pair of `labels`
// (counter and gauge values, histogram sample counts).
inline double registry_sum(prometheus::Registry& registry, const std::string& name,
                           const std::map<std::string, std::string>& labels = {}) {
  double total = 0;
  for_each_series(registry, name, labels, [&](const prometheus::ClientMetric& m) {
    total += m.counter.value + m.gauge.value + static_cast<double>(m.histogram.sample_count);
  });
  return total;
}

// How many series of `name` match `labels` (a series at 0 counts: it exists).
inline int registry_series(prometheus::Registry& registry, const std::string& name,
                           const std::map<std::string, std::string>& labels = {}) {
  int n = 0;
  for_each_series(registry, name, labels, [&](const prometheus::ClientMetric&) { ++n; });
  return n;
}

// Polls pred() every 10 ms until it holds or `limit` passes; returns its last value.
// For conditions another thread brings about (a reload, a counter), not a fixed sleep.
template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return pred();
}

}  // namespace shardguard::testsupport
