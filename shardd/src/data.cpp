#include "shardguard/shardd/data.h"

#include <zlib.h>

#include <array>
#include <fstream>
#include <sstream>
#include <memory>
#include <sys/stat.h>

#include "shardguard/common/token_file.h"
#include "shardguard/model/model_desc.h"

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

// gzip's deflate cannot shrink data by more than about 1032:1, so a file of S bytes
// holds at most this many bytes of content: an IDX header that claims more is lying,
// and is refused before anything is allocated for it.
constexpr int64_t kMaxDeflateRatio = 1032;

struct GzInput {
  GzFile file;
  int64_t compressed_bytes = 0;
};

GzInput open_gz(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw DatasetError("dataset file " + path + " does not exist (spec.dataset.path; run `make deps` to install " +
                       "the dataset-fashion-mnist package)");
  }
  GzFile f(gzopen(path.c_str(), "rb"));
  if (!f) throw DatasetError("cannot open dataset file " + path);
  return {std::move(f), static_cast<int64_t>(st.st_size)};
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

// The header's item count, checked against what the file can hold (bytes_per_item
// bytes each): a count of 0xFFFFFFFF in a small file is refused, naming the file.
int64_t checked_count(const GzInput& in, const std::vector<int64_t>& dims, int64_t bytes_per_item,
                      const std::string& path) {
  const int64_t n = dims[0];
  const int64_t can_hold = in.compressed_bytes * kMaxDeflateRatio / bytes_per_item;
  if (n > can_hold) {
    throw DatasetError("dataset file " + path + " claims " + std::to_string(n) + " items in its header, but its " +
                       std::to_string(in.compressed_bytes) + " compressed bytes can hold at most " +
                       std::to_string(can_hold) + "; the file is damaged");
  }
  return n;
}

// One IDX file of a split, opened and its header read and checked: the reader is left
// at the first item.
struct IdxFile {
  std::string path;
  GzInput in;
  std::vector<int64_t> dims;
  int64_t count = 0;
};

IdxFile open_idx(const DatasetSpec& d, Split split, bool images) {
  IdxFile f;
  f.path = idx_path(d, split, images);
  f.in = open_gz(f.path);
  f.dims = read_header(f.in.file.get(), f.path, images ? 3 : 1);
  f.count = checked_count(f.in, f.dims, images ? 28 * 28 : 1, f.path);
  return f;
}

// The images and the labels of a split must describe the same samples: checks the
// other file's header against `opened` (the images' for labels, and the reverse).
void check_same_count(const DatasetSpec& d, Split split, const IdxFile& opened, bool opened_images) {
  const IdxFile other = open_idx(d, split, !opened_images);
  const IdxFile& images = opened_images ? opened : other;
  const IdxFile& labels = opened_images ? other : opened;
  if (images.count != labels.count) {
    throw DatasetError("dataset files disagree: " + images.path + " holds " + std::to_string(images.count) +
                       " images but " + labels.path + " holds " + std::to_string(labels.count) + " labels");
  }
}

int64_t split_limit(const DatasetSpec& d, Split split) {
  return split == Split::kTrain ? d.max_train_samples : d.max_test_samples;
}

}  // namespace

torch::Tensor load_images(const DatasetSpec& dataset, Split split) {
  IdxFile f = open_idx(dataset, split, true);
  if (f.dims[1] != 28 || f.dims[2] != 28) {
    throw DatasetError("dataset file " + f.path + " holds " + std::to_string(f.dims[1]) + "x" +
                       std::to_string(f.dims[2]) + " images, expected 28x28");
  }
  check_same_count(dataset, split, f, true);
  const int64_t n = limited(f.count, split_limit(dataset, split));
  auto raw = torch::empty({n, 1, 28, 28}, torch::kUInt8);
  read_exact(f.in.file.get(), raw.data_ptr<uint8_t>(), static_cast<size_t>(n) * 28 * 28, f.path);
  return (raw.to(torch::kFloat32).div_(255.0).sub_(kMean).div_(kStd)).contiguous();
}

