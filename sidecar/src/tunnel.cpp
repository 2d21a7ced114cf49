// The sidecar's L4 tunnels (tunnel.h).
#include "tunnel.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <system_error>
#include <thread>

#include "shardguard/common/log.h"
#include "shardguard/common/metrics_server.h"  // split_host_port
#include "shardguard/sidecar/h2/resolve.h"

namespace shardguard::sidecar {

namespace {

using Clock = std::chrono::steady_clock;
using Io = h2::Transport::Io;

const char* tunnel_method(const std::string& service) {
  return service == "store" ? policy::kTunnelStoreMethod : policy::kTunnelGlooMethod;
}

void set_socket_options(int fd) {
  const int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  const int idle = 30, interval = 10, count = 6;  // a dead peer is noticed within ~90 s
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
  const int flags = ::fcntl(fd, F_GETFL, 0);
  ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

// Waits until `fd` has `events`, the deadline passes or the tunnels stop. True: ready.
bool wait_for(int fd, short events, Clock::time_point deadline, int stop_fd) {
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return false;
    pollfd p[2] = {{fd, events, 0}, {stop_fd, POLLIN, 0}};
    const int r = ::poll(p, 2, static_cast<int>(std::min<int64_t>(left, 1000 * 1000)));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 || p[1].revents != 0) return false;
    if (r > 0) return true;
  }
}

short poll_events(Io want) { return want == Io::want_write ? POLLOUT : POLLIN; }

// The tunnels' name lookups, both directions, apart from the relays'.
const h2::LookupBudget& tunnel_lookups() {
  static const h2::LookupBudget budget(h2::kLookupsPerUser);
  return budget;
}

// host:port's addresses before the deadline: a numeric address at once, a name with
// h2::lookup_async, since getaddrinfo blocks for seconds when DNS is slow or down and a
// tunnel must give up at its deadline and when the tunnels stop (shutdown joins the
// tunnel's worker, not the lookup). An answer that comes later is dropped with the state
// the lookup shares.
h2::Resolved resolve_before(const std::string& host, const std::string& port, Clock::time_point deadline,
                            int stop_fd) {
  h2::Resolved numeric = h2::lookup(host, port, AI_NUMERICHOST | AI_NUMERICSERV);
  if (numeric.error.empty()) return numeric;
  h2::Resolved r;
  struct Pending {
    std::mutex mu;
    h2::Resolved answer;
    int ready_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    ~Pending() {
      if (ready_fd >= 0) ::close(ready_fd);
    }
  };
  auto pending = std::make_shared<Pending>();
  if (pending->ready_fd < 0) {
    r.error = std::string("eventfd: ") + std::strerror(errno);
    return r;
  }
  const bool started = h2::lookup_async(
      tunnel_lookups(), host, port,
      [pending](h2::Resolved answer) {
        std::lock_guard<std::mutex> lock(pending->mu);
        pending->answer = std::move(answer);
        const uint64_t one = 1;
        (void)!::write(pending->ready_fd, &one, sizeof one);
      },
      &r.error);
  if (!started) return r;
  if (!wait_for(pending->ready_fd, POLLIN, deadline, stop_fd)) {
    r.error = Clock::now() >= deadline ? "no answer within --handshake-timeout" : "the tunnels are stopping";
    return r;
  }
  std::lock_guard<std::mutex> lock(pending->mu);
  return std::move(pending->answer);
}

// Connects to host:port (any address it resolves to) before the deadline. -1 and *why
// on failure.
int connect_to(const std::string& address, Clock::time_point deadline, int stop_fd, std::string* why) {
  std::pair<std::string, int> hp;
  try {
    hp = split_host_port(address);
  } catch (const std::exception& e) {
    *why = e.what();
    return -1;
  }
  const h2::Resolved found = resolve_before(hp.first, std::to_string(hp.second), deadline, stop_fd);
  if (!found.error.empty()) {
    *why = "cannot resolve " + address + ": " + found.error;
    return -1;
  }
  int fd = -1;
  *why = "no address for " + address;
  for (size_t i = 0; i < found.addresses.size() && fd < 0; ++i) {
    const auto& a = found.addresses[i];
    fd = ::socket(a.addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) continue;
    int r = ::connect(fd, reinterpret_cast<const sockaddr*>(&a.addr), a.len);
    if (r != 0 && errno == EINPROGRESS) {
      if (wait_for(fd, POLLOUT, deadline, stop_fd)) {
        int err = 0;
        socklen_t len = sizeof err;
        ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        r = err == 0 ? 0 : -1;
        errno = err;
      } else {
        errno = ETIMEDOUT;
      }
    }
    if (r != 0) {
      *why = "cannot connect to " + address + ": " + std::strerror(errno);
      ::close(fd);
      fd = -1;
    }
  }
  if (fd >= 0) set_socket_options(fd);
  return fd;
}

// One step-wise TLS operation run to completion before the deadline.
template <typename Op>
Io complete(int fd, Clock::time_point deadline, int stop_fd, Op op) {
  for (;;) {
    const Io r = op();
    if (r != Io::want_read && r != Io::want_write) return r;
    if (!wait_for(fd, poll_events(r), deadline, stop_fd)) return Io::error;
  }
}

bool write_all(h2::Transport& t, int fd, const std::string& text, Clock::time_point deadline, int stop_fd) {
  size_t at = 0;
  while (at < text.size()) {
    size_t n = 0;
    const Io r = complete(fd, deadline, stop_fd, [&] {
      return t.write(reinterpret_cast<const uint8_t*>(text.data()) + at, text.size() - at, &n);
    });
    if (r != Io::ok) return false;
    at += n;
  }
  return true;
}

// Reads one '\n'-terminated line of at most `max` bytes (with the '\n'), byte by byte
// so that nothing after it is taken from the stream. False on EOF, error, timeout or
// a longer line; *line then holds what came.
bool read_line(h2::Transport& t, int fd, size_t max, Clock::time_point deadline, int stop_fd, std::string* line) {
  line->clear();
  while (line->size() < max) {
    uint8_t c = 0;
    size_t n = 0;
    const Io r = complete(fd, deadline, stop_fd, [&] { return t.read(&c, 1, &n); });
    if (r != Io::ok || n != 1) return false;
    if (c == '\n') return true;
    line->push_back(static_cast<char>(c));
  }
  return false;
}

// A direction's buffer: bytes [lo, hi) wait to be written.
struct Buffer {
  static constexpr size_t kSize = 64 * 1024;
  std::vector<uint8_t> data = std::vector<uint8_t>(kSize);
  size_t lo = 0, hi = 0;
  bool empty() const { return lo == hi; }
  bool room() const { return hi < kSize; }
  void consumed(size_t n) {
    lo += n;
    if (lo == hi) lo = hi = 0;
  }
};

// Moves bytes both ways between the local plain socket and the TLS stream until both
// directions are closed, an error, or shutdown. `sent` counts plain → TLS payload
// bytes as they are written, `received` TLS → plain.
void splice(h2::Transport& tls, int tls_fd, int plain_fd, int stop_fd, const std::atomic<bool>& stopping,
            std::initializer_list<prometheus::Counter*> sent, std::initializer_list<prometheus::Counter*> received) {
  Buffer up, down;  // up: plain → TLS, down: TLS → plain
  bool plain_eof = false, tls_eof = false, tls_shut = false, plain_shut = false;
  bool plain_hup = false, tls_hup = false;
  while (!stopping.load(std::memory_order_relaxed)) {
    bool progress = false;
    Io tls_read_wait = Io::ok, tls_write_wait = Io::ok;
    bool plain_write_wait = false;
    if (!plain_eof && up.room()) {
      const ssize_t n = ::recv(plain_fd, up.data.data() + up.hi, Buffer::kSize - up.hi, 0);
      if (n > 0) {
        up.hi += static_cast<size_t>(n);
        progress = true;
      } else if (n == 0) {
        plain_eof = progress = true;
      } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        return;
      }
    }
    if (!up.empty() && !tls_shut) {
      size_t n = 0;
      const Io r = tls.write(up.data.data() + up.lo, up.hi - up.lo, &n);
      if (r == Io::ok) {
        up.consumed(n);
        for (auto* c : sent) c->Increment(static_cast<double>(n));
        progress = true;
      } else if (r == Io::want_read || r == Io::want_write) {
        tls_write_wait = r;
      } else {
        return;
      }
    }
    if (plain_eof && up.empty() && !tls_shut) {
      const Io r = tls.shutdown_write();
      if (r == Io::ok) {
        tls_shut = progress = true;
      } else if (r == Io::want_read || r == Io::want_write) {
        tls_write_wait = r;
      } else {
        return;
      }
    }
    if (!tls_eof && down.room()) {
      size_t n = 0;
      const Io r = tls.read(down.data.data() + down.hi, Buffer::kSize - down.hi, &n);
      if (r == Io::ok) {
        down.hi += n;
        progress = true;
      } else if (r == Io::closed) {
        tls_eof = progress = true;
      } else if (r == Io::want_read || r == Io::want_write) {
        tls_read_wait = r;
      } else {
        return;
      }
    }
    if (!down.empty()) {
      const ssize_t n = ::send(plain_fd, down.data.data() + down.lo, down.hi - down.lo, MSG_NOSIGNAL);
      if (n > 0) {
        down.consumed(static_cast<size_t>(n));
        for (auto* c : received) c->Increment(static_cast<double>(n));
        progress = true;
      } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        plain_write_wait = true;
      } else {
        return;
      }
    }
    if (tls_eof && down.empty() && !plain_shut) {
      ::shutdown(plain_fd, SHUT_WR);
      plain_shut = progress = true;
    }
    if (tls_shut && plain_shut) return;  // both directions ended
    if (progress) continue;
    // Nothing more moves now: a side that hung up (reset, or gone both ways) ends it.
    if (plain_hup || tls_hup) return;
    pollfd p[3] = {{plain_fd, 0, 0}, {tls_fd, 0, 0}, {stop_fd, POLLIN, 0}};
    if (!plain_eof && up.room()) p[0].events |= POLLIN;
    if (plain_write_wait) p[0].events |= POLLOUT;
    if (tls_read_wait != Io::ok) p[1].events |= poll_events(tls_read_wait);
    if (tls_write_wait != Io::ok) p[1].events |= poll_events(tls_write_wait);
    // A side with nothing left to do in either direction is not watched (its HUP
    // would wake us for nothing).
    if (p[0].events == 0 && plain_eof && plain_shut) p[0].fd = -1;
    if (p[1].events == 0 && tls_eof && tls_shut) p[1].fd = -1;
    const int r = ::poll(p, 3, -1);
    if (r < 0 && errno != EINTR) return;
    if (p[2].revents != 0) return;
    if (p[0].revents & (POLLHUP | POLLERR)) plain_hup = true;
    if (p[1].revents & (POLLHUP | POLLERR)) tls_hup = true;
  }
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r");
  return s.substr(b, e - b + 1);
}

}  // namespace

