#include "shardguard/model/package.h"

#include <cmath>

#include "shardguard/common/crypto.h"

namespace shardguard::model {
namespace {

constexpr char kMagic[] = "SGPKG001";
constexpr size_t kMagicLen = 8;

using nlohmann::json;

// A field of the manifest, with its path in every error.
template <typename T>
T field(const json& j, const std::string& key, const std::string& path, const std::string& what) {
  if (!j.is_object() || !j.contains(key)) throw PackageError("manifest " + what + ": " + path + key + " is missing");
  try {
    return j.at(key).get<T>();
  } catch (const json::exception& e) {
    throw PackageError("manifest " + what + ": " + path + key + " has the wrong type (" + e.what() + ")");
  }
}

json block_json(const PackageBlock& b) {
  return {{"index", b.index},       {"source", b.source},     {"type", b.type},
          {"in_shape", b.in_shape}, {"out_shape", b.out_shape}, {"in_dtype", b.in_dtype},
          {"out_dtype", b.out_dtype}, {"parameters", b.parameters}};
}

json shard_json(const PackageShard& s) {
  json params = json::array();
  for (const auto& p : s.params) params.push_back({{"name", p.name}, {"shape", p.shape}, {"numel", p.numel}});
  return {{"index", s.index}, {"blocks", {s.first_block, s.end_block}}, {"parameters", s.parameters},
          {"share", s.share}, {"params", params}, {"file", s.file}, {"sha256", s.sha256}, {"bytes", s.bytes}};
}

std::string header_json(const PackageHeader& h) {
  return json{{"format", kPackageFormat}, {"split", h.split_id}, {"shard", h.shard}, {"shards", h.shards},
              {"blocks", {h.first_block, h.end_block}}}
      .dump();
}

}  // namespace

std::string package_file_name(int shard) { return "shard-" + std::to_string(shard) + ".sgpkg"; }
std::string package_key_file_name(int shard) { return "shard-" + std::to_string(shard) + ".key"; }

int64_t PackageManifest::parameters() const {
  int64_t total = 0;
  for (const auto& b : blocks) total += b.parameters;
  return total;
}

ModelDesc PackageManifest::desc() const {
  ModelDesc d;
  d.architecture = "torchscript";
  for (const auto& b : blocks) {
    BlockDesc bd;
    bd.index = b.index;
    bd.name = b.source;
    bd.in_shape = b.in_shape;
    bd.out_shape = b.out_shape;
    bd.parameters = b.parameters;
    d.blocks.push_back(std::move(bd));
  }
  return d;
}

std::vector<StageDesc> PackageManifest::stages() const {
  std::vector<StageDesc> out;
  for (const auto& s : shards) {
    StageDesc d;
    d.index = s.index;
    d.first_block = s.first_block;
    d.end_block = s.end_block;
    d.parameters = s.parameters;
    out.push_back(d);
  }
  return out;
}

JobCut job_cut(const JobSpec& job, const PackageManifest* manifest) {
  JobCut cut;
  if (!job.model.from_package()) {
    cut.desc = describe_model(job.model);
    cut.stages = partition(cut.desc, job.sharding.shards, job.sharding.balance);
    return cut;
  }
  if (manifest == nullptr) {
    throw PackageError("spec.model.package: no manifest of the packages was read (architecture torchscript takes "
                       "its cut from " + std::string(kManifestFile) + ")");
  }
  if (static_cast<int>(manifest->shards.size()) != job.sharding.shards) {
    throw PackageError("spec.sharding.shards: " + std::to_string(job.sharding.shards) + ", but the packages of split " +
                       manifest->split_id + " are cut into " + std::to_string(manifest->shards.size()) +
                       " shards (split the model again with this job)");
  }
  cut.desc = manifest->desc();
  cut.stages = manifest->stages();
  return cut;
}

json to_json(const PackageManifest& m) {
  json blocks = json::array(), shards = json::array();
  for (const auto& b : m.blocks) blocks.push_back(block_json(b));
  for (const auto& s : m.shards) shards.push_back(shard_json(s));
  return {{"format", kManifestFormat}, {"split", m.split_id},        {"source_sha256", m.source_sha256},
          {"job", m.job},              {"attribute", m.attribute},   {"balance", m.balance},
          {"parameters", m.parameters()}, {"blocks", blocks},        {"shards", shards}};
}

PackageManifest manifest_from_json(const json& j, const std::string& what) {
  if (field<std::string>(j, "format", "", what) != kManifestFormat) {
    throw PackageError("manifest " + what + ": format is " + j.at("format").dump() + ", expected \"" +
                       kManifestFormat + "\"");
  }
  PackageManifest m;
  m.split_id = field<std::string>(j, "split", "", what);
  m.source_sha256 = field<std::string>(j, "source_sha256", "", what);
  m.job = field<std::string>(j, "job", "", what);
  m.attribute = field<std::string>(j, "attribute", "", what);
  m.balance = field<std::string>(j, "balance", "", what);
  const auto blocks = field<json>(j, "blocks", "", what);
  const auto shards = field<json>(j, "shards", "", what);
  if (!blocks.is_array() || blocks.empty()) throw PackageError("manifest " + what + ": blocks must be a non-empty list");
  if (!shards.is_array() || shards.empty()) throw PackageError("manifest " + what + ": shards must be a non-empty list");
  for (size_t i = 0; i < blocks.size(); ++i) {
    const std::string p = "blocks[" + std::to_string(i) + "].";
    PackageBlock b;
    b.index = field<int>(blocks[i], "index", p, what);
    if (b.index != static_cast<int>(i)) {
      throw PackageError("manifest " + what + ": " + p + "index is " + std::to_string(b.index) + ", expected " +
                         std::to_string(i));
    }
    b.source = field<std::string>(blocks[i], "source", p, what);
    b.type = field<std::string>(blocks[i], "type", p, what);
    b.in_shape = field<std::vector<int64_t>>(blocks[i], "in_shape", p, what);
    b.out_shape = field<std::vector<int64_t>>(blocks[i], "out_shape", p, what);
    b.in_dtype = field<std::string>(blocks[i], "in_dtype", p, what);
    b.out_dtype = field<std::string>(blocks[i], "out_dtype", p, what);
    b.parameters = field<int64_t>(blocks[i], "parameters", p, what);
    m.blocks.push_back(std::move(b));
  }
  int next = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string p = "shards[" + std::to_string(i) + "].";
    PackageShard s;
    s.index = field<int>(shards[i], "index", p, what);
    const auto range = field<std::vector<int>>(shards[i], "blocks", p, what);
    if (s.index != static_cast<int>(i) || range.size() != 2 || range[0] != next || range[1] <= range[0] ||
        range[1] > static_cast<int>(m.blocks.size())) {
      throw PackageError("manifest " + what + ": " + p + " does not continue the cut: shard " + std::to_string(i) +
                         " must start at block " + std::to_string(next) + " and end within the " +
                         std::to_string(m.blocks.size()) + " blocks");
    }
    s.first_block = range[0];
    s.end_block = range[1];
    next = s.end_block;
    s.parameters = field<int64_t>(shards[i], "parameters", p, what);
    s.share = field<double>(shards[i], "share", p, what);
    const auto params = field<json>(shards[i], "params", p, what);
    if (!params.is_array()) throw PackageError("manifest " + what + ": " + p + "params must be a list");
    for (size_t k = 0; k < params.size(); ++k) {
      const std::string pp = p + "params[" + std::to_string(k) + "].";
      s.params.push_back({field<std::string>(params[k], "name", pp, what),
                          field<std::vector<int64_t>>(params[k], "shape", pp, what),
                          field<int64_t>(params[k], "numel", pp, what)});
    }
    s.file = field<std::string>(shards[i], "file", p, what);
    if (s.file != package_file_name(s.index)) {
      throw PackageError("manifest " + what + ": " + p + "file is \"" + s.file + "\", expected \"" +
                         package_file_name(s.index) + "\"");
    }
    s.sha256 = field<std::string>(shards[i], "sha256", p, what);
    s.bytes = field<int64_t>(shards[i], "bytes", p, what);
    m.shards.push_back(std::move(s));
  }
  if (next != static_cast<int>(m.blocks.size())) {
    throw PackageError("manifest " + what + ": the shards cover blocks 0.." + std::to_string(next - 1) + " of " +
                       std::to_string(m.blocks.size()));
  }
  return m;
}

