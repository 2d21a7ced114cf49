// sidecar_bench: what the two-sidecar path costs, per data plane (issues 3 and 17). In
// one run, everything on 127.0.0.1:
//
//   direct:        client ──────────────────────────────────────────▶ echo server
//   two sidecars:  client ─▶ sidecar A outbound ══mTLS══▶ sidecar B inbound ─▶ echo server
//
// The client and the echo server (a generic gRPC callback service standing for shardd)
// live in this process; the sidecars are two shard-sidecar child processes, so that
// their RSS and CPU are their own: B guards shard 1 in front of the echo server, A is
// shard 0's with B as its only peer. Certificates come from a fresh job CA
// (common/pki), policies from sidecar::pipeline_policy (2 shards): A may send
// /shardguard.v1.Pipeline/Forward to B, B accepts it from A. Every call of the bench
// is that Forward method.
//
// The direct path is measured first; then, for each data plane of --planes (default
// grpc, then h2), a fresh pair of sidecars runs the same phases:
//   (a) unary 1 KiB requests, open loop at a fixed rate (default 1000/s; send times
//       are scheduled, never held back by replies): warm-up excluded, then N measured;
//       latency p50/p90/p99 and the added latency (two sidecars − direct); each
//       sidecar's CPU per measured call (utime+stime from /proc/<pid>/stat).
//   (b) streaming 1 MiB messages over one stream: the client writes them as fast as
//       flow control lets it and the server answers with small cumulative acks
//       (one-way throughput, the shape of a pipeline Forward), and each sidecar's CPU
//       per GB relayed; then an echo stream (every message comes back).
//   RSS: VmRSS of each sidecar right after it started (idle) and VmHWM at the end (peak).
//
// Figures (DESIGN.md §8) are APPENDED to the results file (default
// build/bench/results.jsonl; `make bench` runs pipeline_bench first, which rewrites
// it) and printed as issue 17's table: one column per plane, the goal, the verdict.
#include <signal.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include "shardguard/common/httplib.h"
#include <nlohmann/json.hpp>

#include "bench_util.h"
#include "shardguard/common/files.h"
#include "shardguard/common/pki.h"
#include "shardguard/common/process.h"
#include "shardguard/policy/policy.h"
#include "support/grpc_echo.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;
using namespace shardguard;
using namespace shardguard::bench;

// Issue 17's goals, per sidecar where it applies.
constexpr double kGoalAddedMs[3] = {0.10, 0.15, 0.30};  // added latency p50 / p90 / p99
constexpr double kGoalCpuPerCallUs = 50;                 // CPU per unary call
constexpr double kGoalStreamRatio = 0.6;                 // one stream, through the pair vs direct
constexpr double kGoalCpuPerGB = 0.6;                    // core·s per GB relayed
constexpr double kGoalIdleRssMB = 12;                    // MB = 10^6 bytes
constexpr double kGoalPeakRssMB = 32;

const std::string kTrustDomain = "shardguard.local";
const std::string kNamespace = "bench";
const std::string kJob = "sidecar-bench";

// ---- small helpers --------------------------------------------------------------
// Nearest-rank percentile of sorted values.
double percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const auto rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(sorted.size())));
  return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
}


// Everything after the process name's closing ')' of /proc/<pid>/stat, split on spaces
// (token 0 is field 3, "state").
std::vector<std::string> proc_stat_fields(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto paren = all.rfind(')');
  if (paren == std::string::npos) throw BenchError("cannot read /proc/" + std::to_string(pid) + "/stat");
  std::istringstream rest(all.substr(paren + 1));
  std::vector<std::string> f;
  std::string t;
  while (rest >> t) f.push_back(t);
  return f;
}

// utime + stime of a process, seconds.
double process_cpu_seconds(pid_t pid) {
  const auto f = proc_stat_fields(pid);
  if (f.size() < 13) throw BenchError("short /proc/" + std::to_string(pid) + "/stat");
  const double ticks = static_cast<double>(::sysconf(_SC_CLK_TCK));
  return (std::stod(f[11]) + std::stod(f[12])) / ticks;  // fields 14 and 15
}

// A "Key:   123 kB" line of /proc/<pid>/status, in bytes (-1 when absent).
int64_t proc_threads(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("Threads:", 0) == 0) return std::stoll(line.substr(8));
  }
  return -1;
}

double mb(int64_t bytes) { return static_cast<double>(bytes) / 1e6; }

// 1048576 → "1mib", 1024 → "1kib", 1000 → "1000b" (for bench names).
std::string size_label(size_t bytes) {
  if (bytes % (1 << 20) == 0) return std::to_string(bytes >> 20) + "mib";
  if (bytes % 1024 == 0) return std::to_string(bytes >> 10) + "kib";
  return std::to_string(bytes) + "b";
}

// ---- the echo server (stands for shardd): the tests' (tests/support/grpc_echo.h) ----
// Any method, every message back as it came; with kEchoReplyHeader "ack", a cumulative
// 8-byte count per message received instead.
using testsupport::EchoServer;
using testsupport::kEchoReplyHeader;
using testsupport::to_buffer;

std::shared_ptr<grpc::Channel> plaintext_channel(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(-1);
  args.SetMaxReceiveMessageSize(-1);
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // its own connection
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

// One synchronous unary call (used to check a path works before measuring it).
grpc::Status unary_once(const std::shared_ptr<grpc::Channel>& channel, const std::string& payload,
                        std::chrono::milliseconds timeout) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  grpc::ByteBuffer request = to_buffer(payload), response;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  grpc::Status result;
  stub.UnaryCall(&ctx, policy::kForwardMethod, grpc::StubOptions(), &request, &response, [&](grpc::Status s) {
    std::lock_guard<std::mutex> lock(mu);
    result = std::move(s);
    done = true;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return done; });  // the deadline bounds it
  if (result.ok() && response.Length() != payload.size()) {
    return grpc::Status(grpc::StatusCode::DATA_LOSS, "reply of " + std::to_string(response.Length()) + " bytes");
  }
  return result;
}

