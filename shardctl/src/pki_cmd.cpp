// `shardctl pki init|issue|verify`: a job CA and leaf SVIDs for local use (DESIGN.md §3).
#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <iostream>
#include <limits>
#include <stdexcept>
#include <string>

#include "shardguard/common/files.h"
#include "shardguard/common/pki.h"
#include "shardguard/common/time.h"
#include "shardguard/shardctl/commands.h"

namespace shardguard::shardctl {
namespace {

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

// true when something (file, link, directory) is at path; throws for errors other than ENOENT.
bool exists(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) return true;
  if (errno == ENOENT || errno == ENOTDIR) return false;
  throw FileError("cannot stat " + path + ": " + std::strerror(errno));
}


}  // namespace

std::chrono::seconds ParseDuration(const std::string& flag, const std::string& value) {
  const auto bad = [&](const std::string& why) {
    return std::invalid_argument(flag + ": \"" + value + "\" is not a valid duration (" + why +
                                 "); use e.g. 24h, 90m, 3600s or 1h30m");
  };
  if (value.empty()) throw bad("empty");
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  int64_t total = 0;
  size_t i = 0;
  while (i < value.size()) {
    const size_t start = i;
    int64_t n = 0;
    while (i < value.size() && value[i] >= '0' && value[i] <= '9') {
      const int d = value[i] - '0';
      if (n > (kMax - d) / 10) throw bad("too large");
      n = n * 10 + d;
      ++i;
    }
    if (i == start) throw bad("expected a number at \"" + value.substr(start) + "\"");
    if (i == value.size()) throw bad("missing unit h, m or s after " + value.substr(start));
    int64_t unit = 0;
    switch (value[i]) {
      case 'h': unit = 3600; break;
      case 'm': unit = 60; break;
      case 's': unit = 1; break;
      default: throw bad(std::string("unknown unit '") + value[i] + "', expected h, m or s");
    }
    ++i;
    if (n > kMax / unit || total > kMax - n * unit) throw bad("too large");
    total += n * unit;
  }
  if (total <= 0) throw bad("must be positive");
  return std::chrono::seconds(total);
}

int RunPkiInit(const PkiInitOptions& o) {
  const char* cmd = "shardctl pki init: ";
  std::chrono::seconds lifetime{};
  try {
    if (o.dir.empty()) throw std::invalid_argument("--dir is required");
    if (o.job.empty()) throw std::invalid_argument("--job is required");
    lifetime = ParseDuration("--lifetime", o.lifetime);
    // Refuse a trust domain, namespace or job name that could not form SPIFFE IDs.
    spiffe_id_for_exporter(o.trust_domain, o.ns, o.job);
  } catch (const std::exception& e) {
    std::cerr << cmd << e.what() << "\n";
    return 2;
  }
  const std::string cert_path = join_path(o.dir, "ca.crt");
  const std::string key_path = join_path(o.dir, "ca.key");
  try {
    if (!o.force) {
      for (const std::string& p : {cert_path, key_path}) {
        if (exists(p)) {
          std::cerr << cmd << p
                    << " already exists; refusing to replace the job CA (every certificate it issued "
                       "would stop verifying). Pass --force to replace it.\n";
          return 1;
        }
      }
    }
    make_dirs(o.dir);
    const CaBundle ca = create_ca(job_ca_common_name(o.trust_domain, o.ns, o.job), lifetime);
    // Key first: a crash in between leaves no certificate without its key.
    write_file_atomic(key_path, ca.key_pem, 0600);
    write_file_atomic(cert_path, ca.cert_pem, 0644);
    std::cout << "created the CA of job " << o.ns << "/" << o.job << " (trust domain " << o.trust_domain << ")\n"
              << "  certificate  " << cert_path << "\n"
              << "  key          " << key_path << " (mode 0600)\n"
              << "  not after    " << format_rfc3339(not_after(ca.cert_pem)) << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << cmd << e.what() << "\n";
    return 1;
  }
}