bool is_loopback_address(const std::string& host) {
  in_addr v4{};
  if (::inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  if (::inet_pton(AF_INET6, host.c_str(), &v6) == 1) return IN6_IS_ADDR_LOOPBACK(&v6);
  return false;
}

std::string tunnel_map_lookup(const std::string& map_text, const std::string& peer, std::string* why) {
  std::istringstream in(map_text);
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    line = trim(line);
    if (line.empty()) continue;
    const auto space = line.find_first_of(" \t");
    if (space == std::string::npos || line.compare(0, space, peer) != 0 || space != peer.size()) continue;
    const std::string address = trim(line.substr(space));
    std::pair<std::string, int> hp;
    try {
      hp = split_host_port(address);
    } catch (const std::exception& e) {
      *why = "line " + std::to_string(number) + " of the tunnel map: " + e.what();
      return "";
    }
    if (!is_loopback_address(hp.first) || hp.second == 0) {
      *why = "line " + std::to_string(number) + " of the tunnel map: \"" + bounded_text(address) +
             "\" is not a loopback address with a port";
      return "";
    }
    return address;
  }
  *why = "the tunnel map has no line for " + bounded_text(peer);
  return "";
}

Tunnels::Tunnels(ProxyCore& core, HandshakeFailure on_handshake_failure)
    : core_(core),
      on_handshake_failure_(std::move(on_handshake_failure)),
      bytes_(prometheus::BuildCounter()
                 .Name("shardguard_tunnel_bytes_total")
                 .Help("Payload bytes through the sidecar's L4 tunnels, sent to or received from a peer, by method")
                 .Register(*core.registry)),
      refused_(prometheus::BuildCounter()
                   .Name("shardguard_tunnel_refused_total")
                   .Help("Tunnels closed before any byte moved for a reason other than the policy, by direction "
                         "and reason")
                   .Register(*core.registry)),
      open_(prometheus::BuildGauge()
                .Name("shardguard_tunnels_open")
                .Help("L4 tunnels open now (both directions)")
                .Register(*core.registry)
                .Add({})) {
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) throw std::runtime_error(std::string("eventfd: ") + std::strerror(errno));
}

