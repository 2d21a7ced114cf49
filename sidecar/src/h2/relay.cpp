#include "shardguard/sidecar/h2/relay.h"

#include "shardguard/sidecar/h2/resolve.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>
#include <thread>

#include <nghttp2/nghttp2.h>

namespace shardguard::sidecar::h2 {

void prepare_socket(int fd) {
  int flags = fcntl(fd, F_GETFL, 0);
  fcntl(fd, F_SETFL, flags | O_NONBLOCK);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

namespace {

// The gauge of held bytes, and its peak.
void add_held(RelayStats& stats, int64_t delta) {
  int64_t now = stats.buffered_bytes.fetch_add(delta, std::memory_order_relaxed) + delta;
  if (delta <= 0) return;
  int64_t peak = stats.peak_buffered_bytes.load(std::memory_order_relaxed);
  while (now > peak && !stats.peak_buffered_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

// DATA bytes of one direction of one call, between the session that received them and
// the one that sends them on. `owed`: bytes not yet given back to the sender's window.
struct Pipe {
  std::deque<std::string> chunks;
  size_t head = 0;  // bytes of chunks.front() already taken
  size_t size = 0;
  uint64_t owed = 0;
  bool ended = false;

  void push(RelayStats& stats, const uint8_t* data, size_t len) {
    if (len == 0) return;
    // Chunks of up to 64 KiB, allocated whole once a stream streams (growing a string
    // by appends would reallocate and copy it several times on the way); the first
    // chunk of an empty pipe only as large as what arrived, so that many small calls
    // do not each hold 64 KiB.
    constexpr size_t kChunk = 64 * 1024;
    while (len > 0) {
      if (chunks.empty() || chunks.back().size() >= kChunk) {
        const bool streaming = !chunks.empty();
        chunks.emplace_back();
        chunks.back().reserve(streaming ? kChunk : std::min(kChunk, len));
      }
      const size_t n = std::min(len, kChunk - chunks.back().size());
      chunks.back().append(reinterpret_cast<const char*>(data), n);
      data += n;
      len -= n;
      size += n;
      add_held(stats, static_cast<int64_t>(n));
    }
  }
  // Appends `len` bytes from the front to `out` and drops them.
  void take(RelayStats& stats, std::string& out, size_t len) {
    size_t left = std::min(len, size);
    while (left > 0) {
      std::string& front = chunks.front();
      size_t n = std::min(left, front.size() - head);
      out.append(front.data() + head, n);
      head += n;
      left -= n;
      size -= n;
      stats.buffered_bytes.fetch_sub(static_cast<int64_t>(n), std::memory_order_relaxed);
      if (head == front.size()) {
        chunks.pop_front();
        head = 0;
      }
    }
  }
  void clear(RelayStats& stats) {
    stats.buffered_bytes.fetch_sub(static_cast<int64_t>(size), std::memory_order_relaxed);
    chunks.clear();
    head = 0;
    size = 0;
  }
};

bool is_hop_by_hop(std::string_view name) {
  return name == "connection" || name == "keep-alive" || name == "proxy-connection" ||
         name == "transfer-encoding" || name == "upgrade" || name == "host";
}

nghttp2_nv make_nv(const std::string& name, const std::string& value) {
  nghttp2_nv nv;
  nv.name = reinterpret_cast<uint8_t*>(const_cast<char*>(name.data()));
  nv.namelen = name.size();
  nv.value = reinterpret_cast<uint8_t*>(const_cast<char*>(value.data()));
  nv.valuelen = value.size();
  nv.flags = NGHTTP2_NV_FLAG_NONE;
  return nv;
}

std::vector<nghttp2_nv> to_nva(const HeaderList& headers) {
  std::vector<nghttp2_nv> nva;
  nva.reserve(headers.size());
  for (const auto& [name, value] : headers) nva.push_back(make_nv(name, value));
  return nva;
}

bool split_host_port(const std::string& address, std::string* host, std::string* port) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) return false;
  *host = address.substr(0, colon);
  *port = address.substr(colon + 1);
  if (host->size() > 2 && host->front() == '[' && host->back() == ']') *host = host->substr(1, host->size() - 2);
  return true;
}

}  // namespace

// Name lookups off the loop thread: getaddrinfo blocks, for seconds when DNS is slow or
// down (a peer's Service name in a cluster), and a blocked loop would stall every stream
// of its worker. A numeric address is converted at once; a name goes to lookup_async (its
// own thread; one budget for all the relays' upstreams in the process), whose answer is
// posted back to the loop — unless the worker has gone by then (the destructor clears
// the loop under the mutex the answer is posted under).
class Resolver {
 public:
  using Done = std::function<void(const Resolved&)>;
  explicit Resolver(EventLoop& loop) : shared_(std::make_shared<Shared>()) { shared_->loop = &loop; }
  ~Resolver() {
    std::lock_guard<std::mutex> lock(shared_->mu);
    shared_->loop = nullptr;
  }
  Resolver(const Resolver&) = delete;
  Resolver& operator=(const Resolver&) = delete;

  // `done` runs on the loop thread: within this call for a numeric address (or one that
  // is not host:port, or a lookup that cannot start), later for a name.
  void resolve(const std::string& address, Done done) {
    std::string host, port;
    Resolved r;
    if (!split_host_port(address, &host, &port)) {
      r.error = "bad address " + address;
      done(r);
      return;
    }
    r = lookup(host, port, AI_NUMERICHOST | AI_NUMERICSERV);
    if (r.error.empty()) {
      done(r);
      return;
    }
    auto answered = [shared = shared_, address, done](Resolved found) {
      if (!found.error.empty()) found.error = "resolve " + address + ": " + found.error;
      std::lock_guard<std::mutex> lock(shared->mu);
      if (shared->loop) shared->loop->post([found = std::move(found), done] { done(found); });
    };
    std::string why;
    if (!lookup_async(budget(), host, port, std::move(answered), &why)) {
      r.error = "resolve " + address + ": " + why;
      done(r);
    }
  }

 private:
  static const LookupBudget& budget() {
    static const LookupBudget shared_by_all_relays(kLookupsPerUser);
    return shared_by_all_relays;
  }
  struct Shared {
    std::mutex mu;
    EventLoop* loop = nullptr;
  };
  std::shared_ptr<Shared> shared_;
};

class Conn;
class DownConn;
class UpConn;

struct Call {
  explicit Call(RelayStats* s) : stats(s) {}
  ~Call() {
    // Whatever is still held counts no more.
    int64_t held = static_cast<int64_t>(req.size + resp.size + req_inspector.held() + resp_inspector.held());
    if (held) stats->buffered_bytes.fetch_sub(held, std::memory_order_relaxed);
  }
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;
  RelayStats* stats;
  CallInfo info;
  DownConn* down = nullptr;  // null once that connection is gone
  int32_t down_id = 0;
  UpConn* up = nullptr;
  int32_t up_id = -1;
  bool decided = false;
  bool down_closed = false;
  bool up_closed = false;
  bool inspect = false;
  bool response_started = false;  // response HEADERS submitted downstream
  bool final_queued = false;      // the downstream end (trailers or trailers-only) is decided
  bool up_rst_received = false;
  bool reported = false;
  HeaderList request_headers;
  size_t header_bytes = 0;
  bool headers_too_big = false;
  std::string path;
  HeaderList response_headers;
  size_t response_header_bytes = 0;
  HeaderList trailers;
  bool have_trailers = false;
  Pipe req;   // downstream → upstream
  Pipe resp;  // upstream → downstream
  GrpcFrameInspector req_inspector{0, false};
  GrpcFrameInspector resp_inspector{0, false};
  CallEnd end;
};

struct RelayWorker::Impl {
  Impl(EventLoop& l, RelayConfig c, RelayHooks h, std::shared_ptr<RelayStats> s)
      : loop(l), config(std::move(c)), hooks(std::move(h)), stats(std::move(s)) {}
  EventLoop& loop;
  RelayConfig config;
  RelayHooks hooks;
  std::shared_ptr<RelayStats> stats;
  std::unordered_map<Conn*, std::shared_ptr<Conn>> conns;
  std::map<std::string, std::shared_ptr<UpConn>> pool;  // upstream name → its live session
  std::unordered_set<Conn*> dirty;
  std::vector<std::shared_ptr<Conn>> graveyard;
  nghttp2_session_callbacks* down_callbacks = nullptr;
  nghttp2_session_callbacks* up_callbacks = nullptr;
  nghttp2_option* option = nullptr;
  std::vector<uint8_t> read_buffer = std::vector<uint8_t>(64 * 1024);
  Resolver resolver{loop};
  size_t downstream = 0;
  size_t upstream = 0;
  bool draining = false;
  int depth = 0;
  static std::atomic<uint64_t> next_call_id;

  // Every entry point (I/O, timers, posted tasks, public calls) runs through enter():
  // afterwards the sessions that changed send their frames, and dead connections go.
  template <typename F>
  void enter(F&& f) {
    ++depth;
    f();
    --depth;
    if (depth == 0) settle();
  }
  void settle();
  void mark(Conn* conn) { dirty.insert(conn); }
  UpConn* upstream_for(const std::string& name);
  void decide(DownConn* down, const std::shared_ptr<Call>& call);
  void relay_in(const std::shared_ptr<Call>& call, Direction dir, const uint8_t* data, size_t len);
  // `refusal` ("" unless the relay itself refuses): CallEnd::refusal_reason.
  void end_downstream(Call& call, GrpcCode code, const std::string& message, const char* refusal,
                      bool upstream_failed);
  void reset_upstream(Call& call, uint32_t code);
  void discard(Call& call, Direction dir);
  void report(Call& call);
};
std::atomic<uint64_t> RelayWorker::Impl::next_call_id{1};

// ---- one connection: socket, transport, nghttp2 session, output buffer ----------------
class Conn : public std::enable_shared_from_this<Conn> {
 public:
  enum class State { connecting, handshaking, open, dead };
  Conn(RelayWorker::Impl& w, int fd) : w_(w), fd_(fd) {}
  virtual ~Conn() {
    if (session_) nghttp2_session_del(session_);
    if (fd_ >= 0) close(fd_);
  }
  virtual bool downstream() const = 0;
  nghttp2_session* session() const { return session_; }
  State state() const { return state_; }
  bool alive() const { return state_ != State::dead; }
  RelayWorker::Impl& worker() { return w_; }

  void start_io(uint32_t events) {
    w_.loop.watch(fd_, events, [this](uint32_t ev) { w_.enter([&] { on_io(ev); }); });
    handshake_timer_ = w_.loop.run_after(w_.config.limits.handshake_timeout, [this] {
      handshake_timer_ = 0;
      w_.enter([&] {
        if (state_ != State::connecting && state_ != State::handshaking) return;
        if (downstream() && w_.hooks.on_handshake_failure)
          w_.hooks.on_handshake_failure("handshake_timeout", "no TLS handshake within the timeout");
        kill("handshake timeout", true);
      });
    });
  }

  size_t pending_output() const { return out_.size() - out_off_; }
  bool output_full() const { return pending_output() >= w_.config.limits.max_output_bytes; }
  void append_output(const uint8_t* data, size_t len) {
    out_.append(reinterpret_cast<const char*>(data), len);
    w_.stats->output_bytes.fetch_add(static_cast<int64_t>(len), std::memory_order_relaxed);
  }
  std::string& output() { return out_; }
  void account_output(size_t len) { w_.stats->output_bytes.fetch_add(static_cast<int64_t>(len), std::memory_order_relaxed); }

  // Sends what the session has, writes it out, sets the epoll interest; closes a
  // session that has nothing more to do.
  void pump() {
    if (state_ != State::open) return;
    bool capped = true;  // left with frames to send: come back when the socket is writable
    for (int round = 0; round < 16 && alive(); ++round) {
      size_t before = pending_output();
      int rv = nghttp2_session_send(session_);
      if (rv != 0) {
        kill(std::string("http2: ") + nghttp2_strerror(rv), false);
        return;
      }
      flush();
      if (!alive()) return;
      bool more = nghttp2_session_want_write(session_) && !output_full() && !write_blocked_;
      if (!more || (pending_output() == before && before > 0)) {
        capped = false;
        break;
      }
    }
    if (!alive()) return;
    if (!nghttp2_session_want_read(session_) && !nghttp2_session_want_write(session_) && pending_output() == 0) {
      kill("done", false);
      return;
    }
    uint32_t events = EPOLLIN;
    if (pending_output() > 0 || read_wants_write_ || capped) events |= EPOLLOUT;
    if (events != events_) {
      events_ = events;
      w_.loop.modify(fd_, events);
    }
  }

  // Marks the connection dead: the socket closes now, the session object is freed
  // once no callback of it is on the stack (the graveyard).
  void kill(const std::string& reason, bool handshake_failure) {
    if (state_ == State::dead) return;
    if (handshake_failure) w_.stats->handshake_failures_total.fetch_add(1, std::memory_order_relaxed);
    if (state_ == State::open && transport_) transport_->close_notify();
    state_ = State::dead;
    reason_ = reason;
    close_socket();
    w_.stats->output_bytes.fetch_sub(static_cast<int64_t>(pending_output()), std::memory_order_relaxed);
    out_.clear();
    out_off_ = 0;
    auto self = shared_from_this();
    w_.conns.erase(this);
    w_.dirty.erase(this);
    w_.graveyard.push_back(self);
    on_dead(reason);
  }

 protected:
  // Stops watching and closes the socket, with its handshake timer.
  void close_socket() {
    if (handshake_timer_) w_.loop.cancel(handshake_timer_);
    handshake_timer_ = 0;
    if (fd_ >= 0) {
      w_.loop.unwatch(fd_);
      close(fd_);
      fd_ = -1;
    }
  }
  std::chrono::steady_clock::time_point last_read_ = std::chrono::steady_clock::now();
  virtual void on_open() {}
  // A connect that failed before the handshake: true when another attempt was started.
  virtual bool retry_connect(const std::string& /*error*/) { return false; }
  virtual void on_dead(const std::string& reason) = 0;

  void on_io(uint32_t ev) {
    if (state_ == State::connecting) {
      int err = 0;
      socklen_t len = sizeof err;
      getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0 || (ev & EPOLLERR)) {
        const std::string error = std::string("connect: ") + std::strerror(err ? err : ECONNREFUSED);
        if (!retry_connect(error)) kill(error, true);
        return;
      }
      state_ = State::handshaking;
    }
    if (state_ == State::handshaking) {
      handshake();
      return;
    }
    if (state_ != State::open) return;
    if (ev & EPOLLOUT) {
      write_blocked_ = false;
      if (read_wants_write_) {
        read_wants_write_ = false;
        read_some();
        if (!alive()) return;
      }
      flush();
      if (!alive()) return;
    }
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) read_some();
    if (alive()) w_.mark(this);
  }

