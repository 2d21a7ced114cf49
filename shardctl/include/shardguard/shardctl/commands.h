// shardctl's torch-free subcommands other than `run` (see local_run.h) and
// `study --report-only` (study_report.h); recombine and study are in torch_commands.h. Each returns the
// process exit code and prints its own errors.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace shardguard::shardctl {

// `shardctl plan JOB.yaml`: validates the job and prints its partition.
// risk_csv: a study's results.csv; adds the worst R one untrusted principal can reach.
// package_keys: a spec.model.package.url job's keys directory (its manifest.json gives the cut).
int RunPlan(const std::string& job_file, const std::string& risk_csv = "", const std::string& package_keys = "");

// ---- shardctl pki (pki_cmd.cpp) ----------------------------------------------

// Parses a duration of one or more <digits><unit> parts, unit h, m or s
// ("24h", "90m", "3600s", "1h30m"). Must be positive. Throws std::invalid_argument
// whose message names `flag` and the value.
std::chrono::seconds ParseDuration(const std::string& flag, const std::string& value);

// `shardctl pki init`: creates the job CA as DIR/ca.crt (0644) and DIR/ca.key (0600).
// Exit 0 done, 1 refused (CA exists without force, I/O error), 2 bad input.
struct PkiInitOptions {
  std::string dir;
  std::string trust_domain = "shardguard.local";
  std::string ns = "default";
  std::string job;
  std::string lifetime = "720h";
  bool force = false;
};
int RunPkiInit(const PkiInitOptions& options);

// `shardctl pki issue`: a leaf SVID for one shard (shard >= 0) or the exporter,
// written as OUT/<shard-N|exporter>.crt (0644) and .key (0600), OUT defaulting to DIR.
// Exit 0 done, 1 no CA / I/O or signing error, 2 bad input.
struct PkiIssueOptions {
  std::string dir;
  int64_t shard = -1;  // -1: not given
  bool exporter = false;
  std::string job;
  std::string ns = "default";
  std::string trust_domain = "shardguard.local";
  std::string lifetime = "24h";
  std::string out_dir;  // "" = dir
};
int RunPkiIssue(const PkiIssueOptions& options);

// `shardctl pki verify --ca CA CERT`: prints the SPIFFE ID (exit 0) or the refusal
// reason (exit 1); unreadable files exit 2. role: "client" (default) or "server".
struct PkiVerifyOptions {
  std::string ca_file;
  std::string cert_file;
  std::string role = "client";
};
int RunPkiVerify(const PkiVerifyOptions& options);

// ---- shardctl explain (explain_cmd.cpp) ---------------------------------------

// Decides one call against a policy file, or against the policy pipeline_policy
// derives for shard `shard` of a ShardedTrainingJob. Prints ALLOW or DENY, the
// rule and the reason. Exit 0 allow, 1 deny, 2 bad input (invalid policy or job,
// listed with their paths).
struct ExplainOptions {
  std::string policy_file;  // exactly one of policy_file and job_file
  std::string job_file;
  int64_t shard = -1;       // required with job_file
  int64_t export_budget_bytes = 0;  // job_file only: budget of each export principal
  std::string peer;
  std::string method;
  std::string direction = "ingress";  // ingress | egress
  bool show_policy = false;           // also print the policy as JSON
};
int RunExplain(const ExplainOptions& options);

// ---- shardctl render (render_cmd.cpp) -----------------------------------------

// Prints the Kubernetes objects the operator would create for a job, from the
// operator's render(): the job is validated as the operator validates it, then a
// fresh job CA, per-shard leaf SVIDs and 32-byte checkpoint keys and a random uid
// stand in for what the operator and the API server would make. Output: a YAML
// stream (one document per object) or a JSON List, on stdout or into out_file
// (mode 0600, as it holds private keys). Exit 0 done, 1 the operator would refuse
// the job (e.g. a stage above maxExposure) or I/O error, 2 bad input (invalid job,
// every error with its field and value; unknown format).
struct RenderOptions {
  std::string job_file;
  std::string out_file;         // "" = stdout
  std::string format = "yaml";  // yaml | json
  int64_t export_budget_bytes = 0;  // as the operator's --export-budget-bytes
  // Used when the job names no image, as the operator's flags of the same names.
  std::string shardd_image;
  std::string sidecar_image;
  std::string package_keys;  // a package job: the keys directory ("" = <spec.model.package.path>.keys)
};
int RunRender(const RenderOptions& options);

// The YAML stream render prints: "---" before each document, block style, strings
// quoted whenever a YAML 1.1 or 1.2 reader could take them for something else.
std::string ToYamlStream(const std::vector<nlohmann::json>& documents);

// `shardctl audit verify FILE`: checks a sidecar audit log's hash chain; prints
// the number of lines, or the first bad line and why. 0 intact, 1 broken, 2 unreadable.
int RunAuditVerify(const std::string& path);

// ---- shardctl data tokens (data_cmd.cpp) --------------------------------------

// `shardctl data tokens TEXT... --out DIR`: a token dataset (common/token_file.h)
// from text files, one token per byte (vocab 256). Each input is a file or a
// directory (its regular files, sorted; symbolic links and files holding a NUL byte
// are skipped). Every file is split on its own: the first (1 - validation) of its
// bytes, cut after a newline where there is one near, go to train.tokens, the rest
// to validation.tokens. Exit 0 done, 1 I/O error, 2 bad input.
struct DataTokensOptions {
  std::vector<std::string> inputs;
  std::string out;
  double validation = 0.1;
  std::size_t max_bytes = std::size_t{1} << 31;  // all inputs together
};
int RunDataTokens(const DataTokensOptions& options);

}  // namespace shardguard::shardctl
