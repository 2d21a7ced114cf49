// The progress line of `shardctl run`: pure formatting, no I/O.
#pragma once

#include <cstdint>
#include <string>

namespace shardguard::shardctl {

struct Progress {
  int epoch = 0;           // 0-based epoch of the last step
  int epochs = 0;
  int64_t step = 0;        // completed steps
  int64_t total_steps = 0;
  double loss = 0;
  double accuracy = 0;
  std::string bits_unit;   // language models: "bits/byte" or "bits/token", shown instead of accuracy
  double samples_per_second = 0;
  double eta_seconds = -1;  // < 0: unknown
};

// Terminal: "epoch 1/2 [#####...............] step 50/200  25%  loss 0.4123  acc 0.859  640 samples/s  ETA 3m12s"
// A language model shows the loss in bits instead of the accuracy: "loss 1.3862  2.000 bits/byte".
// Plain (not a terminal): the same without the bar.
std::string format_progress(const Progress& p, bool terminal, int width = 20);
std::string format_duration(double seconds);  // "3m12s", "45s", "1h02m"

// Throughput and time left from the steps seen so far: an exponential moving
// average of samples/s over step timestamps.
class RateMeter {
 public:
  explicit RateMeter(int batch_size) : batch_size_(batch_size) {}
  void observe(int64_t step, double now_seconds);
  double samples_per_second() const { return rate_; }
  double eta_seconds(int64_t step, int64_t total) const;

 private:
  int batch_size_;
  int64_t last_step_ = -1;
  double last_time_ = 0;
  double rate_ = 0;
};

}  // namespace shardguard::shardctl
