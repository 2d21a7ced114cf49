// Pure pieces of the HTTP/2 relay (issue 17): the gRPC frame inspector that reads the
// 5-byte length prefixes of a DATA stream across frame boundaries, the percent-encoding
// of grpc-message, and RFC 9113 §6.5.2 header list counting. No I/O.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace shardguard::sidecar::h2 {

// gRPC status codes the relay sends itself.
enum class GrpcCode : int {
  ok = 0,
  cancelled = 1,
  unknown = 2,
  invalid_argument = 3,
  deadline_exceeded = 4,
  not_found = 5,
  unimplemented = 12,
  permission_denied = 7,
  resource_exhausted = 8,
  internal = 13,
  unavailable = 14,
  unauthenticated = 16,
};

// One length-prefixed gRPC message: the compressed flag and its payload.
struct GrpcMessage {
  bool compressed = false;
  std::string payload;
};

// Reads a gRPC DATA stream (a sequence of 1-byte flag + big-endian uint32 length +
// payload), however it is cut into DATA frames. Refuses a message whose prefix
// announces more than `max_message_bytes` as soon as the prefix is complete, before
// any of its payload is read. With `collect`, whole messages are returned (at most
// max_message_bytes each is held); without it nothing is buffered.
class GrpcFrameInspector {
 public:
  GrpcFrameInspector(uint64_t max_message_bytes, bool collect)
      : max_(max_message_bytes), collect_(collect) {}

  enum class Result { ok, too_large };
  // Feeds the next bytes of the stream. Complete messages (collect only) are appended
  // to *out. After too_large the inspector stays failed and feed() returns too_large.
  Result feed(std::string_view bytes, std::vector<GrpcMessage>* out = nullptr);

  uint64_t messages() const { return messages_; }  // messages whose prefix was read
  bool mid_message() const { return prefix_have_ > 0 || remaining_ > 0; }
  bool failed() const { return failed_; }
  uint64_t announced() const { return announced_; }  // length of the last prefix read
  size_t held() const { return current_.payload.size(); }  // collected bytes of an unfinished message

 private:
  uint64_t max_;
  bool collect_;
  bool failed_ = false;
  uint8_t prefix_[5] = {};
  size_t prefix_have_ = 0;
  uint64_t remaining_ = 0;  // payload bytes of the current message still to come
  uint64_t announced_ = 0;
  uint64_t messages_ = 0;
  GrpcMessage current_;
};

// The 5-byte prefix of a message of `length` bytes.
std::string grpc_prefix(bool compressed, uint32_t length);

// grpc-message encoding (gRPC's PROTOCOL-HTTP2): bytes outside 0x20..0x7E and '%'
// become %XX (upper-case hex).
std::string percent_encode_grpc_message(std::string_view message);
std::string percent_decode_grpc_message(std::string_view encoded);

// RFC 9113 §6.5.2: the size of a header field is its name plus its value plus 32.
inline size_t header_field_size(std::string_view name, std::string_view value) {
  return name.size() + value.size() + 32;
}

// The grpc-status value as a number, -1 when it is not a decimal number in 0..99.
int parse_grpc_status(std::string_view value);

}  // namespace shardguard::sidecar::h2
