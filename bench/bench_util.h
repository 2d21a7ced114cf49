// bench_util: what pipeline_bench and sidecar_bench share (no LibTorch, no gRPC): the
// error type, the signal handling, number formatting, the results-file objects and
// writing (DESIGN.md §8), the table printer, the temporary directory and log helpers.
#pragma once

#include <chrono>
#include <cstddef>
#include <deque>
#include <filesystem>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/types.h>

#include <nlohmann/json.hpp>

#include "support/temp_dir.h"

namespace shardguard::bench {

using Clock = std::chrono::steady_clock;

class BenchError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ---- signals: Ctrl-C / SIGTERM end the run; each bench stops its children on the way out
// Makes SIGINT and SIGTERM set a flag (read with interrupted_signal()) instead of ending
// the process.
void install_signal_handlers();
// The signal that arrived since install_signal_handlers(), 0 when none.
int interrupted_signal();
// Throws BenchError("interrupted by <signal>") once a signal arrived.
void check_interrupted();

// ---- numbers --------------------------------------------------------------------------
double seconds_between(Clock::time_point a, Clock::time_point b);
inline double seconds_since(Clock::time_point t) { return seconds_between(t, Clock::now()); }

// Rounds for the results file (the raw doubles carry meaningless digits).
double rounded(double x, int decimals = 6);
// x with exactly `decimals` digits after the point.
std::string fixed(double x, int decimals);

// CPU time the whole machine spent busy (/proc/stat), in seconds.
double machine_busy_seconds();

// A "<key>:  <n> kB" field of /proc/<pid>/status in bytes (VmRSS, VmHWM, ...), -1 if absent.
int64_t proc_status_bytes(pid_t pid, const std::string& key);

// ---- results (DESIGN.md §8) ------------------------------------------------------------
// One results-file object: {bench, metric, value, unit, baseline, ratio}.
nlohmann::json figure(const std::string& bench, const std::string& metric, double value, const std::string& unit,
                      double baseline);

enum class WriteMode {
  kTruncate,  // replaces the file (written to <out>.tmp, then renamed)
  kAppend,    // appends to it
};
// Writes one JSON object per line to `out`, creating its directory.
void write_results(const std::vector<nlohmann::json>& rows, const std::filesystem::path& out, WriteMode mode);

// build/bench/results.jsonl next to build/bin/ (the default --out of both benches).
std::filesystem::path default_results_file();

// Prints a header, a rule of dashes and the rows, columns two spaces apart and padded to
// their widest cell; column i is left-aligned when left_aligned(i), else right-aligned.
void print_table(const std::vector<std::string>& head, const std::vector<std::vector<std::string>>& rows,
                 const std::function<bool(size_t)>& left_aligned);

// ---- files ---------------------------------------------------------------------------------
// A fresh directory under the system's temporary directory (<prefix>.XXXXXX), removed
// with everything in it at the end (also on error paths) unless keep() was called: the
// tests' helper (tests/support/temp_dir.h, header-only).
using TempDir = shardguard::testsupport::TempDir;

// The last n lines of a file.
std::deque<std::string> tail_lines(const std::filesystem::path& file, size_t n);
// The same, each indented by four spaces and ending in a newline (for error messages).
std::string indented_tail(const std::filesystem::path& file, size_t n);
// Every line of a file that parses as a JSON object (a log), others skipped.
std::vector<nlohmann::json> json_lines(const std::filesystem::path& file);

}  // namespace shardguard::bench