// Retries (bounded) until one call through the path succeeds.
void wait_for_path(const std::shared_ptr<grpc::Channel>& channel, const std::string& name,
                   std::chrono::seconds limit) {
  const auto deadline = Clock::now() + limit;
  grpc::Status last;
  while (Clock::now() < deadline) {
    check_interrupted();
    last = unary_once(channel, "ping", 2s);
    if (last.ok()) return;
    std::this_thread::sleep_for(100ms);
  }
  throw BenchError("the " + name + " path does not answer: " + std::to_string(last.error_code()) + " " +
                   last.error_message());
}

// ---- (a) open-loop unary load -----------------------------------------------------------
struct UnaryResult {
  std::vector<double> latency_ms;  // measured calls that succeeded, sorted
  int64_t errors = 0;              // measured calls that failed or came back wrong
  std::string first_error;
  double lag_p99_ms = 0;           // how late the sender was against the schedule
  double lag_max_ms = 0;
  double p(double q) const { return percentile(latency_ms, q); }
};

// Sends warmup + n calls at `rate`/s on scheduled times (open loop: a slow reply never
// delays the next send) and waits for every reply (each has a 5 s deadline).
// `on_measure_start` runs when the first measured call is due; `on_measure_end` once
// every reply is in. Latency = reply callback time − the moment the call was started.
UnaryResult run_unary(const std::shared_ptr<grpc::Channel>& channel, double rate, int64_t warmup, int64_t n,
                      size_t payload_bytes, const std::function<void()>& on_measure_start,
                      const std::function<void()>& on_measure_end) {
  struct Call {
    grpc::ClientContext ctx;
    grpc::ByteBuffer response;
  };
  // Shared with the reply callbacks, so that it outlives a call this function gave up on.
  struct State {
    explicit State(size_t total)
        : calls(total), scheduled(total), started(total), finished(total), statuses(total), sizes_ok(total, 0) {}
    std::vector<std::unique_ptr<Call>> calls;
    std::vector<Clock::time_point> scheduled, started, finished;
    std::vector<grpc::Status> statuses;
    std::vector<char> sizes_ok;
    std::mutex mu;
    std::condition_variable cv;
    int64_t completed = 0;
  };
  const int64_t total = warmup + n;
  auto st = std::make_shared<State>(static_cast<size_t>(total));
  const grpc::ByteBuffer request = to_buffer(std::string(payload_bytes, 'q'));
  grpc::GenericStub stub(channel);
  int64_t issued = 0;

  // The sender sleeps until each scheduled time: ask for precise wake-ups.
  ::prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
  const auto interval = std::chrono::nanoseconds(static_cast<int64_t>(1e9 / rate));
  const auto t0 = Clock::now() + 20ms;
  for (int64_t i = 0; i < total && interrupted_signal() == 0; ++i) {
    const auto idx = static_cast<size_t>(i);
    st->scheduled[idx] = t0 + interval * i;
    if (i == warmup && on_measure_start) on_measure_start();  // before the sleep: off the clock
    std::this_thread::sleep_until(st->scheduled[idx]);
    st->calls[idx] = std::make_unique<Call>();
    Call* c = st->calls[idx].get();
    c->ctx.set_deadline(std::chrono::system_clock::now() + 5s);
    st->started[idx] = Clock::now();
    ++issued;
    stub.UnaryCall(&c->ctx, policy::kForwardMethod, grpc::StubOptions(), &request, &c->response,
                   [st, idx, c, payload_bytes](grpc::Status s) {
                     const auto now = Clock::now();
                     const bool size_ok = c->response.Length() == payload_bytes;
                     std::lock_guard<std::mutex> lock(st->mu);
                     st->finished[idx] = now;
                     st->statuses[idx] = std::move(s);
                     st->sizes_ok[idx] = size_ok ? 1 : 0;
                     ++st->completed;
                     st->cv.notify_all();
                   });
  }
  ::prctl(PR_SET_TIMERSLACK, 0UL, 0, 0, 0);  // back to the default
  {
    std::unique_lock<std::mutex> lock(st->mu);
    // Deadlines of 5 s bound it; the margin covers a callback that is late.
    if (!st->cv.wait_for(lock, 15s, [&] { return st->completed == issued; })) {
      throw BenchError("unary load: " + std::to_string(issued - st->completed) + " calls never completed");
    }
  }
  check_interrupted();
  if (on_measure_end) on_measure_end();

  UnaryResult r;
  std::vector<double> lags;
  for (int64_t i = warmup; i < total; ++i) {
    const auto idx = static_cast<size_t>(i);
    lags.push_back(std::chrono::duration<double, std::milli>(st->started[idx] - st->scheduled[idx]).count());
    if (!st->statuses[idx].ok() || !st->sizes_ok[idx]) {
      if (r.errors++ == 0) {
        r.first_error = st->statuses[idx].ok() ? "reply of the wrong size"
                                               : std::to_string(st->statuses[idx].error_code()) + " " +
                                                     st->statuses[idx].error_message();
      }
      continue;
    }
    r.latency_ms.push_back(std::chrono::duration<double, std::milli>(st->finished[idx] - st->started[idx]).count());
  }
  std::sort(r.latency_ms.begin(), r.latency_ms.end());
  std::sort(lags.begin(), lags.end());
  r.lag_p99_ms = percentile(lags, 99);
  r.lag_max_ms = lags.empty() ? 0 : lags.back();
  return r;
}

