// gRPC's own log lines ("E1203 12:00:00.0 123 tls_security_connector.cc:449] …") as the
// JSON lines of common/log.h, so that a binary's stderr is JSON throughout, as
// docs/sidecar.md and docs/shardd.md promise the cluster's log pipeline.
#pragma once

namespace shardguard::proto {

// Installs the bridge for the whole process (gpr_set_log_function): gRPC's ERROR lines
// become level "warn" (the binary logs the outcome it decides itself, with its reason),
// INFO "info", DEBUG "debug"; each with msg = gRPC's text and fields source "grpc" and
// file "<file>:<line>". Call once at start-up, before any channel or server exists.
void route_grpc_logs_to_json();

}  // namespace shardguard::proto