  void handshake() {
    Transport::Io r = transport_->handshake();
    if (r == Transport::Io::ok) {
      state_ = State::open;
      if (handshake_timer_) w_.loop.cancel(handshake_timer_);
      handshake_timer_ = 0;
      events_ = EPOLLIN;
      w_.loop.modify(fd_, EPOLLIN);
      on_open();
      if (!alive()) return;
      w_.mark(this);
      read_some();  // TLS may already hold application data
      return;
    }
    if (r == Transport::Io::want_read || r == Transport::Io::want_write) {
      uint32_t events = r == Transport::Io::want_read ? EPOLLIN : EPOLLOUT;
      events_ = events;
      w_.loop.modify(fd_, events);
      return;
    }
    std::string why = transport_->error();
    if (downstream() && w_.hooks.on_handshake_failure)
      w_.hooks.on_handshake_failure(r == Transport::Io::closed ? "closed" : transport_->failure_reason(), why);
    kill("handshake: " + (why.empty() ? std::string("closed") : why), true);
  }

  void read_some() {
    for (int round = 0; round < 64; ++round) {
      size_t n = 0;
      Transport::Io r = transport_->read(w_.read_buffer.data(), w_.read_buffer.size(), &n);
      if (r == Transport::Io::ok) {
        last_read_ = std::chrono::steady_clock::now();
        ssize_t used = nghttp2_session_mem_recv(session_, w_.read_buffer.data(), n);
        if (!alive()) return;
        if (used < 0) {
          // Protocol errors are answered with GOAWAY by nghttp2 where it can.
          nghttp2_session_send(session_);
          flush();
          kill(std::string("http2: ") + nghttp2_strerror(static_cast<int>(used)), false);
          return;
        }
        if (transport_->drained(n, w_.read_buffer.size())) return;  // epoll says when there is more
        continue;
      }
      if (r == Transport::Io::want_read) return;
      if (r == Transport::Io::want_write) {
        read_wants_write_ = true;
        return;
      }
      kill(r == Transport::Io::closed ? "peer closed" : "read: " + transport_->error(), false);
      return;
    }
    // More to read: come back after the others had their turn.
    std::weak_ptr<Conn> weak = shared_from_this();
    w_.loop.post([weak] {
      if (auto self = weak.lock()) {
        if (self->alive()) self->w_.enter([&] { self->on_io(EPOLLIN); });
      }
    });
  }