// ---- (b) one stream of large messages ------------------------------------------------------
enum class StreamMode { kAck, kEcho };

class StreamStuck : public BenchError {
 public:
  using BenchError::BenchError;
};

struct StreamResult {
  double seconds = 0;      // StartCall .. the last ack (or echoed message) received
  int64_t messages = 0;    // acknowledged (ack) or echoed back (echo)
  int64_t bytes = 0;       // payload bytes in one direction
  double gbps() const { return seconds > 0 ? static_cast<double>(bytes) / 1e9 / seconds : 0; }
};

class StreamCall : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  StreamCall(StreamMode mode, int64_t count, size_t message_bytes)
      : mode_(mode), count_(count), message_bytes_(message_bytes),
        payload_(to_buffer(std::string(message_bytes, 's'))) {}

  StreamResult run(grpc::GenericStub& stub, std::chrono::seconds limit) {
    ctx_.AddMetadata(kEchoReplyHeader, mode_ == StreamMode::kAck ? "ack" : "echo");
    ctx_.set_deadline(std::chrono::system_clock::now() + limit + 5s);
    stub.PrepareBidiStreamingCall(&ctx_, policy::kForwardMethod, grpc::StubOptions(), this);
    StartRead(&in_);
    if (count_ > 0) {
      StartWrite(&payload_);
    } else {
      StartWritesDone();
    }
    start_ = Clock::now();
    StartCall();
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, limit, [&] { return done_; })) {
      lock.unlock();
      ctx_.TryCancel();
      lock.lock();
      cv_.wait_for(lock, 10s, [&] { return done_; });
      if (!done_) throw StreamStuck("a stream did not end 10 s after it was cancelled");
      throw BenchError("a stream of " + std::to_string(count_) + " messages did not finish within " +
                       std::to_string(limit.count()) + " s (" + std::to_string(received_) + " received)");
    }
    if (!status_.ok()) {
      throw BenchError("stream failed: " + std::to_string(status_.error_code()) + " " + status_.error_message());
    }
    if (received_ != count_) {
      throw BenchError("stream ended with " + std::to_string(received_) + " of " + std::to_string(count_) +
                       " messages acknowledged");
    }
    StreamResult r;
    r.seconds = seconds_between(start_, end_);
    r.messages = received_;
    r.bytes = received_ * static_cast<int64_t>(message_bytes_);
    return r;
  }

  void OnWriteDone(bool ok) override {
    if (!ok) return;  // the call failed; OnDone reports it
    if (++written_ < count_) {
      StartWrite(&payload_);
    } else {
      StartWritesDone();
    }
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    int64_t got = 0;
    if (mode_ == StreamMode::kAck) {
      std::vector<grpc::Slice> slices;
      std::string bytes;
      if (in_.Dump(&slices).ok()) {
        for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
      }
      uint64_t n = 0;
      for (size_t i = 0; i < 8 && i < bytes.size(); ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
      got = static_cast<int64_t>(n);
    } else {
      got = received_ + (in_.Length() == message_bytes_ ? 1 : 0);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      received_ = got;
      if (received_ == count_) end_ = Clock::now();
    }
    StartRead(&in_);
  }
  void OnDone(const grpc::Status& status) override {
    std::lock_guard<std::mutex> lock(mu_);
    status_ = status;
    done_ = true;
    cv_.notify_all();
  }

 private:
  const StreamMode mode_;
  const int64_t count_;
  const size_t message_bytes_;
  const grpc::ByteBuffer payload_;  // the same refcounted 1 MiB slice for every write
  grpc::ClientContext ctx_;
  grpc::ByteBuffer in_;
  int64_t written_ = 0;  // only OnWriteDone touches it (one write in flight)
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  grpc::Status status_;
  int64_t received_ = 0;
  Clock::time_point start_, end_;
};

StreamResult run_stream(const std::shared_ptr<grpc::Channel>& channel, StreamMode mode, int64_t count,
                        size_t message_bytes, std::chrono::seconds limit) {
  check_interrupted();
  grpc::GenericStub stub(channel);
  auto call = std::make_unique<StreamCall>(mode, count, message_bytes);
  try {
    return call->run(stub, limit);
  } catch (const StreamStuck&) {
    call.release();  // gRPC may still call into it: leak rather than free it under gRPC
    throw;
  }
}

// ---- the sidecar processes --------------------------------------------------------------
struct Sidecar {
  std::string name;  // "A" or "B"
  fs::path log;
  std::unique_ptr<Process> process;
  int inbound_port = 0;
  int outbound_port = 0;
  int metrics_port = 0;

  pid_t pid() const { return process->pid(); }
  std::string log_tail() const { return indented_tail(log, 20); }
  // Throws, naming how it ended and quoting its log, when the process is gone.
  void ensure_alive(const std::string& during) {
    if (!process || process->running()) return;
    const ExitStatus s = process->wait();
    process.reset();
    throw BenchError("sidecar " + name + " died during " + during + " (" + s.str() + "); its last log lines:\n" +
                     log_tail());
  }
  // SIGTERM, SIGKILL after 5 s; reaps. Returns "" for a clean exit, else what happened.
  std::string stop() {
    if (!process) return "";
    const ExitStatus s = process->terminate(5s);
    process.reset();
    return s.exited && s.code == 0 ? "" : s.str();
  }
  ~Sidecar() { stop(); }
};

