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
void write_file_atomic(const std::string& path, const std::string& data, unsigned mode = 0644);
// mkdir -p; throws FileError.
void make_dirs(const std::string& path);

// The last `lines` lines of a text file (all of it when shorter; "" when unreadable),
// for error messages that quote a child's log.
std::string tail_of_file(const std::string& path, size_t lines);

}  // namespace shardguard
