// StageRunner = the engine (engine.h) behind the gRPC transport
// (grpc_transport.h), with the ShardExport service on the same server.
#include "shardguard/shardd/stage.h"

#include "export_service.h"
#include "grpc_transport.h"
#include "shardguard/shardd/engine.h"
#include "shardguard/shardd/metrics.h"

namespace shardguard::shardd {

class StageRunner::Impl {
 public:
  Impl(StageOptions options, std::shared_ptr<prometheus::Registry> registry, StageEvents events)
      : registry_(std::move(registry)), metrics_(*registry_, options.job.name, options.stage),
        transport_({options.listen, options.prev, options.next, options.peer_timeout_s, options.retry_budget_s},
                   metrics_),
        engine_(options, metrics_, transport_, std::move(events),
                [this](const torch::nn::Sequential& model, int64_t step) { export_.publish(model, step); }) {}

  void start() {
    // The server binds only once the blocks are built: from then on it delivers.
    engine_.start([this] {
      port_ = transport_.listen({&export_});
      return nlohmann::json{{"port", port_}};
    });
  }
  int port() const { return port_; }
  int64_t parameters() const { return engine_.parameters(); }
  void set_neighbours(const std::string& prev, const std::string& next) { transport_.set_neighbours(prev, next); }
  StageResult run() { return engine_.run(); }
  void stop(const std::string& reason) { engine_.stop(reason); }

 private:
  // Declaration order is teardown order reversed: the engine goes first (it
  // closes the transport, whose server serves export_).
  std::shared_ptr<prometheus::Registry> registry_;
  StageMetrics metrics_;
  ExportService export_;
  GrpcTransport transport_;
  Engine engine_;
  int port_ = 0;
};

StageRunner::StageRunner(StageOptions options, std::shared_ptr<prometheus::Registry> registry, StageEvents events)
    : impl_(std::make_unique<Impl>(std::move(options), std::move(registry), std::move(events))) {}
StageRunner::~StageRunner() = default;
void StageRunner::start() { impl_->start(); }
int StageRunner::port() const { return impl_->port(); }
int64_t StageRunner::parameters() const { return impl_->parameters(); }
StageResult StageRunner::run() { return impl_->run(); }
void StageRunner::stop(const std::string& reason) { impl_->stop(reason); }
void StageRunner::set_neighbours(const std::string& prev, const std::string& next) {
  impl_->set_neighbours(prev, next);
}

}  // namespace shardguard::shardd
