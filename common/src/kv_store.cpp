#include "shardguard/common/kv_store.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <system_error>

#include "shardguard/common/log.h"

namespace shardguard {

namespace {

using Clock = std::chrono::steady_clock;

enum Op : uint8_t { kSet = 1, kGet = 2, kAdd = 3, kCompareSet = 4, kDelete = 5, kCheck = 6, kNumKeys = 7, kWait = 8 };
enum Status : uint8_t { kOk = 0, kError = 1, kTimedOut = 2 };
constexpr uint32_t kMaxKeysPerRequest = 1024;

void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(v >> shift));
}
void put_i64(std::vector<uint8_t>& out, int64_t v) {
  const auto u = static_cast<uint64_t>(v);
  for (int shift = 56; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(u >> shift));
}
void put_bytes(std::vector<uint8_t>& out, const uint8_t* data, size_t n) {
  put_u32(out, static_cast<uint32_t>(n));
  out.insert(out.end(), data, data + n);
}
void put_str(std::vector<uint8_t>& out, const std::string& s) {
  put_bytes(out, reinterpret_cast<const uint8_t*>(s.data()), s.size());
}
void put_value(std::vector<uint8_t>& out, const std::vector<uint8_t>& v) { put_bytes(out, v.data(), v.size()); }

// Reads fields off a frame; every read fails (and stays failed) past its end.
class Reader {
 public:
  explicit Reader(const std::vector<uint8_t>& b, size_t pos = 0) : b_(b), pos_(pos) {}
  bool u8(uint8_t* v) {
    if (!need(1)) return false;
    *v = b_[pos_++];
    return true;
  }
  bool u32(uint32_t* v) {
    if (!need(4)) return false;
    *v = 0;
    for (int i = 0; i < 4; ++i) *v = (*v << 8) | b_[pos_++];
    return true;
  }
  bool i64(int64_t* v) {
    if (!need(8)) return false;
    uint64_t u = 0;
    for (int i = 0; i < 8; ++i) u = (u << 8) | b_[pos_++];
    *v = static_cast<int64_t>(u);
    return true;
  }
  bool bytes(std::vector<uint8_t>* v, size_t max) {
    uint32_t n = 0;
    if (!u32(&n) || n > max || !need(n)) return false;
    v->assign(b_.begin() + static_cast<std::ptrdiff_t>(pos_), b_.begin() + static_cast<std::ptrdiff_t>(pos_ + n));
    pos_ += n;
    return true;
  }
  bool str(std::string* s, size_t max) {
    std::vector<uint8_t> v;
    if (!bytes(&v, max)) return false;
    s->assign(v.begin(), v.end());
    return true;
  }
  bool keys(std::vector<std::string>* out) {
    uint32_t n = 0;
    if (!u32(&n) || n > kMaxKeysPerRequest) return false;
    out->resize(n);
    for (auto& k : *out) {
      if (!str(&k, kMaxKvKey)) return false;
    }
    return true;
  }
  bool at_end() const { return ok_ && pos_ == b_.size(); }

 private:
  bool need(size_t n) {
    ok_ = ok_ && b_.size() - pos_ >= n;
    return ok_;
  }
  const std::vector<uint8_t>& b_;
  size_t pos_;
  bool ok_ = true;
};

// Waits until fd is ready for `events` or stop_fd is readable (-1: none), up to the
// deadline (nullopt: none). False on stop, timeout or a poll error.
bool wait_ready(int fd, short events, int stop_fd, std::optional<Clock::time_point> deadline) {
  for (;;) {
    pollfd p[2] = {{fd, events, 0}, {stop_fd, POLLIN, 0}};
    int ms = -1;
    if (deadline) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*deadline - Clock::now()).count();
      if (left <= 0) return false;
      ms = static_cast<int>(std::min<int64_t>(left, 60000));
    }
    const int n = ::poll(p, stop_fd >= 0 ? 2 : 1, ms);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    if (stop_fd >= 0 && (p[1].revents & POLLIN)) return false;
    if (p[0].revents) return true;
  }
}