torch::Tensor load_labels(const DatasetSpec& dataset, Split split) {
  IdxFile f = open_idx(dataset, split, false);
  check_same_count(dataset, split, f, false);
  const int64_t n = limited(f.count, split_limit(dataset, split));
  auto raw = torch::empty({n}, torch::kUInt8);
  read_exact(f.in.file.get(), raw.data_ptr<uint8_t>(), static_cast<size_t>(n), f.path);
  const std::string& path = f.path;
  const uint8_t* p = raw.data_ptr<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] >= 10) {
      throw DatasetError("dataset file " + path + " holds label " + std::to_string(p[i]) + " at item " +
                         std::to_string(i) + ", outside 0..9");
    }
  }
  return raw.to(torch::kInt64);
}

int64_t count_samples(const DatasetSpec& dataset, Split split) {
  const IdxFile labels = open_idx(dataset, split, false);
  check_same_count(dataset, split, labels, false);
  return limited(labels.count, split_limit(dataset, split));
}

namespace {

uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

std::string tokens_path(const JobSpec& job, Split split) {
  return token_file_path(job.dataset.path, split == Split::kTrain);
}

int64_t token_count(const JobSpec& job, Split split) {
  const std::string path = tokens_path(job, split);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw DatasetError("token file " + path + " does not exist (spec.dataset.path; make one with " +
                       "`shardctl data tokens TEXT... --out " + job.dataset.path + "`)");
  }
  return static_cast<int64_t>(st.st_size) / 2;
}

}  // namespace

// ---- tensors: NumPy .npy files ------------------------------------------------------------
namespace {

// One .npy array as its header describes it (format versions 1.0 to 3.0, C order,
// little-endian float32 or int64 only).
struct NpyArray {
  std::string path;
  std::string descr;            // "<f4" or "<i8"
  std::vector<int64_t> shape;   // shape[0] = samples
  int64_t data_offset = 0;
  int64_t item_bytes() const { return 4 + 4 * (descr == "<i8"); }
  int64_t per_sample() const {
    int64_t n = 1;
    for (size_t i = 1; i < shape.size(); ++i) n *= shape[i];
    return n;
  }
};

std::string npy_path(const DatasetSpec& d, Split split, bool inputs) {
  return d.path + "/" + (split == Split::kTrain ? "train" : "test") + (inputs ? "-inputs.npy" : "-labels.npy");
}

// The value of 'key' in the header's Python dict literal, as written: the text from
// after the colon to the closing delimiter of the value ('…' for a string, (…) for a
// tuple, else up to the next ',' or '}'), or "" when the key is not there.
std::string npy_field(const std::string& header, const std::string& key) {
  const auto k = header.find("'" + key + "'");
  if (k == std::string::npos) return "";
  const auto colon = header.find(':', k + key.size() + 2);
  const auto v = colon == std::string::npos ? colon : header.find_first_not_of(' ', colon + 1);
  if (v == std::string::npos) return "";
  const char open = header[v];
  const std::string closers = open == '(' ? ")" : open == '\'' ? "'" : ",}";
  const auto end = header.find_first_of(closers, v + 1);
  if (end == std::string::npos) return "";
  return open == '(' || open == '\'' ? header.substr(v, end - v + 1) : header.substr(v, end - v);
}

NpyArray read_npy_header(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw DatasetError("tensor file " + path + " does not exist (spec.dataset.path, format tensors: " +
                       "train-inputs.npy, train-labels.npy, test-inputs.npy, test-labels.npy)");
  }
  const auto bad = [&](const std::string& why) { return DatasetError("tensor file " + path + " " + why); };
  char magic[8];
  if (!in.read(magic, 8) || std::string(magic, 6) != "\x93NUMPY") throw bad("is not a NumPy .npy file");
  const int major = static_cast<unsigned char>(magic[6]);
  uint32_t header_len = 0;
  unsigned char len[4] = {0, 0, 0, 0};
  if (major == 1) {
    if (!in.read(reinterpret_cast<char*>(len), 2)) throw bad("is truncated in its header");
    header_len = len[0] | (uint32_t{len[1]} << 8);
  } else if (major == 2 || major == 3) {
    if (!in.read(reinterpret_cast<char*>(len), 4)) throw bad("is truncated in its header");
    header_len = len[0] | (uint32_t{len[1]} << 8) | (uint32_t{len[2]} << 16) | (uint32_t{len[3]} << 24);
  } else {
    throw bad("has .npy format version " + std::to_string(major) + ", expected 1, 2 or 3");
  }
  if (header_len > 1u << 20) throw bad("claims a header of " + std::to_string(header_len) + " bytes");
  std::string header(header_len, '\0');
  if (!in.read(header.data(), header_len)) throw bad("is truncated in its header");
  NpyArray a;
  a.path = path;
  a.data_offset = (major == 1 ? 10 : 12) + static_cast<int64_t>(header_len);
  const std::string descr = npy_field(header, "descr");
  a.descr = descr.size() >= 2 ? descr.substr(1, descr.size() - 2) : "";
  if (a.descr != "<f4" && a.descr != "<i8") {
    throw bad("holds dtype " + (descr.empty() ? std::string("(none)") : descr) +
              ", expected float32 ('<f4') or int64 ('<i8'), little-endian");
  }
  if (npy_field(header, "fortran_order") != "False") throw bad("is in Fortran order; save it in C order");
  const std::string shape = npy_field(header, "shape");
  if (shape.size() < 2) throw bad("has no shape in its header");
  std::stringstream dims(shape.substr(1, shape.size() - 2));
  std::string dim;
  while (std::getline(dims, dim, ',')) {
    const auto first = dim.find_first_not_of(' ');
    if (first == std::string::npos) continue;
    try {
      size_t used = 0;
      const int64_t d = std::stoll(dim.substr(first), &used);
      if (d < 0 || dim.find_first_not_of(' ', first + used) != std::string::npos) throw std::invalid_argument(dim);
      a.shape.push_back(d);
    } catch (const std::exception&) {
      throw bad("has shape " + shape + ", which is not a tuple of sizes");
    }
  }
  if (a.shape.empty()) throw bad("holds a scalar, expected one row per sample");
  // The data must all be there: a file cut short is damaged, whatever its header says.
  int64_t items = 1;
  for (int64_t d : a.shape) {
    if (d > 0 && items > (int64_t{1} << 40) / d) throw bad("claims shape " + shape + ", too large");
    items *= d;
  }
  in.seekg(0, std::ios::end);
  const int64_t size = static_cast<int64_t>(in.tellg());
  if (size < a.data_offset + items * a.item_bytes()) {
    throw bad("holds " + std::to_string(size - a.data_offset) + " bytes of data, but its shape " + shape + " needs " +
              std::to_string(items * a.item_bytes()) + "; the file is damaged");
  }
  return a;
}

