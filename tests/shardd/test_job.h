// Small jobs for the shardd tests: the real decoder, tiny data.
#pragma once

#include <cstdlib>
#include <string>

#include <nlohmann/json.hpp>

#include "shardguard/common/jobspec.h"

namespace shardguard::testing {

inline nlohmann::json small_job_json(const std::string& arch, int shards, int train_samples = 256) {
  nlohmann::json model = {{"architecture", arch}, {"hidden", 32}, {"depth", 3}, {"channels", 4}, {"heads", 2},
                          {"patchSize", 7}};
  return {{"apiVersion", "shardguard.io/v1alpha1"},
          {"kind", "ShardedTrainingJob"},
          {"metadata", {{"name", "t-" + arch}, {"namespace", "default"}}},
          {"spec",
           {{"model", model},
            {"dataset", {{"name", "fashion-mnist"}, {"path", "/usr/share/datasets/fashion-mnist"},
                         {"maxTrainSamples", train_samples}, {"maxTestSamples", 200}}},
            {"training", {{"epochs", 1}, {"batchSize", 32}, {"microBatches", 4},
                          {"optimizer", {{"name", "adam"}, {"learningRate", 0.002}}}, {"seed", 7},
                          {"evalBatchSize", 64}}},
            {"sharding", {{"shards", shards}, {"balance", "parameters"}}},
            {"checkpoint", {{"everySteps", 3}}}}}};
}

inline JobSpec small_job(const std::string& arch, int shards, int train_samples = 256) {
  return job_from_json(small_job_json(arch, shards, train_samples));
}

}  // namespace shardguard::testing