Tunnels::~Tunnels() {
  shutdown();
  if (stop_fd_ >= 0) ::close(stop_fd_);
}

Tunnels::Tls Tunnels::tls() const {
  std::lock_guard<std::mutex> lock(mu_);
  return tls_;
}

void Tunnels::set_tls(Tls tls) {
  std::lock_guard<std::mutex> lock(mu_);
  tls_ = std::move(tls);
}

void Tunnels::start(Tls tls) {
  set_tls(std::move(tls));
  const auto& specs = core_.config.tunnels;
  for (const auto& spec : specs) {
    const auto hp = split_host_port(spec.listen);  // validated by Proxy
    sockaddr_storage sa{};
    socklen_t len = 0;
    int family = AF_INET;
    if (hp.first.find(':') != std::string::npos) {
      family = AF_INET6;
      auto* a = reinterpret_cast<sockaddr_in6*>(&sa);
      a->sin6_family = AF_INET6;
      a->sin6_port = htons(static_cast<uint16_t>(hp.second));
      ::inet_pton(AF_INET6, hp.first.c_str(), &a->sin6_addr);
      len = sizeof *a;
    } else {
      auto* a = reinterpret_cast<sockaddr_in*>(&sa);
      a->sin_family = AF_INET;
      a->sin_port = htons(static_cast<uint16_t>(hp.second));
      ::inet_pton(AF_INET, hp.first.c_str(), &a->sin_addr);
      len = sizeof *a;
    }
    const int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    const int one = 1;
    if (fd >= 0) ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&sa), len) != 0 || ::listen(fd, 128) != 0) {
      const std::string err = std::strerror(errno);
      if (fd >= 0) ::close(fd);
      for (int l : listen_fds_) ::close(l);
      listen_fds_.clear();
      listen_ports_.clear();
      throw std::runtime_error("--tunnel " + spec.service + "@" + spec.listen + "=" + spec.peer_id +
                               ": cannot listen on " + spec.listen + ": " + err);
    }
    sockaddr_storage bound{};
    socklen_t blen = sizeof bound;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &blen);
    const int port = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                                                 : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    listen_fds_.push_back(fd);
    listen_ports_.push_back(port);
  }
  if (!listen_fds_.empty()) acceptor_ = std::thread([this] { accept_loop(); });
}

