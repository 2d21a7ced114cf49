// shardd: trains one pipeline stage of a ShardedTrainingJob.
#include <atomic>
#include <csignal>
#include <iostream>
#include <thread>

#include <CLI/CLI.hpp>

#include "shardguard/common/crypto.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/common/log.h"
#include "shardguard/common/metrics_server.h"
#include "shardguard/common/pki.h"
#include "shardguard/common/process.h"
#include "shardguard/common/token_file.h"
#include "shardguard/model/package.h"
#include "shardguard/proto/grpc_log.h"
#include "shardguard/shardd/stage.h"
#include "shardguard/shardd/threads.h"

namespace {

using namespace shardguard;

struct Flags {
  std::string job_file;
  std::string package;  // a directory or an http(s) URL prefix
  shardd::StageOptions stage;
  std::string key_file;
  std::string package_key_file;
  std::string prompt_file;  // --generate-prompt
  std::vector<std::string> replica_tunnels;  // --replica-tunnel ID=host:port
  std::string metrics = "127.0.0.1:9100";
  int threads = 1;
};

// "spiffe://<td>/ns/<ns>/job/<job>/shard/<stage>/replica/<r>=host:port": replica r of
// this stage of this job and the local sidecar listener that tunnels Gloo to it (which
// r may be is shardd::check_tunnels's to say).
std::pair<int, shardd::ReplicaTunnel> parse_replica_tunnel(const std::string& text, const JobSpec& job, int stage) {
  const auto bad = [&](const std::string& why) {
    return std::runtime_error("--replica-tunnel \"" + text + "\": " + why);
  };
  const size_t eq = text.find('=');
  if (eq == std::string::npos) throw bad("not <SPIFFE ID of a replica>=<host:port>");
  shardd::ReplicaTunnel t{text.substr(0, eq), text.substr(eq + 1)};
  if (const std::string why = validate_spiffe_id(t.peer_id); !why.empty()) throw bad(why);
  const std::string shard_id =
      spiffe_id_for_shard(job.protection.trust_domain, job.namespace_, job.name, static_cast<uint32_t>(stage));
  const auto id = parse_replica_spiffe_id(t.peer_id);
  if (!id || id->shard_id != shard_id || id->replica > 4096) {
    throw bad("the ID is not a replica of this stage of the job (" + shard_id + "/replica/<r>)");
  }
  auto [host, port] = split_host_port(t.address);
  if (host.empty() || port <= 0 || port > 65535) throw bad("the address is not host:port with a port in 1..65535");
  return {static_cast<int>(id->replica), t};
}

int RunShardd(Flags flags) {
  flags.stage.job = load_job_file(flags.job_file);
  try {
    flags.stage.key = load_key_file(flags.key_file);
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("--key-file: ") + e.what());
  }
  if (flags.package.rfind("http://", 0) == 0 || flags.package.rfind("https://", 0) == 0) {
    if (!is_package_url(flags.package)) {
      throw std::runtime_error("--package: " + flags.package +
                               " is not a URL prefix shardd fetches from (http:// or https://, a host, a path ending "
                               "in '/', no user, query or fragment)");
    }
    if (flags.stage.package_manifest.empty()) {
      throw std::runtime_error("--package " + flags.package +
                               ": a URL needs --package-manifest FILE (the manifest is never read from the server)");
    }
    flags.stage.package_url = flags.package;
  } else {
    flags.stage.package_dir = flags.package;
  }
  if (flags.package.empty() != flags.package_key_file.empty()) {
    throw std::runtime_error("--package and --package-key-file go together: a package opens only with its shard's key");
  }
  if (flags.stage.job.model.from_package() && flags.package.empty()) {
    throw std::runtime_error("spec.model.architecture torchscript: the stage's blocks come from its package; "
                             "pass --package DIR|URL and --package-key-file FILE");
  }
  if (!flags.stage.package_manifest.empty() && flags.package.empty()) {
    throw std::runtime_error("--package-manifest goes with --package");
  }
  if (!(flags.stage.fetch.timeout_s >= 1 && flags.stage.fetch.timeout_s <= 3600) || flags.stage.fetch.retries < 0 ||
      flags.stage.fetch.retries > 20) {
    throw std::runtime_error("--package-timeout must be 1..3600 s and --package-retries 0..20");
  }
  if (!flags.package_key_file.empty()) {
    try {
      flags.stage.package_key = load_key_file(flags.package_key_file);
    } catch (const std::exception& e) {
      throw shardguard::model::PackageError(std::string("--package-key-file: ") + e.what());
    }
  }
  for (const auto& text : flags.replica_tunnels) {
    const auto [replica, tunnel] = parse_replica_tunnel(text, flags.stage.job, flags.stage.stage);
    if (!flags.stage.replica_tunnels.emplace(replica, tunnel).second) {
      throw std::runtime_error("--replica-tunnel \"" + text + "\": replica " + std::to_string(replica) +
                               " is given twice");
    }
  }
  if (!flags.stage.replica_tunnel_map.empty() && flags.stage.replica_tunnels.empty()) {
    throw std::runtime_error("--replica-tunnel-map \"" + flags.stage.replica_tunnel_map +
                             "\" goes with --replica-tunnel (none given)");
  }
  if (!flags.prompt_file.empty()) {
    if (!flags.stage.generate.enabled()) throw std::runtime_error("--generate-prompt needs --generate-tokens");
    for (const uint16_t t : read_token_file(flags.prompt_file)) flags.stage.generate.prompt.push_back(t);
  }
  if (flags.stage.generate.tokens < 0) {
    throw std::runtime_error("--generate-tokens: " + std::to_string(flags.stage.generate.tokens) + " is negative");
  }
  shardd::set_compute_threads(flags.threads);

