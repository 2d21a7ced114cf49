#include "shardguard/common/process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

extern char** environ;

namespace shardguard {

std::string ExitStatus::str() const {
  return exited ? "exit code " + std::to_string(code) : std::string("killed by signal ") + strsignal(code);
}

Process::Process(const SpawnOptions& options) {
  if (options.argv.empty()) throw std::invalid_argument("Process: empty argv");
  const std::string& program = options.argv[0];
  if (::access(program.c_str(), X_OK) != 0) {
    throw std::runtime_error("cannot run " + program + ": " + std::strerror(errno) + " (was it built? run `make build`)");
  }
  int pipe_fds[2] = {-1, -1};
  if (options.capture_stderr && ::pipe2(pipe_fds, O_CLOEXEC) != 0) {
    throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
  }
  if (!options.log_file.empty()) {
    log_fd_ = ::open(options.log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd_ < 0) throw std::runtime_error("cannot open log file " + options.log_file + ": " + std::strerror(errno));
  }
  // Everything the child needs is prepared before fork (no allocation after it).
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e) {
    const std::string kv = *e;
    const auto eq = kv.find('=');
    if (eq != std::string::npos && options.env.count(kv.substr(0, eq))) continue;
    env_strings.push_back(kv);
  }
  for (const auto& [k, v] : options.env) env_strings.push_back(k + "=" + v);
  std::vector<char*> envp, argv;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = options.argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  if (pid_ == 0) {
    // Child: its own process group, so a terminal's Ctrl-C reaches only the
    // parent, which then stops its children in order; and SIGTERM if the parent
    // dies without doing so, so that nothing is left running.
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (log_fd_ >= 0) {
      ::dup2(log_fd_, STDOUT_FILENO);
      ::dup2(log_fd_, STDERR_FILENO);
    }
    if (pipe_fds[1] >= 0) ::dup2(pipe_fds[1], STDERR_FILENO);
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::execve(argv[0], argv.data(), envp.data());
    ::_exit(127);
  }
  if (pipe_fds[1] >= 0) ::close(pipe_fds[1]);
  err_fd_ = pipe_fds[0];
  pid_fd_ = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));  // readable once the child exits
}

Process::~Process() {
  if (pid_ > 0 && !status_) {
    ::kill(pid_, SIGKILL);
    wait();
  }
  if (err_fd_ >= 0) ::close(err_fd_);
  if (log_fd_ >= 0) ::close(log_fd_);
  if (pid_fd_ >= 0) ::close(pid_fd_);
}

bool Process::running() { return !wait_for(std::chrono::milliseconds(0)).has_value(); }

void Process::signal(int sig) {
  if (pid_ > 0 && !status_) ::kill(pid_, sig);
}

std::optional<ExitStatus> Process::wait_for(std::chrono::milliseconds timeout) {
  if (status_) return status_;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int st = 0;
    struct rusage ru {};
    const pid_t r = ::wait4(pid_, &st, WNOHANG, &ru);
    if (r == pid_) {
      ExitStatus s;
      s.exited = WIFEXITED(st);
      s.code = s.exited ? WEXITSTATUS(st) : WTERMSIG(st);
      s.usage = ru;
      status_ = s;
      return status_;
    }
    if (r < 0 && errno != EINTR) throw std::runtime_error(std::string("wait4: ") + std::strerror(errno));
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return std::nullopt;
    if (pid_fd_ >= 0) {
      pollfd p{pid_fd_, POLLIN, 0};
      ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1 << 30)));
    } else {
      // No pidfd (old kernel): look again in 10 ms.
      std::this_thread::sleep_for(std::min(std::chrono::milliseconds(10), left));
    }
  }
}

ExitStatus Process::wait() {
  for (;;) {
    if (auto s = wait_for(std::chrono::hours(1))) return *s;
  }
}

ExitStatus Process::terminate(std::chrono::milliseconds grace) {
  signal(SIGTERM);
  if (auto s = wait_for(grace)) return *s;
  signal(SIGKILL);
  return wait();
}

std::optional<std::string> Process::read_line(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto nl = buffer_.find('\n');
    if (nl != std::string::npos) {
      std::string line = buffer_.substr(0, nl);
      buffer_.erase(0, nl + 1);
      return line;
    }
    if (eof_ || err_fd_ < 0) {
      if (!buffer_.empty()) {
        std::string line;
        line.swap(buffer_);
        return line;
      }
      return std::nullopt;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() < 0) return std::nullopt;
    pollfd p{err_fd_, POLLIN, 0};
    const int r = ::poll(&p, 1, static_cast<int>(left.count()));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return std::nullopt;
    char buf[8192];
    const ssize_t n = ::read(err_fd_, buf, sizeof buf);
    if (n <= 0) {
      eof_ = true;
      continue;
    }
    buffer_.append(buf, static_cast<size_t>(n));
    if (log_fd_ >= 0) {
      // Captured stderr also goes to the log file.
      const char* p2 = buf;
      ssize_t left_bytes = n;
      while (left_bytes > 0) {
        const ssize_t w = ::write(log_fd_, p2, static_cast<size_t>(left_bytes));
        if (w <= 0) break;
        p2 += w;
        left_bytes -= w;
      }
    }
  }
}