  void flush() {
    write_blocked_ = false;  // until the socket says otherwise again
    while (pending_output() > 0) {
      size_t n = 0;
      Transport::Io r = transport_->write(reinterpret_cast<const uint8_t*>(out_.data()) + out_off_,
                                          pending_output(), &n);
      if (r == Transport::Io::ok) {
        out_off_ += n;
        w_.stats->output_bytes.fetch_sub(static_cast<int64_t>(n), std::memory_order_relaxed);
        continue;
      }
      if (r == Transport::Io::want_write) {
        write_blocked_ = true;
        break;
      }
      if (r == Transport::Io::want_read) break;
      kill("write: " + transport_->error(), false);
      return;
    }
    if (out_off_ == out_.size()) {
      out_.clear();
      out_off_ = 0;
    } else if (out_off_ > 256 * 1024) {
      out_.erase(0, out_off_);
      out_off_ = 0;
    }
  }

  RelayWorker::Impl& w_;
  int fd_;
  std::unique_ptr<Transport> transport_;
  nghttp2_session* session_ = nullptr;
  State state_ = State::handshaking;
  std::string reason_;
  std::string out_;
  size_t out_off_ = 0;
  uint32_t events_ = 0;
  bool write_blocked_ = false;
  bool read_wants_write_ = false;
  uint64_t handshake_timer_ = 0;
};

// ---- downstream: an nghttp2 server session ---------------------------------------------
class DownConn : public Conn {
 public:
  DownConn(RelayWorker::Impl& w, int fd) : Conn(w, fd) {
    transport_ = w.config.server_tls ? make_tls_transport(w.config.server_tls, fd) : make_plain_transport(fd);
    nghttp2_session_server_new2(&session_, w.down_callbacks, this, w.option);
    const RelayLimits& limits = w.config.limits;
    nghttp2_settings_entry settings[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, limits.stream_window},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, static_cast<uint32_t>(limits.max_header_list_bytes * 2)},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
    };
    nghttp2_submit_settings(session_, NGHTTP2_FLAG_NONE, settings, sizeof settings / sizeof settings[0]);
    nghttp2_session_set_local_window_size(session_, NGHTTP2_FLAG_NONE, 0,
                                          static_cast<int32_t>(limits.connection_window));
    ++w.downstream;
    w.stats->downstream_connections.fetch_add(1, std::memory_order_relaxed);
  }
  bool downstream() const override { return true; }
  const std::string& peer_id() const { return peer_id_; }
  std::unordered_map<int32_t, std::shared_ptr<Call>> calls;

  void goaway() {
    if (!alive() || goaway_sent_) return;
    goaway_sent_ = true;
    nghttp2_submit_goaway(session_, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(session_),
                          NGHTTP2_NO_ERROR, nullptr, 0);
    w_.mark(this);
  }

 protected:
  void on_open() override {
    peer_id_ = w_.config.server_tls ? transport_->peer_id() : w_.config.plaintext_peer_id;
    if (w_.draining) goaway();
  }
  void on_dead(const std::string&) override {
    --w_.downstream;
    w_.stats->downstream_connections.fetch_sub(1, std::memory_order_relaxed);
    auto all = std::move(calls);
    calls.clear();
    for (auto& [id, call] : all) {
      call->down_closed = true;
      call->down = nullptr;
      w_.discard(*call, Direction::response);
      w_.discard(*call, Direction::request);
      if (call->end.grpc_status < 0 && call->end.reset_code == 0) call->end.reset_code = NGHTTP2_CANCEL;
      w_.reset_upstream(*call, NGHTTP2_CANCEL);
      w_.report(*call);
    }
  }

 private:
  std::string peer_id_;
  bool goaway_sent_ = false;
};

