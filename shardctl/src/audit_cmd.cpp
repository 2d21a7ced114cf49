#include <sys/stat.h>

#include <cstdio>
#include <iostream>

#include "shardguard/shardctl/commands.h"
#include "shardguard/sidecar/audit.h"

namespace shardguard::shardctl {

int RunAuditVerify(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    std::cerr << "shardctl audit verify: " << path << " is not a readable file\n";
    return 2;
  }
  const auto r = sidecar::verify_audit_log(path);
  if (r.ok) {
    std::printf("%s: intact, %llu lines, last hash %s\n", path.c_str(), static_cast<unsigned long long>(r.lines),
                r.last_hash.c_str());
    return 0;
  }
  std::printf("%s: BROKEN at line %llu: %s\n", path.c_str(), static_cast<unsigned long long>(r.first_bad_line),
              r.reason.c_str());
  return 1;
}

}  // namespace shardguard::shardctl
