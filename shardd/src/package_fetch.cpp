#include "shardguard/shardd/package_fetch.h"

#include <curl/curl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <mutex>
#include <thread>

#include "shardguard/common/log.h"

namespace shardguard::shardd {

namespace {

void init_curl_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) throw std::runtime_error("curl_global_init failed");
  });
}

struct Download {
  CURL* curl = nullptr;
  const std::function<bool(double)>* stop_wait = nullptr;  // FetchOptions::stop_wait, if set
  bool stopped = false;
  std::string body;
  size_t limit = 0;
  size_t discarded = 0;  // of an error page
  bool over = false;
};

// Keeps a 200's body up to the manifest's size; an error page is read (up to 64 KiB)
// but not kept, so its size never passes for the package's.
size_t on_data(char* data, size_t size, size_t n, void* user) {
  auto* d = static_cast<Download*>(user);
  const size_t bytes = size * n;
  long status = 0;
  curl_easy_getinfo(d->curl, CURLINFO_RESPONSE_CODE, &status);
  if (status != 200) {
    d->discarded += bytes;
    return d->discarded > (size_t{64} << 10) ? 0 : bytes;
  }
  if (d->body.empty()) {
    curl_off_t announced = -1;
    curl_easy_getinfo(d->curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &announced);
    if (announced > static_cast<curl_off_t>(d->limit)) d->over = true;
  }
  if (d->over || d->body.size() + bytes > d->limit) {
    d->over = true;
    return 0;  // aborts the transfer (CURLE_WRITE_ERROR)
  }
  d->body.append(data, bytes);
  return bytes;
}

// curl's progress callback: called at least once a second while a transfer runs; a
// non-zero return aborts it (CURLE_ABORTED_BY_CALLBACK).
// Nothing may be thrown through curl's C frames: a failing stop_wait counts as a stop.
int on_progress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) noexcept {
  auto* d = static_cast<Download*>(user);
  try {
    if (d->stop_wait != nullptr && (*d->stop_wait)(0)) d->stopped = true;
  } catch (...) {
    d->stopped = true;
  }
  return d->stopped ? 1 : 0;
}

struct Attempt {
  enum Outcome { kOk, kTransient, kFinal, kTooBig, kStopped } outcome = kFinal;
  std::string error;  // what went wrong, for the message
};

// Transport errors worth another attempt: the server may be back, or faster.
bool transient(CURLcode rc) {
  switch (rc) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
      return true;
    default:
      return false;
  }
}

Attempt attempt(const std::string& url, const FetchOptions& o, Download& d) {
  std::unique_ptr<CURL, decltype(&curl_easy_cleanup)> curl(curl_easy_init(), curl_easy_cleanup);
  if (!curl) return {Attempt::kFinal, "curl_easy_init failed"};
  char err[CURL_ERROR_SIZE] = {0};
  const long timeout_s = std::max(1L, static_cast<long>(std::ceil(o.timeout_s)));
  CURL* c = curl.get();
  curl_easy_setopt(c, CURLOPT_URL, url.c_str());
  curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);  // a redirect is an error naming its status
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, err);
  curl_easy_setopt(c, CURLOPT_USERAGENT, "shardd");
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, timeout_s);
  // A stall: less than 1 byte/s for timeout_s (waiting for the response included).
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, timeout_s);
  curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 1L);
  curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 2L);
  if (!o.ca_file.empty()) curl_easy_setopt(c, CURLOPT_CAINFO, o.ca_file.c_str());
  // A Content-Length above the manifest's size is refused with the first bytes (on_data).
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &d);
  if (o.stop_wait) {
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, &d);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    d.stop_wait = &o.stop_wait;
  }
  d.curl = c;
  d.body.clear();
  d.discarded = 0;
  d.over = false;
  const CURLcode rc = curl_easy_perform(c);
  long status = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
  if (d.stopped) return {Attempt::kStopped, ""};
  if (d.over) return {Attempt::kTooBig, ""};
  if (rc != CURLE_OK && (status == 0 || status == 200)) {
    std::string what = err[0] != 0 ? std::string(err) : std::string(curl_easy_strerror(rc));
    while (!what.empty() && (what.back() == '\n' || what.back() == '\r')) what.pop_back();
    if (rc == CURLE_OPERATION_TIMEDOUT) what += " (no byte for " + std::to_string(timeout_s) + " s, --package-timeout)";
    return {transient(rc) ? Attempt::kTransient : Attempt::kFinal, what};
  }
  if (status == 200) return {Attempt::kOk, ""};
  const std::string what = "HTTP " + std::to_string(status);
  if (status >= 500 || status == 408 || status == 429) return {Attempt::kTransient, what};
  return {Attempt::kFinal, what + (status == 404 ? " (not found)" : status >= 300 && status < 400
                                                                        ? " (redirects are not followed)"
                                                                        : "")};
}

}  // namespace

