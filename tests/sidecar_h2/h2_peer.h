// Test support for the HTTP/2 relay's tests: a scripted HTTP/2 endpoint on nghttp2 over
// a blocking socket (plaintext), as a client (raw frames the gRPC library never sends:
// CONTINUATION, RST_STREAM mid-message, GOAWAY, a reader that never reads) or as a server
// (an upstream that resets a stream or dies mid-stream). Driven by pump_until() from one
// thread; every wait is bounded.
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <nghttp2/nghttp2.h>

namespace shardguard::sidecar::h2::testing {

using Headers = std::vector<std::pair<std::string, std::string>>;

class H2Peer {
 public:
  enum class Role { client, server };
  struct Stream {
    Headers headers;
    Headers trailers;
    std::string data;
    bool headers_done = false;
    bool remote_ended = false;
    bool closed = false;
    uint32_t close_code = 0;
    bool rst_received = false;
    std::string body;  // what we still have to send
    size_t sent = 0;
    bool end_after_body = true;
    bool provider = false;
  };

  H2Peer(Role role, int fd, uint32_t window = 65535) : role_(role), fd_(fd) {
    nghttp2_session_callbacks* cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_send_callback(cb, &H2Peer::send_cb);
    nghttp2_session_callbacks_set_on_header_callback(cb, &H2Peer::header_cb);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, &H2Peer::frame_recv_cb);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, &H2Peer::data_cb);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, &H2Peer::close_cb);
    nghttp2_option* opt;
    nghttp2_option_new(&opt);
    nghttp2_option_set_max_send_header_block_length(opt, 1 << 20);  // over-limit header lists on purpose
    if (role == Role::client)
      nghttp2_session_client_new2(&session_, cb, this, opt);
    else
      nghttp2_session_server_new2(&session_, cb, this, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cb);
    nghttp2_settings_entry s[] = {{NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, window},
                                  {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 10000}};
    nghttp2_submit_settings(session_, NGHTTP2_FLAG_NONE, s, 2);
  }
  ~H2Peer() {
    nghttp2_session_del(session_);
    if (fd_ >= 0) close(fd_);
  }
  H2Peer(const H2Peer&) = delete;
  H2Peer& operator=(const H2Peer&) = delete;

  // Client: a POST to `path` with gRPC's headers, `extra` and `body` (END_STREAM after it
  // when `end`).
  int32_t request(const std::string& path, const Headers& extra, std::string body, bool end) {
    Headers h = {{":method", "POST"},
                 {":scheme", "http"},
                 {":path", path},
                 {":authority", "relay"},
                 {"content-type", "application/grpc"},
                 {"te", "trailers"}};
    h.insert(h.end(), extra.begin(), extra.end());
    auto nva = to_nva(h);
    nghttp2_data_provider prd;
    prd.source.ptr = this;
    prd.read_callback = &H2Peer::read_cb;
    int32_t id = nghttp2_submit_request(session_, nullptr, nva.data(), nva.size(), &prd, nullptr);
    Stream& s = streams[id];
    s.body = std::move(body);
    s.end_after_body = end;
    s.provider = true;
    return id;
  }
  // Server: response headers, then `body`, then trailers (when not empty).
  void respond(int32_t id, std::string body, bool end) {
    Headers h = {{":status", "200"}, {"content-type", "application/grpc"}};
    auto nva = to_nva(h);
    nghttp2_data_provider prd;
    prd.source.ptr = this;
    prd.read_callback = &H2Peer::read_cb;
    Stream& s = streams[id];
    s.body = std::move(body);
    s.end_after_body = end;
    s.provider = true;
    nghttp2_submit_response(session_, id, nva.data(), nva.size(), &prd);
  }
  // More body on a stream with a provider.
  void send_data(int32_t id, const std::string& more, bool end) {
    Stream& s = streams[id];
    s.body += more;
    s.end_after_body = end;
    nghttp2_session_resume_data(session_, id);
  }
  void rst(int32_t id, uint32_t code) { nghttp2_submit_rst_stream(session_, NGHTTP2_FLAG_NONE, id, code); }
  void goaway(uint32_t code) {
    nghttp2_submit_goaway(session_, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(session_), code,
                          nullptr, 0);
  }
  // Closes the socket at once (an upstream that dies).
  void die() {
    if (fd_ >= 0) {
      ::shutdown(fd_, SHUT_RDWR);
      close(fd_);
      fd_ = -1;
    }
  }

  // Sends what is queued and reads (unless `read` is false) until done() or the timeout.
  bool pump_until(const std::function<bool()>& done, std::chrono::milliseconds timeout = std::chrono::seconds(20),
                  bool read = true) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (fd_ < 0) return done();
      if (nghttp2_session_send(session_) != 0) return done();
      if (done()) return true;
      pollfd p{fd_, static_cast<short>(read ? POLLIN : 0), 0};
      int r = poll(&p, 1, 10);
      if (r > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)) && read) {
        uint8_t buf[65536];
        ssize_t n = recv(fd_, buf, sizeof buf, 0);
        if (n <= 0) {
          peer_closed = true;
          return done();
        }
        if (nghttp2_session_mem_recv(session_, buf, static_cast<size_t>(n)) < 0) return done();
      }
    }
    return done();
  }

  nghttp2_session* session() { return session_; }
  std::map<int32_t, Stream> streams;
  std::vector<int32_t> requests_seen;  // server: streams whose request HEADERS arrived
  int pings_received = 0;              // PINGs (not ACKs); nghttp2 answers each itself
  bool goaway_received = false;
  bool peer_closed = false;
  int frames_sent[16] = {};  // by frame type, parsed from the bytes written
  std::function<void(int32_t)> on_request;

  static std::string header(const Headers& h, const std::string& name) {
    for (const auto& [n, v] : h)
      if (n == name) return v;
    return "";
  }

 private:
  static std::vector<nghttp2_nv> to_nva(const Headers& h) {
    std::vector<nghttp2_nv> nva;
    for (const auto& [n, v] : h)
      nva.push_back({reinterpret_cast<uint8_t*>(const_cast<char*>(n.data())),
                     reinterpret_cast<uint8_t*>(const_cast<char*>(v.data())), n.size(), v.size(),
                     NGHTTP2_NV_FLAG_NONE});
    return nva;
  }
  // Follows the frame headers in the outgoing bytes (after the client preface).
  void count_frames(const uint8_t* data, size_t len) {
    for (size_t i = 0; i < len; ++i) {
      if (skip_ > 0) {
        --skip_;
        continue;
      }
      hd_[hd_have_++] = data[i];
      if (hd_have_ == 9) {
        hd_have_ = 0;
        size_t length = (size_t{hd_[0]} << 16) | (size_t{hd_[1]} << 8) | hd_[2];
        if (hd_[3] < 16) ++frames_sent[hd_[3]];
        skip_ = length;
      }
    }
  }
  static ssize_t send_cb(nghttp2_session*, const uint8_t* data, size_t length, int, void* user) {
    auto* self = static_cast<H2Peer*>(user);
    if (self->fd_ < 0) return NGHTTP2_ERR_CALLBACK_FAILURE;
    size_t off = 0;
    if (self->role_ == Role::client && !self->preface_skipped_) {
      self->preface_skipped_ = true;
      self->skip_ = NGHTTP2_CLIENT_MAGIC_LEN;
    }
    self->count_frames(data, length);
    while (off < length) {
      ssize_t n = ::send(self->fd_, data + off, length - off, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
      }
      off += static_cast<size_t>(n);
    }
    return static_cast<ssize_t>(length);
  }
  static ssize_t read_cb(nghttp2_session*, int32_t id, uint8_t* buf, size_t length, uint32_t* flags,
                         nghttp2_data_source*, void* user) {
    auto* self = static_cast<H2Peer*>(user);
    Stream& s = self->streams[id];
    size_t n = std::min(length, s.body.size() - s.sent);
    std::memcpy(buf, s.body.data() + s.sent, n);
    s.sent += n;
    if (s.sent == s.body.size()) {
      if (s.end_after_body) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
      } else if (n == 0) {
        return NGHTTP2_ERR_DEFERRED;
      }
    }
    return static_cast<ssize_t>(n);
  }
  static int header_cb(nghttp2_session*, const nghttp2_frame* frame, const uint8_t* name, size_t namelen,
                       const uint8_t* value, size_t valuelen, uint8_t, void* user) {
    auto* self = static_cast<H2Peer*>(user);
    Stream& s = self->streams[frame->hd.stream_id];
    std::string n(reinterpret_cast<const char*>(name), namelen), v(reinterpret_cast<const char*>(value), valuelen);
    (s.headers_done ? s.trailers : s.headers).emplace_back(std::move(n), std::move(v));
    return 0;
  }
  static int frame_recv_cb(nghttp2_session*, const nghttp2_frame* frame, void* user) {
    auto* self = static_cast<H2Peer*>(user);
    if (frame->hd.type == NGHTTP2_GOAWAY) self->goaway_received = true;
    if (frame->hd.type == NGHTTP2_PING && !(frame->hd.flags & NGHTTP2_FLAG_ACK)) ++self->pings_received;
    if (frame->hd.stream_id == 0) return 0;
    Stream& s = self->streams[frame->hd.stream_id];
    if (frame->hd.type == NGHTTP2_HEADERS) {
      bool first = !s.headers_done;
      s.headers_done = true;
      if (first && self->role_ == Role::server) {
        self->requests_seen.push_back(frame->hd.stream_id);
        if (self->on_request) self->on_request(frame->hd.stream_id);
      }
    }
    if (frame->hd.type == NGHTTP2_RST_STREAM) s.rst_received = true;
    if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) s.remote_ended = true;
    return 0;
  }
  static int data_cb(nghttp2_session*, uint8_t, int32_t id, const uint8_t* data, size_t len, void* user) {
    static_cast<H2Peer*>(user)->streams[id].data.append(reinterpret_cast<const char*>(data), len);
    return 0;
  }
  static int close_cb(nghttp2_session*, int32_t id, uint32_t code, void* user) {
    Stream& s = static_cast<H2Peer*>(user)->streams[id];
    s.closed = true;
    s.close_code = code;
    return 0;
  }

  Role role_;
  int fd_;
  nghttp2_session* session_ = nullptr;
  bool preface_skipped_ = false;
  size_t skip_ = 0;
  uint8_t hd_[9] = {};
  size_t hd_have_ = 0;
};

}  // namespace shardguard::sidecar::h2::testing