// Starts one shard-sidecar with port-0 listeners, reads the bound ports from its
// "listening" log line and waits until its /readyz answers 200 (all bounded).
std::unique_ptr<Sidecar> start_sidecar(const std::string& name, const fs::path& binary, const std::string& plane,
                                       const fs::path& dir,
                                       const std::string& upstream, const std::vector<std::string>& peers,
                                       int64_t max_message_bytes) {
  auto s = std::make_unique<Sidecar>();
  s->name = name;
  s->log = dir / ("sidecar-" + plane + ".log");
  SpawnOptions o;
  o.argv = {binary.string(),
            "--inbound", "127.0.0.1:0",
            "--outbound", "127.0.0.1:0",
            "--upstream", upstream,
            "--cert", (dir / "cert.pem").string(),
            "--key", (dir / "key.pem").string(),
            "--ca", (dir.parent_path() / "ca.pem").string(),
            "--policy", (dir / "policy.json").string(),
            "--metrics", "127.0.0.1:0",
            "--max-message-bytes", std::to_string(max_message_bytes),
            "--data-plane", plane};
  for (const auto& p : peers) o.argv.insert(o.argv.end(), {"--peer", p});
  o.log_file = s->log.string();
  s->process = std::make_unique<Process>(o);

  const auto deadline = Clock::now() + 20s;
  while (s->metrics_port == 0) {
    check_interrupted();
    if (!s->process->running()) throw BenchError("sidecar " + name + " exited at start; its log:\n" + s->log_tail());
    if (Clock::now() > deadline) throw BenchError("sidecar " + name + " logged no \"listening\" line in 20 s:\n" + s->log_tail());
    for (const json& j : json_lines(s->log)) {
      if (j.value("msg", "") == "listening" && j.contains("metrics_port")) {
        s->inbound_port = j.value("inbound_port", 0);
        s->outbound_port = j.value("outbound_port", 0);
        s->metrics_port = j.value("metrics_port", 0);
      }
    }
    if (s->metrics_port == 0) std::this_thread::sleep_for(20ms);
  }
  httplib::Client http("127.0.0.1", s->metrics_port);
  http.set_connection_timeout(0, 500000);
  http.set_read_timeout(1, 0);
  std::string last = "no answer";
  while (true) {
    check_interrupted();
    if (!s->process->running()) throw BenchError("sidecar " + name + " exited; its log:\n" + s->log_tail());
    if (auto res = http.Get("/readyz")) {
      if (res->status == 200) break;
      last = std::to_string(res->status) + " " + res->body;
    }
    if (Clock::now() > deadline) {
      throw BenchError("sidecar " + name + " not ready within 20 s (/readyz: " + last + "); its log:\n" + s->log_tail());
    }
    std::this_thread::sleep_for(50ms);
  }
  return s;
}

// CPU of a set of processes over an interval, in cores (cpu seconds / wall seconds).
class CpuMeter {
 public:
  explicit CpuMeter(std::vector<pid_t> pids) : pids_(std::move(pids)) {}
  void start() {
    t0_ = Clock::now();
    busy0_ = machine_busy_seconds();
    cpu0_.clear();
    for (pid_t p : pids_) cpu0_.push_back(process_cpu_seconds(p));
  }
  void stop() {
    wall_ = seconds_between(t0_, Clock::now());
    machine_cores_ = wall_ > 0 ? (machine_busy_seconds() - busy0_) / wall_ : 0;
    cores_.clear();
    for (size_t i = 0; i < pids_.size(); ++i) {
      cores_.push_back(wall_ > 0 ? (process_cpu_seconds(pids_[i]) - cpu0_[i]) / wall_ : 0);
    }
  }
  double cores(size_t i) const { return cores_.at(i); }
  double machine_cores() const { return machine_cores_; }
  // Cores that processes other than the measured ones kept busy (other work on the
  // machine, which competes with the bench for the CPUs).
  double other_cores() const {
    double own = 0;
    for (double c : cores_) own += c;
    return std::max(0.0, machine_cores_ - own);
  }
  double wall() const { return wall_; }

 private:
  std::vector<pid_t> pids_;
  Clock::time_point t0_;
  double busy0_ = 0, wall_ = 0, machine_cores_ = 0;
  std::vector<double> cpu0_, cores_;
};

struct Options {
  fs::path out;
  fs::path sidecar;
  double rate = 1000;
  double warmup_s = 5;
  int64_t requests = 5000;
  size_t payload_bytes = 1024;
  size_t message_bytes = 1 << 20;
  int64_t stream_mib = 512;
  int64_t echo_mib = 256;
  int timeout_s = 60;
  bool keep_dir = false;
  std::vector<std::string> planes = {"grpc", "h2"};  // shard-sidecar --data-plane, in this order
};

// Writes the CA, each sidecar's leaf, key and policy under dir (dir/ca.pem, dir/a/, dir/b/).
void write_pki_and_policies(const fs::path& dir) {
  const CaBundle ca = create_ca("sidecar-bench-ca", std::chrono::hours(24));
  write_file_atomic((dir / "ca.pem").string(), ca.cert_pem);
  const std::vector<std::pair<std::string, int>> sidecars = {{"a", 0}, {"b", 1}};
  for (const auto& [sub, shard] : sidecars) {
    const fs::path d = dir / sub;
    fs::create_directories(d);
    const Leaf leaf =
        issue_leaf(ca, spiffe_id_for_shard(kTrustDomain, kNamespace, kJob, shard), std::chrono::hours(24));
    write_file_atomic((d / "cert.pem").string(), leaf.cert_pem);
    write_file_atomic((d / "key.pem").string(), leaf.key_pem, 0600);
    write_file_atomic((d / "policy.json").string(),
                      policy::to_json(policy::pipeline_policy(kTrustDomain, kNamespace, kJob, shard, 2, {})));
  }
}

