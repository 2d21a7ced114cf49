#include "shardguard/shardctl/progress.h"

#include <cmath>
#include <cstdio>

namespace shardguard::shardctl {

std::string format_duration(double seconds) {
  if (seconds < 0 || !std::isfinite(seconds)) return "?";
  const auto s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", static_cast<long long>(s / 3600), static_cast<long long>(s % 3600 / 60));
  } else if (s >= 60) {
    std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(s / 60), static_cast<long long>(s % 60));
  } else {
    std::snprintf(buf, sizeof buf, "%llds", static_cast<long long>(s));
  }
  return buf;
}

std::string format_progress(const Progress& p, bool terminal, int width) {
  const double frac = p.total_steps > 0 ? static_cast<double>(p.step) / static_cast<double>(p.total_steps) : 0.0;
  std::string out = "epoch " + std::to_string(p.epoch + 1) + "/" + std::to_string(p.epochs) + " ";
  if (terminal) {
    const int filled = static_cast<int>(std::lround(frac * width));
    out += "[" + std::string(filled, '#') + std::string(width - filled, '.') + "] ";
  }
  char quality[64];
  if (p.bits_unit.empty()) {
    std::snprintf(quality, sizeof quality, "acc %.3f", p.accuracy);
  } else {
    std::snprintf(quality, sizeof quality, "%.3f %s", p.loss / std::log(2.0), p.bits_unit.c_str());
  }
  char buf[240];
  std::snprintf(buf, sizeof buf, "step %lld/%lld %3d%%  loss %.4f  %s  %.0f samples/s  ETA %s",
                static_cast<long long>(p.step), static_cast<long long>(p.total_steps),
                static_cast<int>(std::floor(frac * 100)), p.loss, quality, p.samples_per_second,
                format_duration(p.eta_seconds).c_str());
  return out + buf;
}

void RateMeter::observe(int64_t step, double now) {
  if (last_step_ >= 0 && step > last_step_ && now > last_time_) {
    const double instant = static_cast<double>((step - last_step_) * batch_size_) / (now - last_time_);
    rate_ = rate_ == 0 ? instant : 0.9 * rate_ + 0.1 * instant;
  }
  if (step != last_step_) {
    last_step_ = step;
    last_time_ = now;
  }
}

double RateMeter::eta_seconds(int64_t step, int64_t total) const {
  if (rate_ <= 0) return -1;
  return static_cast<double>((total - step) * batch_size_) / rate_;
}

}  // namespace shardguard::shardctl