// Reads exactly n bytes; false on end of stream, an error, stop or the deadline.
bool read_exact(int fd, uint8_t* buf, size_t n, int stop_fd, std::optional<Clock::time_point> deadline) {
  size_t got = 0;
  while (got < n) {
    const ssize_t r = ::recv(fd, buf + got, n - got, MSG_DONTWAIT);
    if (r > 0) {
      got += static_cast<size_t>(r);
      continue;
    }
    if (r == 0) return false;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return false;
    if (!wait_ready(fd, POLLIN, stop_fd, deadline)) return false;
  }
  return true;
}

bool write_all(int fd, const uint8_t* buf, size_t n, int stop_fd, std::optional<Clock::time_point> deadline) {
  size_t sent = 0;
  while (sent < n) {
    const ssize_t w = ::send(fd, buf + sent, n - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (w > 0) {
      sent += static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return false;
    if (!wait_ready(fd, POLLOUT, stop_fd, deadline)) return false;
  }
  return true;
}

bool write_frame(int fd, const std::vector<uint8_t>& payload, int stop_fd, std::optional<Clock::time_point> deadline) {
  std::vector<uint8_t> frame;
  frame.reserve(payload.size() + 4);
  put_u32(frame, static_cast<uint32_t>(payload.size()));
  frame.insert(frame.end(), payload.begin(), payload.end());
  return write_all(fd, frame.data(), frame.size(), stop_fd, deadline);
}

// One frame: kClosed on end of stream, an error, stop or the deadline; kMalformed for a
// length of 0 or over kMaxKvFrame (*length says which).
enum class Frame { kOk, kClosed, kMalformed };
Frame read_frame(int fd, std::vector<uint8_t>* payload, int stop_fd, std::optional<Clock::time_point> deadline,
                 uint32_t* length = nullptr) {
  uint8_t head[4];
  if (!read_exact(fd, head, 4, stop_fd, deadline)) return Frame::kClosed;
  const uint32_t n = (uint32_t{head[0]} << 24) | (uint32_t{head[1]} << 16) | (uint32_t{head[2]} << 8) | head[3];
  if (length != nullptr) *length = n;
  if (n == 0 || n > kMaxKvFrame) return Frame::kMalformed;
  payload->resize(n);
  return read_exact(fd, payload->data(), n, stop_fd, deadline) ? Frame::kOk : Frame::kClosed;
}

std::chrono::milliseconds capped(uint32_t ms) {
  return std::min(std::chrono::milliseconds(ms), kMaxKvWait);
}

// "localhost" or a literal IPv4/IPv6 address (brackets allowed), port → sockaddr.
sockaddr_storage address_of(const std::string& host, int port, socklen_t* len) {
  std::string h = host == "localhost" ? "127.0.0.1" : host;
  if (h.size() > 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  sockaddr_storage ss{};
  auto* v4 = reinterpret_cast<sockaddr_in*>(&ss);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&ss);
  if (::inet_pton(AF_INET, h.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(static_cast<uint16_t>(port));
    *len = sizeof(sockaddr_in);
  } else if (::inet_pton(AF_INET6, h.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(static_cast<uint16_t>(port));
    *len = sizeof(sockaddr_in6);
  } else {
    throw std::runtime_error("\"" + host + "\" is not an IP address or localhost");
  }
  return ss;
}

std::string endpoint(const std::string& host, int port) { return host + ":" + std::to_string(port); }

// What the server would take as a request, checked before it is sent: a key or value
// over its limit would otherwise close the connection as malformed.
void check_key(const std::string& where, const std::string& key) {
  if (key.size() > kMaxKvKey) {
    throw std::runtime_error(where + ": a key of " + std::to_string(key.size()) + " bytes (at most " +
                             std::to_string(kMaxKvKey) + ")");
  }
}
void check_value(const std::string& where, const std::vector<uint8_t>& value) {
  if (value.size() > kMaxKvValue) {
    throw std::runtime_error(where + ": a value of " + std::to_string(value.size()) + " bytes (at most " +
                             std::to_string(kMaxKvValue) + ")");
  }
}
void check_keys(const std::string& where, const std::vector<std::string>& keys) {
  if (keys.size() > kMaxKeysPerRequest) {
    throw std::runtime_error(where + ": " + std::to_string(keys.size()) + " keys in one request (at most " +
                             std::to_string(kMaxKeysPerRequest) + ")");
  }
  for (const auto& k : keys) check_key(where, k);
}

}  // namespace

// ---- server ----------------------------------------------------------------------

KvServer::KvServer(const std::string& host, int port, std::function<void()> on_refused)
    : on_refused_(std::move(on_refused)) {
  const std::string where = "replica group store " + endpoint(host, port);
  socklen_t len = 0;
  const sockaddr_storage addr = [&] {
    try {
      return address_of(host, port, &len);
    } catch (const std::exception& e) {
      throw std::runtime_error(where + ": " + e.what());
    }
  }();
  listen_fd_ = ::socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (listen_fd_ < 0) throw std::runtime_error(where + ": socket: " + std::strerror(errno));
  const int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(listen_fd_, reinterpret_cast<const sockaddr*>(&addr), len) != 0 || ::listen(listen_fd_, 64) != 0) {
    const std::string err = std::strerror(errno);
    ::close(listen_fd_);
    throw std::runtime_error(where + ": cannot listen: " + err);
  }
  sockaddr_storage bound{};
  socklen_t blen = sizeof bound;
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &blen);
  port_ = ntohs(bound.ss_family == AF_INET ? reinterpret_cast<sockaddr_in*>(&bound)->sin_port
                                           : reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) {
    ::close(listen_fd_);
    throw std::runtime_error(where + ": eventfd: " + std::strerror(errno));
  }
  acceptor_ = std::thread([this] { accept_loop(); });
}

KvServer::~KvServer() { stop(); }

void KvServer::refuse() {
  ++refused_;
  if (on_refused_) on_refused_();
}

void KvServer::stop() {
  if (stopping_.exchange(true)) return;
  const uint64_t one = 1;
  [[maybe_unused]] const ssize_t w = ::write(stop_fd_, &one, sizeof one);
  {
    std::lock_guard<std::mutex> lock(mu_);  // a waiter checks stopping_ under mu_
  }
  changed_.notify_all();
  if (acceptor_.joinable()) acceptor_.join();
  std::list<std::unique_ptr<Worker>> workers;
  {
    std::lock_guard<std::mutex> lock(workers_mu_);
    workers.swap(workers_);
  }
  for (auto& w : workers) w->thread.join();
  ::close(listen_fd_);
  ::close(stop_fd_);
}

void KvServer::accept_loop() {
  while (wait_ready(listen_fd_, POLLIN, stop_fd_, std::nullopt)) {
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
      // Out of descriptors: the pending connection stays; wait a little (or for stop).
      pollfd p{stop_fd_, POLLIN, 0};
      ::poll(&p, 1, 100);
      continue;
    }
    std::lock_guard<std::mutex> lock(workers_mu_);
    for (auto it = workers_.begin(); it != workers_.end();) {
      if ((*it)->done.load()) {
        (*it)->thread.join();
        it = workers_.erase(it);
      } else {
        ++it;
      }
    }
    if (workers_.size() >= kMaxKvConnections) {
      refuse();
      log::warn("replica group store: connection refused, too many open",
                {{"port", port_}, {"limit", kMaxKvConnections}});
      ::close(fd);
      continue;
    }
    auto w = std::make_unique<Worker>();
    w->fd = fd;
    Worker* raw = w.get();
    try {
      w->thread = std::thread([this, raw] {
        serve(raw->fd);
        raw->done.store(true);
      });
    } catch (const std::system_error&) {
      refuse();
      ::close(fd);
      continue;
    }
    workers_.push_back(std::move(w));
  }
}

