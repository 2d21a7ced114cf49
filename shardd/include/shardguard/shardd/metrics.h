// Every metric shardd exports, built once per stage (DESIGN.md §7 names).
#pragma once

#include <memory>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace shardguard::shardd {

struct StageMetrics {
  StageMetrics(prometheus::Registry& registry, const std::string& job, int shard);
  StageMetrics(prometheus::Registry& registry, const prometheus::Labels& labels);
  StageMetrics(const StageMetrics&) = delete;
  StageMetrics& operator=(const StageMetrics&) = delete;

  prometheus::Gauge& parameters;
  prometheus::Counter& steps;
  prometheus::Counter& samples;
  prometheus::Gauge& step;
  prometheus::Gauge& epoch;
  prometheus::Gauge& loss;
  prometheus::Gauge& train_accuracy;
  prometheus::Gauge& eval_accuracy;
  prometheus::Gauge& eval_loss;
  prometheus::Histogram& forward_seconds;
  prometheus::Histogram& backward_seconds;
  prometheus::Histogram& optimizer_seconds;
  prometheus::Histogram& allreduce_seconds;     // replicas: averaging the gradients with the stage's other replicas
  prometheus::Counter& bytes_sent;
  prometheus::Counter& bytes_received;
  prometheus::Counter& message_bytes_sent;      // every message on the links, see wire_bytes.h
  prometheus::Counter& message_bytes_received;
  prometheus::Counter& frames_sent;
  prometheus::Counter& frames_received;
  prometheus::Counter& transport_seconds;
  prometheus::Counter& serialise_seconds;
  prometheus::Counter& stale_frames;
  prometheus::Counter& rejected_frames;
  prometheus::Counter& replica_store_refused;   // replica 0: connections its group store closed
  prometheus::Counter& resyncs;
  prometheus::Counter& generated_tokens;        // stage 0 of `shardctl generate`
  prometheus::Counter& checkpoint_writes;
  prometheus::Counter& checkpoint_failures;
  prometheus::Counter& checkpoint_loads;
  prometheus::Histogram& checkpoint_seconds;
  prometheus::Gauge& checkpoint_bytes;
  prometheus::Gauge& checkpoint_step;
};

}  // namespace shardguard::shardd