int pick_free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const std::string err = std::strerror(errno);
    ::close(fd);
    throw std::runtime_error("cannot find a free port on 127.0.0.1: " + err);
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

namespace {
// Whether a TCP socket can bind host:port right now (host in host byte order).
bool can_bind(uint32_t host, int port, bool reuse_addr) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  const int one = 1;
  if (reuse_addr) ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(host);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}
}  // namespace

int pick_listen_port() {
  int lo = 32768;  // the kernel's default when the range cannot be read
  if (FILE* f = std::fopen("/proc/sys/net/ipv4/ip_local_port_range", "r")) {
    int first = 0, last = 0;
    if (std::fscanf(f, "%d %d", &first, &last) == 2 && first > 0) lo = first;
    std::fclose(f);
  }
  constexpr int kFrom = 20000;
  if (lo < kFrom + 1000) return pick_free_port();
  std::random_device seed;
  std::mt19937 rng(seed());
  const int span = lo - kFrom;
  const int start = static_cast<int>(rng() % static_cast<unsigned>(span));
  for (int i = 0; i < span; ++i) {
    const int port = kFrom + (start + i) % span;
    // Free on every interface: whatever address the child binds it on.
    if (can_bind(INADDR_ANY, port, /*reuse_addr=*/false)) return port;
  }
  throw std::runtime_error("cannot find a free port on 0.0.0.0 in " + std::to_string(kFrom) + ".." +
                           std::to_string(lo - 1));
}

// As servers bind: TIME_WAIT is no conflict.
bool port_free(int port) { return can_bind(INADDR_LOOPBACK, port, /*reuse_addr=*/true); }

namespace {
bool is_executable_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(path.c_str(), X_OK) == 0;
}
}  // namespace

std::string find_in_path(const std::string& name) {
  if (name.empty()) return "";
  if (name.find('/') != std::string::npos) return is_executable_file(name) ? name : "";
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path ? path : "/usr/local/bin:/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const std::string candidate = (dir.empty() ? "." : dir) + "/" + name;
    if (is_executable_file(candidate)) return candidate;
  }
  return "";
}

std::string self_dir() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return ".";
  std::string path(buf, static_cast<size_t>(n));
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

sigset_t block_stop_signals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  return signals;
}

namespace {
// The pipe is made once per process and never closed: a handler running on another
// thread may be about to write to it, and a closed descriptor's number can be reused.
int stop_pipe[2] = {-1, -1};
std::atomic<bool> stop_signals_active{false};

void on_stop_signal(int sig) {
  const int saved = errno;
  if (stop_signals_active.load()) {
    const unsigned char byte = static_cast<unsigned char>(sig);
    (void)!::write(stop_pipe[1], &byte, 1);  // non-blocking: a flood of signals cannot stall a thread
  }
  errno = saved;
}
}  // namespace

StopSignals::StopSignals() {
  static std::once_flag made;
  std::call_once(made, [] {
    if (::pipe2(stop_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
      throw std::runtime_error(std::string("pipe2: ") + std::strerror(errno));
    }
  });
  bool expected = false;
  if (!stop_signals_active.compare_exchange_strong(expected, true)) {
    throw std::logic_error("StopSignals: one instance per process");
  }
  unsigned char stale[64];
  while (::read(stop_pipe[0], stale, sizeof stale) > 0) {
  }  // a wake() or signal left by an earlier instance
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
}

// The handler stays installed and ignores the signals from here on: a process past its
// work (tearing down) is not killed by a late SIGTERM, and a thread in the handler
// still writes to an open pipe.
StopSignals::~StopSignals() { stop_signals_active.store(false); }

int StopSignals::wait() {
  while (true) {
    pollfd p{stop_pipe[0], POLLIN, 0};
    if (::poll(&p, 1, -1) < 0 && errno != EINTR) return 0;
    unsigned char byte = 0;
    if (::read(stop_pipe[0], &byte, 1) == 1) return byte;
  }
}

void StopSignals::wake() {
  const unsigned char zero = 0;
  (void)!::write(stop_pipe[1], &zero, 1);
}

}  // namespace shardguard