// The direct path (client ─▶ echo server, no sidecar) in (a) and (b): every figure of
// the two-sidecar path is read against it.
struct Direct {
  UnaryResult unary;
  CpuMeter unary_cpu{{::getpid()}};
  StreamResult stream, echo;
  CpuMeter stream_cpu{{::getpid()}};
  // The client's and echo server's own CPU, the baselines of the sidecars'.
  double cpu_per_call_us(int64_t calls) const {
    return unary_cpu.cores(0) * unary_cpu.wall() / static_cast<double>(calls) * 1e6;
  }
  double cpu_per_gb() const {
    const double gb = static_cast<double>(stream.bytes) / 1e9;
    return gb > 0 ? stream_cpu.cores(0) * stream_cpu.wall() / gb : 0;
  }
};

// What one data plane measured (sidecar A = index 0, B = 1).
struct PlaneResult {
  std::string plane;
  UnaryResult unary;
  StreamResult stream, echo;
  double cpu_per_call_us[2] = {0, 0};  // CPU seconds in (a) / measured calls
  double cpu_per_gb[2] = {0, 0};       // core·s per GB relayed in (b)
  double idle_rss_mb[2] = {0, 0};      // VmRSS after start, before any call
  double peak_rss_mb[2] = {0, 0};      // VmHWM at the end (≥ every sampled VmRSS)
  double added_ms(double q, const Direct& d) const { return unary.p(q) - d.unary.p(q); }
};

class Bench {
 public:
  explicit Bench(const Options& opt) : opt_(opt) {
    warmup_ = static_cast<int64_t>(std::llround(opt.warmup_s * opt.rate));
    stream_count_ =
        std::max<int64_t>(1, opt.stream_mib * (1 << 20) / static_cast<int64_t>(opt.message_bytes));
    echo_count_ = std::max<int64_t>(1, opt.echo_mib * (1 << 20) / static_cast<int64_t>(opt.message_bytes));
    warm_count_ = std::max<int64_t>(1, stream_count_ / 8);
  }

  int run() {
    if (::access(opt_.sidecar.c_str(), X_OK) != 0) {
      throw BenchError("cannot run " + opt_.sidecar.string() +
                       " (build it: cmake --build build --target shard-sidecar)");
    }
    install_signal_handlers();
    const auto bench_start = Clock::now();
    std::cout << "sidecar_bench: " << cores_ << " cores; data planes";
    for (const auto& p : opt_.planes) std::cout << " " << p;
    std::cout << "; results appended to " << opt_.out.string() << "\n" << std::flush;

    TempDir tmp("sidecar_bench");
    if (opt_.keep_dir) tmp.keep();
    write_pki_and_policies(tmp.path());

    const Direct direct = measure_direct();
    std::vector<PlaneResult> planes;
    for (const auto& plane : opt_.planes) planes.push_back(measure_plane(plane, tmp.path()));

    std::vector<json> lines;
    add_rows(direct, planes, lines);
    // Appended: pipeline_bench (run first by `make bench`) rewrites the file.
    write_results(lines, opt_.out, WriteMode::kAppend);

    std::cout << "\n";
    print_goal_table(direct, planes);
    for (const auto& [phase, other] : contended_) {
      std::cout << "warning: other processes kept " << fixed(other, 2) << " of " << cores_ << " cores busy during "
                << phase << "; its figures are not reliable (rerun on an idle machine)\n";
    }
    std::cout << "\nbaselines: the direct path (client ─▶ echo server) in this run; CPU per call and per GB of\n"
              << "the direct path = this process (client + echo server) on the same traffic. MB = 10^6 B.\n"
              << lines.size() << " figures appended to " << opt_.out.string() << " ("
              << fixed(seconds_between(bench_start, Clock::now()), 0) << " s in all)\n";
    return 0;
  }

 private:
  // Notes a phase during which other processes kept the CPUs busy (figures then unreliable).
  std::string busy_note(const std::string& phase, const CpuMeter& m) {
    if (m.other_cores() > 0.25) contended_.emplace_back(phase, m.other_cores());
    return "(machine busy " + fixed(m.machine_cores(), 2) + " of " + std::to_string(cores_) + " cores, " +
           fixed(m.other_cores(), 2) + " by other processes)";
  }

  void check_unary(const UnaryResult& r, const std::string& path) const {
    if (r.errors > 0) {
      throw BenchError(path + " path: " + std::to_string(r.errors) + " of " + std::to_string(opt_.requests) +
                       " calls failed; first: " + r.first_error);
    }
  }

  Direct measure_direct() {
    Direct d;
    EchoServer& echo = echo_;
    auto channel = plaintext_channel(echo.address());
    wait_for_path(channel, "direct", 10s);
    std::cout << "direct (client ─▶ echo server " << echo.address() << ")\n"
              << "  (a) unary " << opt_.payload_bytes << " B at " << opt_.rate << "/s: " << warmup_ << " warm-up + "
              << opt_.requests << " measured calls ..." << std::flush;
    d.unary = run_unary(channel, opt_.rate, warmup_, opt_.requests, opt_.payload_bytes,
                        [&] { d.unary_cpu.start(); }, [&] { d.unary_cpu.stop(); });
    check_unary(d.unary, "direct");
    std::cout << " p50 " << fixed(d.unary.p(50), 3) << " ms, p99 " << fixed(d.unary.p(99), 3) << " ms "
              << busy_note("(a) direct", d.unary_cpu) << "\n"
              << "  (b) " << stream_count_ << " messages of " << opt_.message_bytes << " B on one stream ..."
              << std::flush;
    const auto limit = std::chrono::seconds(opt_.timeout_s);
    run_stream(channel, StreamMode::kAck, warm_count_, opt_.message_bytes, limit);
    d.stream_cpu.start();
    d.stream = run_stream(channel, StreamMode::kAck, stream_count_, opt_.message_bytes, limit);
    d.stream_cpu.stop();
    d.echo = run_stream(channel, StreamMode::kEcho, echo_count_, opt_.message_bytes, limit);
    std::cout << " " << fixed(d.stream.gbps(), 3) << " GB/s one way, echo " << fixed(d.echo.gbps(), 3)
              << " GB/s each way " << busy_note("(b) direct", d.stream_cpu) << "\n"
              << std::flush;
    return d;
  }

