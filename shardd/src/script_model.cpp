#include "shardguard/shardd/script_model.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <sstream>

#include <torch/csrc/jit/serialization/import.h>
#include <torch/torch.h>

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/model/partition.h"
#include "shardguard/shardd/checkpoint.h"
#include "shardguard/shardd/data.h"
#include "shardguard/shardd/recombine.h"

namespace shardguard::shardd {
namespace fs = std::filesystem;
using model::PackageError;

namespace {

std::string shape_of(const torch::Tensor& t, bool per_sample) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  if (per_sample && !s.empty()) s.erase(s.begin());
  return model::shape_str(s);
}

std::vector<int64_t> per_sample(const torch::Tensor& t) {
  return std::vector<int64_t>(t.sizes().begin() + 1, t.sizes().end());
}

// The line of a LibTorch / TorchScript error that says what went wrong: the
// interpreter's message ends with the Python-style "RuntimeError: …" line.
std::string error_summary(const std::string& what) {
  std::istringstream in(what);
  std::string line, last, runtime;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    last = line;
    if (line.find("Error: ") != std::string::npos && runtime.empty()) runtime = line;
  }
  std::string s = runtime.empty() ? last : runtime;
  const auto start = s.find_first_not_of(" \t");
  return start == std::string::npos ? s : s.substr(start);
}

bool is_sequence_type(const std::string& qualified) {
  const bool container = qualified.find("torch.nn.modules.container.") != std::string::npos;
  const auto dot = qualified.rfind('.');
  const std::string last = dot == std::string::npos ? qualified : qualified.substr(dot + 1);
  return container && (last == "Sequential" || last == "ModuleList");
}

std::string type_name(const torch::jit::Module& m) { return m.type()->name()->qualifiedName(); }

std::string random_hex(size_t bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : random_bytes(bytes)) {
    out.push_back(digits[c >> 4]);
    out.push_back(digits[c & 15]);
  }
  return out;
}

// Finds the blocks attribute: the one named, or the only Sequential/ModuleList child.
std::pair<std::string, torch::jit::Module> find_blocks(const torch::jit::Module& module, const std::string& path,
                                                      const std::string& attribute) {
  std::vector<std::pair<std::string, torch::jit::Module>> children;
  for (const auto& c : module.named_children()) children.emplace_back(c.name, c.value);
  auto listing = [&] {
    std::string s;
    for (const auto& [name, m] : children) s += (s.empty() ? "" : ", ") + name + " (" + type_name(m) + ")";
    return s.empty() ? std::string("none") : s;
  };
  if (!attribute.empty()) {
    for (const auto& [name, m] : children) {
      if (name != attribute) continue;
      if (!is_sequence_type(type_name(m))) {
        throw PackageError("model " + path + ": the blocks attribute \"" + name + "\" is a " + type_name(m) +
                           ", not an ordered nn.Sequential or nn.ModuleList; put the blocks in one of those, in the "
                           "order the model applies them");
      }
      return {name, m};
    }
    throw PackageError("model " + path + ": has no submodule \"" + attribute + "\" (--blocks); its submodules are: " +
                       listing());
  }
  std::vector<std::pair<std::string, torch::jit::Module>> found;
  for (const auto& c : children) {
    if (is_sequence_type(type_name(c.second))) found.push_back(c);
  }
  if (found.size() == 1) return found[0];
  if (found.empty()) {
    throw PackageError("model " + path + ": no submodule is an nn.Sequential or nn.ModuleList, so there is no "
                       "ordered sequence of blocks to cut; its submodules are: " + listing() +
                       ". Put the blocks in one such attribute, in the order forward applies them");
  }
  std::string names;
  for (const auto& [name, m] : found) names += (names.empty() ? "" : ", ") + name;
  throw PackageError("model " + path + ": several submodules are sequences (" + names +
                     "); name the blocks attribute with --blocks");
}

// A directory that split may create: missing, or an empty directory.
void check_target(const std::string& dir, const char* flag) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return;
  if (!fs::is_directory(dir, ec)) throw PackageError(std::string(flag) + ": " + dir + " exists and is not a directory");
  if (!fs::is_empty(dir, ec)) {
    throw PackageError(std::string(flag) + ": " + dir +
                       " is not empty; split writes a new directory (remove it, or give another)");
  }
}

std::string make_temp_dir(const std::string& target) {
  std::string tmpl = target + ".tmp.XXXXXX";
  if (!::mkdtemp(tmpl.data())) {
    throw PackageError("cannot create a directory beside " + target + ": " + std::strerror(errno));
  }
  return tmpl;
}

