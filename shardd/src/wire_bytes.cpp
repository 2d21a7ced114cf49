// See wire_bytes.h.
#include "shardguard/shardd/wire_bytes.h"

#include <google/protobuf/message_lite.h>
#include <grpcpp/support/byte_buffer.h>

namespace shardguard::shardd {
namespace {

using grpc::experimental::InterceptionHookPoints;

class WireBytes : public grpc::experimental::Interceptor {
 public:
  explicit WireBytes(WireByteCounters c) : c_(c) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* m) override {
    if (m->QueryInterceptionHookPoint(InterceptionHookPoints::PRE_SEND_MESSAGE)) {
      // The message object when it is not serialised yet, else the serialised bytes.
      if (const auto* msg = static_cast<const google::protobuf::MessageLite*>(m->GetSendMessage())) {
        c_.sent->Increment(static_cast<double>(msg->ByteSizeLong()));
      } else if (const grpc::ByteBuffer* buf = m->GetSerializedSendMessage()) {
        c_.sent->Increment(static_cast<double>(buf->Length()));
      }
    }
    if (m->QueryInterceptionHookPoint(InterceptionHookPoints::POST_RECV_MESSAGE)) {
      if (const auto* msg = static_cast<const google::protobuf::MessageLite*>(m->GetRecvMessage())) {
        c_.received->Increment(static_cast<double>(msg->ByteSizeLong()));
      }
    }
    m->Proceed();
  }

 private:
  WireByteCounters c_;
};

class ClientFactory : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit ClientFactory(WireByteCounters c) : c_(c) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(grpc::experimental::ClientRpcInfo*) override {
    return new WireBytes(c_);
  }

 private:
  WireByteCounters c_;
};

class ServerFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit ServerFactory(WireByteCounters c) : c_(c) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo*) override {
    return new WireBytes(c_);
  }

 private:
  WireByteCounters c_;
};

}  // namespace

std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> wire_byte_client_interceptors(
    WireByteCounters counters) {
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> v;
  v.push_back(std::make_unique<ClientFactory>(counters));
  return v;
}

std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> wire_byte_server_interceptors(
    WireByteCounters counters) {
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> v;
  v.push_back(std::make_unique<ServerFactory>(counters));
  return v;
}

}  // namespace shardguard::shardd