  // Starts sidecars A and B on `plane`, runs (a) and (b) through them, stops them.
  PlaneResult measure_plane(const std::string& plane, const fs::path& dir) {
    PlaneResult r;
    r.plane = plane;
    const std::string shard1 = spiffe_id_for_shard(kTrustDomain, kNamespace, kJob, 1);
    const int64_t max_msg = std::max<int64_t>(64LL << 20, static_cast<int64_t>(opt_.message_bytes) + 4096);
    auto b = start_sidecar("B", opt_.sidecar, plane, dir / "b", echo_.address(), {}, max_msg);
    auto a = start_sidecar("A", opt_.sidecar, plane, dir / "a", echo_.address() /* no call goes there */,
                           {shard1 + "=127.0.0.1:" + std::to_string(b->inbound_port)}, max_msg);
    Sidecar* const sidecars[2] = {a.get(), b.get()};
    for (int i = 0; i < 2; ++i) r.idle_rss_mb[i] = mb(proc_status_bytes(sidecars[i]->pid(), "VmRSS"));
    std::cout << plane << " data plane (client ─▶ sidecar A " << a->pid() << " ══mTLS══▶ sidecar B " << b->pid()
              << " ─▶ echo server); idle RSS " << fixed(r.idle_rss_mb[0], 1) << " / " << fixed(r.idle_rss_mb[1], 1)
              << " MB\n"
              << std::flush;
    auto channel = plaintext_channel("127.0.0.1:" + std::to_string(a->outbound_port));
    wait_for_path(channel, plane + " two-sidecar", 20s);
    const pid_t self = ::getpid();

    std::cout << "  (a) unary ..." << std::flush;
    CpuMeter unary_cpu({self, a->pid(), b->pid()});
    r.unary = run_unary(channel, opt_.rate, warmup_, opt_.requests, opt_.payload_bytes, [&] { unary_cpu.start(); },
                        [&] { unary_cpu.stop(); });
    a->ensure_alive("(a)");
    b->ensure_alive("(a)");
    check_unary(r.unary, plane + " two-sidecar");
    for (int i = 0; i < 2; ++i) {
      r.cpu_per_call_us[i] = unary_cpu.cores(i + 1) * unary_cpu.wall() / static_cast<double>(opt_.requests) * 1e6;
    }
    std::cout << " p50 " << fixed(r.unary.p(50), 3) << " ms, p99 " << fixed(r.unary.p(99), 3) << " ms; "
              << fixed(r.cpu_per_call_us[0], 0) << " / " << fixed(r.cpu_per_call_us[1], 0) << " µs CPU per call "
              << busy_note("(a) " + plane, unary_cpu) << "\n"
              << std::flush;

    std::cout << "  (b) stream ..." << std::flush;
    const auto limit = std::chrono::seconds(opt_.timeout_s);
    // A failed call through the sidecars: say so if one of them died.
    auto stream = [&](StreamMode mode, int64_t count) {
      try {
        return run_stream(channel, mode, count, opt_.message_bytes, limit);
      } catch (const StreamStuck&) {
        throw;
      } catch (const BenchError&) {
        a->ensure_alive("(b)");
        b->ensure_alive("(b)");
        throw;
      }
    };
    stream(StreamMode::kAck, warm_count_);
    CpuMeter stream_cpu({self, a->pid(), b->pid()});
    stream_cpu.start();
    r.stream = stream(StreamMode::kAck, stream_count_);
    stream_cpu.stop();
    r.echo = stream(StreamMode::kEcho, echo_count_);
    a->ensure_alive("(b)");
    b->ensure_alive("(b)");
    const double gb = static_cast<double>(r.stream.bytes) / 1e9;
    for (int i = 0; i < 2; ++i) {
      r.cpu_per_gb[i] = gb > 0 ? stream_cpu.cores(i + 1) * stream_cpu.wall() / gb : 0;
      r.peak_rss_mb[i] = mb(proc_status_bytes(sidecars[i]->pid(), "VmHWM"));
    }
    std::cout << " " << fixed(r.stream.gbps(), 3) << " GB/s one way, echo " << fixed(r.echo.gbps(), 3)
              << " GB/s each way; " << fixed(r.cpu_per_gb[0], 2) << " / " << fixed(r.cpu_per_gb[1], 2)
              << " core·s per GB; peak RSS " << fixed(r.peak_rss_mb[0], 1) << " / " << fixed(r.peak_rss_mb[1], 1)
              << " MB; threads " << proc_threads(a->pid()) << " / " << proc_threads(b->pid()) << " "
              << busy_note("(b) " + plane, stream_cpu) << "\n"
              << std::flush;

    const std::string a_exit = a->stop();
    const std::string b_exit = b->stop();
    if (!a_exit.empty() || !b_exit.empty()) {
      std::cout << "note: a " << plane << " sidecar did not exit cleanly on SIGTERM: A "
                << (a_exit.empty() ? "ok" : a_exit) << ", B " << (b_exit.empty() ? "ok" : b_exit) << "\n";
    }
    return r;
  }

