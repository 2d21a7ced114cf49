// File helpers with no partial state (see files.h).
#include "shardguard/common/files.h"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include <fcntl.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

namespace shardguard {
namespace {

[[noreturn]] void fail(const std::string& what, const std::string& path, int err) {
  throw FileError(what + " " + path + ": " + std::strerror(err));
}

// Closes the descriptor on scope exit unless released.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  // Hands the descriptor over to the caller, who closes it.
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  // Closes now and reports close(2)'s result, so that a failed close is an error.
  int close_now() {
    int fd = fd_;
    fd_ = -1;
    return ::close(fd);
  }

 private:
  int fd_;
};

std::string parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

void write_all(int fd, const char* data, size_t size, const std::string& path) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("cannot write", path, errno);
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
}

}  // namespace

void fsync_dir(const std::string& dir) {
  Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() < 0) fail("cannot open directory", dir, errno);
  if (::fsync(fd.get()) != 0) fail("cannot fsync directory", dir, errno);
}

std::string read_file(const std::string& path, std::size_t max_bytes) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) fail("cannot open", path, errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) fail("cannot stat", path, errno);
  if (S_ISDIR(st.st_mode)) fail("cannot read", path, EISDIR);

  std::string out;
  if (st.st_size > 0) out.reserve(static_cast<size_t>(std::min<uint64_t>(st.st_size, max_bytes)));
  char buf[64 * 1024];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail("cannot read", path, errno);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > max_bytes) {
      throw FileError(path + " is larger than " + std::to_string(max_bytes) + " bytes");
    }
  }
  return out;
}

std::string read_file(const std::string& path) { return read_file(path, std::string().max_size()); }

void write_file_atomic(const std::string& path, const std::string& data, unsigned mode) {
  if (path.empty()) throw FileError("cannot write file: empty path");
  std::string tmp = path + ".tmp.XXXXXX";
  Fd fd(::mkostemp(&tmp[0], O_CLOEXEC));
  if (fd.get() < 0) fail("cannot create temp file for", path, errno);

  // From here on, any failure removes the temp file.
  bool renamed = false;
  try {
    write_all(fd.get(), data.data(), data.size(), tmp);
    // fchmod, unlike the mode given to open, is not reduced by the umask.
    if (::fchmod(fd.get(), static_cast<mode_t>(mode & 07777)) != 0) fail("cannot chmod", tmp, errno);
    if (::fsync(fd.get()) != 0) fail("cannot fsync", tmp, errno);
    if (fd.close_now() != 0) fail("cannot close", tmp, errno);
    if (::rename(tmp.c_str(), path.c_str()) != 0) fail("cannot rename " + tmp + " to", path, errno);
    renamed = true;
    fsync_dir(parent_dir(path));
  } catch (...) {
    if (!renamed) ::unlink(tmp.c_str());
    throw;
  }
}

void make_dirs(const std::string& path) {
  if (path.empty()) throw FileError("cannot create directory: empty path");
  // Create each prefix ending just before a '/', then the whole path.
  size_t pos = 0;
  for (;;) {
    pos = path.find('/', pos + 1);
    const std::string prefix = path.substr(0, pos);
    if (!prefix.empty() && ::mkdir(prefix.c_str(), 0755) != 0) {
      const int err = errno;
      struct stat st {};
      if (err != EEXIST) fail("cannot create directory", prefix, err);
      if (::stat(prefix.c_str(), &st) != 0) fail("cannot stat", prefix, errno);
      if (!S_ISDIR(st.st_mode)) fail("cannot create directory", prefix, ENOTDIR);
    }
    if (pos == std::string::npos) break;
  }
}

std::string tail_of_file(const std::string& path, size_t lines) {
  std::string text;
  try {
    text = read_file(path);
  } catch (const std::exception&) {
    return "";
  }
  size_t pos = text.size();
  for (size_t n = 0; n <= lines && pos > 0; ++n) {
    pos = text.rfind('\n', pos - 1);
    if (pos == std::string::npos) {
      pos = 0;
      break;
    }
  }
  return text.substr(pos == 0 ? 0 : pos + 1);
}

FileLockBusy::FileLockBusy(const std::string& path, long holder_pid)
    : FileError(path + " is locked by " +
                (holder_pid > 0 ? "process " + std::to_string(holder_pid) : std::string("another process"))),
      holder_pid_(holder_pid) {}

std::string FileLockBusy::holder() const {
  return holder_pid_ > 0 ? "pid " + std::to_string(holder_pid_) : std::string("pid unknown");
}

FileLock::FileLock(const std::string& path) : path_(path) {
  Fd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (fd.get() < 0) fail("cannot open lock file", path, errno);
  if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK) fail("cannot lock", path, errno);
    long holder = 0;
    char buf[32] = {};
    if (::pread(fd.get(), buf, sizeof buf - 1, 0) > 0) holder = std::strtol(buf, nullptr, 10);
    throw FileLockBusy(path, holder);
  }
  const std::string pid = std::to_string(static_cast<long>(::getpid())) + "\n";
  if (::ftruncate(fd.get(), 0) != 0 ||
      ::pwrite(fd.get(), pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    fail("cannot write the pid into lock file", path, errno);
  }
  fd_ = fd.release();
}

FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);
}

}  // namespace shardguard