int Tunnels::listen_port(size_t i) const { return i < listen_ports_.size() ? listen_ports_[i] : 0; }

size_t Tunnels::open_tunnels() const {
  std::lock_guard<std::mutex> lock(mu_);
  return active_inbound_ + active_outbound_;
}

bool Tunnels::spawn(const char* direction, std::function<void()> fn) {
  std::vector<std::unique_ptr<Worker>> finished;
  bool ok = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = workers_.begin(); it != workers_.end();) {
      if ((*it)->done.load()) {
        finished.push_back(std::move(*it));
        it = workers_.erase(it);
      } else {
        ++it;
      }
    }
    // A cap per direction: connections from peers (which need no certificate before
    // their handshake ends) never take the slots of the local shardd's own tunnels.
    size_t& active = std::string(direction) == "inbound" ? active_inbound_ : active_outbound_;
    if (!stopping_.load() && active < kMaxTunnels) {
      auto w = std::make_unique<Worker>();
      Worker* raw = w.get();
      try {
        w->thread = std::thread([this, raw, &active, fn = std::move(fn)] {
          fn();
          {
            std::lock_guard<std::mutex> lock(mu_);
            --active;
            open_.Decrement();
          }
          raw->done.store(true);
        });
        ++active;  // under mu_, which the thread takes before it decrements
        open_.Increment();
        workers_.push_back(std::move(w));
        ok = true;
      } catch (const std::system_error& e) {
        // No thread (EAGAIN): refused like a tunnel over the cap; nothing was counted.
        log::warn("tunnel refused: no thread", {{"direction", direction}, {"error", e.what()}});
      }
    }
  }
  for (auto& w : finished) w->thread.join();
  if (!ok && !stopping_.load()) {
    refuse(direction, "tunnel_limit", "tunnel refused: too many tunnels open",
           {{"direction", direction}, {"limit", kMaxTunnels}});
  }
  return ok;
}

