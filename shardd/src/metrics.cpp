#include "shardguard/shardd/metrics.h"

namespace shardguard::shardd {
namespace {

using prometheus::Labels;

prometheus::Histogram::BucketBoundaries seconds_buckets() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
}

constexpr char kComputeHelp[] =
    "Compute time of one forward or backward pass over a micro-batch, or of one optimizer step.";
constexpr char kBytesHelp[] = "Bytes of tensor-frame requests (activations, gradients) to and from the neighbours.";
constexpr char kMessageBytesHelp[] =
    "Bytes of every gRPC message on the pipeline links (frames, control messages, replies); equals the sidecars' shardguard_proxy_bytes_total.";
constexpr char kFramesHelp[] = "Tensor frames to and from the neighbours.";

Labels with(Labels base, const std::string& k, const std::string& v) {
  base[k] = v;
  return base;
}

prometheus::Counter& counter(prometheus::Registry& r, const std::string& name, const std::string& help,
                             const Labels& labels) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r).Add(labels);
}

prometheus::Gauge& gauge(prometheus::Registry& r, const std::string& name, const std::string& help,
                         const Labels& labels) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r).Add(labels);
}

prometheus::Histogram& histogram(prometheus::Registry& r, const std::string& name, const std::string& help,
                                 const Labels& labels) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(r).Add(labels, seconds_buckets());
}

}  // namespace

StageMetrics::StageMetrics(prometheus::Registry& r, const std::string& job, int shard)
    : StageMetrics(r, Labels{{"job", job}, {"shard", std::to_string(shard)}}) {}

StageMetrics::StageMetrics(prometheus::Registry& r, const Labels& l)
    : parameters(gauge(r, "shardguard_shard_parameters", "Parameters held by this shard.", l)),
      steps(counter(r, "shardguard_train_steps_total", "Optimizer steps completed by this stage.", l)),
      samples(counter(r, "shardguard_train_samples_total", "Training samples processed by this stage.", l)),
      step(gauge(r, "shardguard_train_step", "Last completed optimizer step.", l)),
      epoch(gauge(r, "shardguard_train_epoch", "Epoch of the last completed step.", l)),
      loss(gauge(r, "shardguard_train_loss", "Training loss of the last step (last stage).", l)),
      train_accuracy(gauge(r, "shardguard_train_accuracy", "Training accuracy of the last step (last stage).", l)),
      eval_accuracy(gauge(r, "shardguard_eval_accuracy",
                          "Test-set accuracy of the last evaluation (last stage; gpt: next-token top-1 accuracy).", l)),
      eval_loss(gauge(r, "shardguard_eval_loss",
                      "Mean cross-entropy of the last evaluation in nats per prediction (last stage; gpt: per token).",
                      l)),
      forward_seconds(histogram(r, "shardguard_stage_compute_seconds", kComputeHelp,
                                with(l, "pass", "forward"))),
      backward_seconds(histogram(r, "shardguard_stage_compute_seconds", kComputeHelp,
                                 with(l, "pass", "backward"))),
      optimizer_seconds(histogram(r, "shardguard_stage_compute_seconds", kComputeHelp,
                                  with(l, "pass", "optimizer"))),
      allreduce_seconds(histogram(r, "shardguard_stage_compute_seconds", kComputeHelp,
                                  with(l, "pass", "allreduce"))),
      bytes_sent(counter(r, "shardguard_pipeline_bytes_total", kBytesHelp,
                         with(l, "direction", "sent"))),
      bytes_received(counter(r, "shardguard_pipeline_bytes_total",
                             kBytesHelp, with(l, "direction", "received"))),
      message_bytes_sent(counter(r, "shardguard_pipeline_message_bytes_total", kMessageBytesHelp,
                                 with(l, "direction", "sent"))),
      message_bytes_received(counter(r, "shardguard_pipeline_message_bytes_total", kMessageBytesHelp,
                                     with(l, "direction", "received"))),
      frames_sent(counter(r, "shardguard_pipeline_frames_total", kFramesHelp,
                          with(l, "direction", "sent"))),
      frames_received(counter(r, "shardguard_pipeline_frames_total", kFramesHelp,
                              with(l, "direction", "received"))),
      transport_seconds(counter(r, "shardguard_pipeline_transport_seconds_total",
                                "Time the sender threads spent delivering frames to the neighbours (RPC round trips, retries included).", l)),
      serialise_seconds(counter(r, "shardguard_pipeline_serialise_seconds_total",
                                "Time spent encoding tensors into frames and decoding received frames.", l)),
      stale_frames(counter(r, "shardguard_pipeline_stale_frames_total",
                           "Frames dropped because they belong to another pipeline generation (received, or queued for sending).", l)),
      rejected_frames(counter(r, "shardguard_pipeline_rejected_frames_total",
                              "Frames refused for a wrong shape, dtype or size.", l)),
      replica_store_refused(counter(r, "shardguard_replica_store_refused_total",
                                    "Connections the replica group's store (replica 0) closed: a malformed request, or too many open.", l)),
      resyncs(counter(r, "shardguard_pipeline_resyncs_total", "Pipeline (re)synchronisations this stage took part in.", l)),
      generated_tokens(counter(r, "shardguard_generated_tokens_total",
                               "Tokens generated through the pipeline (stage 0 of shardctl generate).", l)),
      checkpoint_writes(counter(r, "shardguard_checkpoint_writes_total", "Checkpoints written.", l)),
      checkpoint_failures(counter(r, "shardguard_checkpoint_failures_total", "Checkpoint writes or loads that failed.", l)),
      checkpoint_loads(counter(r, "shardguard_checkpoint_loads_total", "Checkpoints restored.", l)),
      checkpoint_seconds(histogram(r, "shardguard_checkpoint_seconds", "Time to write one checkpoint.", l)),
      checkpoint_bytes(gauge(r, "shardguard_checkpoint_bytes", "Size of the last checkpoint written.", l)),
      checkpoint_step(gauge(r, "shardguard_checkpoint_step", "Step of the last checkpoint written or restored.", l)) {}

}  // namespace shardguard::shardd
