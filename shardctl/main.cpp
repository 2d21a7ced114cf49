// shardctl: the user's CLI. Flags are parsed here; each subcommand is a Run…()
// function of the shardctl library.
#include <unistd.h>

#include <cstdio>

#include <CLI/CLI.hpp>

#include "shardguard/common/log.h"
#include "shardguard/operator/render.h"
#include "shardguard/shardctl/commands.h"
#include "shardguard/shardctl/local_run.h"
#include "shardguard/shardctl/study_report.h"
#include "shardguard/shardctl/torch_commands.h"
#ifdef SHARDCTL_WITH_TORCH
#include "shardguard/shardd/threads.h"
#endif

namespace {

// recombine, split and training studies need LibTorch; a shardctl built without it
// (SHARDGUARD_WITH_TORCH=OFF, e.g. the sanitizer tree) says so instead.
[[maybe_unused]] int without_torch(const char* what) {
  std::fprintf(stderr,
               "shardctl %s: this shardctl was built without LibTorch (SHARDGUARD_WITH_TORCH=OFF); "
               "use a build with LibTorch\n",
               what);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace shardguard::shardctl;
  shardguard::log::set_component("shardctl");
  CLI::App app{"shardctl: run, plan and inspect ShardGuard sharded training jobs"};
  app.require_subcommand(1);

  LocalRunOptions run;
  auto* run_cmd = app.add_subcommand("run", "run a ShardedTrainingJob on this machine: per shard, shardd behind its mTLS sidecar");
  run_cmd->add_option("job", run.job_file, "ShardedTrainingJob YAML file")->required();
  run_cmd->add_option("--workdir", run.workdir, "keys, checkpoints and logs (default .shardguard/<job>)");
  run_cmd->add_option("--device", run.device, "auto | cpu | cuda")->capture_default_str();
  run_cmd->add_option("--package-keys", run.package_keys,
                      "a job with spec.model.package: the package keys shard-<i>.key (shardctl split --keys; "
                      "default <spec.model.package.path>.keys; required with spec.model.package.url, and then "
                      "holding manifest.json too), the local stand-in for its keysSecret");
  run_cmd->add_flag("--resume", run.resume, "continue from the checkpoints in the workdir");
  run_cmd->add_flag("--fresh", run.fresh, "delete the workdir's checkpoints and start over");
  run_cmd->add_option("--threads", run.threads, "compute threads per shard process (default: cores / shards)");
  run_cmd->add_option("--shardd", run.shardd, "path of the shardd binary (default: next to shardctl)");
  run_cmd->add_option("--sidecar", run.sidecar, "path of the shard-sidecar binary (default: next to shardctl)");
  run_cmd->add_flag("--prometheus", run.prometheus,
                    "also run Prometheus (Debian package) scraping every shardd and sidecar; the report adds "
                    "the exposure it reads back with PromQL");
  run_cmd->add_option("--prometheus-bin", run.prometheus_bin, "the prometheus binary (name in PATH, or a path)")
      ->capture_default_str();
  run_cmd->add_option("--prometheus-port", run.prometheus_port, "Prometheus' port on 127.0.0.1 (default: a free one)")
      ->check(CLI::Range(0, 65535));
  run_cmd->add_option("--export-budget", run.export_budget_bytes,
                      "bytes each export principal of spec.protection.export may read per shard (as the "
                      "operator's --export-budget-bytes)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  run_cmd->add_option("--peer-timeout", run.peer_timeout_s, "seconds a shard waits for a neighbour")
      ->capture_default_str();

  // `shardctl generate`: the same processes as run, generating from the newest checkpoints.
  LocalRunOptions gen;
  gen.generate.emplace();
  auto* gen_cmd = app.add_subcommand(
      "generate", "generate text with a trained language model through the pipeline: per shard, shardd behind its "
                  "mTLS sidecar, each restoring its own newest checkpoint; the text goes to stdout");
  gen_cmd->add_option("job", gen.job_file, "ShardedTrainingJob YAML file (architecture gpt, or torchscript on tokens)")
      ->required();
  gen_cmd->add_option("--workdir", gen.workdir, "the run's workdir (default .shardguard/<job>)");
  gen_cmd->add_option("--prompt", gen.generate->prompt, "the text to continue (its bytes are the first tokens)")
      ->required();
  gen_cmd->add_option("--tokens", gen.generate->tokens, "how many tokens to generate (1..100000)")->required();
  gen.generate->temperature = 0.8;
  gen_cmd->add_option("--temperature", gen.generate->temperature, "sampling temperature (0 = greedy)")
      ->capture_default_str();
  gen_cmd->add_option("--top-k", gen.generate->top_k, "sample among the k most likely tokens (0 = every token)")
      ->capture_default_str();
  gen_cmd->add_option("--seed", gen.generate->seed, "sampling seed: the same seed gives the same text")
      ->capture_default_str();
  gen_cmd->add_option("--out", gen.generate->out_file,
                      "also write the generated token ids here (little-endian uint16, as `shardctl data tokens`)");
  gen_cmd->add_option("--device", gen.device, "auto | cpu | cuda")->capture_default_str();
  gen_cmd->add_option("--threads", gen.threads, "compute threads per shard process (default: cores / shards)");
  gen_cmd->add_option("--package-keys", gen.package_keys,
                      "a job with spec.model.package: the package keys (default <spec.model.package.path>.keys)");
  gen_cmd->add_option("--shardd", gen.shardd, "path of the shardd binary (default: next to shardctl)");
  gen_cmd->add_option("--sidecar", gen.sidecar, "path of the shard-sidecar binary (default: next to shardctl)");
  gen_cmd->add_option("--peer-timeout", gen.peer_timeout_s, "seconds a shard waits for a neighbour")
      ->capture_default_str();

  std::string plan_job;
  auto* plan_cmd = app.add_subcommand("plan", "validate a job and print how it is cut into shards");
  plan_cmd->add_option("job", plan_job, "ShardedTrainingJob YAML file")->required();
  std::string plan_risk;
  plan_cmd->add_option("--risk", plan_risk,
                       "a study's results.csv: also print the worst R one untrusted principal can reach");
  std::string plan_package_keys;
  plan_cmd->add_option("--package-keys", plan_package_keys,
                       "a job with spec.model.package.url: the keys directory of shardctl split, whose "
                       "manifest.json gives the cut");

  RenderOptions render;
  auto* render_cmd = app.add_subcommand("render", "print the Kubernetes objects the operator would create for a job");
  render_cmd->add_option("job", render.job_file, "ShardedTrainingJob YAML file")->required();
  render_cmd->add_option("--out", render.out_file, "write them to this file (mode 0600) instead of stdout");
  render_cmd->add_option("--format", render.format, "yaml (one document per object) | json (a List)")
      ->check(CLI::IsMember({"yaml", "json"}))
      ->capture_default_str();
  render_cmd->add_option("--export-budget", render.export_budget_bytes,
                         "bytes each export principal may read per shard, written into each policy (as the "
                         "operator's --export-budget-bytes)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  render.shardd_image = shardguard::op::kDefaultShardImage;
  render.sidecar_image = shardguard::op::kDefaultSidecarImage;
  render_cmd->add_option("--shardd-image", render.shardd_image, "shardd image when spec.template.image is empty (as the operator's flag)")
      ->capture_default_str();
  render_cmd->add_option("--sidecar-image", render.sidecar_image, "sidecar image when spec.sidecar.image is empty (as the operator's flag)")
      ->capture_default_str();
  render_cmd->add_option("--package-keys", render.package_keys,
                         "a job with spec.model.package: the package keys shard-<i>.key (default "
                         "<spec.model.package.path>.keys; required with spec.model.package.url, with manifest.json), "
                         "put as the operator puts them from its keysSecret");

  RecombineOptions rec;
  int rec_threads = 0;
  auto* rec_cmd = app.add_subcommand("recombine", "assemble the whole model from every shard's checkpoint and evaluate it");
  rec_cmd->add_option("job", rec.job_file, "ShardedTrainingJob YAML file")->required();
  rec_cmd->add_option("--checkpoints", rec.checkpoint_dir, "directory of the shards' checkpoints")->required();
  rec_cmd->add_option("--keys", rec.key_dir, "directory of the shards' key files shard-<i>.key")->required();
  rec_cmd->add_option("--device", rec.device, "auto | cpu | cuda")->capture_default_str();
  rec_cmd->add_option("--threads", rec_threads, "compute threads");
  rec_cmd->add_option("--package", rec.package_dir,
                      "a split TorchScript model's package directory (shardctl split --out): rebuild it with the "
                      "checkpoints' weights");
  rec_cmd->add_option("--package-keys", rec.package_key_dir, "the package keys (shardctl split --keys)");
  rec_cmd->add_option("--out", rec.out_file, "with --package: write the fine-tuned TorchScript model here");
  rec_cmd->add_option("--prompt", rec.prompt,
                      "a language model: also generate from this text with the whole model in this process (the "
                      "monolithic counterpart of shardctl generate)");
  rec_cmd->add_option("--tokens", rec.tokens, "with --prompt: how many tokens")->capture_default_str();
  rec_cmd->add_option("--temperature", rec.temperature, "with --prompt: sampling temperature (0 = greedy)")
      ->capture_default_str();
  rec_cmd->add_option("--top-k", rec.top_k, "with --prompt: sample among the k most likely tokens (0 = all)")
      ->capture_default_str();
  rec_cmd->add_option("--seed", rec.seed, "with --prompt: sampling seed")->capture_default_str();
  rec_cmd->add_option("--tokens-out", rec.tokens_out,
                      "with --prompt: also write the generated token ids here (little-endian uint16)");

  SplitOptions split;
  auto* split_cmd = app.add_subcommand(
      "split", "cut a TorchScript model into one encrypted package per shard, a manifest and per-shard keys");
  split_cmd->add_option("model", split.model_file, "TorchScript archive (torch.jit.script(...).save)")->required();
  split_cmd->add_option("--job", split.job_file, "ShardedTrainingJob YAML file: its sharding and dataset")->required();
  split_cmd->add_option("--out", split.out_dir,
                        "new directory for manifest.json and shard-<i>.sgpkg (default: the job's spec.model.package.path)");
  split_cmd->add_option("--keys", split.key_dir, "new directory for the per-shard keys shard-<i>.key (default OUT.keys)");
  split_cmd->add_option("--blocks", split.attribute,
                        "the model's attribute holding the blocks (default: its only nn.Sequential/nn.ModuleList)");

  auto* pki_cmd = app.add_subcommand("pki", "create a job CA and leaf certificates (SPIFFE X509-SVIDs) for local use");
  pki_cmd->require_subcommand(1);
  PkiInitOptions pki_init;
  auto* init_cmd = pki_cmd->add_subcommand("init", "create the job CA: DIR/ca.crt and DIR/ca.key (0600)");
  init_cmd->add_option("--dir", pki_init.dir, "directory of the CA files")->required();
  init_cmd->add_option("--job", pki_init.job, "job name (metadata.name)")->required();
  init_cmd->add_option("--trust-domain", pki_init.trust_domain, "SPIFFE trust domain")->capture_default_str();
  init_cmd->add_option("--namespace", pki_init.ns, "job namespace")->capture_default_str();
  init_cmd->add_option("--lifetime", pki_init.lifetime, "CA validity, e.g. 720h, 90m, 3600s")->capture_default_str();
  init_cmd->add_flag("--force", pki_init.force, "replace an existing CA (certificates it issued stop verifying)");

  PkiIssueOptions pki_issue;
  auto* issue_cmd = pki_cmd->add_subcommand("issue", "issue a leaf certificate for one shard or the exporter");
  issue_cmd->add_option("--dir", pki_issue.dir, "directory of the CA files (from pki init)")->required();
  auto* shard_opt = issue_cmd->add_option("--shard", pki_issue.shard, "shard index: writes shard-N.crt/.key")
                        ->check(CLI::NonNegativeNumber);
  auto* exporter_flag = issue_cmd->add_flag("--exporter", pki_issue.exporter, "the export principal: writes exporter.crt/.key");
  shard_opt->excludes(exporter_flag);
  exporter_flag->excludes(shard_opt);
  issue_cmd->add_option("--job", pki_issue.job, "job name (metadata.name)")->required();
  issue_cmd->add_option("--namespace", pki_issue.ns, "job namespace")->capture_default_str();
  issue_cmd->add_option("--trust-domain", pki_issue.trust_domain, "SPIFFE trust domain")->capture_default_str();
  issue_cmd->add_option("--lifetime", pki_issue.lifetime, "leaf validity, e.g. 24h, 90m, 3600s")->capture_default_str();
  issue_cmd->add_option("--out-dir", pki_issue.out_dir, "where the leaf files go (default: --dir)");

  PkiVerifyOptions pki_verify;
  auto* verify_cmd = pki_cmd->add_subcommand("verify", "check a certificate as an X509-SVID of the CA; prints its SPIFFE ID");
  verify_cmd->add_option("--ca", pki_verify.ca_file, "CA certificate file (PEM)")->required();
  verify_cmd->add_option("cert", pki_verify.cert_file, "leaf certificate file (PEM)")->required();
  verify_cmd->add_option("--role", pki_verify.role, "check the EKU for a client or a server")
      ->check(CLI::IsMember({"client", "server"}))
      ->capture_default_str();

  ExplainOptions explain;
  auto* explain_cmd = app.add_subcommand("explain", "print what the sidecar's policy decides for a peer and a method");
  auto* policy_opt = explain_cmd->add_option("--policy", explain.policy_file, "policy JSON file");
  auto* job_opt = explain_cmd->add_option("--job", explain.job_file, "ShardedTrainingJob YAML: use the policy the operator would render");
  policy_opt->excludes(job_opt);
  job_opt->excludes(policy_opt);
  auto* explain_shard_opt = explain_cmd->add_option("--shard", explain.shard, "with --job: the shard whose policy to use")
                                ->check(CLI::NonNegativeNumber);
  explain_shard_opt->needs(job_opt);
  job_opt->needs(explain_shard_opt);
  explain_cmd->add_option("--export-budget", explain.export_budget_bytes,
                          "with --job: byte budget of each export principal")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  explain_cmd->add_option("--peer", explain.peer, "the caller's (ingress) or callee's (egress) SPIFFE ID")->required();
  explain_cmd->add_option("--method", explain.method, "gRPC method path, e.g. /shardguard.v1.Pipeline/Forward")->required();
  explain_cmd->add_option("--direction", explain.direction, "ingress | egress")
      ->check(CLI::IsMember({"ingress", "egress"}))
      ->capture_default_str();
  explain_cmd->add_flag("--show-policy", explain.show_policy, "also print the policy as JSON");

  std::string audit_file;
  auto* audit_cmd = app.add_subcommand("audit", "inspect a sidecar audit log");
  audit_cmd->require_subcommand(1);
  auto* audit_verify_cmd = audit_cmd->add_subcommand("verify", "check that no line was edited, dropped or reordered");
  audit_verify_cmd->add_option("file", audit_file, "audit log (JSON lines)")->required();

  StudyOptions study;
  int study_threads = 1;
  auto* study_cmd = app.add_subcommand("study", "exposure study: how much of a sharded model an attacker recovers from the shards it holds");
  study_cmd->add_option("--job", study.job_files, "ShardedTrainingJob YAML (one per model; repeat for cnn and vit)")->required();
  study_cmd->add_option("--out", study.out_dir, "output directory: results.csv (resumable), results.md, plot-<model>.png")->required();
  study_cmd->add_option("--rows", study.rows, "attacker rows: none, all, s<i>[+<j>..], sw<i>, single, pair, triple, sandwich, default")
      ->capture_default_str();
  study_cmd->add_option("--attacks", study.attacks, "attacks: A1-frozen, A1-lowlr, A2, A3, A4 (the query attacker; only when named)")->capture_default_str();
  study_cmd->add_option("--queries", study.queries, "A4: query budgets (victim evaluations per cell)")->capture_default_str();
  study_cmd->add_option("--a4-samples", study.a4_samples, "A4: the attacker's labelled samples (0 = data-free)")->capture_default_str();
  study_cmd->add_option("--samples", study.samples, "attacker's labelled samples (columns; a language model: training windows of context + 1 tokens)")->capture_default_str();
  study_cmd->add_option("--seeds", study.seeds, "seeds per cell")->capture_default_str();
  study_cmd->add_option("--first-seed", study.first_seed, "first seed")->capture_default_str();
  study_cmd->add_option("--steps", study.steps, "training steps of every attack and scratch run")->capture_default_str();
  study_cmd->add_option("--fit-steps", study.fit_steps,
                        "A2, A3: steps of the first phase (substitute, fit), within --steps (0 = half)")
      ->capture_default_str();
  study_cmd->add_option("--scratch-runs", study.scratch_runs, "scratch controls per size and seed (R uses their mean)")
      ->capture_default_str();
  study_cmd->add_option("--val-samples", study.val_samples,
                        "validation images per seed, from the training set, that the best attack per row is chosen on")
      ->capture_default_str();
  study_cmd->add_option("--batch", study.batch_size, "attacker's batch size")->capture_default_str();
  study_cmd->add_option("--lr", study.learning_rate, "attacker's Adam learning rate")->capture_default_str();
  study_cmd->add_option("--low-lr-factor", study.low_lr_factor, "A1-lowlr: known shards at lr times this")->capture_default_str();
  study_cmd->add_option("--test-samples", study.test_samples, "test subset for accuracy and fidelity (0 = all)")
      ->capture_default_str();
  study_cmd->add_option("--victim-samples", study.victim_train_samples, "victim's training samples (0 = all)")
      ->capture_default_str();
  study_cmd->add_option("--victim-epochs", study.victim_epochs, "victim's epochs (0 = the job's)")->capture_default_str();
  study_cmd->add_option("--checkpoints", study.checkpoint_dir, "load the victim from these shard checkpoints (one --job)");
  study_cmd->add_option("--keys", study.key_dir, "with --checkpoints: directory of the shard-<i>.key files");
  study_cmd->add_flag("--quick", study.quick, "tiny cells: 1 seed, sizes 60,600, 200 steps of 32, 2 scratch runs, 1000 test and 1000 validation samples, victim 2 epochs of 30000");
  study_cmd->add_flag("--report-only", study.report_only, "rewrite results.md and the plots from results.csv");
  study_cmd->add_flag("--no-plots", study.no_plots, "skip gnuplot");
  study_cmd->add_option("--threads", study_threads, "compute threads")->capture_default_str();

  DataTokensOptions data_tokens;
  auto* data_cmd = app.add_subcommand("data", "prepare datasets");
  data_cmd->require_subcommand(1);
  auto* tokens_cmd = data_cmd->add_subcommand(
      "tokens", "make a token dataset (train.tokens, validation.tokens; one token per byte) from text files");
  tokens_cmd->add_option("text", data_tokens.inputs, "text files, or directories of them")->required();
  tokens_cmd->add_option("--out", data_tokens.out, "directory for the token files (spec.dataset.path)")->required();
  tokens_cmd->add_option("--validation", data_tokens.validation, "share of each file that goes to validation")
      ->capture_default_str();

  CLI11_PARSE(app, argc, argv);
  if (*data_cmd) return RunDataTokens(data_tokens);
  if (*audit_cmd) return RunAuditVerify(audit_file);
  if (*pki_cmd) {
    if (*init_cmd) return RunPkiInit(pki_init);
    if (*issue_cmd) return RunPkiIssue(pki_issue);
    if (*verify_cmd) return RunPkiVerify(pki_verify);
    return 2;
  }
  if (*explain_cmd) return RunExplain(explain);
  if (*run_cmd) {
    run.progress_tty = ::isatty(STDOUT_FILENO) != 0;
    return RunLocal(run);
  }
  if (*gen_cmd) return RunLocal(gen);
  if (*plan_cmd) return RunPlan(plan_job, plan_risk, plan_package_keys);
  if (*render_cmd) return RunRender(render);
  if (*rec_cmd) {
#ifdef SHARDCTL_WITH_TORCH
    shardguard::shardd::set_compute_threads(rec_threads);
    return RunRecombine(rec);
#else
    (void)rec_threads;
    return without_torch("recombine");
#endif
  }
  if (*split_cmd) {
#ifdef SHARDCTL_WITH_TORCH
    return RunSplit(split);
#else
    return without_torch("split");
#endif
  }
  if (*study_cmd) {
    if (study.report_only) return RunStudyReport(study);
#ifndef SHARDCTL_WITH_TORCH
    (void)study_threads;
    return without_torch("study (without --report-only)");
#else
    shardguard::shardd::set_compute_threads(study_threads);
    if (study.quick) {
      std::vector<std::string> given;
      for (const char* f : {"--seeds", "--samples", "--queries", "--steps", "--fit-steps", "--batch", "--scratch-runs",
                            "--test-samples", "--val-samples", "--victim-samples", "--victim-epochs"}) {
        if (study_cmd->count(f) > 0) given.push_back(f);
      }
      apply_quick(study, given);
    }
    study.progress_tty = ::isatty(STDOUT_FILENO) != 0;
    return RunStudy(study);
#endif
  }
  return 2;
}
