// File helpers with no partial state: writes go to a temp file in the same
// directory, are fsynced, renamed over the target, and the directory is fsynced.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

namespace shardguard {

class FileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Throws FileError naming the path and strerror on failure.
std::string read_file(const std::string& path);
// The same, but a file of more than max_bytes (a device, a pipe, a wrong path) is
// refused with FileError ("… is larger than N bytes") after reading max_bytes + 1.
std::string read_file(const std::string& path, std::size_t max_bytes);
void write_file_atomic(const std::string& path, const std::string& data, unsigned mode = 0644);
// mkdir -p; throws FileError.
void make_dirs(const std::string& path);
// fsync(2) of a directory, so that renames and creations in it are durable; throws FileError.
void fsync_dir(const std::string& dir);

// An exclusive advisory lock (flock) on a file, held for the object's lifetime:
// one `shardctl run` per workdir. The holder's pid is written into the file, so the
// one refused can say who holds it. The descriptor is close-on-exec (children do not
// keep the lock), and the kernel drops the lock when the holder dies, however it dies.
class FileLock {
 public:
  // Creates `path` if needed and locks it without waiting. Throws FileLockBusy when
  // another process holds it (holder_pid() of the exception: its pid, or 0 when the
  // file does not say), FileError on any other failure.
  explicit FileLock(const std::string& path);
  ~FileLock();
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

class FileLockBusy : public FileError {
 public:
  FileLockBusy(const std::string& path, long holder_pid);
  long holder_pid() const { return holder_pid_; }
  // "pid N", or "pid unknown" when the file does not say: for messages naming the holder.
  std::string holder() const;

 private:
  long holder_pid_;
};

// The last `lines` lines of a text file (all of it when shorter; "" when unreadable),
// for error messages that quote a child's log.
std::string tail_of_file(const std::string& path, size_t lines);

}  // namespace shardguard
