// The engine's Transport between shardd processes: the Pipeline service
// (pipeline.proto) on this stage's gRPC server decodes what neighbours send and
// hands it to the engine; channels to stage-1 and stage+1 (with retries, and a
// sender thread per direction) carry what the engine sends.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "link.h"
#include "shardguard/shardd/metrics.h"
#include "shardguard/shardd/transport.h"
#include "shardguard/v1/pipeline.grpc.pb.h"

namespace shardguard::shardd {

struct GrpcLinkOptions {
  std::string listen;      // this stage's server
  std::string prev, next;  // Pipeline endpoints of stage-1 / stage+1 (or the sidecar in front of them)
  double peer_timeout_s = 300;  // deadline of one attempt to deliver a frame or join
  double retry_budget_s = 60;   // how long an unreachable neighbour is retried
};

class GrpcPeer;

class GrpcTransport final : public Transport, public v1::Pipeline::Service {
 public:
  GrpcTransport(GrpcLinkOptions options, StageMetrics& metrics);
  ~GrpcTransport() override;

  // Binds the server, with `services` (ShardExport) beside Pipeline; returns
  // the port. Throws when it cannot listen. Delivers to the receiver from then on.
  int listen(const std::vector<grpc::Service*>& services);
  void set_neighbours(const std::string& prev, const std::string& next);

  // Transport
  void attach(Receiver& receiver) override { receiver_ = &receiver; }
  void connect(const LinkPlan& plan) override;
  void send_down(OutFrame frame) override;
  void send_up(OutFrame frame) override;
  void send_join(const JoinMsg& msg) override;
  void flush_down() override;
  std::string sync(const SyncMsg& msg, SyncReply* reply) override;
  std::string resume(const ResumeMsg& msg) override;
  std::string finish(const FinishMsg& msg) override;
  void wake() override;
  void close() override;
  double transport_seconds() const override;

  // Pipeline service (gRPC handler threads)
  grpc::Status Forward(grpc::ServerContext*, const v1::ForwardRequest* req, v1::ForwardReply* reply) override;
  grpc::Status Backward(grpc::ServerContext*, const v1::BackwardRequest* req, v1::BackwardReply*) override;

 private:
  grpc::Status deliver_frame(v1::TensorFrame* frame, Direction direction);
  std::string control_down(const v1::ForwardRequest& req, v1::ForwardReply* reply);
  void encode(const OutFrame& frame, v1::TensorFrame* out);

  GrpcLinkOptions opt_;
  StageMetrics& metrics_;
  Receiver* receiver_ = nullptr;
  int stages_ = 1;
  std::unique_ptr<grpc::Server> server_;
  // Set once by connect() on the engine's thread; wake() may run on any thread (a stop
  // from the signal watcher), so it reads them under peers_mu_.
  std::mutex peers_mu_;
  std::unique_ptr<GrpcPeer> prev_, next_;
  std::unique_ptr<LinkSender> down_, up_;
  double closed_seconds_ = 0;  // transport seconds of the senders close() took down
};

}  // namespace shardguard::shardd