// ---- upstream: one nghttp2 client session per upstream ----------------------------------
class UpConn : public Conn {
 public:
  UpConn(RelayWorker::Impl& w, std::string name, const UpstreamConfig& config) : Conn(w, -1), name_(std::move(name)) {
    nghttp2_session_client_new2(&session_, w.up_callbacks, this, w.option);
    const RelayLimits& limits = w.config.limits;
    nghttp2_settings_entry settings[] = {
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, limits.stream_window},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, static_cast<uint32_t>(limits.max_header_list_bytes * 2)},
    };
    nghttp2_submit_settings(session_, NGHTTP2_FLAG_NONE, settings, sizeof settings / sizeof settings[0]);
    nghttp2_session_set_local_window_size(session_, NGHTTP2_FLAG_NONE, 0,
                                          static_cast<int32_t>(limits.connection_window));
    ++w.upstream;
    w.stats->upstream_connections.fetch_add(1, std::memory_order_relaxed);
    w.stats->upstream_connects_total.fetch_add(1, std::memory_order_relaxed);
    tls_ = config.tls != nullptr;
    authority_ = config.address;
  }
  bool downstream() const override { return false; }
  const std::string& name() const { return name_; }
  bool tls() const { return tls_; }
  const std::string& authority() const { return authority_; }
  bool draining = false;
  std::unordered_map<int32_t, std::shared_ptr<Call>> calls;

  // Opens the socket once the address is known (Resolver); failures are reported from
  // the loop, never from inside a caller's nghttp2 callback. Streams submitted meanwhile
  // wait in the session until the connection is open.
  void connect(const UpstreamConfig& config) {
    state_ = State::connecting;
    if (config.dial) {
      const int fd = config.dial();
      open_socket(config, fd, fd >= 0, fd < 0 ? "dial failed" : "");
      return;
    }
    std::weak_ptr<Conn> weak = shared_from_this();
    w_.resolver.resolve(config.address, [weak, config](const Resolved& r) {
      auto self = std::static_pointer_cast<UpConn>(weak.lock());
      if (!self || !self->alive()) return;
      self->worker().enter([&] {
        if (!r.error.empty()) {
          self->open_socket(config, -1, false, r.error);
          return;
        }
        self->config_ = config;
        self->addresses_ = r.addresses;
        self->dial_next("");
      });
    });
  }

 protected:
  void on_open() override {
    last_read_ = std::chrono::steady_clock::now();
    if (w_.config.limits.keepalive_interval.count() > 0) arm_keepalive();
  }

  // A connect that failed on its way tries the name's next address (a dual-stack name
  // whose first address is not served).
  bool retry_connect(const std::string& error) override {
    if (next_address_ >= addresses_.size()) return false;
    close_socket();  // the next attempt starts its own handshake timer
    transport_.reset();
    dial_next(error);
    return true;
  }

 private:
  // The keepalive check runs every half of the shorter of the two periods.
  void arm_keepalive() {
    const RelayLimits& l = w_.config.limits;
    const auto tick = std::max(std::chrono::milliseconds(10), std::min(l.keepalive_interval, l.keepalive_timeout) / 2);
    std::weak_ptr<Conn> weak = shared_from_this();
    keepalive_timer_ = w_.loop.run_after(tick, [weak] {
      auto self = std::static_pointer_cast<UpConn>(weak.lock());
      if (!self || !self->alive()) return;
      self->keepalive_timer_ = 0;
      self->worker().enter([&] { self->keepalive_tick(); });
    });
  }

  void keepalive_tick() {
    const RelayLimits& l = w_.config.limits;
    const auto now = std::chrono::steady_clock::now();
    if (last_read_ < ping_sent_at_) {  // a PING is out and nothing came since
      if (now - ping_sent_at_ >= l.keepalive_timeout) {
        w_.stats->keepalive_timeouts_total.fetch_add(1, std::memory_order_relaxed);
        kill("keepalive: " + name_ + " did not answer a PING within " + std::to_string(l.keepalive_timeout.count()) +
                 " ms",
             false);
        return;
      }
    } else {
      if (!calls.empty() && now - last_read_ >= l.keepalive_interval) {
        nghttp2_submit_ping(session_, NGHTTP2_FLAG_NONE, nullptr);
        ping_sent_at_ = now;
        w_.mark(this);
      }
    }
    arm_keepalive();
  }

  void dial_next(std::string error) {
    while (next_address_ < addresses_.size()) {
      const Resolved::Address& a = addresses_[next_address_++];
      const int fd = socket(a.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) {
        error = std::string("socket: ") + std::strerror(errno);
        continue;
      }
      const int rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&a.addr), a.len);
      if (rc == 0 || errno == EINPROGRESS) {
        open_socket(config_, fd, rc == 0, "");
        return;
      }
      error = "connect " + config_.address + ": " + std::strerror(errno);
      close(fd);
    }
    open_socket(config_, -1, false, error.empty() ? "no address for " + config_.address : error);
  }

  // fd < 0: the connection failed with `error`.
  void open_socket(const UpstreamConfig& config, int fd, bool connected, const std::string& error) {
    if (fd < 0) {
      state_ = State::connecting;
      std::weak_ptr<Conn> weak = shared_from_this();
      w_.loop.post([weak, error] {
        if (auto self = weak.lock()) self->worker().enter([&] { self->kill(error, true); });
      });
      return;
    }
    prepare_socket(fd);
    fd_ = fd;
    transport_ = config.tls ? make_tls_transport(config.tls, fd) : make_plain_transport(fd);
    state_ = connected ? State::handshaking : State::connecting;
    start_io(connected ? (EPOLLIN | EPOLLOUT) : EPOLLOUT);
  }

 protected:
  void on_dead(const std::string& reason) override {
    if (keepalive_timer_) w_.loop.cancel(keepalive_timer_);
    keepalive_timer_ = 0;
    --w_.upstream;
    w_.stats->upstream_connections.fetch_sub(1, std::memory_order_relaxed);
    auto it = w_.pool.find(name_);
    if (it != w_.pool.end() && it->second.get() == this) w_.pool.erase(it);
    auto all = std::move(calls);
    calls.clear();
    for (auto& [id, call] : all) {
      call->up_closed = true;
      call->up = nullptr;
      w_.discard(*call, Direction::request);
      if (!call->resp.ended)
        w_.end_downstream(*call, GrpcCode::unavailable, "upstream connection to " + name_ + " lost: " + reason, nullptr,
                          true);
    }
  }

 private:
  std::string name_;
  bool tls_ = false;
  std::string authority_;
  uint64_t keepalive_timer_ = 0;
  std::chrono::steady_clock::time_point ping_sent_at_ = std::chrono::steady_clock::time_point::min();
  UpstreamConfig config_;                   // as given to connect()
  std::vector<Resolved::Address> addresses_;  // of config_.address, tried in order
  size_t next_address_ = 0;
};

// ---- the worker's pieces ------------------------------------------------------------------
void RelayWorker::Impl::settle() {
  ++depth;
  for (int round = 0; round < 64 && !dirty.empty(); ++round) {
    std::vector<Conn*> now(dirty.begin(), dirty.end());
    dirty.clear();
    for (Conn* conn : now) {
      auto it = conns.find(conn);
      if (it == conns.end()) continue;
      auto hold = it->second;
      hold->pump();
    }
  }
  --depth;
  graveyard.clear();
}

UpConn* RelayWorker::Impl::upstream_for(const std::string& name) {
  auto it = pool.find(name);
  if (it != pool.end() && it->second->alive() && !it->second->draining) return it->second.get();
  auto cfg = config.upstreams.find(name);
  if (cfg == config.upstreams.end()) return nullptr;
  auto conn = std::make_shared<UpConn>(*this, name, cfg->second);
  conns[conn.get()] = conn;
  pool[name] = conn;
  conn->connect(cfg->second);
  return conn.get();
}

void RelayWorker::Impl::report(Call& call) {
  if (call.reported || !call.decided) return;
  call.reported = true;
  stats->active_calls.fetch_sub(1, std::memory_order_relaxed);
  call.end.info = call.info;
  call.end.request_messages = call.req_inspector.messages();
  call.end.response_messages = call.resp_inspector.messages();
  if (hooks.on_call_end) hooks.on_call_end(call.end);
}

void RelayWorker::Impl::discard(Call& call, Direction dir) {
  Pipe& pipe = dir == Direction::request ? call.req : call.resp;
  Conn* source = dir == Direction::request ? static_cast<Conn*>(call.down) : static_cast<Conn*>(call.up);
  if (pipe.owed > 0 && source && source->alive()) {
    nghttp2_session_consume_connection(source->session(), pipe.owed);
    mark(source);
  }
  pipe.owed = 0;
  pipe.clear(*stats);
}

void RelayWorker::Impl::reset_upstream(Call& call, uint32_t code) {
  if (call.up && !call.up_closed && call.up_id > 0 && call.up->alive()) {
    nghttp2_submit_rst_stream(call.up->session(), NGHTTP2_FLAG_NONE, call.up_id, code);
    mark(call.up);
  }
}

