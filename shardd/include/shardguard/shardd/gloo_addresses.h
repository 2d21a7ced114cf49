// The part of Gloo's rendezvous that shardd rewrites to send a replica group's
// connections through the sidecars (issue 20; docs/pipeline.md#the-replica-tunnels).
// Pure: no torch, no I/O except write_tunnel_map.
//
// Gloo's full-mesh rendezvous (gloo/rendezvous/context.cc, the version Debian ships
// with LibTorch) has every rank publish, under the key "<rank>" (below the prefixes
// c10d and we add), one address per other rank, in rank order: the listening socket
// of the pair with that rank. Each address is Gloo's tcp::Address::Impl, a
// sockaddr_storage followed by a 64-bit sequence number. Of two ranks the one with the
// greater address connects; the other accepts.
#pragma once

#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace shardguard::shardd {

inline constexpr size_t kGlooAddressBytes = sizeof(sockaddr_storage) + sizeof(int64_t);

// The rank whose addresses `key` holds: its last '/'-separated part is a decimal
// number (Gloo's other keys, "rank_<i>", are not). nullopt for any other key.
std::optional<int> gloo_address_key_rank(const std::string& key);

// The listening addresses ("a.b.c.d:port") that rank `rank` of a group of `size`
// published, keyed by the other rank. Throws std::runtime_error when the blob does not
// have size-1 IPv4 addresses (another Gloo than the one this was written for).
std::map<int, std::string> gloo_listeners(const std::vector<uint8_t>& blob, int rank, int size);

// The blob with every address replaced by host:port (IPv4), sequence numbers kept.
// Throws like gloo_listeners, and std::invalid_argument for a host that is not IPv4.
std::vector<uint8_t> rewrite_gloo_addresses(const std::vector<uint8_t>& blob, int rank, int size,
                                            const std::string& host, int port);

// Writes `lines` (peer SPIFFE ID → host:port) as "<id> <host:port>\n" lines to `path`
// atomically (a temporary file renamed over it), mode 0644: the sidecar's --tunnel-map.
void write_tunnel_map(const std::string& path, const std::map<std::string, std::string>& lines);

}  // namespace shardguard::shardd