void Tunnels::accept_loop() {
  std::vector<pollfd> fds;
  for (int fd : listen_fds_) fds.push_back({fd, POLLIN, 0});
  fds.push_back({stop_fd_, POLLIN, 0});
  while (!stopping_.load()) {
    const int r = ::poll(fds.data(), fds.size(), -1);
    if (r < 0 && errno != EINTR) {
      log::error("tunnel listeners: poll failed", {{"error", std::strerror(errno)}});
      return;
    }
    if (fds.back().revents != 0) return;
    bool out_of_resources = false;
    int accept_errno = 0;
    for (size_t i = 0; i + 1 < fds.size(); ++i) {
      if (fds[i].revents == 0) continue;
      for (int k = 0; k < 64; ++k) {
        const int cfd = ::accept4(fds[i].fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (cfd < 0) {
          if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
            out_of_resources = true;
            accept_errno = errno;
          }
          break;
        }
        if (!spawn("outbound", [this, i, cfd] { outbound(i, cfd); })) ::close(cfd);
      }
    }
    if (out_of_resources) {
      // The pending connection stays readable while no descriptor is free: wait 100 ms
      // (or for the stop) instead of spinning on it.
      refuse("outbound", "accept", "tunnel listeners: cannot accept", {{"error", std::strerror(accept_errno)}});
      pollfd stop{stop_fd_, POLLIN, 0};
      ::poll(&stop, 1, 100);
    }
  }
}

void Tunnels::outbound(size_t index, int plain_fd) {
  const ProxyConfig::Tunnel& spec = core_.config.tunnels[index];
  const std::string method = tunnel_method(spec.service);
  set_socket_options(plain_fd);
  const RouteDecision d = core_.decide_outbound(spec.peer_id, method);  // counted, audited when refused
  if (!d.allow) {
    ::close(plain_fd);
    return;
  }
  const auto deadline = Clock::now() + core_.config.handshake_timeout;
  const auto fail = [&](const char* reason, const std::string& detail) {
    refuse("outbound", reason, "tunnel to a peer failed",
           {{"peer", spec.peer_id},
            {"method", method},
            {"reason", reason},
            {"detail", bounded_text(detail, 2 * kLoggedPrefixBytes)}});
  };
  std::string why;
  const int tls_fd = connect_to(core_.config.peers.at(spec.peer_id), deadline, stop_fd_, &why);
  if (tls_fd < 0) {
    fail("connect", why);
    ::close(plain_fd);
    return;
  }
  const Tls contexts = tls();
  const auto ctx = contexts.clients.find(spec.peer_id);
  std::unique_ptr<h2::Transport> t;
  try {
    if (ctx == contexts.clients.end()) throw std::runtime_error("no TLS context for the peer");
    t = h2::make_tls_transport(ctx->second, tls_fd);
  } catch (const std::exception& e) {
    fail("tls", e.what());
    ::close(tls_fd);
    ::close(plain_fd);
    return;
  }
  std::string answer;
  if (complete(tls_fd, deadline, stop_fd_, [&] { return t->handshake(); }) != Io::ok) {
    fail("handshake", t->error());
  } else if (!write_all(*t, tls_fd, method + "\n", deadline, stop_fd_)) {
    fail("request", "could not send the method line: " + t->error());
  } else if (!read_line(*t, tls_fd, 128, deadline, stop_fd_, &answer)) {
    fail("answer", "no answer line from the peer: " + bounded_text(answer));
  } else if (answer != "OK") {
    const std::string rule = answer.rfind("DENIED ", 0) == 0 ? answer.substr(7) : answer;
    refuse("outbound", "denied_by_peer", "tunnel refused by the peer",
           {{"peer", spec.peer_id}, {"method", method}, {"rule", bounded_text(rule, 64)}});
  } else {
    splice(*t, tls_fd, plain_fd, stop_fd_, stopping_,
           {&core_.bytes_counter("sent", spec.peer_id),
            &bytes_.Add({{"direction", "sent"}, {"peer", spec.peer_id}, {"method", method}})},
           {&core_.bytes_counter("received", spec.peer_id),
            &bytes_.Add({{"direction", "received"}, {"peer", spec.peer_id}, {"method", method}})});
  }
  t.reset();
  ::close(tls_fd);
  ::close(plain_fd);
}