// Registers a TorchScript module's own parameters and buffers (the same tensors, not
// copies) on `holder`, and a holder per child, recursively: the nn::Module tree then
// has the TorchScript module's names.
void mirror(torch::nn::Module& holder, const torch::jit::Module& m) {
  for (const auto& p : m.named_parameters(false)) holder.register_parameter(p.name, p.value, true);
  for (const auto& b : m.named_buffers(false)) holder.register_buffer(b.name, b.value);
  for (const auto& c : m.named_children()) {
    auto child = std::make_shared<torch::nn::Module>();
    mirror(*child, c.value);
    holder.register_module(c.name, child);
  }
}

// One TorchScript block inside a stage's Sequential.
struct ScriptBlockImpl : torch::nn::Module {
  explicit ScriptBlockImpl(torch::jit::Module m) : module(std::move(m)) { mirror(*this, module); }
  torch::Tensor forward(torch::Tensor x) { return module.forward({x}).toTensor(); }
  // Dropout and the like follow the stage's mode: the TorchScript module keeps its own flag.
  void train(bool on = true) override {
    torch::nn::Module::train(on);
    module.train(on);
  }
  torch::jit::Module module;
};
TORCH_MODULE(ScriptBlock);

}  // namespace

std::string dtype_name(c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::Float: return "float32";
    case c10::ScalarType::Double: return "float64";
    case c10::ScalarType::Half: return "float16";
    case c10::ScalarType::BFloat16: return "bfloat16";
    case c10::ScalarType::Long: return "int64";
    case c10::ScalarType::Int: return "int32";
    case c10::ScalarType::Bool: return "bool";
    default: return c10::toString(type);
  }
}

torch::Tensor example_input(const JobSpec& job, int64_t batch) {
  return data_shapes(job).example(batch, job.model.vocab);
}