std::string package_url(const std::string& prefix, int shard) { return prefix + model::package_file_name(shard); }

std::string fetch_package(const std::string& prefix, const model::PackageManifest& manifest, int shard,
                          const FetchOptions& o) {
  if (shard < 0 || shard >= static_cast<int>(manifest.shards.size())) {
    throw model::PackageError("shard " + std::to_string(shard) + " is not in the manifest (it has " +
                              std::to_string(manifest.shards.size()) + " shards)");
  }
  init_curl_once();
  const std::string url = package_url(prefix, shard);
  const int64_t bytes = manifest.shards[shard].bytes;
  Download d;
  // The manifest records each package's size; an oversized answer is not the package.
  d.limit = bytes > 0 ? static_cast<size_t>(bytes) : size_t{4} << 30;
  double wait = std::max(0.0, o.backoff_s);
  const auto stopped = [&] {
    return FetchStopped("package fetch of shard " + std::to_string(shard) + " stopped: GET " + url);
  };
  log::info("fetching package", {{"url", url}, {"shard", shard}, {"bytes", bytes}});
  for (int tries = 0;; ++tries) {
    Attempt a = attempt(url, o, d);
    if (a.outcome == Attempt::kStopped) throw stopped();
    if (a.outcome == Attempt::kOk && bytes > 0 && static_cast<int64_t>(d.body.size()) < bytes) {
      // Fewer bytes than the package has: an upload still in progress, or a "soft 404"
      // page; not a tampered package, so unavailable (retried), not refused.
      a = {Attempt::kTransient, "HTTP 200 with " + std::to_string(d.body.size()) + " bytes, but the manifest records " +
                                    std::to_string(bytes) + " for shard " + std::to_string(shard)};
    }
    if (a.outcome == Attempt::kOk) {
      log::info("package fetched", {{"url", url}, {"shard", shard}, {"bytes", d.body.size()}});
      return std::move(d.body);
    }
    if (a.outcome == Attempt::kTooBig) {
      throw model::PackageError("package " + url + ": the server sends more than the " + std::to_string(d.limit) +
                                " bytes the manifest records for shard " + std::to_string(shard) +
                                " (not this split's package)");
    }
    const std::string attempts = std::to_string(tries + 1) + (tries == 0 ? " attempt" : " attempts");
    if (a.outcome == Attempt::kFinal || tries >= o.retries) {
      throw model::PackageUnavailable("package of shard " + std::to_string(shard) + " unavailable: GET " + url + ": " +
                                      a.error + " (" + attempts + ")");
    }
    log::warn("package fetch failed, retrying",
              {{"url", url}, {"shard", shard}, {"error", a.error}, {"attempt", tries + 1}, {"retry_in_s", wait}});
    if (!o.stop_wait) {
      std::this_thread::sleep_for(std::chrono::duration<double>(wait));
    } else if (o.stop_wait(wait)) {
      throw stopped();
    }
    wait = std::min(30.0, wait * 2);
  }
}

}  // namespace shardguard::shardd