int RunPkiIssue(const PkiIssueOptions& o) {
  const char* cmd = "shardctl pki issue: ";
  std::chrono::seconds lifetime{};
  std::string spiffe_id;
  std::string name;
  try {
    if (o.dir.empty()) throw std::invalid_argument("--dir is required");
    if (o.job.empty()) throw std::invalid_argument("--job is required");
    if ((o.shard >= 0) == o.exporter) throw std::invalid_argument("give exactly one of --shard N and --exporter");
    if (!o.exporter && o.shard > std::numeric_limits<uint32_t>::max()) {
      throw std::invalid_argument("--shard: " + std::to_string(o.shard) + " is out of range");
    }
    lifetime = ParseDuration("--lifetime", o.lifetime);
    if (o.exporter) {
      spiffe_id = spiffe_id_for_exporter(o.trust_domain, o.ns, o.job);
      name = "exporter";
    } else {
      spiffe_id = spiffe_id_for_shard(o.trust_domain, o.ns, o.job, static_cast<uint32_t>(o.shard));
      name = "shard-" + std::to_string(o.shard);
    }
  } catch (const std::exception& e) {
    std::cerr << cmd << e.what() << "\n";
    return 2;
  }
  const std::string ca_cert_path = join_path(o.dir, "ca.crt");
  const std::string ca_key_path = join_path(o.dir, "ca.key");
  const std::string out = o.out_dir.empty() ? o.dir : o.out_dir;
  try {
    for (const std::string& p : {ca_cert_path, ca_key_path}) {
      if (!exists(p)) {
        std::cerr << cmd << "no job CA in " << o.dir << " (" << p
                  << " does not exist); run `shardctl pki init --dir " << o.dir << " --job " << o.job
                  << "` first\n";
        return 1;
      }
    }
    CaBundle ca;
    ca.cert_pem = read_file(ca_cert_path);
    ca.key_pem = read_file(ca_key_path);
    const Leaf leaf = issue_leaf(ca, spiffe_id, lifetime);
    make_dirs(out);
    const std::string cert_path = join_path(out, name + ".crt");
    const std::string key_path = join_path(out, name + ".key");
    write_file_atomic(key_path, leaf.key_pem, 0600);
    write_file_atomic(cert_path, leaf.cert_pem, 0644);
    std::cout << spiffe_id << "\n"
              << "  certificate  " << cert_path << "\n"
              << "  key          " << key_path << " (mode 0600)\n"
              << "  not after    " << format_rfc3339(not_after(leaf.cert_pem)) << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << cmd << e.what() << "\n";
    return 1;
  }
}

int RunPkiVerify(const PkiVerifyOptions& o) {
  const char* cmd = "shardctl pki verify: ";
  SvidRole role = SvidRole::client;
  if (o.role == "server") {
    role = SvidRole::server;
  } else if (o.role != "client") {
    std::cerr << cmd << "--role: \"" << o.role << "\" is not one of client, server\n";
    return 2;
  }
  std::string ca_pem;
  std::string leaf_pem;
  try {
    if (o.ca_file.empty()) throw std::invalid_argument("--ca is required");
    if (o.cert_file.empty()) throw std::invalid_argument("a certificate file is required");
    ca_pem = read_file(o.ca_file);
    leaf_pem = read_file(o.cert_file);
  } catch (const std::exception& e) {
    std::cerr << cmd << e.what() << "\n";
    return 2;
  }
  const SvidCheck check = verify_svid(leaf_pem, ca_pem, std::chrono::system_clock::now(), role);
  if (!check.ok) {
    std::cout << "refused: " << check.reason << ": " << check.message << "\n";
    return 1;
  }
  std::cout << check.spiffe_id << "\n";
  try {
    std::cout << "  not after    " << format_rfc3339(not_after(leaf_pem)) << "\n";
  } catch (const std::exception&) {
    // verify_svid parsed it; nothing to add if this one cannot.
  }
  return 0;
}

}  // namespace shardguard::shardctl