void KvServer::serve(int fd) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  std::vector<uint8_t> request, reply;
  for (;;) {
    // A connection stays as long as its client wants (Gloo keeps one for the group's
    // life); the stop ends it.
    uint32_t n = 0;
    const Frame got = read_frame(fd, &request, stop_fd_, std::nullopt, &n);
    if (got == Frame::kClosed) break;
    reply.clear();
    if (got == Frame::kMalformed || !handle(request, &reply)) {
      refuse();
      log::warn("replica group store: connection closed after a malformed request", {{"port", port_}, {"bytes", n}});
      break;
    }
    if (!write_frame(fd, reply, stop_fd_, std::nullopt)) break;
  }
  ::close(fd);
}

bool KvServer::handle(const std::vector<uint8_t>& request, std::vector<uint8_t>* reply) {
  Reader in(request);
  uint8_t op = 0;
  if (!in.u8(&op)) return false;
  auto error = [&](const std::string& message) {
    reply->push_back(kError);
    put_str(*reply, message);
    return true;
  };
  // Stores `value` at `key` within the limits (mu_ held); an error message otherwise.
  auto store = [&](const std::string& key, std::vector<uint8_t> value) -> std::string {
    const auto it = data_.find(key);
    const size_t old = it == data_.end() ? 0 : key.size() + it->second.size();
    if (it == data_.end() && data_.size() >= kMaxKvKeys) return "the store holds " + std::to_string(kMaxKvKeys) + " keys";
    if (bytes_ - old + key.size() + value.size() > kMaxKvBytes) {
      return "the store would hold more than " + std::to_string(kMaxKvBytes) + " bytes";
    }
    bytes_ = bytes_ - old + key.size() + value.size();
    data_[key] = std::move(value);
    return "";
  };
  std::string key;
  switch (op) {
    case kSet: {
      std::vector<uint8_t> value;
      if (!in.str(&key, kMaxKvKey) || !in.bytes(&value, kMaxKvValue) || !in.at_end()) return false;
      std::string why;
      {
        std::lock_guard<std::mutex> lock(mu_);
        why = store(key, std::move(value));
      }
      if (!why.empty()) return error(why);
      changed_.notify_all();
      reply->push_back(kOk);
      return true;
    }
    case kGet: {
      uint32_t ms = 0;
      if (!in.str(&key, kMaxKvKey) || !in.u32(&ms) || !in.at_end()) return false;
      std::unique_lock<std::mutex> lock(mu_);
      const bool there = changed_.wait_for(lock, capped(ms), [&] { return stopping_.load() || data_.count(key) > 0; });
      if (stopping_.load()) return error("the store is stopping");
      if (!there) {
        reply->push_back(kTimedOut);
        return true;
      }
      reply->push_back(kOk);
      put_value(*reply, data_.at(key));
      return true;
    }
    case kAdd: {
      int64_t delta = 0;
      if (!in.str(&key, kMaxKvKey) || !in.i64(&delta) || !in.at_end()) return false;
      int64_t sum = 0;
      std::string why;
      {
        std::lock_guard<std::mutex> lock(mu_);
        int64_t current = 0;
        const auto it = data_.find(key);
        if (it != data_.end()) {
          const std::string text(it->second.begin(), it->second.end());
          char* end = nullptr;
          errno = 0;
          current = std::strtoll(text.c_str(), &end, 10);
          if (text.empty() || errno != 0 || *end != '\0') why = "key \"" + key.substr(0, 64) + "\" does not hold an integer";
        }
        if (why.empty() && __builtin_add_overflow(current, delta, &sum)) why = "the sum overflows";
        if (why.empty()) {
          const std::string text = std::to_string(sum);
          why = store(key, std::vector<uint8_t>(text.begin(), text.end()));
        }
      }
      if (!why.empty()) return error(why);
      changed_.notify_all();
      reply->push_back(kOk);
      put_i64(*reply, sum);
      return true;
    }
    case kCompareSet: {
      std::vector<uint8_t> expected, desired;
      if (!in.str(&key, kMaxKvKey) || !in.bytes(&expected, kMaxKvValue) || !in.bytes(&desired, kMaxKvValue) ||
          !in.at_end()) {
        return false;
      }
      std::vector<uint8_t> now;
      std::string why;
      {
        std::lock_guard<std::mutex> lock(mu_);
        const auto it = data_.find(key);
        if (it == data_.end() ? expected.empty() : it->second == expected) {
          why = store(key, desired);
          now = desired;
        } else {
          now = it == data_.end() ? expected : it->second;
        }
      }
      if (!why.empty()) return error(why);
      changed_.notify_all();
      reply->push_back(kOk);
      put_value(*reply, now);
      return true;
    }
    case kDelete: {
      if (!in.str(&key, kMaxKvKey) || !in.at_end()) return false;
      bool there = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        const auto it = data_.find(key);
        there = it != data_.end();
        if (there) {
          bytes_ -= key.size() + it->second.size();
          data_.erase(it);
        }
      }
      reply->push_back(kOk);
      reply->push_back(there ? 1 : 0);
      return true;
    }
    case kCheck:
    case kWait: {
      std::vector<std::string> keys;
      uint32_t ms = 0;
      if (!in.keys(&keys) || (op == kWait && !in.u32(&ms)) || !in.at_end()) return false;
      std::unique_lock<std::mutex> lock(mu_);
      auto all = [&] {
        for (const auto& k : keys) {
          if (!data_.count(k)) return false;
        }
        return true;
      };
      if (op == kCheck) {
        reply->push_back(kOk);
        reply->push_back(all() ? 1 : 0);
        return true;
      }
      const bool there = changed_.wait_for(lock, capped(ms), [&] { return stopping_.load() || all(); });
      if (stopping_.load()) return error("the store is stopping");
      reply->push_back(there ? kOk : kTimedOut);
      return true;
    }
    case kNumKeys: {
      if (!in.at_end()) return false;
      std::lock_guard<std::mutex> lock(mu_);
      reply->push_back(kOk);
      put_i64(*reply, static_cast<int64_t>(data_.size()));
      return true;
    }
    default:
      return false;
  }
}