torch::Tensor read_npy(const NpyArray& a, int64_t rows) {
  std::vector<int64_t> shape = a.shape;
  shape[0] = rows;
  auto t = torch::empty(shape, a.descr == "<f4" ? torch::kFloat32 : torch::kInt64);
  std::ifstream in(a.path, std::ios::binary);
  in.seekg(a.data_offset);
  const auto bytes = static_cast<std::streamsize>(rows * a.per_sample() * a.item_bytes());
  if (!in.read(static_cast<char*>(t.data_ptr()), bytes)) throw DatasetError("tensor file " + a.path + " could not be read");
  return t;
}

// Both files of a split, checked against each other and against the model: inputs
// float32 shaped like the model's input, labels int64 [N] in 0..classes-1.
struct TensorSplit {
  NpyArray inputs, labels;
  int64_t count = 0;
  int64_t classes = 0;  // labels lie in 0..classes-1
};

TensorSplit open_tensors(const JobSpec& job, Split split, const model::ModelDesc* model) {
  TensorSplit t;
  t.inputs = read_npy_header(npy_path(job.dataset, split, true));
  t.labels = read_npy_header(npy_path(job.dataset, split, false));
  const model::ModelDesc desc = model ? *model : model::describe_model(job.model);
  const std::vector<int64_t>& want = desc.blocks.front().in_shape;
  t.classes = desc.blocks.back().out_shape.front();
  const std::vector<int64_t> got(t.inputs.shape.begin() + 1, t.inputs.shape.end());
  if (t.inputs.descr != "<f4") {
    throw DatasetError("tensor file " + t.inputs.path + " holds int64 inputs; architecture " + job.model.architecture +
                       " takes float32");
  }
  if (got != want) {
    throw DatasetError("tensor file " + t.inputs.path + " holds inputs of shape " + model::shape_str(got) +
                       " per sample; architecture " + job.model.architecture + " takes " + model::shape_str(want));
  }
  if (t.labels.descr != "<i8" || t.labels.shape.size() != 1) {
    throw DatasetError("tensor file " + t.labels.path + " must hold int64 class labels of shape (N,), got " +
                       (t.labels.descr == "<f4" ? "float32" : "int64") + " " + model::shape_str(t.labels.shape));
  }
  if (t.inputs.shape[0] != t.labels.shape[0]) {
    throw DatasetError("tensor files disagree: " + t.inputs.path + " holds " + std::to_string(t.inputs.shape[0]) +
                       " samples but " + t.labels.path + " holds " + std::to_string(t.labels.shape[0]) + " labels");
  }
  t.count = limited(t.inputs.shape[0], split_limit(job.dataset, split));
  return t;
}

}  // namespace

