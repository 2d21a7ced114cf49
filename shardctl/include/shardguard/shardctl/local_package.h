// A package job (spec.model.package, docs/distribution.md) on this machine: the
// manifest read from the package directory spec.model.package.path (a url job: from
// the keys directory), and the package keys from a local keys directory, the stand-in
// for the keys Secret (by default <path>.keys, where `shardctl split` puts them; a
// url job has no default). Torch-free.
#pragma once

#include <optional>
#include <string>

#include "shardguard/common/jobspec.h"
#include "shardguard/model/package.h"
#include "shardguard/operator/render.h"

namespace shardguard::shardctl {

// <path>/manifest.json of a package job, or for a url job <keys dir>/manifest.json
// (never fetched from the URL); nullopt for a zoo job. Throws model::PackageError
// naming the file.
std::optional<model::PackageManifest> local_manifest(const JobSpec& job, const std::string& keys_dir = "");

// The job's model and cut (model::job_cut with local_manifest).
model::JobCut local_job_cut(const JobSpec& job, const std::string& keys_dir = "");

// "" → <path>.keys (the path without trailing '/'), as `shardctl split` defaults; a
// url job has no default (model::PackageError asking for --package-keys).
std::string package_keys_dir(const JobSpec& job, const std::string& keys_dir);

// A package job's manifest and every shard's key (keys_dir/shard-<i>.key) into the
// render inputs, as the operator fills them from the keys Secret. Nothing for a zoo
// job. Throws model::PackageError naming the file that is missing or not a key.
void add_local_package(const JobSpec& job, const std::string& keys_dir, op::RenderInputs& in);

}  // namespace shardguard::shardctl