void RelayWorker::Impl::end_downstream(Call& call, GrpcCode code, const std::string& message, const char* refusal,
                                       bool upstream_failed) {
  bool by_relay = refusal != nullptr && *refusal != '\0';
  discard(call, Direction::request);
  reset_upstream(call, NGHTTP2_CANCEL);
  if (call.down_closed || !call.down || call.final_queued) return;
  call.final_queued = true;
  call.end.grpc_status = static_cast<int>(code);
  call.end.grpc_message = message;
  call.end.refused_by_relay = by_relay;
  if (by_relay) call.end.refusal_reason = refusal;
  call.end.upstream_failed = upstream_failed;
  if (by_relay) stats->refused_total.fetch_add(1, std::memory_order_relaxed);
  std::string status = std::to_string(static_cast<int>(code));
  std::string encoded = percent_encode_grpc_message(message);
  if (!call.response_started) {
    call.response_started = true;
    HeaderList h = {{":status", "200"},
                    {"content-type", "application/grpc"},
                    {"grpc-status", status},
                    {"grpc-message", encoded}};
    auto nva = to_nva(h);
    nghttp2_submit_response(call.down->session(), call.down_id, nva.data(), nva.size(), nullptr);
  } else {
    discard(call, Direction::response);
    call.trailers = {{"grpc-status", status}, {"grpc-message", encoded}};
    call.have_trailers = true;
    call.resp.ended = true;
    nghttp2_session_resume_data(call.down->session(), call.down_id);
  }
  mark(call.down);
}

namespace {
ssize_t read_pipe(nghttp2_session* session, int32_t stream_id, uint8_t*, size_t length, uint32_t* flags,
                  nghttp2_data_source* source, void* user_data);
}

void RelayWorker::Impl::decide(DownConn* down, const std::shared_ptr<Call>& call) {
  call->decided = true;
  call->info.id = next_call_id.fetch_add(1, std::memory_order_relaxed);
  call->info.peer_id = down->peer_id();
  call->info.path = call->path;
  call->info.started = std::chrono::steady_clock::now();
  stats->calls_total.fetch_add(1, std::memory_order_relaxed);
  stats->active_calls.fetch_add(1, std::memory_order_relaxed);
  const RelayLimits& limits = config.limits;
  if (call->headers_too_big) {
    end_downstream(*call, GrpcCode::resource_exhausted,
                   "request headers of " + std::to_string(call->header_bytes) + " bytes exceed the sidecar's limit of " +
                       std::to_string(limits.max_header_list_bytes) + " bytes",
                   "header_list_too_large", false);
    return;
  }
  if (call->path.empty() || call->path[0] != '/') {
    end_downstream(*call, GrpcCode::unimplemented, "request without a valid :path", "bad_request", false);
    return;
  }
  Decision d;
  try {
    d = hooks.decide(RequestInfo{call->info.id, call->info.peer_id, call->path, call->request_headers});
  } catch (const std::exception& e) {
    d = Decision::refuse(GrpcCode::internal, std::string("policy decision failed: ") + e.what());
  }
  if (!d.allow) {
    end_downstream(*call, d.code, d.message, "decision", false);
    return;
  }
  call->info.upstream = d.upstream;
  call->inspect = d.inspect && hooks.on_message != nullptr;
  call->req_inspector = GrpcFrameInspector(limits.max_message_bytes, call->inspect);
  call->resp_inspector = GrpcFrameInspector(limits.max_message_bytes, call->inspect);
  UpConn* up = upstream_for(d.upstream);
  if (!up) {
    end_downstream(*call, GrpcCode::unavailable, "no upstream named " + d.upstream, "no_upstream", false);
    return;
  }
  // Pseudo-headers first, in the order HTTP/2 clients use; then the rest.
  HeaderList out;
  std::string authority = up->authority();
  std::string method = "POST";
  for (const auto& [name, value] : call->request_headers) {
    if (name == ":authority") authority = value;
    if (name == ":method") method = value;
  }
  out.emplace_back(":method", method);
  out.emplace_back(":scheme", up->tls() ? "https" : "http");
  out.emplace_back(":path", call->path);
  out.emplace_back(":authority", authority);
  for (const auto& [name, value] : call->request_headers) {
    if (name.empty() || name[0] == ':' || is_hop_by_hop(name)) continue;
    if (std::find(config.drop_request_headers.begin(), config.drop_request_headers.end(), name) !=
        config.drop_request_headers.end())
      continue;
    out.emplace_back(name, value);
  }
  auto nva = to_nva(out);
  nghttp2_data_provider provider;
  provider.source.ptr = call.get();
  provider.read_callback = read_pipe;
  int32_t id = nghttp2_submit_request(up->session(), nullptr, nva.data(), nva.size(), &provider, nullptr);
  if (id < 0) {
    end_downstream(*call, GrpcCode::unavailable, std::string("upstream: ") + nghttp2_strerror(id), nullptr, true);
    return;
  }
  call->up = up;
  call->up_id = id;
  up->calls[id] = call;
  mark(up);
}

void RelayWorker::Impl::relay_in(const std::shared_ptr<Call>& call, Direction dir, const uint8_t* data, size_t len) {
  bool request = dir == Direction::request;
  Conn* source = request ? static_cast<Conn*>(call->down) : static_cast<Conn*>(call->up);
  int32_t source_id = request ? call->down_id : call->up_id;
  auto drop = [&] {
    if (source && source->alive()) {
      nghttp2_session_consume(source->session(), source_id, len);
      mark(source);
    }
  };
  bool sink_gone = request ? (!call->up || call->up_closed || call->final_queued)
                           : (!call->down || call->down_closed || call->final_queued);
  if (sink_gone) {
    drop();
    return;
  }
  GrpcFrameInspector& inspector = request ? call->req_inspector : call->resp_inspector;
  std::vector<GrpcMessage> messages;
  size_t held_before = inspector.held();
  auto result = inspector.feed(std::string_view(reinterpret_cast<const char*>(data), len),
                               call->inspect ? &messages : nullptr);
  // Bytes of a message being collected count as held, like the pipes' bytes.
  int64_t held_delta = static_cast<int64_t>(inspector.held()) - static_cast<int64_t>(held_before);
  if (held_delta != 0) add_held(*stats, held_delta);
  if (result == GrpcFrameInspector::Result::too_large) {
    drop();
    end_downstream(*call, GrpcCode::resource_exhausted,
                   std::string(request ? "request" : "response") + " message of " +
                       std::to_string(inspector.announced()) + " bytes exceeds the sidecar's limit of " +
                       std::to_string(config.limits.max_message_bytes) + " bytes",
                   "message_too_large", false);
    return;
  }
  Pipe& pipe = request ? call->req : call->resp;
  if (call->inspect) {
    // A message is held whole before it is forwarded, so its bytes cannot wait for the
    // other side (a message larger than the window would never complete): they are
    // given back at once while the backlog to forward is under the stream window, and
    // only as the backlog drains when it is not. Held: the window + one message.
    if (pipe.size <= config.limits.stream_window) {
      drop();
    } else {
      pipe.owed += len;
    }
    for (const auto& message : messages) {
      Decision d = hooks.on_message(call->info, dir, message);
      if (!d.allow) {
        end_downstream(*call, d.code, d.message, "message", false);
        return;
      }
      std::string prefix = grpc_prefix(message.compressed, static_cast<uint32_t>(message.payload.size()));
      pipe.push(*stats, reinterpret_cast<const uint8_t*>(prefix.data()), prefix.size());
      pipe.push(*stats, reinterpret_cast<const uint8_t*>(message.payload.data()), message.payload.size());
    }
  } else {
    pipe.push(*stats, data, len);
    pipe.owed += len;
  }
  Conn* sink = request ? static_cast<Conn*>(call->up) : static_cast<Conn*>(call->down);
  int32_t sink_id = request ? call->up_id : call->down_id;
  nghttp2_session_resume_data(sink->session(), sink_id);
  mark(sink);
}