void Tunnels::adopt(int fd) {
  // The source's handshakes in progress: a peer needs no certificate to hold one, so
  // one address may hold only a few of the inbound slots.
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  const std::string source = ::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0 ? source_address(ss) : "?";
  bool over = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    size_t& n = handshaking_[source];
    over = n >= kMaxTunnelHandshakesPerSource;
    if (!over) ++n;
  }
  if (over) {
    refuse("inbound", "source_limit", "tunnel refused: too many handshakes from one address",
           {{"source", source}, {"limit", kMaxTunnelHandshakesPerSource}});
    ::close(fd);
    return;
  }
  if (!spawn("inbound", [this, fd, source] { inbound(fd, source); })) {
    release_handshake(source);
    ::close(fd);
  }
}

void Tunnels::refuse(const char* direction, const std::string& reason, const std::string& message,
                     nlohmann::json fields) {
  refused_.Add({{"direction", direction}, {"reason", reason}}).Increment();
  uint64_t suppressed = 0;
  if (core_.log_limiter.allow("tunnel_" + reason, Clock::now(), &suppressed)) {
    fields["suppressed"] = suppressed;
    log::warn(message, fields);
  }
}

void Tunnels::release_handshake(const std::string& source) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto it = handshaking_.find(source);
  if (it != handshaking_.end() && --it->second == 0) handshaking_.erase(it);
}

