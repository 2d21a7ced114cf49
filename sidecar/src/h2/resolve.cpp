#include "shardguard/sidecar/h2/resolve.h"

#include <netdb.h>

#include <cstring>

namespace shardguard::sidecar::h2 {

Resolved lookup(const std::string& host, const std::string& port, int flags) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = flags;
  addrinfo* found = nullptr;
  Resolved r;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &found); rc != 0 || !found) {
    r.error = rc != 0 ? gai_strerror(rc) : "no address";
  } else {
    for (const addrinfo* a = found; a && r.addresses.size() < 8; a = a->ai_next) {
      Resolved::Address one;
      std::memcpy(&one.addr, a->ai_addr, a->ai_addrlen);
      one.len = a->ai_addrlen;
      r.addresses.push_back(one);
    }
  }
  if (found) freeaddrinfo(found);
  return r;
}

}  // namespace shardguard::sidecar::h2