  // The results-file objects: the direct path, then each plane's figures against it.
  void add_rows(const Direct& d, const std::vector<PlaneResult>& planes, std::vector<json>& lines) const {
    const std::string ub = "sidecar.unary_" + size_label(opt_.payload_bytes);
    const std::string sb = "sidecar.stream_" + size_label(opt_.message_bytes);
    const double direct_call_us = d.cpu_per_call_us(opt_.requests);
    const double direct_per_gb = d.cpu_per_gb();
    for (const auto& [q, name] : kQuantiles) lines.push_back(figure(ub + ".direct", "latency_" + name, d.unary.p(q), "ms", d.unary.p(q)));
    lines.push_back(figure(sb + ".direct", "throughput", d.stream.gbps(), "GB/s", d.stream.gbps()));
    lines.push_back(figure(sb + "_echo.direct", "throughput", d.echo.gbps(), "GB/s", d.echo.gbps()));
    lines.push_back(figure("sidecar.direct", "cpu_per_call", direct_call_us, "us", direct_call_us));
    lines.push_back(figure("sidecar.direct", "cpu_per_gb", direct_per_gb, "core_s_per_GB", direct_per_gb));
    const auto with_goal = [](json j, double goal, bool met) {
      j["target"] = goal;
      j["met"] = met;
      return j;
    };
    for (const auto& r : planes) {
      const std::string p = "sidecar." + r.plane + ".";
      for (size_t k = 0; k < kQuantiles.size(); ++k) {
        const auto& [q, name] = kQuantiles[k];
        lines.push_back(figure(p + "unary_" + size_label(opt_.payload_bytes) + ".two_sidecars", "latency_" + name,
                               r.unary.p(q), "ms", d.unary.p(q)));
        json j = figure(p + "unary_" + size_label(opt_.payload_bytes) + ".added", "latency_" + name,
                        r.added_ms(q, d), "ms", d.unary.p(q));
        lines.push_back(with_goal(j, kGoalAddedMs[k], r.added_ms(q, d) <= kGoalAddedMs[k]));
      }
      const double ratio = d.stream.gbps() > 0 ? r.stream.gbps() / d.stream.gbps() : 0;
      json j = figure(p + "stream_" + size_label(opt_.message_bytes) + ".two_sidecars", "throughput",
                      r.stream.gbps(), "GB/s", d.stream.gbps());
      j["target_ratio"] = kGoalStreamRatio;
      j["met"] = ratio >= kGoalStreamRatio;
      lines.push_back(j);
      lines.push_back(figure(p + "stream_" + size_label(opt_.message_bytes) + "_echo.two_sidecars", "throughput",
                             r.echo.gbps(), "GB/s", d.echo.gbps()));
      for (int i = 0; i < 2; ++i) {
        const std::string proc = p + "process_" + (i == 0 ? "A" : "B");
        lines.push_back(with_goal(figure(proc, "cpu_per_call", r.cpu_per_call_us[i], "us", direct_call_us),
                                  kGoalCpuPerCallUs, r.cpu_per_call_us[i] <= kGoalCpuPerCallUs));
        lines.push_back(with_goal(figure(proc, "cpu_per_gb", r.cpu_per_gb[i], "core_s_per_GB", direct_per_gb),
                                  kGoalCpuPerGB, r.cpu_per_gb[i] <= kGoalCpuPerGB));
        lines.push_back(with_goal(figure(proc, "idle_rss", r.idle_rss_mb[i], "MB", kGoalIdleRssMB), kGoalIdleRssMB,
                                  r.idle_rss_mb[i] <= kGoalIdleRssMB));
        lines.push_back(with_goal(figure(proc, "peak_rss", r.peak_rss_mb[i], "MB", kGoalPeakRssMB), kGoalPeakRssMB,
                                  r.peak_rss_mb[i] <= kGoalPeakRssMB));
      }
    }
  }