ScriptModel load_script_model(const std::string& path, const JobSpec& job, const std::string& attribute) {
  ScriptModel sm;
  try {
    sm.module = torch::jit::load(path, torch::kCPU);
  } catch (const std::exception& e) {
    throw PackageError("model " + path + ": not a TorchScript archive torch::jit::load can read (" +
                       error_summary(e.what()) + ")");
  }
  auto [attr, list] = find_blocks(sm.module, path, attribute);
  sm.manifest.attribute = attr;
  sm.manifest.job = job.name;
  sm.manifest.source_sha256 = sha256_hex(read_file(path));
  for (const auto& c : list.named_children()) sm.blocks.push_back(c.value);
  if (sm.blocks.empty()) throw PackageError("model " + path + ": the blocks attribute \"" + attr + "\" is empty");

  // Every parameter and buffer inside a block; no tensor in two blocks.
  const std::string prefix = attr + ".";
  std::vector<std::string> outside;
  for (const auto& p : sm.module.named_parameters(true)) {
    if (p.name.rfind(prefix, 0) != 0) outside.push_back("parameter \"" + p.name + "\" " + shape_of(p.value, false));
  }
  for (const auto& b : sm.module.named_buffers(true)) {
    if (b.name.rfind(prefix, 0) != 0) outside.push_back("buffer \"" + b.name + "\" " + shape_of(b.value, false));
  }
  if (!outside.empty()) {
    std::string list_s;
    for (const auto& o : outside) list_s += (list_s.empty() ? "" : ", ") + o;
    throw PackageError("model " + path + ": " + list_s + (outside.size() == 1 ? " lies" : " lie") +
                       " outside the blocks attribute \"" + attr +
                       "\"; every parameter and buffer must belong to one block, so that a shard can hold it "
                       "(move it into a block)");
  }
  std::map<const void*, std::string> owner;  // storage → "blocks.i tensor name"
  for (size_t i = 0; i < sm.blocks.size(); ++i) {
    const std::string where = prefix + std::to_string(i);
    auto check = [&](const std::string& name, const torch::Tensor& t) {
      const void* key = t.storage().data();
      if (key == nullptr) return;
      const std::string me = where + "." + name;
      auto [it, fresh] = owner.emplace(key, me);
      if (!fresh && it->second.rfind(where + ".", 0) != 0) {
        throw PackageError("model " + path + ": " + me + " and " + it->second +
                           " are the same tensor (tied weights) in two blocks of \"" + attr +
                           "\"; each would be in its shard's package; untie them or keep both uses in one block");
      }
    };
    for (const auto& p : sm.blocks[i].named_parameters(true)) check(p.name, p.value);
    for (const auto& b : sm.blocks[i].named_buffers(true)) check(b.name, b.value);
  }

  // Shapes: the example input through the blocks one after the other.
  const bool was_training = sm.module.is_training();
  sm.module.eval();
  torch::NoGradGuard no_grad;
  torch::Tensor x = example_input(job, 2);
  const torch::Tensor input = x;
  for (size_t i = 0; i < sm.blocks.size(); ++i) {
    const std::string name = prefix + std::to_string(i);
    model::PackageBlock b;
    b.index = static_cast<int>(i);
    b.source = name;
    b.type = type_name(sm.blocks[i]);
    b.in_shape = per_sample(x);
    b.in_dtype = dtype_name(x.scalar_type());
    for (const auto& p : sm.blocks[i].named_parameters(true)) b.parameters += p.value.numel();
    c10::IValue out;
    try {
      out = sm.blocks[i].forward({x});
    } catch (const std::exception& e) {
      const std::string from = i == 0 ? "the job's example input (spec.dataset.format " + job.dataset.format + ")"
                                      : "the output of " + prefix + std::to_string(i - 1);
      throw PackageError("model " + path + ": the shapes of the blocks attribute \"" + attr + "\" do not chain: " +
                         name + " (" + b.type + ") cannot take " + from + ", a " + b.in_dtype + " tensor of " +
                         shape_of(x, true) + " per sample: " + error_summary(e.what()));
    }
    if (!out.isTensor()) {
      throw PackageError("model " + path + ": " + name + " (" + b.type + ") of the blocks attribute \"" + attr +
                         "\" returns a " + out.tagKind() + ", not a tensor; every block must map one tensor to one");
    }
    x = out.toTensor();
    if (x.dim() < 1 || x.size(0) != input.size(0)) {
      throw PackageError("model " + path + ": " + name + " of the blocks attribute \"" + attr +
                         "\" gives shape " + shape_of(x, false) + " for a batch of " + std::to_string(input.size(0)) +
                         "; the first dimension must stay the batch");
    }
    b.out_shape = per_sample(x);
    b.out_dtype = dtype_name(x.scalar_type());
    if (i + 1 < sm.blocks.size() && x.scalar_type() != torch::kFloat32) {
      throw PackageError("model " + path + ": " + name + " of the blocks attribute \"" + attr + "\" gives a " +
                         b.out_dtype + " tensor; the pipeline carries float32 activations between stages, so every "
                         "block but the last must give float32 (cast inside the block)");
    }
    sm.manifest.blocks.push_back(std::move(b));
  }
  const auto& last = sm.manifest.blocks.back();
  std::string what = data_shapes(job).refuses_output(last.out_shape);
  if (what.empty() && !x.is_floating_point()) what = "float logits";
  if (!what.empty()) {
    throw PackageError("model " + path + ": the last block " + last.source + " gives " + last.out_dtype + " " +
                       model::shape_str(last.out_shape) + " per sample, but spec.dataset.format " +
                       job.dataset.format + " needs " + what);
  }
  // forward must be the blocks in order: split and recombine keep nothing else.
  try {
    const torch::Tensor whole = sm.module.forward({input}).toTensor();
    if (!whole.sizes().equals(x.sizes()) || !torch::allclose(whole, x, 1e-4, 1e-5)) {
      throw PackageError("model " + path + ": forward(example input) is not the blocks of \"" + attr +
                         "\" applied in order (it differs from their chained output); split keeps only the blocks, "
                         "so forward may do nothing else");
    }
  } catch (const PackageError&) {
    throw;
  } catch (const std::exception& e) {
    throw PackageError("model " + path + ": forward(example input) failed: " + error_summary(e.what()));
  }
  sm.module.train(was_training);
  return sm;
}

torch::jit::Module stage_module(const std::vector<torch::jit::Module>& blocks, int first, int end) {
  torch::jit::Module stage(c10::QualifiedName("__torch__.shardguard.Stage"));
  stage.register_attribute("training", c10::BoolType::get(), true);
  std::string src = "def forward(self, x):\n";
  for (int i = first; i < end; ++i) {
    const std::string name = "block" + std::to_string(i);
    stage.register_module(name, blocks.at(i));
    src += "    x = self." + name + ".forward(x)\n";
  }
  src += "    return x\n";
  stage.define(src);
  return stage;
}

std::vector<model::PackageParam> package_params(const torch::jit::Module& module) {
  std::vector<model::PackageParam> out;
  for (const auto& p : module.named_parameters(true)) {
    out.push_back({p.name, std::vector<int64_t>(p.value.sizes().begin(), p.value.sizes().end()), p.value.numel()});
  }
  return out;
}

