// `shardctl study`: the exposure study of issue 7 — how much of a sharded model an
// attacker recovers from the shards it holds (or the stage traffic it observes),
// against how much of the model that is (exposure, DESIGN.md §5).
//
// Two halves. This header is the plan and the report (study_report.cpp, in the
// torch-free shardguard_shardctl library): rows, their exposure, the cells, CSV
// lines, the aggregation into R, the Markdown tables and plots, and `--report-only`,
// tested without LibTorch (and under the sanitizers). The runner (study.h,
// study.cpp, in shardguard_shardctl_torch) trains the victim and the attacks with
// LibTorch and appends one CSV line per finished cell, so that an interrupted study
// resumes by skipping the cells already in the CSV.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "shardguard/common/files.h"
#include "shardguard/common/jobspec.h"
#include "shardguard/model/partition.h"

namespace shardguard::shardctl {

// Bad input to the study: the message names the flag and the value.
class StudyError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// ---- the plan (pure) ----------------------------------------------------------

// One attacker setting (a row of the table).
struct StudyRow {
  std::string name;       // "none", "s1", "s0+1", "s0+1+3", "all", "sw1"
  std::vector<int> held;  // stages whose parameters the attacker holds, ascending
  int sandwiched = -1;    // sandwich rows: the stage whose input and output it observes
};

// Every row of the study for n stages, in table order: none; each single stage;
// each contiguous pair; each n-1 of n; all; and the sandwich of each interior
// stage i (the attacker holds stages i-1 and i+1, as in DESIGN.md §5).
std::vector<StudyRow> default_rows(int stages);

// Resolves a --rows list (comma-separated). Entries: a row name ("s2", "s0+1",
// "sw1", "none", "all") or a group ("single", "pair", "triple" = every n-1 of n,
// "sandwich", "default" = all of default_rows). Any stage set may be named
// ("s0+2"), in any order; duplicates are dropped. Throws StudyError naming
// --rows and the entry for an unknown name, an out-of-range stage or a sandwich
// of a stage without two neighbours.
std::vector<StudyRow> parse_rows(const std::string& list, int stages);

// Exposure of a row per DESIGN.md §5 (model/exposure.h, as the operator computes
// it): Σ shares of held ∪ sandwiched stages, a stage both of whose neighbours are
// held counting as sandwiched.
double row_exposure(const StudyRow& row, const std::vector<double>& stage_shares);

// The attacks of a row. Controls "scratch" and "victim" are separate cells (row
// "-"). A1 fine-tune: known shards loaded, "A1-frozen" keeps them fixed,
// "A1-lowlr" trains them at a tenth of the learning rate; unknown shards random.
// "A2" substitute: unknown shards from the attacker's own model trained from
// scratch for the first part of the budget, then fine-tuned with the known ones
// frozen for the rest. "A3" (sandwich rows only): the sandwiched stage fitted to
// the recorded (input, output) activation pairs, the stages still unknown then
// trained as in A1-frozen for the rest of the budget (attack_phases).
// Rows where an attack would repeat another exactly are left out: none has only
// A1-frozen (nothing is known, so frozen = lower LR, and A2 = more scratch).
// "A4" (issue 19): the query attacker (a4_config below) — every row, `none` being
// the pure black-box control; its cells have a query budget (CellResult::queries).
std::vector<std::string> row_attacks(const StudyRow& row, int stages, const std::vector<std::string>& wanted);

inline const std::vector<std::string>& all_attacks() {
  static const std::vector<std::string> kAll{"A1-frozen", "A1-lowlr", "A2", "A3", "A4"};
  return kAll;
}

// A4, the data-free query attacker (DFME / MAZE style, docs/exposure-study.md "A4").
// Per round: one generator step on `batch` images G(z) (ascend the substitute–victim
// disagreement, plus `balance` × the class balance of the substitute's predictions),
// its gradient through the victim estimated by forward differences along `directions` random unit directions
// per image (batch × (1 + directions) queries), then `substitute_steps` substitute
// steps, each on `batch` fresh generated images (batch queries) plus `batch` replayed
// past queries. Rounds run while a whole round fits the query budget.
struct A4Config {
  int64_t batch = 64;
  int64_t directions = 1;
  double epsilon = 1e-3;          // forward-difference step, in normalised pixel units
  int64_t substitute_steps = 5;   // per generator step
  int64_t z_dim = 32;
  double substitute_lr = 1e-3;    // Adam, cosine-decayed to 0 over the rounds
  double generator_lr = 1e-3;     // Adam, constant
  double balance = 1.0;           // weight of the class-balance term of the generator's loss
  int64_t replay = 50000;         // past queries kept for replay (the latest)
  int64_t queries_per_round() const { return batch * (1 + directions) + substitute_steps * batch; }
  // Rounds a budget buys (whole rounds only).
  int64_t rounds(int64_t queries) const { return queries / queries_per_round(); }
};
inline const A4Config& a4_config() {
  static const A4Config kConfig;
  return kConfig;
}

// One phase of a cell's training: what is trained, and for how many steps.
struct StudyPhase {
  std::string what;  // "train" (cross-entropy on the attacker's samples), "substitute" (A2's own model from
                     // scratch), "fit" (A3: the sandwiched stage to its boundary activations, mean squared error)
  int64_t steps = 0;
};

// The training budget of a cell, phase by phase. Every attack and every scratch run
// gets the same total, `steps` optimiser steps of the attacker's batch: scratch,
// A1-frozen and A1-lowlr one phase of `steps`; A2 and A3 a first phase of
// `first_phase` steps (0: half of `steps`, rounded down) and a second of the rest.
// Throws StudyError naming --fit-steps when the first phase leaves no step for the
// second. Victim cells (and `all` rows, where nothing is unknown) train nothing.
std::vector<StudyPhase> attack_phases(const std::string& attack, int64_t steps, int64_t first_phase);

// Scratch controls: `runs` per (model, size, seed), named "scratch" (the first, as
// in a CSV of the first study) and "scratch-2" … "scratch-<runs>".
std::string scratch_run_name(int run);
bool is_scratch(const std::string& attack);

// Parses "60,600,6000" (positive integers). Throws StudyError naming `flag`.
std::vector<int64_t> parse_sizes(const std::string& flag, const std::string& list);

// One measured cell: one line of the CSV.
struct CellResult {
  std::string model;      // architecture of the job
  std::string row;        // row name, or "-" for the controls
  std::string held;       // "0+1" ("" for none and controls)
  double exposure = 0;
  std::string attack;     // A1-frozen | A1-lowlr | A2 | A3 | scratch | victim
  int64_t samples = 0;    // attacker's labelled samples
  int seed = 0;
  double accuracy = 0;    // on the test subset
  double fidelity = 0;    // top-1 agreement with the victim on the test subset
  double wall_seconds = 0;
  // Accuracy on the validation images (training-set images no attacker of that seed
  // trains on): what the best attack per row is chosen on. NaN in a CSV of the first
  // study, which had no validation split.
  double val_accuracy = std::numeric_limits<double>::quiet_NaN();
  // A4: the query budget (the victim's evaluations, forward differences included);
  // 0 for every other attack and the controls. A CSV line carries it as a 12th field,
  // on A4 lines only (the other lines keep the 11 — or the first study's 10 — fields).
  int64_t queries = 0;
  // A language model (spec.dataset.format tokens, the gpt): `samples` counts training
  // windows of context + 1 tokens, accuracy and fidelity are per predicted token, and
  // these are the mean next-token cross-entropy in nats per token on the test windows
  // (validation.tokens) and on the seed's validation windows (training windows no
  // attacker of that seed trains on). Its R is on the loss (lower is better; see
  // aggregate). NaN for the image models, whose lines do not carry them: a language
  // model's line carries them as fields 13 and 14 (field 12, queries, then empty).
  double loss = std::numeric_limits<double>::quiet_NaN();
  double val_loss = std::numeric_limits<double>::quiet_NaN();
  bool on_loss() const { return loss == loss; }  // a language model's cell (loss not NaN)
  std::string key() const;  // model|row|attack|samples|seed, and |q<queries> for A4
};

std::string csv_header();

// Sets each cell's exposure from its holding (`held`, "0+2") and its model's stage
// shares, by the one exposure function (model/exposure.h). Cells of models missing
// from `shares` and the controls (row "-") are left as they are. Returns how many
// changed: a CSV written before the study counted implicit sandwiches is restated.
int restate_exposure(std::vector<CellResult>& cells, const std::map<std::string, std::vector<double>>& shares);
std::string to_csv_line(const CellResult& cell);
// The lines parse_csv left out (empty lines are not counted): how many are not results,
// the first of them as "line N: why", and the number of a last line without its newline.
struct CsvSkipped {
  int lines = 0;
  std::string first;
  int cut_short = 0;
  bool any() const { return lines > 0 || cut_short > 0; }
};
// Parses the CSV text (header line first); a line that is not a result (wrong field
// count, a field that is not a number, a measurement that is not finite, an exposure
// outside [0, 1], a negative count, an empty model, row or attack, a second header) is
// skipped and counted in `skipped`, and a last line without its newline (a write cut
// short) is left out and noted there. Lines of the first study (10 fields, no
// val_accuracy) are read with val_accuracy NaN.
std::vector<CellResult> parse_csv(const std::string& text, CsvSkipped* skipped = nullptr);
// "PATH: N lines are not study results (first: line K: why); line M has no newline
// (a write cut short); mend or delete such lines to have them read".
std::string describe_skipped(const std::string& path, const CsvSkipped& skipped);

// ---- the report (pure) ----------------------------------------------------------

struct Stat {
  double mean = 0;
  double std = 0;  // sample standard deviation (n-1); 0 for one value
  int n = 0;
};
Stat stat_of(const std::vector<double>& values);

// R = (attack − scratch) / (victim − scratch); NaN when victim == scratch.
double recovered_fraction(double attack, double scratch, double victim);

// The 97.5 % quantile of Student's t with `df` degrees of freedom (df ≥ 1).
double t_quantile_975(int df);

// Half the width of the 95 % interval that the mean of a rerun with as many new
// seeds falls into, from n per-seed values with sample sd s: t(n−1) · s · √(2/n)
// (the two means differ by noise of variance 2s²/n). NaN for fewer than 2 values.
double rerun_half_width(const Stat& s);

// One table row after aggregation over seeds.
struct Aggregate {
  std::string model;
  std::string row;
  std::string held;
  double exposure = 0;
  std::string attack;
  int64_t samples = 0;
  int64_t queries = 0;  // A4's budget (one group per budget); 0 otherwise
  Stat accuracy;
  Stat fidelity;
  bool on_loss = false;  // a language model's group: R is on the loss, the tables show it (Stat loss)
  Stat loss;             // nats per token (language models; n = 0 otherwise)
  Stat r;        // per seed R on the test images, against the mean of that seed's scratch runs of the same size
  Stat val_r;    // the same on the validation images (n = 0 without validation accuracies)
  // A language model's R on the next-token accuracy of the test windows (per seed, against
  // the mean of its scratch runs): shown beside R on the loss; n = 0 for image models.
  Stat r_accuracy;
  Stat wall;
};

// Groups cells by (model, row, attack, samples) in the order first seen; R of
// each seed uses the scratch runs (their mean accuracy) and the victim cell of the
// same model, size and seed (cells without both are left out of r). For a language
// model's cells (CellResult::on_loss) R is on the loss instead of the accuracy:
// R = (scratch loss − attack loss) / (scratch loss − victim loss), the same
// recovered_fraction with the losses. The scratch
// runs of a seed are one group "scratch": per seed the mean of its runs, then the
// mean and sd over the seeds.
std::vector<Aggregate> aggregate(const std::vector<CellResult>& cells);

// What the best attack of a row is chosen by: the mean R on the validation images,
// or, for cells without them (a CSV of the first study), the mean R on the test
// images.
double selection_r(const Aggregate& a);

// The Markdown table of one model: one line per (row, attack), the sizes as
// column groups "acc ± sd / fid / R ± sd".
std::string markdown_table(const std::vector<Aggregate>& aggregates, const std::string& model);

// The headline of one model and size: per row (table order; not the controls), its
// group ("1 of 4", "2 of 4", "sandwich", ...; N is `stages`, the model's stage
// count, or "1 held" when it is 0 = unknown), exposure, the best attack (highest
// selection_r: chosen on the validation images where the cells have them), and that
// attack's R on the test images: mean ± sd over seeds and the 95 % interval for a
// rerun's mean (rerun_half_width).
std::string headline_table(const std::vector<Aggregate>& aggregates, const std::string& model, int64_t samples,
                           int stages);

// The A4 table of one model and labelled-sample count: per row (table order), per
// query budget the accuracy, fidelity and R (mean ± sd over seeds), and the queries
// needed to reach R = 0.5 (queries_to_reach). Empty when the model has no A4 cells
// at that size.
std::string a4_table(const std::vector<Aggregate>& aggregates, const std::string& model, int64_t samples);

// A4's plot of one model and labelled-sample count: gnuplot data with one block per
// row (table order; "# <row> <exposure>" then "<queries> <mean R> <sd>" per budget,
// ascending; rows without R left out), and the script that draws it to `png` — R
// against the query budget on a log axis, one line per row, and R = 0.5 (where
// queries_to_reach reads the crossing). Empty data when the model has no A4 R there.
std::string a4_plot_data(const std::vector<Aggregate>& aggregates, const std::string& model, int64_t samples);
std::string a4_plot_script(const std::string& model, int64_t samples, const std::string& dat, const std::string& png,
                           const std::string& data);

// The attacker with data beside the attacker with queries, for one model: per row
// (table order), its exposure, the best data attack's test R at each labelled size
// (chosen as in headline_table, its name given), and A4's R at each (labelled
// samples, query budget); "…" where a row was not measured. Empty unless the model
// has cells of both kinds.
std::string data_vs_queries_table(const std::vector<Aggregate>& aggregates, const std::string& model);

// From mean R per budget (ascending budgets): the smallest measured budget whose
// mean R is ≥ target (0 when none), and in *interpolated the budget where R crosses
// target, linear in log(queries) between the last budget below it and that one (the
// smallest budget itself when it already reaches target; NaN when none does).
int64_t queries_to_reach(const std::vector<std::pair<int64_t, double>>& r_by_budget, double target,
                         double* interpolated);

// For the plots: per model and size, each row's exposure and its best attack's test
// R (chosen as in headline_table), error bar the rerun interval's half width.
struct PlotPoint {
  std::string row;
  double exposure = 0;
  double r = 0;
  double r_err = 0;
  std::string attack;
};
std::map<int64_t, std::vector<PlotPoint>> best_r_by_size(const std::vector<Aggregate>& aggregates,
                                                         const std::string& model);

// ---- options and jobs -----------------------------------------------------------

struct StudyOptions {
  std::vector<std::string> job_files;   // one per model; the job gives model, shards, optimizer, victim epochs
  std::string out_dir;                  // results.csv, results.md, plots, cached models
  std::string rows = "default";
  std::string attacks = "A1-frozen,A1-lowlr,A2,A3";  // A4 only when named
  std::string queries = "10000,100000,1000000";     // A4: query budgets
  int64_t a4_samples = 0;                           // A4: labelled samples (0 = data-free)
  std::string samples = "60,600,6000";
  int seeds = 3;
  int first_seed = 1;
  int64_t steps = 300;                  // optimisation steps of every attack and scratch run
  int batch_size = 64;                  // attacker's batch (at most its sample count)
  double learning_rate = 3e-3;          // attacker's Adam learning rate (cosine-decayed to 0 over the steps)
  double low_lr_factor = 0.1;           // A1-lowlr: known shards at lr × this
  int64_t fit_steps = 0;                // A2, A3: steps of the first phase, within --steps (0 = half)
  int scratch_runs = 3;                 // scratch controls per (model, size, seed)
  int64_t val_samples = 2000;           // validation images per seed (choose the best attack on them)
  int64_t test_samples = 10000;         // test subset for accuracy and fidelity (0 = all)
  int64_t victim_train_samples = 0;     // victim's training set (0 = all)
  int victim_epochs = 0;                // 0 = the job's spec.training.epochs
  std::string checkpoint_dir;           // load the victim from shard checkpoints (one job only)
  std::string key_dir;
  bool quick = false;                   // tiny cells: see apply_quick
  bool report_only = false;             // rewrite results.md and plots from the CSV, train nothing
  bool no_plots = false;
  bool progress_tty = false;
};

// --quick: one seed, sizes 60 and 600 (A4: 2,000 and 10,000 queries), 200 steps of 32, 2 scratch runs, 1,000 test
// and 1,000 validation samples, a victim of two epochs over 30,000 samples. Values the user set explicitly are kept (flags
// given on the command line are listed in `explicit_flags`).
void apply_quick(StudyOptions& options, const std::vector<std::string>& explicit_flags);

// One --job of the study: the model it trains and how the job cuts it.
struct StudyJob {
  std::string file;
  JobSpec spec;
  std::string model;                 // architecture; one job per architecture
  std::vector<model::StageDesc> cut;
  std::vector<double> shares;        // each stage's share of the parameters
};

// Loads and partitions every --job file. Throws StudyError naming --job and the
// file for an invalid job, a second job of the same architecture or a cut that
// does not fit.
std::vector<StudyJob> load_study_jobs(const StudyOptions& options);

// Each job's stage shares by model, what restate_exposure and write_report need.
std::map<std::string, std::vector<double>> shares_by_model(const std::vector<StudyJob>& jobs);

// Writes results.md (and plot-<model>.dat, .gp and .png through gnuplot when it is
// on PATH and plots are wanted) from results.csv in out_dir, after restate_exposure
// with `shares` (the CSV is rewritten, atomically, when an exposure changed). Throws
// FileError when results.csv cannot be read or a file cannot be written; a gnuplot
// that fails or runs past a minute is reported on stderr and the report stands.
void write_report(const std::string& out_dir, bool plots,
                  const std::map<std::string, std::vector<double>>& shares = {});

// Runs one study command body and turns what it throws into the exit code, with the
// message on stderr: StudyError (bad input) → 2, any other exception → 1.
int study_exit_code(const std::function<int()>& body);

// One shardctl study per --out at a time: OUT/study.lock, held until the returned
// lock is destroyed. A run appends cells to results.csv and a report may rewrite it
// (restated exposures), so a second process there could lose cells. Throws StudyError
// naming the holder's pid when another process holds it; null when out_dir does not
// exist (nothing there to guard: a run creates it first).
std::unique_ptr<FileLock> lock_study_out(const std::string& out_dir);

// `shardctl study --report-only`: the report from the CSV and the jobs, without
// training (and without LibTorch), under lock_study_out. Exit 0 done, 1 I/O failure,
// 2 bad input (also: a study is running in --out).
int RunStudyReport(const StudyOptions& options);

// ---- the study turned into placement (issue 19 item 3) ---------------------------

// What one untrusted principal (a node or an identity) of a job can recover, by the
// study's measurements: `shardctl plan JOB --risk STUDY.csv`.
struct RiskRow {
  int64_t samples = 0;  // the attacker's labelled samples (training windows for a language model)
  int64_t queries = 0;  // A4: the query budget (0: an attacker with data only)
  bool on_loss = false; // a language model's: R is on the loss
  Stat r;               // R of the worst reachable (row, attack) at that size
  std::string row;
  std::string attack;
  double exposure = 0;  // of that row for this job (trusted stages left out)
  double selection = 0; // what it was chosen by (selection_r: validation R, or test R in a first-study CSV)
};
// "600 samples", "181 training windows" (a language model), "0 samples + 100000
// queries" (A4): who a RiskRow's attacker is, as plan --risk and the placement table say.
std::string attacker_label(const RiskRow& w);
struct RiskReport {
  std::string model;
  int stages = 0;
  // One per attacker: the attackers with data by size, ascending, then A4's by labelled
  // samples and query budget, ascending.
  std::vector<RiskRow> worst;
  std::vector<std::string> out_of_reach;  // rows no untrusted principal can hold, with why
};
// A row is within reach of one untrusted principal when it holds no trusted stage and
// its exposure (held ∪ sandwiched, trusted stages left out: model/exposure.h) fits
// maxExposure: a node may gather stages up to that bound (the operator's placement
// history), an identity holds one stage. "none" is always within reach. For each
// attacker size, and for each of A4's (labelled samples, query budget), the reachable
// (row, attack) with the highest selection_r (chosen on the validation images where
// the study has them), and its test R. Throws
// StudyError naming --risk when the study has no rows for the job's model or was made
// for another number of stages.
RiskReport worst_reachable_risk(const std::vector<CellResult>& cells, const JobSpec& job,
                                const std::vector<int64_t>& stage_params);
// The same for a model's aggregated cells, its stages' weights (parameters or shares),
// the trusted stages and a maxExposure cap.
RiskReport worst_reachable_risk(const std::vector<Aggregate>& aggregates, const std::string& model,
                                const std::vector<double>& stage_weights, const std::set<int>& trusted,
                                double max_exposure);

// What placement buys, for results.md: per attacker (as worst_reachable_risk lists
// them), one line with no trusted stage, one per stage trusted alone and (with 3
// stages or more) one with both ends trusted, the input and the output stage; per
// maxExposure cap 0.25, 0.5, 0.75 and 1 the worst reachable R with its row, or
// "refused" where an untrusted stage's share is above the cap (the operator refuses
// such a job: no placement exists). Empty when
// the cells have no "all" row of the model or another stage count than the shares.
std::string placement_table(const std::vector<Aggregate>& aggregates, const std::string& model,
                            const std::vector<double>& stage_shares);

}  // namespace shardguard::shardctl