  // SIGTERM / SIGINT stop the stage from a watcher thread. Not block-and-sigwait alone:
  // threads started before the block (OpenBLAS's at load time, LibTorch's pool in
  // set_compute_threads) would take a signal with its default action, killing the
  // process. The handler (StopSignals) works on any thread; the block keeps the
  // threads started from here on (gRPC, Gloo) from being interrupted by it, and the
  // watcher unblocks them for itself.
  StopSignals stops;
  const sigset_t stop_set = block_stop_signals();

  auto registry = std::make_shared<prometheus::Registry>();
  MetricsServer metrics(registry);
  if (flags.metrics != "off") {
    auto [host, port] = split_host_port(flags.metrics);
    metrics.start(host, port);
  }
  // The last stage reports every step and evaluation; `shardctl run` turns these
  // lines into its progress bar.
  shardd::StageEvents events;
  events.on_step = [](const shardd::StepReport& r) {
    log::info("step", {{"step", r.step}, {"total_steps", r.total_steps}, {"epoch", r.epoch}, {"loss", r.loss},
                       {"accuracy", r.accuracy}});
  };
  shardd::StageRunner runner(flags.stage, registry, events);
  // From before start(): a stop while the package is fetched ends the fetch.
  std::atomic<bool> signalled{false};
  std::thread watcher([&] {
    pthread_sigmask(SIG_UNBLOCK, &stop_set, nullptr);
    if (const int sig = stops.wait(); sig != 0) {
      signalled.store(true);
      runner.stop(std::string("stopped by signal ") + strsignal(sig));
    }
  });
  struct EndWatcher {  // on every way out, a thrown exception included
    StopSignals& stops;
    std::thread& watcher;
    ~EndWatcher() {
      stops.wake();  // if no signal came
      watcher.join();
    }
  } end_watcher{stops, watcher};
  try {
    runner.start();
  } catch (const shardd::FetchStopped& e) {
    log::warn("stopped", {{"error", e.what()}});
    std::cerr << "shardd: " << e.what() << "\n";
    return 1;  // as any stopped run
  }
  if (signalled.load()) {  // during start(), after any fetch: not ready, not run
    log::warn("stopped", {{"error", "stopped by a signal while starting"}});
    return 1;
  }
  metrics.set_ready(true);
  log::info("listening", {{"pipeline_port", runner.port()}, {"metrics_port", metrics.port()}});
  const auto result = runner.run();
  metrics.set_ready(false, "finished");
  metrics.stop();
  return result.ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  shardguard::log::set_component("shardd");
  shardguard::proto::route_grpc_logs_to_json();  // stderr stays JSON lines
  CLI::App app{"shardd: trains one pipeline stage of a ShardedTrainingJob, holding only that stage's blocks"};
  Flags flags;
  flags.stage.listen = "127.0.0.1:7000";  // DESIGN.md §7; the sidecar is the only way in
  app.add_option("--job", flags.job_file, "ShardedTrainingJob YAML file")->required();
  app.add_option("--stage", flags.stage.stage, "this stage's index (0-based)")->required();
  app.add_option("--replica", flags.stage.replica,
                 "this stage's replica (0-based; spec.sharding.replicas > 1)")->capture_default_str();
  app.add_option("--replica-store", flags.stage.replica_store,
                 "host:port of the stage's replica-group rendezvous store (replica 0 serves it)");
  app.add_option("--replica-host", flags.stage.replica_host,
                 "this replica's own address for the replica group's Gloo connections (default: the store's host; "
                 "in a pod: its IP)");
  app.add_option("--replica-tunnel", flags.replica_tunnels,
                 "SPIFFE-ID=host:port: the local sidecar's Gloo tunnel to that replica of this stage (repeatable; "
                 "every other replica, listening on 127.77.0.<r+1>)");
  app.add_option("--replica-tunnel-map", flags.stage.replica_tunnel_map,
                 "file where this replica publishes its Gloo listeners for its sidecar (--tunnel-map)");
  app.add_option("--listen", flags.stage.listen, "gRPC address to listen on (loopback)")->capture_default_str();
  app.add_option("--prev", flags.stage.prev, "address of the previous stage (or of the sidecar's outbound listener)");
  app.add_option("--next", flags.stage.next, "address of the next stage (or of the sidecar's outbound listener)");
  app.add_option("--checkpoint-dir", flags.stage.checkpoint_dir, "directory for this shard's checkpoints")->required();
  app.add_option("--key-file", flags.key_file, "this shard's 32-byte checkpoint key")->required();
  app.add_option("--package", flags.package,
                 "where the packages of a split TorchScript model lie: a directory (manifest.json, shard-<i>.sgpkg) "
                 "or an http:// or https:// prefix ending in '/' (only shard-<stage>.sgpkg is fetched); this stage's "
                 "blocks come from its package");
  app.add_option("--package-manifest", flags.stage.package_manifest,
                 "the manifest to check the package against (required with a URL; default DIR/manifest.json)");
  app.add_option("--package-key-file", flags.package_key_file, "this shard's 32-byte package key (shardctl split)");
  app.add_option("--package-timeout", flags.stage.fetch.timeout_s,
                 "URL: seconds to connect, and the longest a download may receive nothing")
      ->capture_default_str();
  app.add_option("--package-retries", flags.stage.fetch.retries,
                 "URL: further attempts after a transient error (backoff 1 s, doubling, at most 30 s)")
      ->capture_default_str();
  app.add_option("--package-ca", flags.stage.fetch.ca_file,
                 "URL: PEM CA bundle to verify the https server with, instead of the system's trust store");
  app.add_option("--metrics", flags.metrics, "metrics and health address host:port, or off")->capture_default_str();
  app.add_option("--device", flags.stage.device, "auto | cpu | cuda")->capture_default_str();
  app.add_option("--threads", flags.threads, "compute threads (LibTorch and OpenBLAS)")->capture_default_str();
  app.add_option("--peer-timeout", flags.stage.peer_timeout_s, "seconds to wait for a frame from a neighbour")
      ->capture_default_str();
  app.add_option("--retry-budget", flags.stage.retry_budget_s, "seconds to keep retrying an unreachable neighbour")
      ->capture_default_str();
  app.add_option("--max-steps", flags.stage.max_steps, "stop after this many steps (0 = all epochs)")
      ->capture_default_str();
  // `shardctl generate` (docs/pipeline.md): restore the newest checkpoint and generate
  // instead of training. Every stage gets the same flags.
  app.add_option("--generate-tokens", flags.stage.generate.tokens,
                 "generate this many tokens instead of training (0 = train)")->capture_default_str();
  app.add_option("--generate-prompt", flags.prompt_file, "stage 0: the prompt's token ids (little-endian uint16)");
  app.add_option("--generate-out", flags.stage.generate.out_file,
                 "stage 0: where the generated token ids go (little-endian uint16)");
  app.add_option("--temperature", flags.stage.generate.temperature, "generation: sampling temperature (0 = greedy)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--top-k", flags.stage.generate.top_k, "generation: sample among the k most likely tokens (0 = all)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--sample-seed", flags.stage.generate.seed, "generation: the sampling seed")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    return RunShardd(std::move(flags));
  } catch (const shardguard::JobSpecError& e) {
    shardguard::log::error("invalid job", {{"file", flags.job_file}, {"error", e.what()}});
    std::cerr << "shardd: invalid job " << flags.job_file << ":\n" << e.what() << "\n";
    return 2;
  } catch (const shardguard::model::PackageError& e) {
    // Its own status: retrying cannot help (the operator fails the job, naming the shard).
    shardguard::log::error("package refused", {{"error", e.what()}});
    std::cerr << "shardd: package refused: " << e.what() << "\n";
    return shardguard::model::kExitPackageRefused;
  } catch (const shardguard::model::PackageUnavailable& e) {
    // Not a refusal: the pod fails like any other and is recreated (backoffLimit).
    shardguard::log::error("package unavailable", {{"error", e.what()}});
    std::cerr << "shardd: " << e.what() << "\n";
    return shardguard::model::kExitPackageUnavailable;
  } catch (const std::exception& e) {
    shardguard::log::error("cannot start", {{"error", e.what()}});
    std::cerr << "shardd: " << e.what() << "\n";
    return 2;
  }
}