model::PackageManifest split_model(ScriptModel& sm, const JobSpec& job, const std::string& out_dir,
                                   const std::string& key_dir) {
  if (job.sharding.balance != "parameters") {
    throw PackageError("spec.sharding.balance: \"" + job.sharding.balance +
                       "\" needs FLOP counts, which split does not measure for TorchScript models; use parameters");
  }
  std::error_code ec;
  auto absolute = [&](const std::string& dir) {  // without a trailing separator ("out/" → ".../out")
    fs::path p = fs::weakly_canonical(dir, ec);
    return p.has_filename() ? p : p.parent_path();
  };
  const fs::path out_abs = absolute(out_dir), keys_abs = absolute(key_dir);
  auto inside = [](const fs::path& a, const fs::path& b) {  // a within b (or equal)
    auto [ia, ib] = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
    return ib == b.end();
  };
  if (inside(keys_abs, out_abs) || inside(out_abs, keys_abs)) {
    throw PackageError("--keys: " + key_dir + " and --out " + out_dir +
                       " must be separate directories: the packages are handed out, the keys are not");
  }
  check_target(out_dir, "--out");
  check_target(key_dir, "--keys");

  model::PackageManifest m = sm.manifest;
  m.split_id = random_hex(16);
  m.balance = job.sharding.balance;
  const auto desc = m.desc();
  std::vector<model::StageDesc> stages;
  try {
    stages = model::partition(desc, job.sharding.shards, job.sharding.balance);
  } catch (const model::PartitionError& e) {
    throw PackageError(std::string(e.what()) + " (blocks of the attribute \"" + m.attribute + "\")");
  }
  fs::create_directories(fs::path(out_abs).parent_path(), ec);
  fs::create_directories(fs::path(keys_abs).parent_path(), ec);
  const std::string tmp_out = make_temp_dir(out_abs.string());
  std::string tmp_keys;
  try {
    tmp_keys = make_temp_dir(keys_abs.string());
    ::chmod(tmp_out.c_str(), 0755);
    ::chmod(tmp_keys.c_str(), 0700);
    for (const auto& s : stages) {
      auto module = stage_module(sm.blocks, s.first_block, s.end_block);
      std::ostringstream archive;
      module.save(archive);
      const std::string key = random_bytes(kAesKeyBytes);
      const std::string sealed =
          model::seal_package({m.split_id, s.index, static_cast<int>(stages.size()), s.first_block, s.end_block},
                              key, archive.str());
      model::PackageShard shard;
      shard.index = s.index;
      shard.first_block = s.first_block;
      shard.end_block = s.end_block;
      shard.parameters = s.parameters;
      shard.share = model::parameter_share(desc, s);
      shard.params = package_params(module);
      shard.file = model::package_file_name(s.index);
      shard.sha256 = sha256_hex(sealed);
      shard.bytes = static_cast<int64_t>(sealed.size());
      write_file_atomic(tmp_out + "/" + shard.file, sealed, 0644);
      write_file_atomic(tmp_keys + "/" + model::package_key_file_name(s.index), key, 0600);
      m.shards.push_back(std::move(shard));
    }
    const std::string manifest_text = model::to_json(m).dump(2) + "\n";
    write_file_atomic(tmp_out + "/" + model::kManifestFile, manifest_text, 0644);
    // The keys directory is what keysSecret holds: the keys and the manifest (a shard
    // pod trusts that copy, never the one beside the packages).
    write_file_atomic(tmp_keys + "/" + model::kManifestFile, manifest_text, 0644);
    if (::rename(tmp_keys.c_str(), keys_abs.c_str()) != 0) {
      throw PackageError("cannot rename " + tmp_keys + " to " + key_dir + ": " + std::strerror(errno));
    }
    tmp_keys.clear();
    if (::rename(tmp_out.c_str(), out_abs.c_str()) != 0) {
      const std::string err = std::strerror(errno);
      fs::remove_all(keys_abs, ec);  // keys without their packages are of no use
      throw PackageError("cannot rename " + tmp_out + " to " + out_dir + ": " + err);
    }
  } catch (...) {
    fs::remove_all(tmp_out, ec);
    if (!tmp_keys.empty()) fs::remove_all(tmp_keys, ec);
    throw;
  }
  // Best effort, as before: the packages and keys are already in place.
  for (const auto& dir : {out_abs.parent_path(), keys_abs.parent_path()}) {
    try {
      fsync_dir(dir.string());
    } catch (const FileError&) {
    }
  }
  return m;
}

model::PackageManifest load_manifest(const std::string& package_dir) {
  return load_manifest_file(package_dir + "/" + model::kManifestFile);
}