  // Issue 17's table: one row per figure, one column per data plane, the goal, and
  // whether the last plane (the new one) meets it.
  void print_goal_table(const Direct& d, const std::vector<PlaneResult>& planes) const {
    std::vector<std::string> head = {"figure", "direct"};
    for (const auto& r : planes) head.push_back(r.plane);
    head.insert(head.end(), {"goal", planes.empty() ? "" : planes.back().plane + " meets"});
    std::vector<std::vector<std::string>> cells;
    const auto row = [&](const std::string& label, const std::string& direct,
                         const std::function<std::string(const PlaneResult&)>& value, const std::string& goal,
                         const std::function<bool(const PlaneResult&)>& met) {  // null: no goal
      std::vector<std::string> c = {label, direct};
      for (const auto& r : planes) c.push_back(value(r));
      c.push_back(goal);
      c.push_back(planes.empty() || !met ? "" : met(planes.back()) ? "yes" : "NO");
      cells.push_back(std::move(c));
    };
    const auto both = [](const double (&v)[2], int dec) { return fixed(v[0], dec) + " / " + fixed(v[1], dec); };
    const auto max2 = [](const double (&v)[2]) { return std::max(v[0], v[1]); };
    row("added latency, 1 KiB unary at " + fixed(opt_.rate, 0) + "/s, p50 / p90 / p99 (ms)",
        "(" + fixed(d.unary.p(50), 3) + " / " + fixed(d.unary.p(90), 3) + " / " + fixed(d.unary.p(99), 3) + ")",
        [&](const PlaneResult& r) {
          return fixed(r.added_ms(50, d), 3) + " / " + fixed(r.added_ms(90, d), 3) + " / " + fixed(r.added_ms(99, d), 3);
        },
        "<= " + fixed(kGoalAddedMs[0], 2) + " / " + fixed(kGoalAddedMs[1], 2) + " / " + fixed(kGoalAddedMs[2], 2),
        [&](const PlaneResult& r) {
          for (size_t k = 0; k < kQuantiles.size(); ++k) {
            if (r.added_ms(kQuantiles[k].first, d) > kGoalAddedMs[k]) return false;
          }
          return true;
        });
    row("CPU per unary call, sidecar A / B (µs)", "(" + fixed(d.cpu_per_call_us(opt_.requests), 0) + " client+server)",
        [&](const PlaneResult& r) { return both(r.cpu_per_call_us, 0); }, "<= " + fixed(kGoalCpuPerCallUs, 0),
        [&](const PlaneResult& r) { return max2(r.cpu_per_call_us) <= kGoalCpuPerCallUs; });
    row("1 MiB messages, one stream (GB/s, × direct)", fixed(d.stream.gbps(), 3),
        [&](const PlaneResult& r) {
          return fixed(r.stream.gbps(), 3) + " (" + fixed(d.stream.gbps() > 0 ? r.stream.gbps() / d.stream.gbps() : 0, 2) + "×)";
        },
        ">= " + fixed(kGoalStreamRatio, 1) + "×",
        [&](const PlaneResult& r) { return r.stream.gbps() >= kGoalStreamRatio * d.stream.gbps(); });
    row("1 MiB messages, echo stream (GB/s each way)", fixed(d.echo.gbps(), 3),
        [&](const PlaneResult& r) { return fixed(r.echo.gbps(), 3); }, "", nullptr);
    row("CPU per GB relayed, sidecar A / B (core·s/GB)", "(" + fixed(d.cpu_per_gb(), 2) + " client+server)",
        [&](const PlaneResult& r) { return both(r.cpu_per_gb, 2); }, "<= " + fixed(kGoalCpuPerGB, 1),
        [&](const PlaneResult& r) { return max2(r.cpu_per_gb) <= kGoalCpuPerGB; });
    row("RSS idle, sidecar A / B (MB)", "", [&](const PlaneResult& r) { return both(r.idle_rss_mb, 1); },
        "<= " + fixed(kGoalIdleRssMB, 0), [&](const PlaneResult& r) { return max2(r.idle_rss_mb) <= kGoalIdleRssMB; });
    row("RSS peak while streaming, sidecar A / B (MB)", "", [&](const PlaneResult& r) { return both(r.peak_rss_mb, 1); },
        "<= " + fixed(kGoalPeakRssMB, 0), [&](const PlaneResult& r) { return max2(r.peak_rss_mb) <= kGoalPeakRssMB; });
    bench::print_table(head, cells, [](size_t i) { return i == 0; });
  }

  static inline const std::vector<std::pair<double, std::string>> kQuantiles = {{50, "p50"}, {90, "p90"}, {99, "p99"}};

  const Options& opt_;
  const unsigned cores_ = std::max(1u, std::thread::hardware_concurrency());
  int64_t warmup_ = 0, stream_count_ = 0, echo_count_ = 0, warm_count_ = 0;
  EchoServer echo_;
  std::vector<std::pair<std::string, double>> contended_;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"sidecar_bench: a client and a gRPC echo server directly vs through two shard-sidecars (mTLS)"};
  Options opt;
  opt.out = shardguard::bench::default_results_file();
  opt.sidecar = fs::path(shardguard::self_dir()) / "shard-sidecar";
  std::string out = opt.out.string(), sidecar_path = opt.sidecar.string();
  app.add_option("--out", out, "results file (JSON lines, appended)")->capture_default_str();
  app.add_option("--sidecar", sidecar_path, "the shard-sidecar binary")->capture_default_str();
  app.add_option("--rate", opt.rate, "unary calls per second (open loop)")->capture_default_str()
      ->check(CLI::Range(1.0, 100000.0));
  app.add_option("--warmup", opt.warmup_s, "seconds of unary warm-up per path (not measured)")->capture_default_str()
      ->check(CLI::Range(0.0, 60.0));
  app.add_option("--requests", opt.requests, "measured unary calls per path")->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1000000}));
  app.add_option("--payload-bytes", opt.payload_bytes, "unary request (and reply) size")->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1} << 24));
  app.add_option("--message-bytes", opt.message_bytes, "stream message size")->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1} << 26));
  app.add_option("--stream-mib", opt.stream_mib, "MiB sent over the one-way stream per path")->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{65536}));
  app.add_option("--echo-mib", opt.echo_mib, "MiB sent over the echo stream per path")->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{65536}));
  app.add_option("--timeout", opt.timeout_s, "seconds one stream may take before the run fails")
      ->capture_default_str()->check(CLI::Range(1, 3600));
  app.add_option("--planes", opt.planes, "data planes to measure, each with its own pair of sidecars")
      ->capture_default_str()->check(CLI::IsMember({"grpc", "h2"}));
  app.add_flag("--keep-dir", opt.keep_dir, "keep the temporary directory (certificates, policies, sidecar logs)");
  CLI11_PARSE(app, argc, argv);
  opt.out = out;
  opt.sidecar = sidecar_path;
  try {
    return Bench(opt).run();
  } catch (const std::exception& e) {
    std::cerr << "sidecar_bench: " << e.what() << "\n";
    return 1;
  }
}