DataShapes data_shapes(const JobSpec& job, bool with_input) {
  DataShapes s;
  s.format = job.dataset.format;
  if (job.dataset.format == "tokens") {
    s.input = {job.model.context};
    s.token_input = true;
    s.output = {job.model.context, job.model.vocab};
  } else if (job.dataset.format == "tensors") {
    if (!with_input) return s;
    const NpyArray inputs = read_npy_header(npy_path(job.dataset, Split::kTrain, true));
    s.input.assign(inputs.shape.begin() + 1, inputs.shape.end());
  } else {
    s.input = {1, model::kImageSide, model::kImageSide};
    s.output = {model::kNumClasses};
  }
  return s;
}

std::string DataShapes::refuses_output(const std::vector<int64_t>& out) const {
  if (format == "tensors") {
    if (out.size() == 1 && out[0] >= 2) return "";
    return "[classes] float logits (one per class, at least 2 classes)";
  }
  if (out == output) return "";
  if (token_input) {
    return "[spec.model.context, spec.model.vocab] = " + model::shape_str(output) +
           " float logits (the next token's at every position)";
  }
  return model::shape_str(output) + " float logits (one per class)";
}

torch::Tensor DataShapes::example(int64_t batch, int vocab) const {
  std::vector<int64_t> shape{batch};
  shape.insert(shape.end(), input.begin(), input.end());
  int64_t per_sample = 1;
  for (int64_t d : input) per_sample *= d;
  if (token_input) return torch::arange(batch * per_sample, torch::kLong).remainder(vocab).reshape(shape);
  return torch::linspace(0.0, 1.0, batch * per_sample).reshape(shape);
}

int64_t count_samples(const JobSpec& job, Split split, const model::ModelDesc* model) {
  if (job.dataset.format == "tensors") return open_tensors(job, split, model).count;
  if (job.dataset.format != "tokens") return count_samples(job.dataset, split);
  const int64_t n = token_count(job, split);
  if (n < job.model.context + 1) {
    throw DatasetError("token file " + tokens_path(job, split) + " holds " + std::to_string(n) +
                       " tokens, fewer than one window of spec.model.context + 1 = " +
                       std::to_string(job.model.context + 1));
  }
  return limited(token_windows(n, job.model.context, split == Split::kTrain), split_limit(job.dataset, split));
}

