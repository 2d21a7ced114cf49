// File names that several binaries agree on: shardd writes a shard's checkpoints,
// the sidecar its exposure ledger, the operator renders the ledger's path, and
// `shardctl run` looks for both before it would make a key that cannot read them.
#pragma once

#include <string>

namespace shardguard {

// <job>-shard-<stage>-step-<step, 12 digits>.sgckpt (and .rejected when set aside).
inline std::string checkpoint_file_prefix(const std::string& job, int stage) {
  return job + "-shard-" + std::to_string(stage) + "-step-";
}
inline constexpr const char* kCheckpointSuffix = ".sgckpt";

// <job>-shard-<shard>.ledger.json, sealed under the shard's ledger key.
inline std::string ledger_file_name(const std::string& job, int shard) {
  return job + "-shard-" + std::to_string(shard) + ".ledger.json";
}

}  // namespace shardguard
