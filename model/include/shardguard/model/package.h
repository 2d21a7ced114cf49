// A model split into packages (`shardctl split`, docs/distribution.md): the
// manifest that describes the cut without holding any weight, and the sealed
// package container, one per shard. Pure and torch-free: bytes in, bytes out
// (the callers read and write the files), so the operator and the torch-free
// shardctl can read a manifest, and shardd and shardctl open packages alike.
//
// Package file: "SGPKG001" | u32 little-endian header length | header JSON |
//               nonce(12) | ciphertext | tag(16)
// The header ({"format","split","shard","shards","blocks"}) is the AES-256-GCM
// additional authenticated data with the magic and the length, so a package cannot
// be passed off as another shard's or another split's; the plaintext is the
// TorchScript archive of the shard's blocks.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "shardguard/common/jobspec.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/model/partition.h"

namespace shardguard::model {

class PackageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The package could not be had (not found, unreachable, timed out): not a refusal.
class PackageUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr const char* kManifestFormat = "shardguard-manifest/v1";
inline constexpr const char* kPackageFormat = "shardguard-package/v1";
inline constexpr const char* kManifestFile = "manifest.json";
// shardd's exit status when its package is refused (digest, header, key, contents):
// the same package and key would be refused again, so the operator fails the job at
// once, naming the shard, instead of recreating the pod (docs/operator.md).
inline constexpr int kExitPackageRefused = 3;
// shardd's exit status when its package could not be fetched (spec.model.package.url:
// a 404, an unreachable or stalled server, a TLS certificate that does not verify)
// after its bounded retries. Nothing was refused: the pod fails like any other and is
// recreated within runPolicy.backoffLimit, so the package may yet appear.
inline constexpr int kExitPackageUnavailable = 4;

// "shard-<i>.sgpkg": the package of shard i, in the package directory (or under a
// URL prefix), and "shard-<i>.key" its key in the keys directory.
std::string package_file_name(int shard);
std::string package_key_file_name(int shard);

struct PackageParam {
  std::string name;            // in the package: "block3.ln1.weight"
  std::vector<int64_t> shape;
  int64_t numel = 0;
  bool operator==(const PackageParam& o) const { return name == o.name && shape == o.shape && numel == o.numel; }
  bool operator!=(const PackageParam& o) const { return !(*this == o); }
};

struct PackageBlock {
  int index = 0;
  std::string source;          // its attribute path in the scripted model: "blocks.3"
  std::string type;            // its TorchScript class, e.g. "__torch__.CausalLayer"
  std::vector<int64_t> in_shape, out_shape;  // per sample (no batch dimension)
  std::string in_dtype, out_dtype;           // "float32", "int64", …
  int64_t parameters = 0;
};

struct PackageShard {
  int index = 0;
  int first_block = 0, end_block = 0;  // [first, end)
  int64_t parameters = 0;
  double share = 0;                    // of the model's parameters
  std::vector<PackageParam> params;    // in the package's order
  std::string file;                    // package_file_name(index)
  std::string sha256;                  // of the whole package file
  int64_t bytes = 0;
};

struct PackageManifest {
  std::string split_id;       // random, in every package header: packages of one split only
  std::string source_sha256;  // of the TorchScript archive that was split
  std::string job;            // metadata.name of the job given to split
  std::string attribute;      // the blocks attribute, e.g. "blocks"
  std::string balance = "parameters";
  std::vector<PackageBlock> blocks;
  std::vector<PackageShard> shards;

  int64_t parameters() const;
  // The blocks as the partitioner and the exposure math see them (FLOPs are not
  // measured for TorchScript models: 0).
  ModelDesc desc() const;
  // The cut split made, as partition() gives it for zoo models.
  std::vector<StageDesc> stages() const;
};

// The model and the cut of a job, as every party computes them: for architecture
// torchscript the manifest's (`manifest` must be given: read from the package
// directory locally, from spec.model.package.keysSecret by the operator), otherwise
// describe_model and partition. Throws PackageError (spec.model.package: no manifest,
// or one cut into another number of shards than spec.sharding.shards) and what
// describe_model and partition throw.
struct JobCut {
  ModelDesc desc;
  std::vector<StageDesc> stages;
};
JobCut job_cut(const JobSpec& job, const PackageManifest* manifest);

nlohmann::json to_json(const PackageManifest& manifest);
// Throws PackageError ("manifest WHAT: …", naming the field) for anything missing,
// mistyped or inconsistent (shards that do not cover the blocks once, in order).
PackageManifest manifest_from_json(const nlohmann::json& json, const std::string& what);
PackageManifest parse_manifest(const std::string& text, const std::string& what);

struct PackageHeader {
  std::string split_id;
  int shard = 0;
  int shards = 0;
  int first_block = 0, end_block = 0;
};

// The package file of one shard: `archive` sealed under the shard's 32-byte key.
std::string seal_package(const PackageHeader& header, const std::string& key, const std::string& archive);

// Checks, in this order and before any decryption: the file's SHA-256 against the
// manifest's entry for `shard`, the magic, the header against the manifest (split,
// shard, blocks); then authenticates and decrypts with `key`. Returns the archive.
// Throws PackageError naming `what` (the file) and the reason: a digest that does not
// match, another shard's or split's package, a wrong key or a modified file.
std::string open_package(const std::string& bytes, const std::string& key, const PackageManifest& manifest,
                         int shard, const std::string& what);

}  // namespace shardguard::model
