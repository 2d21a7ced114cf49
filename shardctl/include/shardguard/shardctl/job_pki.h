// The job's PKI and keys as the operator makes them (DESIGN.md §3): one ECDSA CA
// per job, one leaf SVID, one 32-byte checkpoint key and one 32-byte ledger key per shard, and the
// RenderInputs that carry them into op::render. Shared by `shardctl render` (fresh,
// in memory) and `shardctl run` (kept in the workdir, reused by --resume).
#pragma once

#include <chrono>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/common/jobspec.h"
#include "shardguard/common/pki.h"
#include "shardguard/operator/render.h"

namespace shardguard::shardctl {

// Lifetimes as the operator issues them: leaves 24 h, the CA 30 days.
inline constexpr std::chrono::hours kCaLifetime{24 * 30};
inline constexpr std::chrono::hours kLeafLifetime{24};

// A random (version 4) UUID, standing in for the metadata.uid the API server assigns.
std::string random_uuid();

// A fresh job CA, named after the job's trust domain, namespace and name.
CaBundle create_job_ca(const JobSpec& job);

// A fresh leaf SVID for spiffe://<td>/ns/<ns>/job/<job>/shard/<index>.
Leaf issue_shard_leaf(const JobSpec& job, const CaBundle& ca, int index);
// Replica r of stage i of a job with spec.sharding.replicas > 1 (op::spiffe_id_of).
Leaf issue_replica_leaf(const JobSpec& job, const CaBundle& ca, int index, int replica);

// The inputs of op::render for `object` (the job as read; its metadata.uid is set
// to a random UUID), `ca` and one ShardMaterial per shard. The images stay empty
// (spec.template.image / spec.sidecar.image) unless the caller sets them.
op::RenderInputs make_render_inputs(nlohmann::json object, const CaBundle& ca, std::vector<op::ShardMaterial> shards);

// The job's PKI kept in a `shardctl run` workdir, as the operator keeps it in the
// job's Secrets:
//   <workdir>/pki/ca.crt, ca.key (0600)      the job CA
//   <workdir>/keys/shard-<i>.key (0600)      each shard's checkpoint key
//   <workdir>/keys/shard-<i>.ledger.key      each sidecar's exposure-ledger HMAC key
// A key that exists is always reused, never replaced (the checkpoints and the
// ledger are sealed under them); one of the wrong size is an error. With reuse (--resume),
// the CA is reused when it still parses and signs, and so is each shard's leaf in
// <workdir>/shard-<i>/tls.crt, tls.key when the CA still verifies it for another
// hour with the expected SPIFFE ID; otherwise they are made afresh.
class LocalPkiError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct LocalPki {
  CaBundle ca;
  // One per pod slot (op::slot_of: replica r of stage i at r·shards + i), each with
  // its own leaf; the replicas of a stage hold copies of replica 0's keys.
  std::vector<op::ShardMaterial> shards;
  size_t stages = 0;  // spec.sharding.shards: the slots whose keys are the stages' own
  std::vector<std::string> reused;  // what came from the workdir, for the log
};

// <workdir>/logs/sidecar-state-<shard>: what the sidecar's own volume (the audit
// log) and its subPath of the checkpoint volume (the exposure ledger) are in a
// `shardctl run`.
std::string local_sidecar_state_dir(const std::string& workdir, int shard);

// Reads and makes, but writes nothing (so a job render() refuses leaves no state).
// A key is never made for a shard whose checkpoints are in `kept_checkpoint_dir`
// ("" when none are kept, e.g. with --fresh), or whose sealed ledger is then in its
// local_sidecar_state_dir (or, as written before, in the checkpoint dir): without its key
// they could never be read again, so a missing key throws LocalPkiError naming the
// shard, the key file and the files it seals, and how to recover.
LocalPki load_or_create_local_pki(const JobSpec& job, const std::string& workdir, bool reuse,
                                  const std::string& kept_checkpoint_dir = "");
// Writes the CA and the checkpoint and ledger keys (atomic, keys 0600, directories 0700).
void save_local_pki(const LocalPki& pki, const std::string& workdir);

}  // namespace shardguard::shardctl