PackageManifest parse_manifest(const std::string& text, const std::string& what) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw PackageError("manifest " + what + ": not JSON (" + e.what() + ")");
  }
  return manifest_from_json(j, what);
}

std::string seal_package(const PackageHeader& h, const std::string& key, const std::string& archive) {
  const std::string header = header_json(h);
  std::string aad(kMagic, kMagicLen);
  const auto len = static_cast<uint32_t>(header.size());
  for (int i = 0; i < 4; ++i) aad.push_back(static_cast<char>((len >> (8 * i)) & 0xFF));
  aad += header;
  return aad + aes256gcm_seal(key, aad, archive);
}

std::string open_package(const std::string& bytes, const std::string& key, const PackageManifest& m, int shard,
                         const std::string& what) {
  const std::string pre = "package " + what + ": ";
  if (shard < 0 || shard >= static_cast<int>(m.shards.size())) {
    throw PackageError(pre + "shard " + std::to_string(shard) + " is not in the manifest (it has " +
                       std::to_string(m.shards.size()) + " shards)");
  }
  const PackageShard& s = m.shards[shard];
  const std::string digest = sha256_hex(bytes);
  if (digest != s.sha256) {
    throw PackageError(pre + "SHA-256 " + digest + " does not match the manifest's " + s.sha256 + " for shard " +
                       std::to_string(shard) + " (the file was modified, is truncated, or belongs to another split)");
  }
  if (bytes.size() < kMagicLen + 4 || bytes.compare(0, kMagicLen, kMagic) != 0) {
    throw PackageError(pre + "not a ShardGuard package (bad magic)");
  }
  uint32_t len = 0;
  for (int i = 0; i < 4; ++i) len |= static_cast<uint32_t>(static_cast<unsigned char>(bytes[kMagicLen + i])) << (8 * i);
  if (len > bytes.size() - kMagicLen - 4) throw PackageError(pre + "truncated header");
  PackageHeader h;
  try {
    const auto j = json::parse(bytes.substr(kMagicLen + 4, len));
    if (j.at("format") != kPackageFormat) throw PackageError("unknown format " + j.at("format").dump());
    h.split_id = j.at("split").get<std::string>();
    h.shard = j.at("shard").get<int>();
    h.shards = j.at("shards").get<int>();
    h.first_block = j.at("blocks").at(0).get<int>();
    h.end_block = j.at("blocks").at(1).get<int>();
  } catch (const std::exception& e) {
    throw PackageError(pre + "unreadable header (" + e.what() + ")");
  }
  if (h.split_id != m.split_id || h.shard != shard || h.shards != static_cast<int>(m.shards.size()) ||
      h.first_block != s.first_block || h.end_block != s.end_block) {
    throw PackageError(pre + "is shard " + std::to_string(h.shard) + " of " + std::to_string(h.shards) +
                       " (blocks [" + std::to_string(h.first_block) + ", " + std::to_string(h.end_block) +
                       ")) of split " + h.split_id + ", expected shard " + std::to_string(shard) + " of " +
                       std::to_string(m.shards.size()) + " (blocks [" + std::to_string(s.first_block) + ", " +
                       std::to_string(s.end_block) + ")) of split " + m.split_id);
  }
  try {
    return aes256gcm_open(key, bytes.substr(0, kMagicLen + 4 + len), bytes.substr(kMagicLen + 4 + len));
  } catch (const CryptoError& e) {
    throw PackageError(pre + "refused: " + e.what() + " (this is not shard " + std::to_string(shard) +
                       "'s key, or the file was modified)");
  }
}

}  // namespace shardguard::model
