// Counts every gRPC message payload byte on the pipeline links — frames, control
// messages (sync, resume, finish, join) and replies — in both directions, with a
// client interceptor on the channels to the neighbours and a server interceptor on
// the stage's own server. This is the figure the sidecars' shardguard_proxy_bytes_total
// must equal when all stage-to-stage traffic crosses them (issue 3).
#pragma once

#include <memory>
#include <vector>

#include <grpcpp/support/client_interceptor.h>
#include <grpcpp/support/server_interceptor.h>
#include <prometheus/counter.h>

namespace shardguard::shardd {

struct WireByteCounters {
  prometheus::Counter* sent = nullptr;
  prometheus::Counter* received = nullptr;
};

std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> wire_byte_client_interceptors(
    WireByteCounters counters);
std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> wire_byte_server_interceptors(
    WireByteCounters counters);

}  // namespace shardguard::shardd