// ---- nghttp2 callbacks ----------------------------------------------------------------------
namespace {

Conn* conn_of(void* user_data) { return static_cast<Conn*>(user_data); }

ssize_t on_send(nghttp2_session*, const uint8_t* data, size_t length, int, void* user_data) {
  Conn* conn = conn_of(user_data);
  if (!conn->alive()) return NGHTTP2_ERR_CALLBACK_FAILURE;
  if (conn->output_full()) return NGHTTP2_ERR_WOULDBLOCK;
  conn->append_output(data, length);
  return static_cast<ssize_t>(length);
}

ssize_t read_pipe(nghttp2_session* session, int32_t stream_id, uint8_t*, size_t length, uint32_t* flags,
                  nghttp2_data_source* source, void* user_data) {
  Conn* conn = conn_of(user_data);
  Call* call = static_cast<Call*>(source->ptr);
  Pipe& pipe = conn->downstream() ? call->resp : call->req;
  size_t n = std::min(length, pipe.size);
  if (n == 0 && !pipe.ended) return NGHTTP2_ERR_DEFERRED;
  if (n > 0) *flags |= NGHTTP2_DATA_FLAG_NO_COPY;
  if (pipe.ended && n == pipe.size) {
    *flags |= NGHTTP2_DATA_FLAG_EOF;
    if (conn->downstream() && call->have_trailers) {
      *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
      auto nva = to_nva(call->trailers);
      nghttp2_submit_trailer(session, stream_id, nva.data(), nva.size());
    }
  }
  return static_cast<ssize_t>(n);
}

int on_send_data(nghttp2_session*, nghttp2_frame* frame, const uint8_t* framehd, size_t length,
                 nghttp2_data_source* source, void* user_data) {
  Conn* conn = conn_of(user_data);
  if (conn->output_full()) return NGHTTP2_ERR_WOULDBLOCK;
  auto& w = conn->worker();
  Call* call = static_cast<Call*>(source->ptr);
  bool to_down = conn->downstream();
  Pipe& pipe = to_down ? call->resp : call->req;
  std::string& out = conn->output();
  size_t before = out.size();
  out.append(reinterpret_cast<const char*>(framehd), 9);
  size_t padlen = frame->data.padlen;
  if (padlen > 0) out.push_back(static_cast<char>(padlen - 1));
  pipe.take(*w.stats, out, length);
  if (padlen > 1) out.append(padlen - 1, '\0');
  conn->account_output(out.size() - before);
  // Give the bytes back to the sender's window now that they are on their way.
  uint64_t give = std::min<uint64_t>(length, pipe.owed);
  pipe.owed -= give;
  Conn* source_conn = to_down ? static_cast<Conn*>(call->up) : static_cast<Conn*>(call->down);
  int32_t source_id = to_down ? call->up_id : call->down_id;
  if (give > 0 && source_conn && source_conn->alive()) {
    nghttp2_session_consume(source_conn->session(), source_id, give);
    w.mark(source_conn);
  }
  if (to_down) {
    call->end.response_bytes += length;
    w.stats->bytes_downstream_total.fetch_add(length, std::memory_order_relaxed);
  } else {
    call->end.request_bytes += length;
    w.stats->bytes_upstream_total.fetch_add(length, std::memory_order_relaxed);
  }
  return 0;
}

// Downstream --------------------------------------------------------------------------------
DownConn* down_of(void* user_data) { return static_cast<DownConn*>(user_data); }

std::shared_ptr<Call> find_call(std::unordered_map<int32_t, std::shared_ptr<Call>>& calls, int32_t id) {
  auto it = calls.find(id);
  return it == calls.end() ? nullptr : it->second;
}

int down_begin_headers(nghttp2_session*, const nghttp2_frame* frame, void* user_data) {
  DownConn* down = down_of(user_data);
  if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  auto call = std::make_shared<Call>(down->worker().stats.get());
  call->down = down;
  call->down_id = frame->hd.stream_id;
  down->calls[frame->hd.stream_id] = std::move(call);
  return 0;
}

int down_header(nghttp2_session*, const nghttp2_frame* frame, const uint8_t* name, size_t namelen,
                const uint8_t* value, size_t valuelen, uint8_t, void* user_data) {
  DownConn* down = down_of(user_data);
  auto call = find_call(down->calls, frame->hd.stream_id);
  if (!call || call->decided) return 0;  // request trailers are not relayed
  call->header_bytes += namelen + valuelen + 32;
  if (call->header_bytes > down->worker().config.limits.max_header_list_bytes) {
    call->headers_too_big = true;
    call->request_headers.clear();
    call->request_headers.shrink_to_fit();
    return 0;
  }
  std::string n(reinterpret_cast<const char*>(name), namelen);
  std::string v(reinterpret_cast<const char*>(value), valuelen);
  if (n == ":path") call->path = v;
  call->request_headers.emplace_back(std::move(n), std::move(v));
  return 0;
}

void request_ended(RelayWorker::Impl& w, Call& call) {
  call.req.ended = true;
  if (call.up && !call.up_closed && call.up_id > 0 && call.up->alive()) {
    nghttp2_session_resume_data(call.up->session(), call.up_id);
    w.mark(call.up);
  }
}

int down_frame_recv(nghttp2_session*, const nghttp2_frame* frame, void* user_data) {
  DownConn* down = down_of(user_data);
  auto& w = down->worker();
  if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) return 0;
  auto call = find_call(down->calls, frame->hd.stream_id);
  if (!call) return 0;
  if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) w.decide(down, call);
  if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) request_ended(w, *call);
  return 0;
}

int down_data_chunk(nghttp2_session* session, uint8_t, int32_t stream_id, const uint8_t* data, size_t len,
                    void* user_data) {
  DownConn* down = down_of(user_data);
  auto call = find_call(down->calls, stream_id);
  if (!call) {
    nghttp2_session_consume(session, stream_id, len);
    down->worker().mark(down);
    return 0;
  }
  down->worker().relay_in(call, Direction::request, data, len);
  return 0;
}

int down_frame_send(nghttp2_session* session, const nghttp2_frame* frame, void* user_data) {
  DownConn* down = down_of(user_data);
  if ((frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) ||
      !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM))
    return 0;
  // The response is complete; a request still open is reset with NO_ERROR, as gRPC does.
  if (nghttp2_session_get_stream_remote_close(session, frame->hd.stream_id) == 0) {
    nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame->hd.stream_id, NGHTTP2_NO_ERROR);
    down->worker().mark(down);
  }
  return 0;
}

int down_stream_close(nghttp2_session*, int32_t stream_id, uint32_t error_code, void* user_data) {
  DownConn* down = down_of(user_data);
  auto& w = down->worker();
  auto it = down->calls.find(stream_id);
  if (it == down->calls.end()) return 0;
  auto call = it->second;
  down->calls.erase(it);
  w.discard(*call, Direction::response);
  call->down_closed = true;
  if (error_code != NGHTTP2_NO_ERROR && !call->final_queued) {
    call->end.grpc_status = -1;
    call->end.reset_code = error_code;
  }
  if (call->up && !call->up_closed) {
    w.discard(*call, Direction::request);
    w.reset_upstream(*call, error_code == NGHTTP2_NO_ERROR ? static_cast<uint32_t>(NGHTTP2_CANCEL) : error_code);
  }
  call->down = nullptr;
  w.report(*call);
  return 0;
}