model::PackageManifest load_manifest_file(const std::string& path) {
  std::string text;
  try {
    text = read_file(path, 64u << 20);
  } catch (const FileError& e) {
    throw PackageError(std::string("manifest: ") + e.what());
  }
  return model::parse_manifest(text, path);
}

torch::nn::Sequential package_stage(const torch::jit::Module& package, int first, int end) {
  torch::nn::Sequential stage;
  for (int i = first; i < end; ++i) {
    const std::string name = "block" + std::to_string(i);
    if (!package.hasattr(name)) throw PackageError("package has no block " + name);
    stage->push_back(std::string(name), ScriptBlock(package.attr(name).toModule()));
  }
  return stage;
}

RecombinedScript recombine_packages(const JobSpec& job, const std::string& package_dir,
                                    const std::string& package_key_dir, const std::string& checkpoint_dir,
                                    const std::string& checkpoint_key_dir) {
  RecombinedScript r;
  r.manifest = load_manifest(package_dir);
  const auto files = find_shard_files(job, r.manifest.stages(), checkpoint_dir, checkpoint_key_dir);
  std::vector<torch::jit::Module> blocks;
  for (const auto& s : r.manifest.shards) {
    const std::string key = load_key_file(package_key_dir + "/" + model::package_key_file_name(s.index));
    auto package = load_package(package_dir, r.manifest, s.index, key);
    auto stage = package_stage(package, s.first_block, s.end_block);
    const auto header = read_checkpoint_header(files[s.index].checkpoint);
    if (header.id.first_block != s.first_block || header.id.end_block != s.end_block) {
      throw CheckpointError("checkpoint " + files[s.index].checkpoint + " holds blocks [" +
                            std::to_string(header.id.first_block) + ", " + std::to_string(header.id.end_block) +
                            "), but shard " + std::to_string(s.index) + " of " + package_dir + " is [" +
                            std::to_string(s.first_block) + ", " + std::to_string(s.end_block) + ")");
    }
    r.step = header.step;
    // Into the TorchScript blocks' own tensors (the stage holds the same ones).
    load_checkpoint_model(files[s.index].checkpoint, files[s.index].key, stage);
    for (int i = s.first_block; i < s.end_block; ++i) {
      blocks.push_back(package.attr("block" + std::to_string(i)).toModule());
    }
  }
  r.module = stage_module(blocks, 0, static_cast<int>(blocks.size()));
  r.view = package_stage(r.module, 0, static_cast<int>(blocks.size()));
  return r;
}

torch::jit::Module load_package(const std::string& package_dir, const model::PackageManifest& manifest, int shard,
                                const std::string& key) {
  if (shard < 0 || shard >= static_cast<int>(manifest.shards.size())) {
    throw PackageError("shard " + std::to_string(shard) + " is not in the manifest of " + package_dir + " (it has " +
                       std::to_string(manifest.shards.size()) + " shards)");
  }
  const std::string path = package_dir + "/" + model::package_file_name(shard);
  std::string bytes;
  try {
    bytes = read_file(path);
  } catch (const FileError& e) {
    throw PackageError("package of shard " + std::to_string(shard) + ": " + e.what());
  }
  return open_package_bytes(bytes, path, manifest, shard, key);
}

torch::jit::Module open_package_bytes(const std::string& bytes, const std::string& path,
                                      const model::PackageManifest& manifest, int shard, const std::string& key) {
  const std::string archive = model::open_package(bytes, key, manifest, shard, path);
  torch::jit::Module module;
  try {
    std::istringstream in(archive);
    module = torch::jit::load(in, torch::kCPU);
  } catch (const std::exception& e) {
    throw PackageError("package " + path + ": authenticated, but not a TorchScript archive (" +
                       error_summary(e.what()) + ")");
  }
  const auto got = package_params(module);
  const auto& want = manifest.shards[shard].params;
  if (got != want) {
    size_t k = 0;
    while (k < got.size() && k < want.size() && got[k] == want[k]) ++k;
    const std::string g = k < got.size() ? got[k].name + " " + model::shape_str(got[k].shape) : "nothing";
    const std::string w = k < want.size() ? want[k].name + " " + model::shape_str(want[k].shape) : "nothing";
    throw PackageError("package " + path + ": holds " + std::to_string(got.size()) + " parameters, the manifest lists " +
                       std::to_string(want.size()) + "; the first difference is at #" + std::to_string(k) + ": " + g +
                       " where the manifest has " + w);
  }
  return module;
}

}  // namespace shardguard::shardd