void Tunnels::inbound(int tls_fd, const std::string& source) {
  // Held until the method line is read (or the tunnel ends before that).
  struct HandshakeSlot {
    Tunnels* tunnels;
    const std::string& source;
    bool held = true;
    void release() {
      if (held) tunnels->release_handshake(source);
      held = false;
    }
    ~HandshakeSlot() { release(); }
  } slot{this, source};
  set_socket_options(tls_fd);
  const Tls contexts = tls();
  std::unique_ptr<h2::Transport> t;
  try {
    if (!contexts.server) throw std::runtime_error("no TLS context");
    t = h2::make_tls_transport(contexts.server, tls_fd);
  } catch (const std::exception& e) {
    on_handshake_failure_("tls", e.what());
    ::close(tls_fd);
    return;
  }
  const auto deadline = Clock::now() + core_.config.handshake_timeout;
  if (complete(tls_fd, deadline, stop_fd_, [&] { return t->handshake(); }) != Io::ok) {
    // A peer that stalls its handshake is a timeout, as the relay counts it.
    const bool timed_out = Clock::now() >= deadline && t->error().empty();
    if (!stopping_.load()) {
      on_handshake_failure_(timed_out ? "handshake_timeout" : t->failure_reason(),
                            timed_out ? "tunnel: no complete handshake within --handshake-timeout" : "tunnel: " + t->error());
    }
    t.reset();
    ::close(tls_fd);
    return;
  }
  const std::string peer = t->peer_id();
  const auto line_deadline = Clock::now() + core_.config.first_bytes_timeout;
  std::string method;
  const bool got_method = read_line(*t, tls_fd, kMaxTunnelRequestLine, line_deadline, stop_fd_, &method);
  slot.release();
  if (!got_method) {
    refuse("inbound", "request", "tunnel refused: no method line (at most 64 bytes, within the first-bytes timeout)",
           {{"peer", bounded_text(peer)}, {"got", bounded_text(method, 64)}});
    t.reset();
    ::close(tls_fd);
    return;
  }
  // One decision per tunnel: the policy's, then where the tunnel would go.
  policy::Decision d = core_.policy->decide(policy::Direction::kIngress, peer, method);
  const bool is_tunnel = method == policy::kTunnelStoreMethod || method == policy::kTunnelGlooMethod;
  std::string destination;
  if (d.allow && !is_tunnel) {
    d.allow = false;
    d.rule = kRuleTunnelNotATunnel;
    d.reason = "method " + bounded_text(method) + " is not a tunnel method";
  } else if (d.allow && method == policy::kTunnelStoreMethod) {
    destination = core_.config.tunnel_store;
    if (destination.empty()) {
      d.allow = false;
      d.rule = kRuleTunnelNoStore;
      d.reason = "this sidecar serves no rendezvous store (--tunnel-store)";
    }
  } else if (d.allow) {
    std::string why;
    std::string text;
    if (core_.config.tunnel_map_file.empty()) {
      why = "this sidecar has no tunnel map (--tunnel-map)";
    } else {
      // Written by the local shardd on a volume it can write to: a regular file only,
      // never followed through a link, never a FIFO that would block this thread.
      const int fd = ::open(core_.config.tunnel_map_file.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
      struct stat st {};
      if (fd < 0 || ::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        why = "the tunnel map " + core_.config.tunnel_map_file +
              (fd < 0 ? " cannot be read: " + std::string(std::strerror(errno)) : " is not a regular file");
        if (fd >= 0) ::close(fd);
      } else {
        text.resize(kMaxTunnelMapBytes + 1);
        size_t got = 0;
        while (got < text.size()) {
          const ssize_t n = ::read(fd, text.data() + got, text.size() - got);
          if (n < 0 && errno == EINTR) continue;
          if (n <= 0) break;
          got += static_cast<size_t>(n);
        }
        text.resize(got);
        ::close(fd);
        if (text.size() > kMaxTunnelMapBytes) {
          why = "the tunnel map " + core_.config.tunnel_map_file + " is over " + std::to_string(kMaxTunnelMapBytes) +
                " bytes";
        } else {
          destination = tunnel_map_lookup(text, peer, &why);
        }
      }
    }
    if (destination.empty()) {
      d.allow = false;
      d.rule = kRuleTunnelUnmapped;
      d.reason = why;
    }
  }
  core_.count_decision(d, method, peer);
  if (!d.allow) {
    core_.audit_deny(d, peer, method);
    write_all(*t, tls_fd, "DENIED " + d.rule + "\n", deadline + core_.config.handshake_timeout, stop_fd_);
    t->close_notify();
    t.reset();
    ::close(tls_fd);
    return;
  }
  std::string why;
  const int plain_fd = connect_to(destination, Clock::now() + core_.config.handshake_timeout, stop_fd_, &why);
  if (plain_fd < 0) {
    refuse("inbound", "connect", "tunnel refused: its local destination does not answer",
           {{"peer", bounded_text(peer)}, {"method", method}, {"error", why}});
    write_all(*t, tls_fd, "DENIED tunnel-unreachable\n", Clock::now() + core_.config.handshake_timeout, stop_fd_);
    t->close_notify();
    t.reset();
    ::close(tls_fd);
    return;
  }
  if (write_all(*t, tls_fd, "OK\n", Clock::now() + core_.config.handshake_timeout, stop_fd_)) {
    // The peer's verified identity labels its bytes (received from it: TLS → local).
    splice(*t, tls_fd, plain_fd, stop_fd_, stopping_,
           {&core_.bytes_counter("sent", peer), &bytes_.Add({{"direction", "sent"}, {"peer", peer}, {"method", method}})},
           {&core_.bytes_counter("received", peer),
            &bytes_.Add({{"direction", "received"}, {"peer", peer}, {"method", method}})});
  }
  t.reset();
  ::close(plain_fd);
  ::close(tls_fd);
}

void Tunnels::shutdown() {
  if (stopping_.exchange(true)) {
    return;
  }
  const uint64_t one = 1;
  if (::write(stop_fd_, &one, sizeof one) < 0) {
    log::error("tunnels: cannot signal shutdown", {{"error", std::strerror(errno)}});
  }
  if (acceptor_.joinable()) acceptor_.join();
  for (int fd : listen_fds_) ::close(fd);
  listen_fds_.clear();
  std::list<std::unique_ptr<Worker>> workers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    workers.swap(workers_);
  }
  for (auto& w : workers) w->thread.join();
}

}  // namespace shardguard::sidecar
