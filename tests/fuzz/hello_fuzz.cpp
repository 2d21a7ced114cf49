// libFuzzer target: the sidecar acceptor's ClientHello classifier
// (sidecar/acceptor.h, classify_client_hello), which reads bytes any TCP client can
// send before any authentication.
//
// Every input is classified whole and at two of its prefixes. Checked (abort() on a
// violation):
// - the reason is one of the documented tokens, and empty while undecided;
// - the log detail of a refusal is short (at most 512 bytes) printable ASCII;
// - a decision is final: once a prefix is decided, every longer input that starts
//   with it gets the same reason (the acceptor peeks at a growing prefix and must not
//   accept what it would have refused a moment earlier, or the other way round).
#include "shardguard/sidecar/acceptor.h"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>

namespace {

using shardguard::sidecar::classify_client_hello;
using shardguard::sidecar::HelloClass;

void fail(const char* what, const HelloClass& c, size_t size) {
  std::fprintf(stderr, "hello_fuzz: %s (size %zu, complete %d, reason \"%s\", detail \"%s\")\n", what, size,
               c.complete ? 1 : 0, c.reason.c_str(), c.detail.c_str());
  std::abort();
}

HelloClass checked(const uint8_t* data, size_t size) {
  static const std::set<std::string> kReasons = {"", "plaintext", "not_tls", "tls_version", "alpn"};
  const HelloClass c = classify_client_hello(data, size);
  if (kReasons.count(c.reason) == 0) fail("reason outside the documented set", c, size);
  if (!c.complete && !c.reason.empty()) fail("a reason while undecided", c, size);
  if (c.detail.size() > 512) fail("detail longer than 512 bytes", c, size);
  for (char ch : c.detail) {
    if (ch < 0x20 || ch > 0x7e) fail("detail not printable ASCII", c, size);
  }
  return c;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const HelloClass whole = checked(data, size);
  for (size_t prefix : {size / 2, size > 0 ? size - 1 : 0}) {
    const HelloClass part = checked(data, prefix);
    if (part.complete && (!whole.complete || part.reason != whole.reason)) {
      fail("a decided prefix changed its decision when more bytes came", whole, size);
    }
  }
  return 0;
}