// ---- client ----------------------------------------------------------------------

KvClient::KvClient(const std::string& host, int port, std::chrono::milliseconds timeout)
    : where_("replica group store " + endpoint(host, port)), timeout_(timeout) {
  socklen_t len = 0;
  sockaddr_storage addr{};
  try {
    addr = address_of(host, port, &len);
  } catch (const std::exception& e) {
    throw std::runtime_error(where_ + ": " + e.what());
  }
  fd_ = ::socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd_ < 0) throw std::runtime_error(where_ + ": socket: " + std::strerror(errno));
  const int one = 1;
  ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  std::string err;
  if (::connect(fd_, reinterpret_cast<const sockaddr*>(&addr), len) != 0) {
    if (errno != EINPROGRESS) {
      err = std::strerror(errno);
    } else if (!wait_ready(fd_, POLLOUT, -1, Clock::now() + timeout_)) {
      err = "no connection within " + std::to_string(timeout_.count()) + " ms";
    } else {
      int so = 0;
      socklen_t sl = sizeof so;
      ::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &so, &sl);
      if (so != 0) err = std::strerror(so);
    }
  }
  if (!err.empty()) {
    ::close(fd_);
    throw std::runtime_error(where_ + ": cannot connect: " + err);
  }
}

KvClient::~KvClient() {
  if (fd_ >= 0) ::close(fd_);
}

