// Fetching one shard's package from spec.model.package.url (docs/distribution.md):
// only <prefix>shard-<i>.sgpkg, over http or https (certificates verified against
// the system's trust store, or a given CA bundle; never unverified), with its size
// bounded by the manifest and bounded retries on transient errors. The server is
// untrusted storage: what comes back is checked against the manifest (which never
// comes from the server) by model::open_package before anything is decrypted.
#pragma once

#include <functional>
#include <stdexcept>
#include <string>

#include "shardguard/model/package.h"

namespace shardguard::shardd {

struct FetchOptions {
  // Connecting, and the longest a transfer may go without receiving a byte (a server
  // that accepts and then stalls), in seconds; at least 1.
  double timeout_s = 60;
  // Further attempts after a transient failure (connection refused or reset, timeout,
  // HTTP 5xx, 408 or 429), waiting backoff_s, then twice that, … (at most 30 s).
  int retries = 3;
  double backoff_s = 1;
  // A PEM CA bundle to verify https servers with instead of the system's trust store.
  std::string ca_file;
  // Waits up to `seconds` (0: only asks) and says whether the fetch is to be abandoned
  // (shardd stopped by SIGTERM while fetching): asked between attempts instead of
  // sleeping, and at least once a second while a transfer runs. Unset: never abandoned.
  std::function<bool(double seconds)> stop_wait;
};

// The fetch was abandoned on request (FetchOptions::stop_wait), not failed.
struct FetchStopped : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// "<prefix>shard-<i>.sgpkg".
std::string package_url(const std::string& prefix, int shard);

// The bytes of shard `shard`'s package, still sealed. Throws model::PackageError when
// the server sends more bytes than the manifest's entry for the shard records (a
// refusal: that is not the package), model::PackageUnavailable naming the URL and the
// HTTP status or the transport error when no attempt got it (404 and other 4xx at
// once, transient errors after the retries), FetchStopped when stop_wait asked it to
// end.
std::string fetch_package(const std::string& prefix, const model::PackageManifest& manifest, int shard,
                          const FetchOptions& options);

}  // namespace shardguard::shardd
