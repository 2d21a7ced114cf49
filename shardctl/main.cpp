// shardctl: the user's CLI. Flags are parsed here; each subcommand is a Run…()
// function of the shardctl library.
#include <unistd.h>

#include <CLI/CLI.hpp>

#include "shardguard/common/log.h"
#include "shardguard/shardctl/commands.h"
#include "shardguard/shardctl/local_run.h"
#include "shardguard/shardd/threads.h"

int main(int argc, char** argv) {
  using namespace shardguard::shardctl;
  shardguard::log::set_component("shardctl");
  CLI::App app{"shardctl: run, plan and inspect ShardGuard sharded training jobs"};
  app.require_subcommand(1);

  LocalRunOptions run;
  auto* run_cmd = app.add_subcommand("run", "run a ShardedTrainingJob on this machine, one shardd process per shard");
  run_cmd->add_option("job", run.job_file, "ShardedTrainingJob YAML file")->required();
  run_cmd->add_option("--workdir", run.workdir, "keys, checkpoints and logs (default .shardguard/<job>)");
  run_cmd->add_option("--device", run.device, "auto | cpu | cuda")->capture_default_str();
  run_cmd->add_flag("--resume", run.resume, "continue from the checkpoints in the workdir");
  run_cmd->add_flag("--fresh", run.fresh, "delete the workdir's checkpoints and start over");
  run_cmd->add_option("--threads", run.threads, "compute threads per shard process (default: cores / shards)");
  run_cmd->add_option("--shardd", run.shardd, "path of the shardd binary (default: next to shardctl)");
  run_cmd->add_option("--peer-timeout", run.peer_timeout_s, "seconds a shard waits for a neighbour")
      ->capture_default_str();

  std::string plan_job;
  auto* plan_cmd = app.add_subcommand("plan", "validate a job and print how it is cut into shards");
  plan_cmd->add_option("job", plan_job, "ShardedTrainingJob YAML file")->required();

  RecombineOptions rec;
  int rec_threads = 0;
  auto* rec_cmd = app.add_subcommand("recombine", "assemble the whole model from every shard's checkpoint and evaluate it");
  rec_cmd->add_option("job", rec.job_file, "ShardedTrainingJob YAML file")->required();
  rec_cmd->add_option("--checkpoints", rec.checkpoint_dir, "directory of the shards' checkpoints")->required();
  rec_cmd->add_option("--keys", rec.key_dir, "directory of the shards' key files shard-<i>.key")->required();
  rec_cmd->add_option("--device", rec.device, "auto | cpu | cuda")->capture_default_str();
  rec_cmd->add_option("--threads", rec_threads, "compute threads");

  CLI11_PARSE(app, argc, argv);
  if (*run_cmd) {
    run.progress_tty = ::isatty(STDOUT_FILENO) != 0;
    return RunLocal(run);
  }
  if (*plan_cmd) return RunPlan(plan_job);
  if (*rec_cmd) {
    shardguard::shardd::set_compute_threads(rec_threads);
    return RunRecombine(rec);
  }
  return 2;
}
