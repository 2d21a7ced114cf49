#include "shardguard/shardd/gloo_addresses.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace shardguard::shardd {

namespace {

void check_blob(const std::vector<uint8_t>& blob, int rank, int size) {
  if (size < 2 || rank < 0 || rank >= size) {
    throw std::invalid_argument("Gloo addresses: rank " + std::to_string(rank) + " of " + std::to_string(size));
  }
  const size_t want = static_cast<size_t>(size - 1) * kGlooAddressBytes;
  if (blob.size() != want) {
    throw std::runtime_error("Gloo addresses of rank " + std::to_string(rank) + ": " + std::to_string(blob.size()) +
                             " bytes where " + std::to_string(size - 1) + " addresses of " +
                             std::to_string(kGlooAddressBytes) + " bytes were expected (a Gloo this shardd does "
                             "not know; the replica tunnels cannot rewrite it)");
  }
}

sockaddr_in address_at(const std::vector<uint8_t>& blob, size_t k, int rank) {
  sockaddr_storage ss{};
  std::memcpy(&ss, blob.data() + k * kGlooAddressBytes, sizeof(ss));
  if (ss.ss_family != AF_INET) {
    throw std::runtime_error("Gloo addresses of rank " + std::to_string(rank) + ": address family " +
                             std::to_string(ss.ss_family) + " is not IPv4 (the replica tunnels use 127.77.0.x)");
  }
  sockaddr_in in{};
  std::memcpy(&in, &ss, sizeof(in));
  return in;
}

}  // namespace

std::optional<int> gloo_address_key_rank(const std::string& key) {
  const size_t slash = key.rfind('/');
  const std::string last = slash == std::string::npos ? key : key.substr(slash + 1);
  if (last.empty() || last.size() > 6) return std::nullopt;
  for (const char c : last) {
    if (c < '0' || c > '9') return std::nullopt;
  }
  return std::stoi(last);
}

std::map<int, std::string> gloo_listeners(const std::vector<uint8_t>& blob, int rank, int size) {
  check_blob(blob, rank, size);
  std::map<int, std::string> out;
  size_t k = 0;
  for (int peer = 0; peer < size; ++peer) {
    if (peer == rank) continue;
    const sockaddr_in in = address_at(blob, k++, rank);
    char text[INET_ADDRSTRLEN] = {};
    ::inet_ntop(AF_INET, &in.sin_addr, text, sizeof(text));
    out[peer] = std::string(text) + ":" + std::to_string(ntohs(in.sin_port));
  }
  return out;
}

std::vector<uint8_t> rewrite_gloo_addresses(const std::vector<uint8_t>& blob, int rank, int size,
                                            const std::string& host, int port) {
  check_blob(blob, rank, size);
  in_addr ip{};
  if (::inet_pton(AF_INET, host.c_str(), &ip) != 1) {
    throw std::invalid_argument("Gloo tunnel address \"" + host + "\" is not an IPv4 address");
  }
  if (port <= 0 || port > 65535) throw std::invalid_argument("Gloo tunnel port " + std::to_string(port));
  std::vector<uint8_t> out = blob;
  for (size_t k = 0; k + 1 < static_cast<size_t>(size); ++k) {
    sockaddr_in in = address_at(blob, k, rank);
    in.sin_addr = ip;
    in.sin_port = htons(static_cast<uint16_t>(port));
    std::memcpy(out.data() + k * kGlooAddressBytes, &in, sizeof(in));
  }
  return out;
}

void write_tunnel_map(const std::string& path, const std::map<std::string, std::string>& lines) {
  std::string text;
  for (const auto& [id, address] : lines) text += id + " " + address + "\n";
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("--replica-tunnel-map: cannot write " + tmp + ": " + std::strerror(errno));
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int e = errno;
      ::close(fd);
      throw std::runtime_error("--replica-tunnel-map: cannot write " + tmp + ": " + std::strerror(e));
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    throw std::runtime_error("--replica-tunnel-map: cannot write " + tmp + ": " + std::strerror(errno));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    throw std::runtime_error("--replica-tunnel-map: cannot rename " + tmp + " to " + path + ": " + std::strerror(errno));
  }
}

}  // namespace shardguard::shardd