// Upstream ------------------------------------------------------------------------------------
UpConn* up_of(void* user_data) { return static_cast<UpConn*>(user_data); }

int up_header(nghttp2_session*, const nghttp2_frame* frame, const uint8_t* name, size_t namelen, const uint8_t* value,
              size_t valuelen, uint8_t, void* user_data) {
  UpConn* up = up_of(user_data);
  auto call = find_call(up->calls, frame->hd.stream_id);
  if (!call || frame->hd.type != NGHTTP2_HEADERS) return 0;
  call->response_header_bytes += namelen + valuelen + 32;
  if (call->response_header_bytes > 2 * up->worker().config.limits.max_header_list_bytes)
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;  // resets the stream: UNAVAILABLE downstream
  std::string n(reinterpret_cast<const char*>(name), namelen);
  std::string v(reinterpret_cast<const char*>(value), valuelen);
  if (is_hop_by_hop(n)) return 0;
  bool trailers = frame->headers.cat == NGHTTP2_HCAT_HEADERS;
  if (n == "grpc-status" && (trailers || (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)))
    call->end.grpc_status = parse_grpc_status(v);
  if (n == "grpc-message" && (trailers || (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)))
    call->end.grpc_message = percent_decode_grpc_message(v);
  (trailers ? call->trailers : call->response_headers).emplace_back(std::move(n), std::move(v));
  return 0;
}

int up_frame_recv(nghttp2_session*, const nghttp2_frame* frame, void* user_data) {
  UpConn* up = up_of(user_data);
  auto& w = up->worker();
  if (frame->hd.type == NGHTTP2_GOAWAY) {
    // No new streams on it; the streams it still serves finish, then it closes.
    up->draining = true;
    auto it = w.pool.find(up->name());
    if (it != w.pool.end() && it->second.get() == up) w.pool.erase(it);
    return 0;
  }
  auto call = find_call(up->calls, frame->hd.stream_id);
  if (!call) return 0;
  if (frame->hd.type == NGHTTP2_RST_STREAM) {
    call->up_rst_received = true;
    return 0;
  }
  if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) return 0;
  bool end = frame->hd.flags & NGHTTP2_FLAG_END_STREAM;
  if (call->down_closed || !call->down || call->final_queued) return 0;
  if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_RESPONSE) {
    call->response_started = true;
    auto nva = to_nva(call->response_headers);
    if (end) {  // trailers-only
      call->final_queued = true;
      call->resp.ended = true;
      nghttp2_submit_response(call->down->session(), call->down_id, nva.data(), nva.size(), nullptr);
    } else {
      nghttp2_data_provider provider;
      provider.source.ptr = call.get();
      provider.read_callback = read_pipe;
      nghttp2_submit_response(call->down->session(), call->down_id, nva.data(), nva.size(), &provider);
    }
    w.mark(call->down);
    return 0;
  }
  if (end) {
    if (frame->hd.type == NGHTTP2_HEADERS) call->have_trailers = !call->trailers.empty();
    call->final_queued = true;
    call->resp.ended = true;
    nghttp2_session_resume_data(call->down->session(), call->down_id);
    w.mark(call->down);
  }
  return 0;
}

int up_data_chunk(nghttp2_session* session, uint8_t, int32_t stream_id, const uint8_t* data, size_t len,
                  void* user_data) {
  UpConn* up = up_of(user_data);
  auto call = find_call(up->calls, stream_id);
  if (!call) {
    nghttp2_session_consume(session, stream_id, len);
    up->worker().mark(up);
    return 0;
  }
  up->worker().relay_in(call, Direction::response, data, len);
  return 0;
}

int up_stream_close(nghttp2_session*, int32_t stream_id, uint32_t error_code, void* user_data) {
  UpConn* up = up_of(user_data);
  auto& w = up->worker();
  auto it = up->calls.find(stream_id);
  if (it == up->calls.end()) return 0;
  auto call = it->second;
  up->calls.erase(it);
  w.discard(*call, Direction::request);
  call->up_closed = true;
  // The stream is over: what of its response still waits downstream no longer needs the
  // stream window, but it must not keep the shared connection's window.
  if (call->resp.owed > 0) {
    nghttp2_session_consume_connection(up->session(), call->resp.owed);
    call->resp.owed = 0;
    w.mark(up);
  }
  if (call->down_closed || !call->down) {
    call->up = nullptr;
    return 0;
  }
  if (!call->resp.ended && !call->final_queued) {
    if (call->up_rst_received) {
      // RST_STREAM from upstream is passed on as it came.
      call->final_queued = true;
      call->end.reset_code = error_code;
      w.discard(*call, Direction::response);
      nghttp2_submit_rst_stream(call->down->session(), NGHTTP2_FLAG_NONE, call->down_id, error_code);
      w.mark(call->down);
    } else {
      w.end_downstream(*call, GrpcCode::unavailable,
                       std::string("upstream stream closed: ") + nghttp2_http2_strerror(error_code), nullptr, true);
    }
  }
  call->up = nullptr;
  return 0;
}

}  // namespace

