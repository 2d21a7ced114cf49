#include "shardguard/sidecar/h2/grpc_frames.h"

#include <algorithm>

namespace shardguard::sidecar::h2 {

GrpcFrameInspector::Result GrpcFrameInspector::feed(std::string_view bytes, std::vector<GrpcMessage>* out) {
  if (failed_) return Result::too_large;
  size_t pos = 0;
  while (pos < bytes.size()) {
    if (remaining_ == 0 && prefix_have_ < 5) {
      size_t take = std::min<size_t>(5 - prefix_have_, bytes.size() - pos);
      for (size_t i = 0; i < take; ++i) prefix_[prefix_have_ + i] = static_cast<uint8_t>(bytes[pos + i]);
      prefix_have_ += take;
      pos += take;
      if (prefix_have_ < 5) break;
      uint64_t length = (uint64_t{prefix_[1]} << 24) | (uint64_t{prefix_[2]} << 16) |
                        (uint64_t{prefix_[3]} << 8) | uint64_t{prefix_[4]};
      announced_ = length;
      ++messages_;
      if (length > max_) {
        failed_ = true;
        return Result::too_large;
      }
      current_.compressed = (prefix_[0] & 1) != 0;
      current_.payload.clear();
      remaining_ = length;
      if (remaining_ == 0) {
        prefix_have_ = 0;
        if (collect_ && out) out->push_back(std::move(current_));
        current_ = GrpcMessage{};
      }
      continue;
    }
    size_t take = static_cast<size_t>(std::min<uint64_t>(remaining_, bytes.size() - pos));
    if (collect_) current_.payload.append(bytes.data() + pos, take);
    pos += take;
    remaining_ -= take;
    if (remaining_ == 0) {
      prefix_have_ = 0;
      if (collect_ && out) out->push_back(std::move(current_));
      current_ = GrpcMessage{};
    }
  }
  return Result::ok;
}

std::string grpc_prefix(bool compressed, uint32_t length) {
  std::string p(5, '\0');
  p[0] = compressed ? 1 : 0;
  p[1] = static_cast<char>((length >> 24) & 0xff);
  p[2] = static_cast<char>((length >> 16) & 0xff);
  p[3] = static_cast<char>((length >> 8) & 0xff);
  p[4] = static_cast<char>(length & 0xff);
  return p;
}

std::string percent_encode_grpc_message(std::string_view message) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  out.reserve(message.size());
  for (unsigned char c : message) {
    if (c >= 0x20 && c <= 0x7e && c != '%') {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 0xf]);
    }
  }
  return out;
}

namespace {
int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}
}  // namespace

std::string percent_decode_grpc_message(std::string_view encoded) {
  std::string out;
  out.reserve(encoded.size());
  for (size_t i = 0; i < encoded.size(); ++i) {
    if (encoded[i] == '%' && i + 2 < encoded.size()) {
      int hi = hex_value(encoded[i + 1]);
      int lo = hex_value(encoded[i + 2]);
      if (hi >= 0 && lo >= 0) {
        out.push_back(static_cast<char>(hi * 16 + lo));
        i += 2;
        continue;
      }
    }
    out.push_back(encoded[i]);
  }
  return out;
}

int parse_grpc_status(std::string_view value) {
  if (value.empty() || value.size() > 2) return -1;
  int v = 0;
  for (char c : value) {
    if (c < '0' || c > '9') return -1;
    v = v * 10 + (c - '0');
  }
  return v;
}

}  // namespace shardguard::sidecar::h2
