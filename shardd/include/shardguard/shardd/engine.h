// The engine of one pipeline stage: builds only its own blocks, synchronises and
// resumes with the other stages, runs training steps (1F1B or GPipe) and
// evaluation rounds, checkpoints its shard. Everything it exchanges with its
// neighbours goes through a Transport (transport.h), so the same engine runs
// behind gRPC in a shardd process (StageRunner, stage.h) and, in tests, in one
// process with its neighbours (memory_transport.h). Protocol: docs/pipeline.md.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>
#include <torch/nn/modules/container/sequential.h>

#include "shardguard/shardd/metrics.h"
#include "shardguard/shardd/stage.h"
#include "shardguard/shardd/transport.h"

namespace shardguard::shardd {

// Called on the engine's thread with the shard's parameters each time it writes
// a checkpoint or restores one (step > 0): what the ShardExport service serves.
using ParameterSink = std::function<void(const torch::nn::Sequential& model, int64_t step)>;

class Engine {
 public:
  // options.listen/prev/next are the transport's business and ignored here.
  // Attaches itself to `transport`, which must outlive the engine.
  Engine(StageOptions options, StageMetrics& metrics, Transport& transport, StageEvents events = {},
         ParameterSink publish = {});
  ~Engine();  // stops and closes the transport
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Builds this stage's blocks and loads the data it needs, then calls `open`
  // (e.g. to bind a server, which may deliver from then on) and logs
  // "stage ready" with the fields `open` returns added. Throws on a bad job or
  // missing data.
  void start(const std::function<nlohmann::json()>& open = {});
  int64_t parameters() const;
  // Trains until Finish, a fatal error, or stop(). Call once, after start();
  // closes the transport before it returns.
  StageResult run();
  // Asks run() to return (thread-safe).
  void stop(const std::string& reason);

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace shardguard::shardd