// ---- RelayWorker --------------------------------------------------------------------------------
RelayWorker::RelayWorker(EventLoop& loop, RelayConfig config, RelayHooks hooks, std::shared_ptr<RelayStats> stats) {
  if (!hooks.decide) throw std::invalid_argument("RelayHooks.decide is required");
  const RelayLimits& l = config.limits;
  if (l.stream_window < 65535 || l.stream_window > 0x7fffffffu)
    throw std::invalid_argument("stream_window " + std::to_string(l.stream_window) + " is outside 65535..2^31-1");
  if (l.connection_window < 65535 || l.connection_window > 0x7fffffffu)
    throw std::invalid_argument("connection_window " + std::to_string(l.connection_window) +
                                " is outside 65535..2^31-1");
  if (l.max_header_list_bytes < 1024 || l.max_message_bytes == 0 || l.max_output_bytes < 16384 ||
      l.max_concurrent_streams == 0)
    throw std::invalid_argument("relay limits out of range");
  if (!stats) stats = std::make_shared<RelayStats>();
  impl_ = std::make_unique<Impl>(loop, std::move(config), std::move(hooks), std::move(stats));

  nghttp2_session_callbacks_new(&impl_->down_callbacks);
  nghttp2_session_callbacks* d = impl_->down_callbacks;
  nghttp2_session_callbacks_set_send_callback(d, on_send);
  nghttp2_session_callbacks_set_send_data_callback(d, on_send_data);
  nghttp2_session_callbacks_set_on_begin_headers_callback(d, down_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(d, down_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(d, down_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(d, down_data_chunk);
  nghttp2_session_callbacks_set_on_frame_send_callback(d, down_frame_send);
  nghttp2_session_callbacks_set_on_stream_close_callback(d, down_stream_close);

  nghttp2_session_callbacks_new(&impl_->up_callbacks);
  nghttp2_session_callbacks* u = impl_->up_callbacks;
  nghttp2_session_callbacks_set_send_callback(u, on_send);
  nghttp2_session_callbacks_set_send_data_callback(u, on_send_data);
  nghttp2_session_callbacks_set_on_header_callback(u, up_header);
  nghttp2_session_callbacks_set_on_frame_recv_callback(u, up_frame_recv);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(u, up_data_chunk);
  nghttp2_session_callbacks_set_on_stream_close_callback(u, up_stream_close);

  nghttp2_option_new(&impl_->option);
  nghttp2_option_set_no_auto_window_update(impl_->option, 1);
  nghttp2_option_set_peer_max_concurrent_streams(impl_->option, l.max_concurrent_streams);
  // nghttp2 refuses to send a header block whose worst-case encoding exceeds this (64 KiB
  // by default); what the relay forwards is at most the limit plus its own fields.
  nghttp2_option_set_max_send_header_block_length(impl_->option, 2 * l.max_header_list_bytes + 16 * 1024);
}

RelayWorker::~RelayWorker() {
  close_all();
  impl_->graveyard.clear();
  nghttp2_session_callbacks_del(impl_->down_callbacks);
  nghttp2_session_callbacks_del(impl_->up_callbacks);
  nghttp2_option_del(impl_->option);
}

void RelayWorker::adopt(int fd) {
  Impl& w = *impl_;
  w.enter([&] {
    if (w.draining) {
      close(fd);
      return;
    }
    prepare_socket(fd);
    auto conn = std::make_shared<DownConn>(w, fd);
    w.conns[conn.get()] = conn;
    conn->start_io(EPOLLIN | EPOLLOUT);  // writable at once: the handshake (or plaintext) starts
  });
}

void RelayWorker::drain() {
  Impl& w = *impl_;
  w.enter([&] {
    w.draining = true;
    std::vector<std::shared_ptr<Conn>> all;
    for (auto& [p, c] : w.conns) all.push_back(c);
    for (auto& c : all) {
      if (c->downstream()) {
        if (c->state() == Conn::State::open)
          static_cast<DownConn*>(c.get())->goaway();
        else
          c->kill("draining", false);
      } else if (static_cast<UpConn*>(c.get())->calls.empty()) {
        c->kill("draining", false);
      }
    }
  });
}

void RelayWorker::close_all() {
  Impl& w = *impl_;
  w.enter([&] {
    std::vector<std::shared_ptr<Conn>> all;
    for (auto& [p, c] : w.conns) all.push_back(c);
    // Downstream first: their calls reset upstream streams instead of waiting for them.
    for (auto& c : all)
      if (c->downstream()) c->kill("closed", false);
    for (auto& c : all) c->kill("closed", false);
  });
}

void RelayWorker::set_server_tls(std::shared_ptr<TlsContext> tls) {
  if (tls && tls->side() == TlsContext::Side::server) impl_->config.server_tls = std::move(tls);
}

void RelayWorker::set_upstream_tls(const std::string& name, std::shared_ptr<TlsContext> tls) {
  auto it = impl_->config.upstreams.find(name);
  if (it != impl_->config.upstreams.end() && tls && tls->side() == TlsContext::Side::client)
    it->second.tls = std::move(tls);
}

size_t RelayWorker::downstream_connections() const { return impl_->downstream; }
size_t RelayWorker::upstream_connections() const { return impl_->upstream; }
bool RelayWorker::idle() const { return impl_->conns.empty(); }
const RelayStats& RelayWorker::stats() const { return *impl_->stats; }

// ---- Relay: threads and the listener ------------------------------------------------------------
Relay::Relay(std::string listen_address, RelayConfig config, RelayHooks hooks, int threads)
    : listen_address_(std::move(listen_address)),
      config_(std::move(config)),
      hooks_(std::move(hooks)),
      threads_(std::max(1, threads)),
      stats_(std::make_shared<RelayStats>()) {}

Relay::~Relay() { shutdown(std::chrono::milliseconds(0)); }

void Relay::adopt(int fd) {
  if (!started_ || stopped_ || workers_.empty()) {
    close(fd);
    return;
  }
  Worker& target = *workers_[next_worker_.fetch_add(1) % workers_.size()];
  RelayWorker* relay = target.relay.get();
  target.loop->post([relay, fd] { relay->adopt(fd); });
}

void Relay::set_server_tls(std::shared_ptr<TlsContext> tls) {
  for (auto& worker : workers_) {
    RelayWorker* relay = worker->relay.get();
    worker->loop->post([relay, tls] { relay->set_server_tls(tls); });
  }
}

void Relay::set_upstream_tls(const std::string& name, std::shared_ptr<TlsContext> tls) {
  for (auto& worker : workers_) {
    RelayWorker* relay = worker->relay.get();
    worker->loop->post([relay, name, tls] { relay->set_upstream_tls(name, tls); });
  }
}

void Relay::start() {
  if (started_) return;
  if (listen_address_.empty()) {
    start_workers();
    return;
  }
  std::string host, port;
  if (!split_host_port(listen_address_, &host, &port))
    throw std::runtime_error("listen address " + listen_address_ + " is not host:port");
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0 || !found)
    throw std::runtime_error("listen address " + listen_address_ + " does not resolve");
  int fd = socket(found->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (fd < 0 || bind(fd, found->ai_addr, found->ai_addrlen) != 0 || listen(fd, 1024) != 0) {
    std::string err = std::strerror(errno);
    freeaddrinfo(found);
    if (fd >= 0) close(fd);
    throw std::runtime_error("listen on " + listen_address_ + ": " + err);
  }
  freeaddrinfo(found);
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = addr.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
                                     : ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  listen_fd_ = fd;
  make_workers();
  EventLoop& first = *workers_[0]->loop;
  first.watch(listen_fd_, EPOLLIN, [this](uint32_t) {
    for (int i = 0; i < 64; ++i) {
      int c = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (c < 0) return;
      Worker& target = *workers_[next_worker_.fetch_add(1) % workers_.size()];
      if (&target == workers_[0].get()) {
        target.relay->adopt(c);
      } else {
        RelayWorker* relay = target.relay.get();
        target.loop->post([relay, c] { relay->adopt(c); });
      }
    }
  });
  start_workers();
}

void Relay::make_workers() {
  for (int i = 0; i < threads_; ++i) {
    auto worker = std::make_unique<Worker>();
    worker->loop = std::make_unique<EventLoop>();
    worker->relay = std::make_unique<RelayWorker>(*worker->loop, config_, hooks_, stats_);
    workers_.push_back(std::move(worker));
  }
}

void Relay::start_workers() {
  if (workers_.empty()) make_workers();
  for (auto& worker : workers_) {
    EventLoop* loop = worker->loop.get();
    worker->thread = std::thread([loop] { loop->run(); });
  }
  started_ = true;
}

void Relay::shutdown(std::chrono::milliseconds grace) {
  if (!started_ || stopped_) return;
  stopped_ = true;
  auto deadline = EventLoop::Clock::now() + grace;
  if (listen_fd_ >= 0) {
    workers_[0]->loop->post([this] {
      workers_[0]->loop->unwatch(listen_fd_);
      close(listen_fd_);
      listen_fd_ = -1;
    });
  }
  for (auto& worker : workers_) {
    EventLoop* loop = worker->loop.get();
    RelayWorker* relay = worker->relay.get();
    loop->post([loop, relay, deadline] {
      relay->drain();
      // Checks every 10 ms whether the drain is over (or the grace has run out).
      auto check = std::make_shared<std::function<void()>>();
      *check = [loop, relay, deadline, check] {
        if (relay->downstream_connections() == 0 || EventLoop::Clock::now() >= deadline) {
          relay->close_all();
          loop->stop();
          *check = nullptr;  // breaks the cycle
          return;
        }
        loop->run_after(std::chrono::milliseconds(10), [check] {
          auto again = *check;  // a copy: the call may reset *check
          if (again) again();
        });
      };
      auto first = *check;
      first();
    });
  }
  for (auto& worker : workers_) worker->thread.join();
  workers_.clear();
}

}  // namespace shardguard::sidecar::h2