namespace {

// The one field of an OK answer to `what`, read by `read`; an answer that is not exactly
// that field is malformed: an error naming the store and the request.
template <typename T, typename Read>
T answer(const std::string& where, const std::vector<uint8_t>& reply, const char* what, Read read) {
  Reader in(reply, 1);
  T value{};
  if (reply[0] != kOk || !read(in, &value) || !in.at_end()) {
    throw std::runtime_error(where + ": a malformed answer to " + what);
  }
  return value;
}

// An answer that is its status alone: OK (set, wait) or timed out (wait, get).
void bare_answer(const std::string& where, const std::vector<uint8_t>& reply, const char* what, bool may_time_out) {
  if (reply.size() != 1 || (reply[0] != kOk && !(may_time_out && reply[0] == kTimedOut))) {
    throw std::runtime_error(where + ": a malformed answer to " + what);
  }
}

bool read_value(Reader& in, std::vector<uint8_t>* v) { return in.bytes(v, kMaxKvValue); }
bool read_i64(Reader& in, int64_t* v) { return in.i64(v); }
bool read_flag(Reader& in, uint8_t* v) { return in.u8(v) && *v <= 1; }

}  // namespace

std::vector<uint8_t> KvClient::call(const std::vector<uint8_t>& request, std::chrono::milliseconds blocking) {
  std::lock_guard<std::mutex> lock(mu_);
  if (fd_ < 0) throw std::runtime_error(where_ + ": the connection was lost by an earlier request");
  const auto deadline = Clock::now() + timeout_ + blocking;
  std::vector<uint8_t> reply;
  const bool ok = write_frame(fd_, request, -1, deadline) && read_frame(fd_, &reply, -1, deadline) == Frame::kOk;
  if (!ok) {
    // The connection's state is unknown now: no later request may read this one's reply.
    ::close(fd_);
    fd_ = -1;
    throw std::runtime_error(where_ + ": the connection closed or gave no reply within " +
                             std::to_string((timeout_ + blocking).count()) + " ms");
  }
  if (reply[0] == kError) {
    Reader in(reply, 1);
    std::string message;
    in.str(&message, kMaxKvFrame);
    throw std::runtime_error(where_ + ": " + message);
  }
  if (reply[0] != kOk && reply[0] != kTimedOut) {
    ::close(fd_);
    fd_ = -1;
    throw std::runtime_error(where_ + ": an answer with status " + std::to_string(reply[0]));
  }
  return reply;
}

