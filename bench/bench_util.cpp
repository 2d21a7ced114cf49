#include "bench_util.h"

#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <system_error>

#include "shardguard/common/process.h"

namespace shardguard::bench {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
std::atomic<int> g_signal{0};
extern "C" void on_signal(int sig) { g_signal.store(sig); }
}  // namespace

void install_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

int interrupted_signal() { return g_signal.load(); }

void check_interrupted() {
  if (const int sig = g_signal.load()) throw BenchError(std::string("interrupted by ") + strsignal(sig));
}

double seconds_between(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

double rounded(double x, int decimals) {
  const double f = std::pow(10.0, decimals);
  return std::round(x * f) / f;
}

std::string fixed(double x, int decimals) {
  std::ostringstream s;
  s << std::fixed << std::setprecision(decimals) << x;
  return s.str();
}

int64_t proc_status_bytes(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      std::istringstream s(line.substr(key.size() + 1));
      int64_t kib = -1;
      s >> kib;
      return kib < 0 ? -1 : kib * 1024;
    }
  }
  return -1;
}

double machine_busy_seconds() {
  std::ifstream in("/proc/stat");
  std::string cpu;
  in >> cpu;
  double v = 0, busy = 0;
  for (int i = 0; i < 8 && (in >> v); ++i) {
    if (i != 3 && i != 4) busy += v;  // everything but idle and iowait
  }
  return busy / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

json figure(const std::string& bench, const std::string& metric, double value, const std::string& unit,
            double baseline) {
  return {{"bench", bench},
          {"metric", metric},
          {"value", rounded(value)},
          {"unit", unit},
          {"baseline", rounded(baseline)},
          {"ratio", rounded(baseline != 0 ? value / baseline : 0.0, 4)}};
}

void write_results(const std::vector<json>& rows, const fs::path& out, WriteMode mode) {
  if (out.has_parent_path()) fs::create_directories(out.parent_path());
  std::string text;
  for (const auto& r : rows) text += r.dump() + "\n";
  if (mode == WriteMode::kAppend) {
    std::ofstream f(out, std::ios::app);
    f << text;
    f.flush();
    if (!f) throw BenchError("cannot append to " + out.string());
    return;
  }
  const fs::path tmp = out.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << text;
    f.flush();
    if (!f) throw BenchError("cannot write " + tmp.string());
  }
  fs::rename(tmp, out);
}

fs::path default_results_file() { return fs::path(self_dir()).parent_path() / "bench" / "results.jsonl"; }

void print_table(const std::vector<std::string>& head, const std::vector<std::vector<std::string>>& rows,
                 const std::function<bool(size_t)>& left_aligned) {
  std::vector<size_t> width(head.size());
  for (size_t i = 0; i < head.size(); ++i) width[i] = head[i].size();
  for (const auto& row : rows) {
    for (size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], row[i].size());
  }
  auto print_row = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size(); ++i) {
      std::cout << (left_aligned(i) ? std::left : std::right) << std::setw(static_cast<int>(width[i])) << row[i]
                << (i + 1 < row.size() ? "  " : "\n");
    }
  };
  print_row(head);
  std::vector<std::string> rule;
  for (auto w : width) rule.push_back(std::string(w, '-'));
  print_row(rule);
  for (const auto& row : rows) print_row(row);
  std::cout << std::right;
}

std::deque<std::string> tail_lines(const fs::path& file, size_t n) {
  std::deque<std::string> lines;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    lines.push_back(line);
    if (lines.size() > n) lines.pop_front();
  }
  return lines;
}

std::string indented_tail(const fs::path& file, size_t n) {
  std::string out;
  for (const auto& line : tail_lines(file, n)) out += "    " + line + "\n";
  return out;
}

std::vector<json> json_lines(const fs::path& file) {
  std::vector<json> out;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    auto j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object()) out.push_back(std::move(j));
  }
  return out;
}

}  // namespace shardguard::bench
