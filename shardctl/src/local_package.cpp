#include "shardguard/shardctl/local_package.h"

#include "shardguard/common/crypto.h"
#include "shardguard/common/files.h"

namespace shardguard::shardctl {

std::optional<model::PackageManifest> local_manifest(const JobSpec& job, const std::string& keys_dir) {
  if (!job.model.from_package()) return std::nullopt;
  const bool url = !job.model.package->url.empty();
  // A url job's manifest is never read from the URL: the keys directory holds it.
  const std::string path = (url ? package_keys_dir(job, keys_dir) : job.model.package->path) + "/" + model::kManifestFile;
  std::string text;
  try {
    text = read_file(path, 64u << 20);
  } catch (const std::exception& e) {
    throw model::PackageError(url ? "spec.model.package.url: the manifest is read from the keys directory, not "
                                    "from the URL: " + std::string(e.what()) +
                                        " (the --keys directory `shardctl split` wrote)"
                                  : "spec.model.package.path: " + std::string(e.what()) +
                                        " (the directory `shardctl split --out` wrote)");
  }
  return model::parse_manifest(text, path);
}

model::JobCut local_job_cut(const JobSpec& job, const std::string& keys_dir) {
  const auto manifest = local_manifest(job, keys_dir);
  return model::job_cut(job, manifest ? &*manifest : nullptr);
}

std::string package_keys_dir(const JobSpec& job, const std::string& keys_dir) {
  if (!keys_dir.empty() || !job.model.from_package()) return keys_dir;
  if (!job.model.package->url.empty()) {
    throw model::PackageError("spec.model.package.url: " + job.model.package->url +
                              " is never asked for the manifest; pass --package-keys DIR, the keys directory of "
                              "`shardctl split` (the local stand-in for spec.model.package.keysSecret, with "
                              "manifest.json)");
  }
  std::string dir = job.model.package->path;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir + ".keys";
}

void add_local_package(const JobSpec& job, const std::string& keys_dir, op::RenderInputs& in) {
  if (!job.model.from_package()) return;
  in.package_manifest = local_manifest(job, keys_dir);
  const std::string dir = package_keys_dir(job, keys_dir);
  in.package_keys.clear();
  for (int i = 0; i < job.sharding.shards; ++i) {
    const std::string file = dir + "/" + model::package_key_file_name(i);
    try {
      in.package_keys.push_back(load_key_file(file));
    } catch (const std::exception& e) {
      throw model::PackageError("package key of shard " + std::to_string(i) + ": " + e.what() +
                                " (--package-keys: the keys directory of `shardctl split`, the local stand-in "
                                "for spec.model.package.keysSecret)");
    }
  }
}

}  // namespace shardguard::shardctl
