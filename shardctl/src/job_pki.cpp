#include "shardguard/shardctl/job_pki.h"

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <tuple>
#include <vector>

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/common/shard_files.h"

namespace shardguard::shardctl {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::system_clock;

std::string shard_id(const JobSpec& job, int index) {
  return spiffe_id_for_shard(job.protection.trust_domain, job.namespace_, job.name, static_cast<uint32_t>(index));
}

std::string checkpoint_key_file(const std::string& key_dir, int i) {
  return key_dir + "/shard-" + std::to_string(i) + ".key";
}
std::string ledger_key_file(const std::string& key_dir, int i) {
  return key_dir + "/shard-" + std::to_string(i) + ".ledger.key";
}

// Files in dir whose names start with prefix (checkpoints, also set-aside ones).
std::vector<std::string> files_starting(const std::string& dir, const std::string& prefix) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.compare(0, prefix.size(), prefix) == 0) out.push_back(name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// What a key that is missing would orphan, and the directory holding it: the
// shard's checkpoints for its checkpoint key, its sealed ledger for its ledger key
// (in its sidecar's state directory; before issue 16, beside the checkpoints).
std::pair<std::string, std::vector<std::string>> sealed_by(const JobSpec& job, const std::string& workdir,
                                                           const std::string& ckpt_dir, int shard, bool ledger) {
  if (ckpt_dir.empty()) return {};
  if (ledger) {
    const std::string f = ledger_file_name(job.name, shard);
    for (const std::string& dir : {local_sidecar_state_dir(workdir, shard), ckpt_dir}) {
      if (fs::exists(dir + "/" + f)) return {dir, {f}};
    }
    return {};
  }
  return {ckpt_dir, files_starting(ckpt_dir, checkpoint_file_prefix(job.name, shard))};
}

// The CA in the workdir, when it parses, signs and outlives a fresh leaf.
bool usable_ca(const JobSpec& job, const CaBundle& ca) {
  try {
    if (not_after(ca.cert_pem) < Clock::now() + kLeafLifetime) return false;
    issue_leaf(ca, shard_id(job, 0), std::chrono::minutes(1));  // throws when cert and key do not match
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

std::string local_sidecar_state_dir(const std::string& workdir, int shard) {
  return workdir + "/logs/sidecar-state-" + std::to_string(shard);
}

std::string random_uuid() {
  std::string b = random_bytes(16);
  b[6] = static_cast<char>((b[6] & 0x0f) | 0x40);
  b[8] = static_cast<char>((b[8] & 0x3f) | 0x80);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < b.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out += '-';
    const unsigned char c = static_cast<unsigned char>(b[i]);
    out += hex[c >> 4];
    out += hex[c & 0x0f];
  }
  return out;
}

CaBundle create_job_ca(const JobSpec& job) {
  return create_ca(job_ca_common_name(job.protection.trust_domain, job.namespace_, job.name), kCaLifetime);
}

Leaf issue_shard_leaf(const JobSpec& job, const CaBundle& ca, int index) {
  return issue_leaf(ca, shard_id(job, index), kLeafLifetime);
}

Leaf issue_replica_leaf(const JobSpec& job, const CaBundle& ca, int index, int replica) {
  return issue_leaf(ca, op::spiffe_id_of(job, index, replica), kLeafLifetime);
}

op::RenderInputs make_render_inputs(nlohmann::json object, const CaBundle& ca, std::vector<op::ShardMaterial> shards) {
  op::RenderInputs in;
  // The real metadata.uid is assigned by the API server when the job is created;
  // a random one stands in for it in the ownerReferences.
  in.uid = random_uuid();
  if (!object.is_object()) object = nlohmann::json::object();
  if (!object.contains("metadata") || !object["metadata"].is_object()) object["metadata"] = nlohmann::json::object();
  object["metadata"]["uid"] = in.uid;
  in.job_object = std::move(object);
  in.ca_cert_pem = ca.cert_pem;
  in.ca_key_pem = ca.key_pem;
  in.shards = std::move(shards);
  return in;
}

LocalPki load_or_create_local_pki(const JobSpec& job, const std::string& workdir, bool reuse,
                                  const std::string& kept_checkpoint_dir) {
  const std::string pki_dir = workdir + "/pki", key_dir = workdir + "/keys";
  LocalPki pki;
  bool ca_reused = false;
  if (reuse && fs::exists(pki_dir + "/ca.crt") && fs::exists(pki_dir + "/ca.key")) {
    CaBundle old{read_file(pki_dir + "/ca.crt"), read_file(pki_dir + "/ca.key")};
    if (usable_ca(job, old)) {
      pki.ca = std::move(old);
      ca_reused = true;
      pki.reused.push_back(pki_dir + "/ca.crt");
    }
  }
  if (!ca_reused) pki.ca = create_job_ca(job);

  const int n = job.sharding.shards;
  for (int k = 0; k < n * op::replica_count(job); ++k) {
    const int i = k % n, r = k / n;
    op::ShardMaterial m;
    // Replicas: each its own leaf (spiffe_id_of), in shard-<i>-r<r>; the stage's keys.
    const std::string shard_dir = workdir + "/shard-" + std::to_string(i) + (r > 0 ? "-r" + std::to_string(r) : "");
    const std::string identity = op::spiffe_id_of(job, i, r);
    if (r > 0) {
      m.checkpoint_key = pki.shards[i].checkpoint_key;
      m.ledger_key = pki.shards[i].ledger_key;
    }
    // Both keys: reused when present (a wrong size throws), never replaced.
    for (auto [file, key, ledger] : {std::tuple{checkpoint_key_file(key_dir, i), &m.checkpoint_key, false},
                                     std::tuple{ledger_key_file(key_dir, i), &m.ledger_key, true}}) {
      if (r > 0) break;  // replica 0's, above
      if (fs::exists(file)) {
        *key = load_key_file(file);
        pki.reused.push_back(file);
        continue;
      }
      if (const auto [where, orphans] = sealed_by(job, workdir, kept_checkpoint_dir, i, ledger); !orphans.empty()) {
        std::string list;
        for (size_t k = 0; k < orphans.size() && k < 3; ++k) list += (k ? ", " : "") + orphans[k];
        if (orphans.size() > 3) list += " and " + std::to_string(orphans.size() - 3) + " more";
        throw LocalPkiError(
            "shard " + std::to_string(i) + ": its " + (ledger ? "ledger key " : "checkpoint key ") + file +
            " is missing, but " + where + " holds what it sealed (" + list +
            "); a new key could never read them. Restore " + file + " from a backup, or start over with --fresh " +
            "(deletes every checkpoint of the run)");
      }
      *key = random_bytes(kAesKeyBytes);
    }
    if (ca_reused && fs::exists(shard_dir + "/tls.crt") && fs::exists(shard_dir + "/tls.key")) {
      const std::string cert = read_file(shard_dir + "/tls.crt");
      const SvidCheck check = verify_svid(cert, pki.ca.cert_pem, Clock::now() + std::chrono::hours(1));
      if (check.ok && check.spiffe_id == identity) {
        m.cert_pem = cert;
        m.key_pem = read_file(shard_dir + "/tls.key");
        pki.reused.push_back(shard_dir + "/tls.crt");
      }
    }
    if (m.cert_pem.empty()) {
      const Leaf leaf = issue_leaf(pki.ca, identity, kLeafLifetime);
      m.cert_pem = leaf.cert_pem;
      m.key_pem = leaf.key_pem;
    }
    pki.shards.push_back(std::move(m));
  }
  pki.stages = static_cast<size_t>(n);
  return pki;
}

void save_local_pki(const LocalPki& pki, const std::string& workdir) {
  const std::string pki_dir = workdir + "/pki", key_dir = workdir + "/keys";
  make_dirs(pki_dir);
  make_dirs(key_dir);
  ::chmod(pki_dir.c_str(), 0700);
  ::chmod(key_dir.c_str(), 0700);
  write_file_atomic(pki_dir + "/ca.crt", pki.ca.cert_pem);
  write_file_atomic(pki_dir + "/ca.key", pki.ca.key_pem, 0600);
  // The stage's keys are replica 0's (slots 0 .. shards-1; the others hold copies).
  for (size_t i = 0; i < pki.shards.size() && i < pki.stages; ++i) {
    for (auto [file, key] : {std::pair{checkpoint_key_file(key_dir, i), &pki.shards[i].checkpoint_key},
                             std::pair{ledger_key_file(key_dir, i), &pki.shards[i].ledger_key}}) {
      if (!fs::exists(file)) write_file_atomic(file, *key, 0600);  // never replaced
    }
  }
}

}  // namespace shardguard::shardctl
