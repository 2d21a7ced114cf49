#include "shardguard/shardd/checkpoint.h"

#include <dirent.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/serialize.h>

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/common/shard_files.h"

namespace shardguard::shardd {
namespace {

constexpr char kMagic[] = "SGCKPT01";
constexpr size_t kMagicLen = 8;

std::string file_prefix(const CheckpointId& id) { return checkpoint_file_prefix(id.job, id.stage); }
constexpr const char* kSuffix = kCheckpointSuffix;

std::string encode_header(const CheckpointHeader& h) {
  nlohmann::json j = {{"format", "shardguard-checkpoint/v1"},
                      {"job", h.id.job},
                      {"stage", h.id.stage},
                      {"blocks", {h.id.first_block, h.id.end_block}},
                      {"step", h.step}};
  return j.dump();
}

struct Parsed {
  CheckpointHeader header;
  std::string aad;     // magic + length + header bytes
  std::string sealed;  // nonce | ciphertext | tag
};

Parsed parse_file(const std::string& path) {
  std::string data;
  try {
    data = read_file(path);
  } catch (const FileError& e) {
    throw CheckpointError(std::string("checkpoint ") + path + ": " + e.what());
  }
  if (data.size() < kMagicLen + 4 || data.compare(0, kMagicLen, kMagic) != 0) {
    throw CheckpointError("checkpoint " + path + ": not a ShardGuard checkpoint (bad magic)");
  }
  uint32_t len = 0;
  for (int i = 0; i < 4; ++i) len |= static_cast<uint32_t>(static_cast<unsigned char>(data[kMagicLen + i])) << (8 * i);
  if (len > data.size() - kMagicLen - 4) throw CheckpointError("checkpoint " + path + ": truncated header");
  Parsed p;
  p.aad = data.substr(0, kMagicLen + 4 + len);
  p.sealed = data.substr(kMagicLen + 4 + len);
  try {
    const auto j = nlohmann::json::parse(data.substr(kMagicLen + 4, len));
    if (j.at("format") != "shardguard-checkpoint/v1") throw CheckpointError("unknown format");
    p.header.id.job = j.at("job").get<std::string>();
    p.header.id.stage = j.at("stage").get<int>();
    p.header.id.first_block = j.at("blocks").at(0).get<int>();
    p.header.id.end_block = j.at("blocks").at(1).get<int>();
    p.header.step = j.at("step").get<int64_t>();
  } catch (const std::exception& e) {
    throw CheckpointError("checkpoint " + path + ": unreadable header (" + e.what() + ")");
  }
  return p;
}

std::string open_payload(const Parsed& p, const std::string& path, const std::string& key) {
  try {
    return aes256gcm_open(key, p.aad, p.sealed);
  } catch (const CryptoError& e) {
    throw CheckpointError("checkpoint " + path + ": refused: " + e.what() +
                          " (the file was modified, is truncated, or this is not the shard's key)");
  }
}

}  // namespace

CheckpointStore::CheckpointStore(std::string dir, CheckpointId id, std::string key, int keep)
    : dir_(std::move(dir)), id_(std::move(id)), key_(std::move(key)), keep_(keep) {
  if (key_.size() != kAesKeyBytes) throw CheckpointError("checkpoint key must be 32 bytes, got " + std::to_string(key_.size()));
  make_dirs(dir_);
}

std::string CheckpointStore::path_for(int64_t step) const {
  char num[32];
  std::snprintf(num, sizeof num, "%010lld", static_cast<long long>(step));
  return dir_ + "/" + file_prefix(id_) + num + kSuffix;
}

std::vector<int64_t> CheckpointStore::steps() const {
  std::vector<int64_t> out;
  const std::string prefix = file_prefix(id_);
  DIR* d = ::opendir(dir_.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    const size_t suffix_len = std::strlen(kSuffix);
    if (name.size() <= prefix.size() + suffix_len || name.compare(0, prefix.size(), prefix) != 0 ||
        name.compare(name.size() - suffix_len, suffix_len, kSuffix) != 0) {
      continue;
    }
    const std::string num = name.substr(prefix.size(), name.size() - prefix.size() - suffix_len);
    if (num.empty() || !std::all_of(num.begin(), num.end(), ::isdigit)) continue;
    out.push_back(std::stoll(num));
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

size_t CheckpointStore::save(int64_t step, torch::nn::Sequential& model, torch::optim::Optimizer& optimizer) {
  torch::serialize::OutputArchive root, model_archive, optimizer_archive;
  model->save(model_archive);
  optimizer.save(optimizer_archive);
  root.write("model", model_archive);
  root.write("optimizer", optimizer_archive);
  root.write("step", torch::tensor(step, torch::kInt64));
  std::ostringstream payload;
  root.save_to(payload);

  CheckpointHeader h{id_, step};
  const std::string header = encode_header(h);
  std::string aad(kMagic, kMagicLen);
  const auto len = static_cast<uint32_t>(header.size());
  for (int i = 0; i < 4; ++i) aad.push_back(static_cast<char>((len >> (8 * i)) & 0xff));
  aad += header;
  const std::string file = aad + aes256gcm_seal(key_, aad, payload.str());
  write_file_atomic(path_for(step), file, 0600);

  auto all = steps();
  while (static_cast<int>(all.size()) > keep_) {
    std::remove(path_for(all.front()).c_str());
    all.erase(all.begin());
  }
  return file.size();
}

void CheckpointStore::load(int64_t step, torch::nn::Sequential& model, torch::optim::Optimizer& optimizer,
                           torch::Device device) const {
  const std::string path = path_for(step);
  const Parsed p = parse_file(path);
  const auto& got = p.header.id;
  if (got.job != id_.job || got.stage != id_.stage || got.first_block != id_.first_block ||
      got.end_block != id_.end_block || p.header.step != step) {
    throw CheckpointError("checkpoint " + path + ": belongs to job " + got.job + " stage " + std::to_string(got.stage) +
                          " blocks [" + std::to_string(got.first_block) + ", " + std::to_string(got.end_block) +
                          ") step " + std::to_string(p.header.step) + ", expected job " + id_.job + " stage " +
                          std::to_string(id_.stage) + " blocks [" + std::to_string(id_.first_block) + ", " +
                          std::to_string(id_.end_block) + ") step " + std::to_string(step));
  }
  const std::string payload = open_payload(p, path, key_);
  try {
    std::istringstream in(payload);
    torch::serialize::InputArchive root, model_archive, optimizer_archive;
    root.load_from(in, device);
    root.read("model", model_archive);
    root.read("optimizer", optimizer_archive);
    model->load(model_archive);
    optimizer.load(optimizer_archive);
  } catch (const c10::Error& e) {
    throw CheckpointError("checkpoint " + path + ": authenticated but unreadable payload: " + e.what_without_backtrace());
  }
}

std::string CheckpointStore::quarantine(int64_t step) const {
  const std::string from = path_for(step), to = from + ".rejected";
  return std::rename(from.c_str(), to.c_str()) == 0 ? to : "";
}

CheckpointHeader read_checkpoint_header(const std::string& path) { return parse_file(path).header; }

void load_checkpoint_model(const std::string& path, const std::string& key, torch::nn::Sequential& model) {
  const Parsed p = parse_file(path);
  const std::string payload = open_payload(p, path, key);
  try {
    std::istringstream in(payload);
    torch::serialize::InputArchive root, model_archive;
    root.load_from(in, torch::kCPU);
    root.read("model", model_archive);
    model->load(model_archive);
  } catch (const c10::Error& e) {
    throw CheckpointError("checkpoint " + path + ": authenticated but unreadable payload: " + e.what_without_backtrace());
  }
}

}  // namespace shardguard::shardd
