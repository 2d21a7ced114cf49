// Child processes: spawn with argv (no shell), stderr to a file and/or a pipe the
// parent reads line by line, signal and reap by PID. Used by shardctl run, the
// benchmarks and the integration tests. Not thread-safe per object.
#pragma once

#include <signal.h>
#include <sys/resource.h>
#include <sys/types.h>

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace shardguard {

struct SpawnOptions {
  std::vector<std::string> argv;            // argv[0] is the program path
  std::map<std::string, std::string> env;   // added to (or overriding) the parent's environment
  std::string log_file;                     // stdout and stderr appended here ("" = inherit)
  bool capture_stderr = false;              // also expose stderr through read_line()
};

struct ExitStatus {
  bool exited = false;     // normal exit (else killed by a signal)
  int code = 0;            // exit code, or the signal number
  struct rusage usage {};  // of the child, incl. ru_maxrss (KiB)
  std::string str() const;
};

class Process {
 public:
  // Throws std::runtime_error naming the program when it cannot be started
  // (missing, not executable).
  explicit Process(const SpawnOptions& options);
  ~Process();  // kills (SIGKILL) and reaps a child still running
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  pid_t pid() const { return pid_; }
  bool running();
  void signal(int sig);
  // Waits up to `timeout` for the child to exit; nullopt if it is still running.
  std::optional<ExitStatus> wait_for(std::chrono::milliseconds timeout);
  ExitStatus wait();
  // SIGTERM, then SIGKILL after `grace`; reaps. Returns the status.
  ExitStatus terminate(std::chrono::milliseconds grace = std::chrono::seconds(10));
  // Next line of captured stderr; nullopt on timeout or EOF (check eof()).
  std::optional<std::string> read_line(std::chrono::milliseconds timeout);
  bool eof() const { return eof_; }
  int stderr_fd() const { return err_fd_; }

 private:
  pid_t pid_ = -1;
  int err_fd_ = -1;
  int log_fd_ = -1;
  int pid_fd_ = -1;
  bool eof_ = false;
  std::string buffer_;
  std::optional<ExitStatus> status_;
};

// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read, close).
int pick_free_port();

// A TCP port for a listener that another process binds later: free a moment ago on
// every interface, and below the kernel's ephemeral range (net.ipv4.ip_local_port_range,
// 32768 and up by default), from which the source ports of outgoing connections come —
// so no connection opened in between (a Gloo pair, a gRPC channel) can take it, as one
// can take a port pick_free_port returned. Random from 20000 up to that range;
// pick_free_port where the range starts below 21000.
int pick_listen_port();

// Whether 127.0.0.1:port can be bound right now (false: in use or not allowed).
bool port_free(int port);

// The executable `name` would run as: itself when it contains a '/', else the first
// executable file of that name in $PATH (/usr/local/bin:/usr/bin:/bin when unset);
// "" when there is none.
std::string find_in_path(const std::string& name);

// Directory of the running executable (/proc/self/exe), e.g. build/bin.
std::string self_dir();

// Blocks SIGTERM and SIGINT in the calling thread (and so in every thread it starts
// afterwards) and returns that set, for a daemon's main thread to sigwait() on: no
// work happens in a signal handler. Call it before starting any thread.
sigset_t block_stop_signals();

// SIGTERM and SIGINT as something to wait for, in a process where blocking them cannot
// reach every thread: a library may start threads before main() or before the signals
// are blocked (OpenBLAS at load time, LibTorch's thread pool when the thread count is
// set), and a process-directed signal goes to any thread that does not block it. A
// handler on every thread writes the signal's number to a pipe (the only work it does);
// wait() reads it. One instance at a time per process; once it is destroyed the handler
// ignores the signals (a process tearing down is not killed by a late SIGTERM).
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // Blocks until SIGTERM or SIGINT arrives (returns its number; one that came before
  // the call counts) or wake() is called (returns 0).
  int wait();
  void wake();
};

}  // namespace shardguard