void KvClient::set(const std::string& key, const std::vector<uint8_t>& value) {
  check_key(where_, key);
  check_value(where_, value);
  std::vector<uint8_t> req{kSet};
  put_str(req, key);
  put_value(req, value);
  const auto reply = call(req, std::chrono::milliseconds(0));
  bare_answer(where_, reply, "set", false);
}

std::optional<std::vector<uint8_t>> KvClient::get(const std::string& key, std::chrono::milliseconds wait) {
  check_key(where_, key);
  wait = std::min(wait, kMaxKvWait);
  std::vector<uint8_t> req{kGet};
  put_str(req, key);
  put_u32(req, static_cast<uint32_t>(wait.count()));
  const auto reply = call(req, wait);
  if (reply[0] == kTimedOut) {
    bare_answer(where_, reply, "get", true);
    return std::nullopt;
  }
  return answer<std::vector<uint8_t>>(where_, reply, "get", read_value);
}

int64_t KvClient::add(const std::string& key, int64_t delta) {
  check_key(where_, key);
  std::vector<uint8_t> req{kAdd};
  put_str(req, key);
  put_i64(req, delta);
  return answer<int64_t>(where_, call(req, std::chrono::milliseconds(0)), "add", read_i64);
}

std::vector<uint8_t> KvClient::compare_set(const std::string& key, const std::vector<uint8_t>& expected,
                                           const std::vector<uint8_t>& desired) {
  check_key(where_, key);
  check_value(where_, expected);
  check_value(where_, desired);
  std::vector<uint8_t> req{kCompareSet};
  put_str(req, key);
  put_value(req, expected);
  put_value(req, desired);
  return answer<std::vector<uint8_t>>(where_, call(req, std::chrono::milliseconds(0)), "compare-and-set",
                                      read_value);
}

bool KvClient::remove(const std::string& key) {
  check_key(where_, key);
  std::vector<uint8_t> req{kDelete};
  put_str(req, key);
  return answer<uint8_t>(where_, call(req, std::chrono::milliseconds(0)), "delete", read_flag) == 1;
}

bool KvClient::check(const std::vector<std::string>& keys) {
  check_keys(where_, keys);
  std::vector<uint8_t> req{kCheck};
  put_u32(req, static_cast<uint32_t>(keys.size()));
  for (const auto& k : keys) put_str(req, k);
  return answer<uint8_t>(where_, call(req, std::chrono::milliseconds(0)), "check", read_flag) == 1;
}

int64_t KvClient::size() {
  return answer<int64_t>(where_, call({kNumKeys}, std::chrono::milliseconds(0)), "the key count", read_i64);
}

bool KvClient::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  check_keys(where_, keys);
  timeout = std::min(timeout, kMaxKvWait);
  std::vector<uint8_t> req{kWait};
  put_u32(req, static_cast<uint32_t>(keys.size()));
  for (const auto& k : keys) put_str(req, k);
  put_u32(req, static_cast<uint32_t>(timeout.count()));
  const auto reply = call(req, timeout);
  bare_answer(where_, reply, "wait", true);
  return reply[0] == kOk;
}

}  // namespace shardguard
