#include "shardguard/shardd/data.h"

#include <zlib.h>

#include <array>
#include <memory>
#include <sys/stat.h>

namespace shardguard::shardd {
namespace {

constexpr double kMean = 0.2860, kStd = 0.3530;  // Fashion-MNIST training-set pixel statistics

std::string idx_path(const DatasetSpec& d, Split split, bool images) {
  const std::string prefix = split == Split::kTrain ? "train" : "t10k";
  return d.path + "/" + prefix + (images ? "-images-idx3-ubyte.gz" : "-labels-idx1-ubyte.gz");
}

struct GzCloser {
  void operator()(gzFile_s* f) const { gzclose(f); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

GzFile open_gz(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw DatasetError("dataset file " + path + " does not exist (spec.dataset.path; run `make deps` to install " +
                       "the dataset-fashion-mnist package)");
  }
  GzFile f(gzopen(path.c_str(), "rb"));
  if (!f) throw DatasetError("cannot open dataset file " + path);
  return f;
}

void read_exact(gzFile_s* f, void* buf, size_t n, const std::string& path) {
  auto* p = static_cast<char*>(buf);
  while (n > 0) {
    const unsigned chunk = static_cast<unsigned>(std::min<size_t>(n, 1u << 30));
    const int got = gzread(f, p, chunk);
    if (got <= 0) throw DatasetError("dataset file " + path + " is truncated or not gzip IDX data");
    p += got;
    n -= static_cast<size_t>(got);
  }
}

uint32_t be32(const unsigned char* b) {
  return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | uint32_t{b[3]};
}

// Reads the IDX header; returns the dimensions.
std::vector<int64_t> read_header(gzFile_s* f, const std::string& path, int expected_dims) {
  std::array<unsigned char, 4> magic{};
  read_exact(f, magic.data(), 4, path);
  if (magic[0] != 0 || magic[1] != 0 || magic[2] != 0x08 || magic[3] != expected_dims) {
    throw DatasetError("dataset file " + path + " is not an IDX file of unsigned bytes with " +
                       std::to_string(expected_dims) + " dimensions");
  }
  std::vector<int64_t> dims(expected_dims);
  for (auto& d : dims) {
    std::array<unsigned char, 4> b{};
    read_exact(f, b.data(), 4, path);
    d = be32(b.data());
  }
  return dims;
}

int64_t limited(int64_t n, int64_t limit) { return limit > 0 && limit < n ? limit : n; }

int64_t split_limit(const DatasetSpec& d, Split split) {
  return split == Split::kTrain ? d.max_train_samples : d.max_test_samples;
}

}  // namespace

torch::Tensor load_images(const DatasetSpec& dataset, Split split) {
  const std::string path = idx_path(dataset, split, true);
  auto f = open_gz(path);
  const auto dims = read_header(f.get(), path, 3);
  if (dims[1] != 28 || dims[2] != 28) {
    throw DatasetError("dataset file " + path + " holds " + std::to_string(dims[1]) + "x" +
                       std::to_string(dims[2]) + " images, expected 28x28");
  }
  const int64_t n = limited(dims[0], split_limit(dataset, split));
  auto raw = torch::empty({n, 1, 28, 28}, torch::kUInt8);
  read_exact(f.get(), raw.data_ptr<uint8_t>(), static_cast<size_t>(n) * 28 * 28, path);
  return (raw.to(torch::kFloat32).div_(255.0).sub_(kMean).div_(kStd)).contiguous();
}

torch::Tensor load_labels(const DatasetSpec& dataset, Split split) {
  const std::string path = idx_path(dataset, split, false);
  auto f = open_gz(path);
  const auto dims = read_header(f.get(), path, 1);
  const int64_t n = limited(dims[0], split_limit(dataset, split));
  auto raw = torch::empty({n}, torch::kUInt8);
  read_exact(f.get(), raw.data_ptr<uint8_t>(), static_cast<size_t>(n), path);
  auto labels = raw.to(torch::kInt64);
  if (n > 0 && labels.max().item<int64_t>() >= 10) {
    throw DatasetError("dataset file " + path + " holds a label outside 0..9");
  }
  return labels;
}

int64_t count_samples(const DatasetSpec& dataset, Split split) {
  const std::string path = idx_path(dataset, split, false);
  auto f = open_gz(path);
  return limited(read_header(f.get(), path, 1)[0], split_limit(dataset, split));
}

std::vector<int64_t> epoch_order(uint64_t seed, int epoch, int64_t n) {
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  uint64_t state = seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(epoch) * 0xD1B54A32D192ED03ULL + 1;
  auto next = [&state]() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  };
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(next() % static_cast<uint64_t>(i + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

BatchPlan make_batch_plan(const JobSpec& job, int64_t train_samples) {
  BatchPlan p;
  p.train_samples = train_samples;
  p.batch_size = job.training.batch_size;
  p.micro_batches = job.training.micro_batches;
  p.epochs = job.training.epochs;
  p.seed = job.training.seed;
  if (train_samples < p.batch_size) {
    throw JobSpecError({{"spec.training.batchSize", "is " + std::to_string(p.batch_size) + " but the training set has only " +
                                                         std::to_string(train_samples) + " samples"}});
  }
  return p;
}

torch::Tensor BatchSampler::indices(int64_t step, int micro_batch) {
  const int epoch = plan_.epoch_of(step);
  if (epoch != cached_epoch_) {
    order_ = epoch_order(plan_.seed, epoch, plan_.train_samples);
    cached_epoch_ = epoch;
  }
  const int64_t within = step % plan_.steps_per_epoch();
  const int64_t begin = within * plan_.batch_size + static_cast<int64_t>(micro_batch) * plan_.micro_batch_size();
  return torch::from_blob(order_.data() + begin, {plan_.micro_batch_size()}, torch::kInt64).clone();
}

}  // namespace shardguard::shardd
