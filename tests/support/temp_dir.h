// A fresh temporary directory for one test (or one benchmark run), removed with
// everything in it when the object goes out of scope, also when the test fails.
// Header-only, so that bench/ can use it without linking the test support library.
#pragma once

#include <stdlib.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>

namespace shardguard::testsupport {

class TempDir {
 public:
  // <system temporary directory>/<prefix>.XXXXXX. Throws std::runtime_error when it
  // cannot be made (a test that gets no directory fails there, not later).
  explicit TempDir(const std::string& prefix = "shardguard-test") {
    std::string templ = (std::filesystem::temp_directory_path() / (prefix + ".XXXXXX")).string();
    if (::mkdtemp(templ.data()) == nullptr) {
      throw std::runtime_error("cannot create a temporary directory " + templ + ": " +
                               std::strerror(errno));
    }
    path_ = templ;
    str_ = templ;
  }

  ~TempDir() {
    if (keep_) return;
    std::error_code ec;
    // A test may leave a directory without write or search permission (to provoke an
    // error); give them back so that everything below can be removed.
    std::filesystem::permissions(path_, std::filesystem::perms::owner_all,
                                 std::filesystem::perm_options::add, ec);
    for (auto it = std::filesystem::recursive_directory_iterator(
             path_, std::filesystem::directory_options::skip_permission_denied, ec);
         !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
      std::error_code ignored;
      if (it->is_directory(ignored) && !it->is_symlink(ignored)) {
        std::filesystem::permissions(it->path(), std::filesystem::perms::owner_all,
                                     std::filesystem::perm_options::add, ignored);
      }
    }
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }

  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::string& str() const { return str_; }
  // path()/name as a string.
  std::string file(const std::string& name) const { return str_ + "/" + name; }
  // Leave the directory in place (to look at it after a benchmark run).
  void keep() { keep_ = true; }

 private:
  std::filesystem::path path_;
  std::string str_;
  bool keep_ = false;
};

}  // namespace shardguard::testsupport
