// The seam between a stage's engine (engine.h: sync, resume, training steps,
// evaluation, checkpoints) and the network. The engine hands a Transport what it
// sends to its neighbours; the transport delivers what arrives to the engine
// through Receiver. Both sides speak the plain types below, so the engine knows
// nothing of gRPC: grpc_transport.cpp carries them as pipeline.proto messages
// between processes, memory_transport.h hands them from engine to engine in one
// process (tests). The protocol itself is docs/pipeline.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/types.h>

namespace shardguard::shardd {

enum class Phase { kUnspecified, kTrain, kEval, kGenerate };

// Which way a frame travels: activations go forward (stage i -> i+1), gradients backward.
enum class Direction { kForward, kBackward };

struct FrameHeader {
  uint64_t generation = 0;
  Phase phase = Phase::kUnspecified;
  int64_t step = 0;       // train: the global optimizer step; eval: the evaluation batch index
  int micro_batch = 0;
  int epoch = 0;          // train: the step's epoch; eval: the evaluation round
  int position = 0;       // generate: the window's last real position (step: the token's index)
};

// A frame the engine sends: the transport copies the tensor (to CPU float32)
// before send_* returns, so the engine may drop or reuse it at once.
struct OutFrame {
  FrameHeader header;
  torch::Tensor tensor;
};

// Thrown by TensorPayload::take for a tensor this stage must not accept.
class FrameError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An inbound frame's tensor, not yet accepted. Only the engine knows which shape
// it expects (its input shape forward, its output shape backward; the micro-batch
// or evaluation batch size), so the check happens when it takes the tensor.
class TensorPayload {
 public:
  virtual ~TensorPayload() = default;
  // Checks float32, a batch dimension of 1..max_batch followed by exactly
  // sample_shape, and the byte count; throws FrameError naming both shapes.
  virtual torch::Tensor take(const std::vector<int64_t>& sample_shape, int64_t max_batch) = 0;
};

struct InFrame {
  FrameHeader header;
  std::unique_ptr<TensorPayload> payload;
};

// The check every payload applies, whatever carried it: "expected a tensor
// float32[1..8, 4, 14, 14], received float32[8, 4, 7, 7]".
void check_frame_shape(const std::string& dtype, const std::vector<int64_t>& shape,
                       const std::vector<int64_t>& sample_shape, int64_t max_batch);

// ---- control messages (stage 0 drives them down the chain; joins travel up) ----
struct SyncMsg {  // which checkpoint steps can every stage restore?
  uint64_t generation = 0;
  std::vector<int64_t> steps;
  std::vector<std::string> boot_ids;
};
struct SyncReply {
  std::vector<int64_t> steps;
  std::vector<std::string> boot_ids;
};
struct ResumeMsg {  // restore `step`, switch to `generation`
  uint64_t generation = 0;
  int64_t step = 0;
  int64_t schedule_steps = 0;  // the job's optimizer steps: the learning-rate schedule's length
};
struct FinishMsg {  // write the final checkpoint and stop
  uint64_t generation = 0;
  int64_t step = 0;
};
struct JoinMsg {  // stage `stage` with `boot_id` (re)started; relayed up to stage 0
  int stage = 0;
  std::string boot_id;
};

// The engine's answer to an inbound message. The gRPC transport maps the codes
// to INVALID_ARGUMENT, FAILED_PRECONDITION and UNAVAILABLE; only kUnavailable is
// worth retrying.
struct Status {
  enum Code { kOk, kInvalid, kRefused, kUnavailable };
  Code code = kOk;
  std::string message;
  bool ok() const { return code == kOk; }
  static Status Ok() { return {}; }
  static Status Invalid(std::string m) { return {kInvalid, std::move(m)}; }
  static Status Refused(std::string m) { return {kRefused, std::move(m)}; }
  static Status Unavailable(std::string m) { return {kUnavailable, std::move(m)}; }
};

// What a transport delivers to (the engine). Called from the transport's own
// threads (gRPC handlers, sender threads, a neighbour's engine), concurrently.
class Receiver {
 public:
  virtual ~Receiver() = default;
  virtual Status on_frame(Direction direction, InFrame frame) = 0;
  // Relays Sync down (through the Transport) before answering: the reply holds
  // the whole chain's intersection and boot ids.
  virtual Status on_sync(const SyncMsg& msg, SyncReply* reply) = 0;
  // Answer only once this stage (and, relayed, every stage after it) has acted.
  virtual Status on_resume(const ResumeMsg& msg) = 0;
  virtual Status on_finish(const FinishMsg& msg) = 0;
  virtual Status on_join(const JoinMsg& msg) = 0;

  // For the transport's senders and retries: a queued message of another
  // generation is dropped, and nothing is retried once the stage is stopping.
  virtual uint64_t generation() const = 0;
  virtual bool stopping() const = 0;
  // A link failed for good (a refused call, a spent retry budget): the stage stops.
  virtual void link_failed(const std::string& reason) = 0;
};

struct LinkPlan {  // what the engine tells its transport when it connects
  int stage = 0;
  int stages = 1;
  size_t max_queued = 1;  // messages waiting per direction before send_* blocks
};

// What the engine sends. Frames and joins are queued and sent in order from the
// transport's own threads, so compute never waits on the network (until
// max_queued wait); one whose generation is no longer the receiver's current
// one when its turn comes is dropped, and its retries stop if the generation
// changes meanwhile. Control calls go to the next stage, block until it
// answers (retried while it is unavailable, within the retry budget) and return
// "" or why the call failed for good.
class Transport {
 public:
  virtual ~Transport() = default;
  // Before anything is delivered: the engine that receives.
  virtual void attach(Receiver& receiver) = 0;
  // Opens the links to the neighbours (at the top of Engine::run); throws
  // std::invalid_argument when one this stage needs is not configured.
  virtual void connect(const LinkPlan& plan) = 0;
  virtual void send_down(OutFrame frame) = 0;  // activations / evaluation outputs to stage+1
  virtual void send_up(OutFrame frame) = 0;    // gradients to stage-1
  virtual void send_join(const JoinMsg& msg) = 0;  // to stage-1, tagged with the current generation
  // Waits until every frame queued down so far went out (or was dropped, or the link failed).
  virtual void flush_down() = 0;
  virtual std::string sync(const SyncMsg& msg, SyncReply* reply) = 0;
  virtual std::string resume(const ResumeMsg& msg) = 0;
  virtual std::string finish(const FinishMsg& msg) = 0;
  // Interrupts retry backoffs (the stage is stopping).
  virtual void wake() = 0;
  // Stops delivering and sending; nothing calls the receiver after it returns. Idempotent.
  virtual void close() = 0;
  virtual double transport_seconds() const = 0;  // spent delivering frames (overlaps compute)
};

}  // namespace shardguard::shardd