Samples Samples::load(const JobSpec& job, Split split, bool features, bool targets, const model::ModelDesc* model) {
  Samples s;
  if (job.dataset.format == "tensors") {
    const TensorSplit t = open_tensors(job, split, model);
    s.count_ = t.count;
    if (features) s.x_ = read_npy(t.inputs, t.count);
    if (targets) {
      s.y_ = read_npy(t.labels, t.count);
      const int64_t classes = t.classes;
      const auto bad = (s.y_ < 0).logical_or(s.y_ >= classes).nonzero();
      if (bad.size(0) > 0) {
        const int64_t i = bad[0][0].item<int64_t>();
        throw DatasetError("tensor file " + t.labels.path + " holds label " + std::to_string(s.y_[i].item<int64_t>()) +
                           " at item " + std::to_string(i) + ", outside 0.." + std::to_string(classes - 1));
      }
    }
    return s;
  }
  if (job.dataset.format != "tokens") {
    if (features) s.x_ = load_images(job.dataset, split);
    if (targets) s.y_ = load_labels(job.dataset, split);
    s.count_ = count_samples(job.dataset, split);
    return s;
  }
  s.tokens_ = true;
  s.context_ = job.model.context;
  s.train_ = split == Split::kTrain;
  s.seed_ = job.training.seed;
  s.count_ = count_samples(job, split);
  const std::string path = tokens_path(job, split);
  std::vector<uint16_t> tokens;
  try {
    tokens = read_token_file(path);
    check_tokens(tokens, path, job.model.vocab, job.model.context);
  } catch (const TokenFileError& e) {
    throw DatasetError(e.what());
  }
  const auto n = static_cast<int64_t>(tokens.size());
  s.max_offset_ = n - 1 - s.count_ * s.context_;
  if (features || targets) {
    s.ids_ = torch::from_blob(tokens.data(), {n}, torch::kInt16).to(torch::kInt64).bitwise_and(0xFFFF);
  }
  return s;
}

torch::Tensor Samples::range(int64_t begin, int64_t end) { return torch::arange(begin, end, torch::kInt64); }

torch::Tensor Samples::windows(const torch::Tensor& idx, int epoch) const {
  int64_t offset = 0;
  if (train_ && max_offset_ > 0) {
    offset = static_cast<int64_t>(mix64(seed_ * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(epoch) + 0x5851F42D4C957F2DULL) %
                                  static_cast<uint64_t>(max_offset_ + 1));
  }
  const auto starts = idx.to(torch::kInt64) * context_ + offset;
  const auto positions = starts.unsqueeze(1) + torch::arange(context_ + 1, torch::kInt64).unsqueeze(0);
  return ids_.index_select(0, positions.reshape({-1})).reshape({idx.size(0), context_ + 1});
}

torch::Tensor Samples::features(const torch::Tensor& idx, int epoch) const {
  if (!tokens_) return x_.index_select(0, idx);
  return windows(idx, epoch).slice(1, 0, context_).contiguous();
}

torch::Tensor Samples::targets(const torch::Tensor& idx, int epoch) const {
  if (!tokens_) return y_.index_select(0, idx);
  return windows(idx, epoch).slice(1, 1, context_ + 1).contiguous();
}

std::vector<int64_t> epoch_order(uint64_t seed, int epoch, int64_t n) {
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  uint64_t state = seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(epoch) * 0xD1B54A32D192ED03ULL + 1;
  auto next = [&state]() { return mix64(state += 0x9E3779B97F4A7C15ULL); };
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(next() % static_cast<uint64_t>(i + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

BatchPlan make_batch_plan(const JobSpec& job, int64_t train_samples, int replica) {
  BatchPlan p;
  p.train_samples = train_samples;
  p.batch_size = job.training.batch_size;
  p.micro_batches = job.training.micro_batches;
  p.epochs = job.training.epochs;
  p.seed = job.training.seed;
  p.replicas = job.sharding.replicas;
  p.replica = replica;
  if (replica < 0 || replica >= p.replicas) {
    throw std::invalid_argument("replica " + std::to_string(replica) + " is out of range for spec.sharding.replicas " +
                                std::to_string(p.replicas) + " (0.." + std::to_string(p.replicas - 1) + ")");
  }
  if (train_samples < p.global_batch()) {
    throw JobSpecError({{"spec.training.batchSize",
                         "is " + std::to_string(p.batch_size) +
                             (p.replicas > 1 ? " × spec.sharding.replicas " + std::to_string(p.replicas) : std::string()) +
                             " but the training set has only " + std::to_string(train_samples) + " samples"}});
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
  const int64_t begin = within * plan_.global_batch() + static_cast<int64_t>(plan_.replica) * plan_.batch_size +
                        static_cast<int64_t>(micro_batch) * plan_.micro_batch_size();
  return torch::from_blob(order_.data() + begin, {plan_.micro_batch_size()}, torch::kInt64).clone();
}

}  // namespace shardguard::shardd
