// shardctl study, the torch-free half: the plan (rows, sizes, exposure), the CSV,
// the aggregation into R, the report and --report-only. The runner's tests (bad
// input, the quick study end to end) are in tests/shardctl_torch/study_test.cpp.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include <unistd.h>

#include <gtest/gtest.h>

#include "shardguard/common/jobspec.h"
#include "shardguard/operator/status.h"
#include "shardguard/common/process.h"
#include "shardguard/shardctl/study_report.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/model/partition.h"
#include "support/temp_dir.h"

namespace fs = std::filesystem;
using namespace shardguard::shardctl;
namespace testsupport = shardguard::testsupport;

namespace {

const std::string kCnnJob = std::string(SHARDGUARD_SOURCE_DIR) + "/examples/fashion-mnist-cnn.yaml";

// Shares of the example cnn's 4 stages (docs/models.md): 18816, 73856, 73792, 650 of 167114.
const std::vector<double> kCnnShares{18816 / 167114.0, 73856 / 167114.0, 73792 / 167114.0, 650 / 167114.0};

std::vector<std::string> names(const std::vector<StudyRow>& rows) {
  std::vector<std::string> out;
  for (const auto& r : rows) out.push_back(r.name);
  return out;
}


}  // namespace

TEST(StudyRows, DefaultRowsOfFourStages) {
  EXPECT_EQ(names(default_rows(4)),
            (std::vector<std::string>{"none", "s0", "s1", "s2", "s3", "s0+1", "s1+2", "s2+3", "s0+1+2", "s0+1+3",
                                      "s0+2+3", "s1+2+3", "all", "sw1", "sw2"}));
  const auto rows = default_rows(4);
  EXPECT_EQ(rows.back().sandwiched, 2);
  EXPECT_EQ(rows.back().held, (std::vector<int>{1, 3}));
}

TEST(StudyRows, ParseNamesAndGroups) {
  EXPECT_EQ(names(parse_rows("none,triple,all", 4)),
            (std::vector<std::string>{"none", "s0+1+2", "s0+1+3", "s0+2+3", "s1+2+3", "all"}));
  EXPECT_EQ(names(parse_rows("s2+0, s0+1+2+3, sw1, s1, s1", 4)), (std::vector<std::string>{"s0+2", "all", "sw1", "s1"}));
  EXPECT_EQ(names(parse_rows("default", 4)), names(default_rows(4)));
}

TEST(StudyRows, BadRowsNameTheFlagAndValue) {
  auto msg = [](const std::string& list, int n) {
    try {
      parse_rows(list, n);
    } catch (const StudyError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(msg("bogus", 4).find("--rows: unknown row \"bogus\""), std::string::npos) << msg("bogus", 4);
  EXPECT_NE(msg("s4", 4).find("--rows s4: stage 4 does not exist"), std::string::npos) << msg("s4", 4);
  EXPECT_NE(msg("sw0", 4).find("--rows sw0"), std::string::npos) << msg("sw0", 4);
  EXPECT_NE(msg("sw3", 4).find("--rows sw3"), std::string::npos) << msg("sw3", 4);
  EXPECT_NE(msg("s1,", 4).find("empty entry"), std::string::npos) << msg("s1,", 4);
  EXPECT_NE(msg("sandwich", 2).find("--rows sandwich"), std::string::npos) << msg("sandwich", 2);
}

TEST(StudyRows, ExposureFollowsDesignSection5) {
  const auto rows = default_rows(4);
  auto exposure = [&](const std::string& name) {
    for (const auto& r : rows) {
      if (r.name == name) return row_exposure(r, kCnnShares);
    }
    return -1.0;
  };
  EXPECT_DOUBLE_EQ(exposure("none"), 0.0);
  EXPECT_NEAR(exposure("s1"), 73856 / 167114.0, 1e-12);
  EXPECT_NEAR(exposure("s0+1"), (18816 + 73856) / 167114.0, 1e-12);
  EXPECT_NEAR(exposure("all"), 1.0, 1e-12);
  // The sandwich of stage 1 holds stages 0 and 2 and counts stage 1 as exposed.
  EXPECT_NEAR(exposure("sw1"), (18816 + 73856 + 73792) / 167114.0, 1e-12);
  EXPECT_NEAR(exposure("sw2"), (73856 + 73792 + 650) / 167114.0, 1e-12);
  // Holding stages 1 and 3 sandwiches stage 2 whether or not the row is a sandwich row.
  EXPECT_NEAR(exposure("s0+1+3"), 1.0, 1e-12);
}

// A CSV written before implicit sandwiches were counted is restated from the holdings.
TEST(StudyReport, RestateExposureFromHoldings) {
  std::vector<CellResult> cells(3);
  cells[0].model = "cnn"; cells[0].row = "s0+1+3"; cells[0].held = "0+1+3"; cells[0].exposure = 0.558433;
  cells[1].model = "cnn"; cells[1].row = "s1"; cells[1].held = "1"; cells[1].exposure = 73856 / 167114.0;
  cells[2].model = "cnn"; cells[2].row = "-"; cells[2].held = ""; cells[2].exposure = 1.0;  // victim control
  EXPECT_EQ(restate_exposure(cells, {{"cnn", kCnnShares}}), 1);
  EXPECT_NEAR(cells[0].exposure, 1.0, 1e-12);
  EXPECT_NEAR(cells[1].exposure, 73856 / 167114.0, 1e-12);
  EXPECT_DOUBLE_EQ(cells[2].exposure, 1.0);
  EXPECT_EQ(restate_exposure(cells, {{"vit", kCnnShares}}), 0);  // no shares for cnn: left alone
}

// The study's exposure of every row equals the operator's exposure_of for the same
// holding, for both models of the study as the example jobs cut them.
TEST(StudyRows, ExposureIsTheOperatorsForEveryRowOfBothModels) {
  for (const char* example : {"fashion-mnist-cnn.yaml", "fashion-mnist-vit.yaml"}) {
    SCOPED_TRACE(example);
    const auto job = shardguard::load_job_file(std::string(SHARDGUARD_SOURCE_DIR) + "/examples/" + example);
    const auto desc = shardguard::model::describe_model(job.model);
    const auto cut = shardguard::model::partition(desc, job.sharding.shards, job.sharding.balance);
    std::vector<double> shares;
    std::vector<int64_t> params;
    for (const auto& s : cut) {
      shares.push_back(shardguard::model::parameter_share(desc, s));
      params.push_back(s.parameters);
    }
    const auto rows = default_rows(static_cast<int>(cut.size()));
    EXPECT_GE(rows.size(), 14u);
    for (const auto& r : rows) {
      SCOPED_TRACE(r.name);
      std::set<int> held(r.held.begin(), r.held.end());
      if (r.sandwiched >= 0) {
        // What a sandwich row observes: the neighbours of the sandwiched stage.
        held.insert(r.sandwiched - 1);
        held.insert(r.sandwiched + 1);
      }
      EXPECT_NEAR(row_exposure(r, shares), shardguard::op::exposure_of(params, held), 1e-9);
    }
  }
}

TEST(StudyRows, AttacksPerRow) {
  const std::vector<std::string> every = all_attacks();
  const auto rows = default_rows(4);
  // A4, the query attacker, runs on every row (`none` is its pure black-box control).
  EXPECT_EQ(row_attacks(rows[0], 4, every), (std::vector<std::string>{"A1-frozen", "A4"}));  // none
  EXPECT_EQ(row_attacks(rows[1], 4, every), (std::vector<std::string>{"A1-frozen", "A1-lowlr", "A2", "A4"}));
  EXPECT_EQ(row_attacks(rows.back(), 4, every), (std::vector<std::string>{"A3", "A4"}));  // sw2
  EXPECT_EQ(row_attacks(rows[1], 4, {"A2"}), (std::vector<std::string>{"A2"}));
}

TEST(StudySizes, ParseAndRefuse) {
  EXPECT_EQ(parse_sizes("--samples", "60, 600,6000,60"), (std::vector<int64_t>{60, 600, 6000}));
  EXPECT_THROW(parse_sizes("--samples", "60,x"), StudyError);
  EXPECT_THROW(parse_sizes("--samples", "0"), StudyError);
  try {
    parse_sizes("--samples", "-5");
    FAIL();
  } catch (const StudyError& e) {
    EXPECT_NE(std::string(e.what()).find("--samples"), std::string::npos);
  }
}

TEST(StudyCsv, RoundTripAndCutShortLine) {
  CellResult c{"cnn", "s0+1", "0+1", 0.5537, "A1-frozen", 600, 2, 0.8123, 0.85, 12.5};
  const std::string line = to_csv_line(c);
  const auto back = parse_csv(csv_header() + "\n" + line + "\n" + line.substr(0, 20));
  ASSERT_EQ(back.size(), 1u);
  EXPECT_EQ(back[0].key(), c.key());
  EXPECT_EQ(back[0].held, "0+1");
  EXPECT_NEAR(back[0].accuracy, 0.8123, 1e-9);
  EXPECT_NEAR(back[0].exposure, 0.5537, 1e-9);
  EXPECT_TRUE(parse_csv("garbage\nmodel,a\n").empty());
}

// A line that is not a result is skipped and counted, with the first one's line number
// and reason; empty lines, a CRLF ending and a last line cut short are not problems.
TEST(StudyCsv, LinesThatAreNotResultsAreCountedWithTheFirstReason) {
  const CellResult c{"cnn", "s0", "0", 0.1126, "A1-frozen", 600, 1, 0.81, 0.85, 12.5};
  const std::string good = to_csv_line(c);
  std::string bad_number = good;
  bad_number.replace(bad_number.find("0.810000"), 8, "0.81x");
  std::string not_finite = good;
  not_finite.replace(not_finite.find("0.850000"), 8, "nan");
  std::string exposure = good;
  exposure.replace(exposure.find("0.112600"), 8, "1.5");
  const std::string text = csv_header() + "\n" + good + "\n" + bad_number + "\n\n" + "cnn,s0,0\n" + not_finite +
                           "\n" + exposure + "\n" + good + "\r\n" + good.substr(0, 12);
  CsvSkipped skipped;
  const auto cells = parse_csv(text, &skipped);
  ASSERT_EQ(cells.size(), 2u);
  EXPECT_EQ(cells[1].key(), c.key()) << "the CRLF line is read";
  EXPECT_EQ(skipped.lines, 4);
  EXPECT_EQ(skipped.first, "line 3: accuracy '0.81x' is not a number");
  EXPECT_EQ(skipped.cut_short, 9);
  EXPECT_EQ(describe_skipped("r.csv", skipped),
            "r.csv: 4 lines are not study results (first: line 3: accuracy '0.81x' is not a number); line 9 has no "
            "newline (a write cut short); mend or delete such lines to have them read");
  // Each rule on its own line: the reason the first (here the only) bad line gets.
  const auto with = [&](const std::string& from, const std::string& to) {
    std::string line = good;
    return line.replace(line.find(from), from.size(), to);
  };
  for (const auto& [line, why] : std::vector<std::pair<std::string, std::string>>{
           {"cnn,s0,0", "3 fields, a result has 10, 11, 12 or 14"},
           {not_finite, "fidelity 'nan' is not finite"},
           {exposure, "exposure 1.5 is outside [0, 1]"},
           {with("0.810000", " 0.81"), "accuracy ' 0.81' is not a number"},
           {with(",600,", ",+600,"), "samples '+600' is not a number"},
           {with(",600,", ",-600,"), "samples and queries may not be negative"},
           {with(",600,1,", ",600,2147483648,"), "seed '2147483648' is not a number"},
           {with("cnn,", ","), "model, row and attack may not be empty"},
           {csv_header(), "a second header line (a study's CSV has one, on line 1)"}}) {
    CsvSkipped each;
    EXPECT_TRUE(parse_csv(csv_header() + "\n" + line + "\n", &each).empty()) << line;
    EXPECT_EQ(each.first, "line 2: " + why) << line;
  }
  CsvSkipped none;
  EXPECT_EQ(parse_csv("\xEF\xBB\xBF" + csv_header() + "\n" + good + "\n", &none).size(), 1u) << "a BOM";
  EXPECT_FALSE(none.any());
}

TEST(StudyReport, RecoveredFractionPerSeed) {
  std::vector<CellResult> cells;
  auto add = [&](const std::string& row, const std::string& attack, int seed, double acc) {
    cells.push_back({"cnn", row, "", 0.25, attack, 60, seed, acc, 0.5, 1.0});
  };
  add("-", "scratch", 1, 0.60);
  add("-", "victim", 1, 0.90);
  add("s0", "A1-frozen", 1, 0.75);  // R = 0.5
  add("-", "scratch", 2, 0.70);
  add("-", "victim", 2, 0.90);
  add("s0", "A1-frozen", 2, 0.90);  // R = 1.0
  add("s0", "A1-frozen", 2, 0.10);  // a duplicate cell counts once
  const auto aggs = aggregate(cells);
  const auto it = std::find_if(aggs.begin(), aggs.end(), [](const Aggregate& a) { return a.row == "s0"; });
  ASSERT_NE(it, aggs.end());
  EXPECT_EQ(it->r.n, 2);
  EXPECT_NEAR(it->r.mean, 0.75, 1e-12);
  EXPECT_NEAR(it->r.std, std::sqrt(0.125), 1e-12);
  EXPECT_NEAR(it->accuracy.mean, 0.825, 1e-12);
  EXPECT_TRUE(std::isnan(recovered_fraction(0.5, 0.9, 0.9)));
  const std::string md = markdown_table(aggs, "cnn");
  EXPECT_NE(md.find("| s0 |"), std::string::npos) << md;
  EXPECT_NE(md.find("0.75 ± 0.35"), std::string::npos) << md;
  // One seed: the mean alone, no "± 0.000".
  const std::string one = markdown_table(aggregate({cells[0], cells[1], cells[2]}), "cnn");
  EXPECT_NE(one.find("| s0 | – | 25.0% | A1-frozen | 0.750 | 0.500 | 0.50 | 1 |"), std::string::npos) << one;
  EXPECT_EQ(one.substr(one.find('\n')).find("±"), std::string::npos) << one;  // (the header has one)

  const auto pts = best_r_by_size(aggs, "cnn");
  ASSERT_EQ(pts.at(60).size(), 1u);
  EXPECT_NEAR(pts.at(60)[0].r, 0.75, 1e-12);
}

// The headline: per row the attack with the highest mean R on the validation
// images, in table order, with its group, exposure, test R (mean ± sd over seeds)
// and the 95 % interval for a rerun's mean.
TEST(StudyReport, HeadlinePicksTheBestAttackPerRowOnValidation) {
  std::vector<CellResult> cells;
  // Validation accuracies sit 0.1 above the test ones unless `val` is given.
  auto add = [&](const std::string& row, const std::string& held, double expo, const std::string& attack, int seed,
                 double acc, double val = -1) {
    CellResult c{"vit", row, held, expo, attack, 600, seed, acc, 0.5, 1.0};
    c.val_accuracy = val >= 0 ? val : acc + 0.1;
    cells.push_back(c);
  };
  for (int seed : {1, 2}) {
    add("-", "", 0, "scratch", seed, 0.60);
    add("-", "", 0, "victim", seed, 0.80);
    add("s0", "0", 0.271, "A1-frozen", seed, seed == 1 ? 0.70 : 0.72);  // R 0.50, 0.60
    // A2 is the best on test (R 0.65), the worst on validation (R 0.25): not chosen.
    add("s0", "0", 0.271, "A2", seed, 0.73, 0.75);
    add("s0+1", "0+1", 0.512, "A1-lowlr", seed, 0.75);  // R 0.75
    add("sw1", "0+2", 0.753, "A3", seed, 0.78);         // R 0.90
    add("all", "0+1+2+3", 1.0, "A1-lowlr", seed, 0.79);  // R 0.95
  }
  const std::string md = headline_table(aggregate(cells), "vit", 600, 4);
  // s0: R 0.50 and 0.60, sd 0.0707; t(1) = 12.706, half width 12.706 · 0.0707 · √(2/2) = 0.90.
  EXPECT_EQ(md,
            "| group | row | exposure | best attack (chosen on validation) | R on test, mean ± sd over seeds "
            "| 95 % interval for a rerun's mean | seeds |\n|---|---|---|---|---|---|---|\n"
            "| 1 of 4 | s0 | 27.1% | A1-frozen | 0.55 ± 0.07 | -0.35 … 1.45 | 2 |\n"
            "| 2 of 4 | s0+1 | 51.2% | A1-lowlr | 0.75 ± 0.00 | 0.75 … 0.75 | 2 |\n"
            "| sandwich | sw1 | 75.3% | A3 | 0.90 ± 0.00 | 0.90 … 0.90 | 2 |\n"
            "| 4 of 4 | all | 100.0% | A1-lowlr | 0.95 ± 0.00 | 0.95 … 0.95 | 2 |\n");
  EXPECT_EQ(headline_table(aggregate(cells), "vit", 60, 4).find("| s0"), std::string::npos) << "no cells at 60";

  // Cells of the first study (no validation accuracy) are chosen on test, and the
  // header says so.
  for (auto& c : cells) c.val_accuracy = std::nan("");
  const std::string old = headline_table(aggregate(cells), "vit", 600, 4);
  EXPECT_NE(old.find("best attack (chosen on test)"), std::string::npos) << old;
  EXPECT_NE(old.find("| 1 of 4 | s0 | 27.1% | A2 | 0.65 ± 0.00 |"), std::string::npos) << old;
}

// The group's "of N" is the model's stage count, not the most stages a row of the
// run holds: a run of single stages only is still "1 of 4".
TEST(StudyReport, HeadlineGroupCountsTheModelsStages) {
  std::vector<CellResult> cells{{"cnn", "-", "", 0, "scratch", 60, 1, 0.6, 0.6, 1},
                                {"cnn", "-", "", 1, "victim", 60, 1, 0.9, 1, 1},
                                {"cnn", "s1", "1", 0.44, "A1-frozen", 60, 1, 0.7, 0.7, 1},
                                {"cnn", "s2", "2", 0.44, "A1-frozen", 60, 1, 0.7, 0.7, 1}};
  const auto aggs = aggregate(cells);
  const std::string md = headline_table(aggs, "cnn", 60, 4);
  EXPECT_NE(md.find("| 1 of 4 | s1 |"), std::string::npos) << md;
  EXPECT_EQ(md.find("of 1"), std::string::npos) << md;
  EXPECT_NE(headline_table(aggs, "cnn", 60, 0).find("| 1 held | s1 |"), std::string::npos);
}

// Several scratch runs per seed: R is taken against their mean, and they form one
// "scratch" line whose accuracy is, per seed, that mean.
TEST(StudyReport, RecoveredFractionAgainstTheMeanOfTheScratchRuns) {
  std::vector<CellResult> cells{{"cnn", "-", "", 0, scratch_run_name(1), 60, 1, 0.50, 0.5, 1},
                                {"cnn", "-", "", 0, scratch_run_name(2), 60, 1, 0.70, 0.7, 1},
                                {"cnn", "-", "", 0, scratch_run_name(3), 60, 1, 0.60, 0.6, 1},
                                {"cnn", "-", "", 1, "victim", 60, 1, 0.90, 1, 1},
                                {"cnn", "s0", "0", 0.11, "A1-frozen", 60, 1, 0.75, 0.8, 1}};
  EXPECT_EQ(scratch_run_name(1), "scratch");
  EXPECT_EQ(scratch_run_name(3), "scratch-3");
  EXPECT_TRUE(is_scratch("scratch-3"));
  EXPECT_FALSE(is_scratch("A2"));
  const auto aggs = aggregate(cells);
  ASSERT_EQ(aggs.size(), 3u);  // scratch (one line for its three runs), victim, s0
  EXPECT_EQ(aggs[0].attack, "scratch");
  EXPECT_EQ(aggs[0].accuracy.n, 1);
  EXPECT_NEAR(aggs[0].accuracy.mean, 0.60, 1e-12);
  EXPECT_NEAR(aggs[0].fidelity.mean, 0.60, 1e-12);
  EXPECT_NEAR(aggs[2].r.mean, (0.75 - 0.60) / (0.90 - 0.60), 1e-12);
  EXPECT_EQ(aggs[2].val_r.n, 0) << "no validation accuracies in these cells";
}

// The interval a rerun's mean falls into: t(n−1) · sd · √(2/n).
TEST(StudyReport, RerunIntervalIsStudentsT) {
  EXPECT_NEAR(t_quantile_975(2), 4.303, 1e-9);
  EXPECT_NEAR(t_quantile_975(8), 2.306, 1e-9);
  EXPECT_NEAR(t_quantile_975(120), 1.98, 0.002);
  const Stat three = stat_of({0.5, 0.6, 0.7});  // sd 0.1
  EXPECT_NEAR(rerun_half_width(three), 4.303 * 0.1 * std::sqrt(2.0 / 3.0), 1e-9);
  EXPECT_TRUE(std::isnan(rerun_half_width(stat_of({0.5}))));
}

// Every attack and every scratch run gets the same total budget; A2 and A3 split it
// into a first phase (half by default, or --fit-steps) and the rest.
TEST(StudyBudget, EveryAttackSpendsTheSameSteps) {
  for (const std::string a : {"scratch", "scratch-2", "A1-frozen", "A1-lowlr", "A2", "A3"}) {
    for (int64_t first : {0, 50}) {
      int64_t total = 0;
      for (const auto& p : attack_phases(a, 200, first)) total += p.steps;
      EXPECT_EQ(total, 200) << a << " first " << first;
    }
  }
  const auto a2 = attack_phases("A2", 201, 0);
  ASSERT_EQ(a2.size(), 2u);
  EXPECT_EQ(a2[0].what, "substitute");
  EXPECT_EQ(a2[0].steps, 100);
  EXPECT_EQ(a2[1].steps, 101);
  EXPECT_EQ(attack_phases("A3", 200, 50)[0].what, "fit");
  EXPECT_EQ(attack_phases("A3", 200, 50)[0].steps, 50);
  EXPECT_TRUE(attack_phases("victim", 200, 0).empty());
  try {
    attack_phases("A2", 200, 200);
    FAIL() << "a first phase of the whole budget leaves nothing to fine-tune";
  } catch (const StudyError& e) {
    EXPECT_NE(std::string(e.what()).find("--fit-steps 200"), std::string::npos) << e.what();
  }
}

// The CSV of the first study (10 fields) still reads, without validation accuracy;
// a new line carries it as an 11th field and round-trips.
TEST(StudyCsv, ValidationAccuracyColumn) {
  const auto old = parse_csv("model,row,held,exposure,attack,samples,seed,accuracy,fidelity,wall_s\n"
                             "cnn,s0,0,0.112594,A1-frozen,600,1,0.809500,0.850000,11.128\n");
  ASSERT_EQ(old.size(), 1u);
  EXPECT_TRUE(std::isnan(old[0].val_accuracy));
  EXPECT_EQ(to_csv_line(old[0]), "cnn,s0,0,0.112594,A1-frozen,600,1,0.809500,0.850000,11.128");
  CellResult c = old[0];
  c.val_accuracy = 0.8125;
  const auto back = parse_csv(csv_header() + "\n" + to_csv_line(c) + "\n");
  ASSERT_EQ(back.size(), 1u);
  EXPECT_NEAR(back[0].val_accuracy, 0.8125, 1e-9);
  EXPECT_NE(csv_header().find(",val_accuracy"), std::string::npos);
}

// A4's query budget is a 12th field on A4 lines only: the other lines keep the 11 (or
// the first study's 10) fields, so the CSVs in docs/ read as before and a resumed
// --out keeps its lines byte for byte.
TEST(StudyCsv, QueriesColumnOnA4LinesOnly) {
  EXPECT_EQ(csv_header().substr(csv_header().size() - 35), ",val_accuracy,queries,loss,val_loss");
  const auto old = parse_csv("model,row,held,exposure,attack,samples,seed,accuracy,fidelity,wall_s,val_accuracy\n"
                             "vit,s0,0,0.271000,A2,600,1,0.790000,0.830000,20.000,0.800000\n");
  ASSERT_EQ(old.size(), 1u);
  EXPECT_EQ(old[0].queries, 0);
  EXPECT_EQ(old[0].key(), "vit|s0|A2|600|1");
  EXPECT_EQ(to_csv_line(old[0]), "vit,s0,0,0.271000,A2,600,1,0.790000,0.830000,20.000,0.800000");

  CellResult a4 = old[0];
  a4.attack = "A4";
  a4.samples = 0;
  a4.queries = 100000;
  EXPECT_EQ(to_csv_line(a4), "vit,s0,0,0.271000,A4,0,1,0.790000,0.830000,20.000,0.800000,100000");
  EXPECT_EQ(a4.key(), "vit|s0|A4|0|1|q100000");
  const auto back = parse_csv(csv_header() + "\n" + to_csv_line(old[0]) + "\n" + to_csv_line(a4) + "\n");
  ASSERT_EQ(back.size(), 2u);
  EXPECT_EQ(back[0].queries, 0);
  EXPECT_EQ(back[1].queries, 100000);
  EXPECT_EQ(back[1].key(), a4.key());
  // Budgets are separate cells of one (row, seed).
  a4.queries = 10000;
  EXPECT_NE(a4.key(), back[1].key());
  // A negative budget is a malformed line.
  EXPECT_TRUE(parse_csv("vit,s0,0,0.271000,A4,0,1,0.79,0.83,20.0,0.8,-5\n").empty());
}

TEST(StudyReport, QueriesToReachAHalf) {
  double at = 0;
  // Reached between two budgets: log-linear interpolation, 10^(4 + 0.3/0.4).
  EXPECT_EQ(queries_to_reach({{10000, 0.2}, {100000, 0.6}, {1000000, 0.9}}, 0.5, &at), 100000);
  EXPECT_NEAR(at, std::pow(10.0, 4.75), 1.0);
  // Already at the smallest budget: that budget (an upper bound).
  EXPECT_EQ(queries_to_reach({{10000, 0.7}, {100000, 0.9}}, 0.5, &at), 10000);
  EXPECT_EQ(at, 10000.0);
  // Never: 0 and NaN.
  EXPECT_EQ(queries_to_reach({{10000, 0.1}, {100000, 0.3}}, 0.5, &at), 0);
  EXPECT_TRUE(std::isnan(at));
  // Not monotone: the first budget that reaches it, from the one before it.
  EXPECT_EQ(queries_to_reach({{10000, 0.6}, {100000, 0.4}, {1000000, 0.8}}, 0.5, &at), 10000);
}

namespace {

CellResult cell_of(const std::string& row, const std::string& held, const std::string& attack, int64_t samples,
                   int seed, double accuracy, int64_t queries = 0) {
  CellResult c;
  c.model = "cnn"; c.row = row; c.held = held; c.exposure = held.empty() ? 0 : 0.5; c.attack = attack;
  c.samples = samples; c.seed = seed; c.accuracy = accuracy; c.fidelity = accuracy; c.wall_seconds = 1;
  c.val_accuracy = accuracy; c.queries = queries;
  return c;
}

}  // namespace

// A4 cells get their own table (R per row and budget, and where R reaches 0.5), and
// change nothing in the tables of the other attacks — nor do their data-free controls
// (samples 0) add a column there.
TEST(StudyReport, A4TableAndTheOtherTablesUnchanged) {
  std::vector<CellResult> base;
  for (int seed : {1, 2}) {
    base.push_back(cell_of("-", "", "scratch", 60, seed, 0.50));
    base.push_back(cell_of("-", "", "victim", 60, seed, 0.90));
    base.push_back(cell_of("s0", "0", "A1-frozen", 60, seed, 0.70));
  }
  std::vector<CellResult> with_a4 = base;
  for (int seed : {1, 2}) {
    with_a4.push_back(cell_of("-", "", "scratch", 0, seed, 0.10));
    with_a4.push_back(cell_of("-", "", "scratch-2", 0, seed, 0.10));
    with_a4.push_back(cell_of("-", "", "victim", 0, seed, 0.90));
    // R: none 0.125 / 0.5 + 0.05 (seed), s0 0.625 / 0.875, all 1.
    with_a4.push_back(cell_of("none", "", "A4", 0, seed, 0.20, 10000));
    with_a4.push_back(cell_of("none", "", "A4", 0, seed, 0.50 + 0.04 * seed, 100000));
    with_a4.push_back(cell_of("s0", "0", "A4", 0, seed, 0.60, 10000));
    with_a4.push_back(cell_of("s0", "0", "A4", 0, seed, 0.80, 100000));
    with_a4.push_back(cell_of("all", "0+1+2+3", "A4", 0, seed, 0.90, 10000));
  }
  const auto a = aggregate(base);
  const auto b = aggregate(with_a4);
  EXPECT_EQ(markdown_table(b, "cnn"), markdown_table(a, "cnn"));
  EXPECT_EQ(headline_table(b, "cnn", 60, 4), headline_table(a, "cnn", 60, 4));
  EXPECT_EQ(best_r_by_size(b, "cnn").size(), 1u);
  EXPECT_EQ(a4_table(a, "cnn", 0), "");

  const std::string t = a4_table(b, "cnn", 0);
  EXPECT_NE(t.find("| row | held | exposure | 10000 queries: acc (± sd) | fid | R (± sd) | 100000 queries:"),
            std::string::npos) << t;
  // none: R 0.125 at 10 000, 0.575 ± 0.035 at 100 000 → first at 100 000, log-interpolated
  // 10^(4 + 0.375 / 0.45) ≈ 68 129.
  EXPECT_NE(t.find("| none | – | 0.0% | 0.200 ± 0.000 | 0.200 | 0.12 ± 0.00 | 0.560 ± 0.028 | 0.560 | 0.57 ± 0.04 | "
                   "100000 | ≈ 68129 | 2 |"),
            std::string::npos) << t;
  EXPECT_NE(t.find("| s0 | 0 | 50.0% | 0.600 ± 0.000 | 0.600 | 0.62 ± 0.00 |"), std::string::npos) << t;
  EXPECT_NE(t.find(" 10000 | ≤ 10000 | 2 |"), std::string::npos) << t;  // s0 reaches it at once
  EXPECT_NE(t.find("| all | 0+1+2+3 | 50.0% | 0.900 ± 0.000 | 0.900 | 1.00 ± 0.00 | … | … | … | 10000 | ≤ 10000 | 2 |"),
            std::string::npos) << t;
}

// A4's plot: one data block per row with its budgets ascending, R mean and sd per
// budget, and a script that draws R against log(queries) with the R = 0.5 line.
TEST(StudyReport, A4PlotHasOneLinePerRowOverTheBudgets) {
  std::vector<CellResult> cells;
  for (int seed : {1, 2}) {
    cells.push_back(cell_of("-", "", "scratch", 0, seed, 0.10));
    cells.push_back(cell_of("-", "", "victim", 0, seed, 0.90));
    cells.push_back(cell_of("none", "", "A4", 0, seed, 0.50 + 0.04 * seed, 100000));  // the larger budget first
    cells.push_back(cell_of("none", "", "A4", 0, seed, 0.20, 10000));
    cells.push_back(cell_of("s0", "0", "A4", 0, seed, 0.60, 10000));
  }
  const auto aggs = aggregate(cells);
  EXPECT_EQ(a4_plot_data(aggs, "cnn", 60), "");  // no A4 cells at 60 labelled samples
  EXPECT_EQ(a4_plot_data(aggs, "vit", 0), "");
  const std::string d = a4_plot_data(aggs, "cnn", 0);
  // none: R 0.125 at 10 000; (0.54, 0.58) → R 0.55, 0.60: mean 0.575, sd 0.0354 at 100 000.
  EXPECT_EQ(d.substr(0, d.find("\n\n\n")), "# none 0\n10000 0.125 0\n100000 0.575 0.0353553");
  EXPECT_NE(d.find("\n\n\n# s0 0.5\n10000 0.625 0\n\n\n"), std::string::npos) << d;
  const std::string g = a4_plot_script("cnn", 0, "/o/p.dat", "/o/p.png", d);
  EXPECT_NE(g.find("set logscale x"), std::string::npos) << g;
  EXPECT_NE(g.find("plot 0.5 with lines"), std::string::npos) << g;
  EXPECT_NE(g.find("'/o/p.dat' index 0 using 1:2:3 with yerrorlines pt 1 title 'none'"), std::string::npos) << g;
  EXPECT_NE(g.find("'/o/p.dat' index 1 using 1:2:3 with yerrorlines pt 2 title 's0'"), std::string::npos) << g;
  EXPECT_EQ(g.find("index 2"), std::string::npos) << g;
}

// The attacker with data beside the attacker with queries: one line per row, the best
// data attack at each size and A4 at each budget, "…" where a row was not measured.
TEST(StudyReport, DataVersusQueriesTableSetsBothAttackersSideBySide) {
  std::vector<CellResult> data;
  std::vector<CellResult> both;
  for (int seed : {1, 2}) {
    for (auto* v : {&data, &both}) {
      v->push_back(cell_of("-", "", "scratch", 60, seed, 0.50));
      v->push_back(cell_of("-", "", "victim", 60, seed, 0.90));
      v->push_back(cell_of("s0", "0", "A1-frozen", 60, seed, 0.70));             // R 0.5
      v->push_back(cell_of("s0", "0", "A2", 60, seed, 0.60 + 0.02 * seed));     // R 0.3, 0.35
      v->push_back(cell_of("s1", "1", "A1-frozen", 60, seed, 0.54));             // R 0.1
    }
    both.push_back(cell_of("-", "", "scratch", 0, seed, 0.10));
    both.push_back(cell_of("-", "", "victim", 0, seed, 0.90));
    both.push_back(cell_of("none", "", "A4", 0, seed, 0.30 + 0.08 * seed, 100000));  // R 0.35, 0.45
    both.push_back(cell_of("s0", "0", "A4", 0, seed, 0.50, 10000));                  // R 0.5
    both.push_back(cell_of("s0", "0", "A4", 0, seed, 0.74, 100000));                 // R 0.8
  }
  EXPECT_EQ(data_vs_queries_table(aggregate(data), "cnn"), "");
  EXPECT_EQ(data_vs_queries_table(aggregate(both), "vit"), "");
  const std::string t = data_vs_queries_table(aggregate(both), "cnn");
  EXPECT_EQ(t,
            "| row | held | exposure | data: 60 samples, best attack R | queries: A4 10000 (0 labelled), R |"
            " queries: A4 100000 (0 labelled), R |\n"
            "|---|---|---|---|---|---|\n"
            "| s0 | 0 | 50.0% | 0.50 (A1-frozen) | 0.50 ± 0.00 | 0.80 ± 0.00 |\n"
            "| s1 | 1 | 50.0% | 0.10 (A1-frozen) | … | … |\n"
            "| none | – | 0.0% | … | … | 0.40 ± 0.07 |\n");
}

namespace {

// A small CSV of one model: controls, a single and a triple whose exposure was
// written before implicit sandwiches counted (0.558433 for s0+1+3).
std::string small_csv() {
  std::vector<CellResult> cells;
  const auto cell = [&](const std::string& row, const std::string& held, double exposure, const std::string& attack,
                        double accuracy) {
    CellResult c;
    c.model = "cnn"; c.row = row; c.held = held; c.exposure = exposure; c.attack = attack;
    c.samples = 60; c.seed = 1; c.accuracy = accuracy; c.fidelity = accuracy; c.wall_seconds = 1;
    cells.push_back(c);
  };
  cell("-", "", 0, "scratch", 0.40);
  cell("-", "", 1, "victim", 0.90);
  cell("s1", "1", 73856 / 167114.0, "A1-frozen", 0.50);
  cell("s0+1+3", "0+1+3", 0.558433, "A1-frozen", 0.85);
  std::string csv = csv_header() + "\n";
  for (const auto& c : cells) csv += to_csv_line(c) + "\n";
  return csv;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace

// --report-only needs no LibTorch: it restates the exposure, rewrites the CSV and
// writes results.md and the plot data from the job files and the CSV.
TEST(StudyReportOnly, RestatesAndWritesTheReport) {
  const testsupport::TempDir tmp("shardguard-study-report-only");
  const fs::path dir = tmp.path();
  { std::ofstream(dir / "results.csv") << small_csv(); }
  StudyOptions o;
  o.job_files = {kCnnJob};
  o.out_dir = dir.string();
  o.report_only = true;
  o.no_plots = true;
  ASSERT_EQ(RunStudyReport(o), 0);
  const auto cells = parse_csv(slurp(dir / "results.csv"));
  ASSERT_EQ(cells.size(), 4u);
  EXPECT_NEAR(cells[3].exposure, 1.0, 1e-6) << "s0+1+3 sandwiches stage 2";
  const std::string md = slurp(dir / "results.md");
  EXPECT_NE(md.find("### Headline: cnn, 60 samples"), std::string::npos) << md;
  EXPECT_NE(md.find("| s0+1+3 |"), std::string::npos) << md;
  EXPECT_TRUE(fs::exists(dir / "plot-cnn.dat"));
  EXPECT_FALSE(fs::exists(dir / "plot-cnn.gp")) << "no plots wanted";
  // A second run finds nothing to restate and writes the same report.
  ASSERT_EQ(RunStudyReport(o), 0);
  EXPECT_EQ(slurp(dir / "results.md"), md);
}

// A results.csv with lines that are not results: the report says so on stderr and is
// made from the others, and the file is not rewritten (a restatement would drop them).
TEST(StudyReportOnly, KeepsLinesThatAreNotResults) {
  const testsupport::TempDir tmp("shardguard-study-report-damaged");
  const fs::path dir = tmp.path();
  const std::string csv = small_csv() + "cnn,s0,0,0.1,A1-frozen,60,1,oops,0.5,1.0\n";
  { std::ofstream(dir / "results.csv") << csv; }
  StudyOptions o;
  o.job_files = {kCnnJob};
  o.out_dir = dir.string();
  o.report_only = true;
  o.no_plots = true;
  testing::internal::CaptureStderr();
  testing::internal::CaptureStdout();
  ASSERT_EQ(RunStudyReport(o), 0);
  const std::string out = testing::internal::GetCapturedStdout();
  const std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("1 line is not a study result (first: line 6: accuracy 'oops' is not a number)"),
            std::string::npos)
      << err;
  EXPECT_NE(out.find("the exposure of 1 cells is restated in the report only"), std::string::npos) << out;
  EXPECT_EQ(slurp(dir / "results.csv"), csv);
  // The report shows the restated exposure (s0+1+3 sandwiches stage 2: 100 %, not the CSV's 55.8 %).
  const std::string md = slurp(dir / "results.md");
  const size_t row = md.find("| s0+1+3 |");
  ASSERT_NE(row, std::string::npos) << md;
  const std::string line = md.substr(row, md.find('\n', row) - row);
  EXPECT_NE(line.find("100.0%"), std::string::npos) << line;
  EXPECT_EQ(line.find("55.8%"), std::string::npos) << line;
}

// The CSV missing or unreadable is an I/O failure that names the file (exit 1),
// not an empty report; an invalid job is bad input (exit 2) naming --job.
TEST(StudyReportOnly, MissingCsvAndBadJobAreRefused) {
  const testsupport::TempDir tmp("shardguard-study-report-missing");
  const fs::path dir = tmp.path();
  StudyOptions o;
  o.job_files = {kCnnJob};
  o.out_dir = dir.string();
  o.no_plots = true;
  testing::internal::CaptureStderr();
  EXPECT_EQ(RunStudyReport(o), 1);
  std::string err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find((dir / "results.csv").string()), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(dir / "results.md"));

  o.job_files = {(dir / "nope.yaml").string()};
  testing::internal::CaptureStderr();
  EXPECT_EQ(RunStudyReport(o), 2);
  err = testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("--job " + (dir / "nope.yaml").string()), std::string::npos) << err;
}

// One study per --out at a time: while another holds OUT/study.lock (a run appending
// cells), a report is refused naming the holder and touches nothing; once it is
// released the report runs. A directory that does not exist has nothing to guard.
TEST(StudyReportOnly, OneStudyPerOutAtATime) {
  const testsupport::TempDir tmp("shardguard-study-lock");
  const fs::path dir = tmp.path();
  const std::string csv = small_csv();
  { std::ofstream(dir / "results.csv") << csv; }
  StudyOptions o;
  o.job_files = {kCnnJob};
  o.out_dir = dir.string();
  o.no_plots = true;
  {
    const auto held = lock_study_out(dir.string());
    ASSERT_NE(held, nullptr);
    testing::internal::CaptureStderr();
    EXPECT_EQ(RunStudyReport(o), 2);
    const std::string err = testing::internal::GetCapturedStderr();
    EXPECT_NE(err.find("--out " + dir.string() + ": another shardctl study (pid " + std::to_string(::getpid()) + ")"),
              std::string::npos)
        << err;
    EXPECT_FALSE(fs::exists(dir / "results.md"));
    EXPECT_EQ(slurp(dir / "results.csv"), csv) << "not restated while locked";
  }
  EXPECT_EQ(RunStudyReport(o), 0);
  EXPECT_TRUE(fs::exists(dir / "results.md"));
  EXPECT_EQ(lock_study_out((dir / "absent").string()), nullptr);
}

// Plots are drawn by gnuplot without a shell: an output directory whose name has
// a quote and a space still gets its PNG (gnuplot is a `make deps` package).
TEST(StudyReportOnly, PlotsInADirectoryWithAQuote) {
  if (shardguard::find_in_path("gnuplot").empty()) GTEST_SKIP() << "gnuplot is not on PATH (make deps installs gnuplot-nox)";
  const testsupport::TempDir tmp("shardguard-study");
  const fs::path dir = tmp.path() / "it's a plot";
  fs::create_directories(dir);
  { std::ofstream(dir / "results.csv") << small_csv(); }
  StudyOptions o;
  o.job_files = {kCnnJob};
  o.out_dir = dir.string();
  ASSERT_EQ(RunStudyReport(o), 0);
  EXPECT_GT(fs::file_size(dir / "plot-cnn.png"), 1000u);
  EXPECT_FALSE(fs::exists(dir / "plot-cnn.gnuplot.log")) << "the log is kept only when gnuplot fails";
}

// The language model (issue 19 item 2): its lines carry the losses as fields 13–14
// (field 12, A4's queries, empty), the image lines keep theirs; its R is on the loss,
// (scratch − attack) / (scratch − victim); and its rows, with their losses, stay in a
// table of their own, which says "loss" — an image table shows accuracy.
TEST(StudyCsv, LanguageModelLossOnItsLinesAndItsOwnTable) {
  std::vector<CellResult> cells;
  auto add = [&](const std::string& model, const std::string& row, const std::string& held, const std::string& attack,
                 int seed, double acc, double loss) {
    CellResult c = cell_of(row, held, attack, 181, seed, acc);
    c.model = model;
    if (model == "gpt") {
      c.loss = loss;
      c.val_loss = loss + 0.01;
    }
    cells.push_back(c);
  };
  for (int seed : {1, 2}) {
    add("cnn", "-", "", "scratch", seed, 0.50, 0);
    add("cnn", "-", "", "victim", seed, 0.90, 0);
    add("cnn", "s0", "0", "A1-frozen", seed, 0.70, 0);
    // gpt: the accuracies alone would give R 0.9 for s0; the losses give 0.25.
    add("gpt", "-", "", "scratch", seed, 0.10, 4.0);
    add("gpt", "-", "", "victim", seed, 0.20, 2.0);
    add("gpt", "s0", "0", "A1-frozen", seed, 0.19, 3.5);
  }
  // CSV: the gpt line has 14 fields, the losses last; the cnn line keeps its 11.
  const std::string gpt_line = to_csv_line(cells[5]);
  EXPECT_EQ(gpt_line, "gpt,s0,0,0.500000,A1-frozen,181,1,0.190000,0.190000,1.000,0.190000,,3.500000,3.510000");
  EXPECT_EQ(to_csv_line(cells[2]), "cnn,s0,0,0.500000,A1-frozen,181,1,0.700000,0.700000,1.000,0.700000");
  std::string text = csv_header() + "\n";
  for (const auto& c : cells) text += to_csv_line(c) + "\n";
  const auto back = parse_csv(text);
  ASSERT_EQ(back.size(), cells.size());
  EXPECT_TRUE(back[5].on_loss());
  EXPECT_DOUBLE_EQ(back[5].loss, 3.5);
  EXPECT_DOUBLE_EQ(back[5].val_loss, 3.51);
  EXPECT_EQ(back[5].queries, 0);
  EXPECT_FALSE(back[2].on_loss());
  EXPECT_EQ(to_csv_line(back[5]), gpt_line);
  // 13 fields is no line of any model.
  EXPECT_TRUE(parse_csv("gpt,s0,0,0.5,A1-frozen,181,1,0.19,0.19,1.0,0.19,,3.5\n").empty());

  const auto aggs = aggregate(back);
  for (const auto& a : aggs) {
    if (a.row != "s0") continue;
    ASSERT_EQ(a.r.n, 2) << a.model;
    EXPECT_EQ(a.on_loss, a.model == "gpt");
    EXPECT_NEAR(a.r.mean, a.model == "gpt" ? 0.25 : 0.5, 1e-12) << a.model;
    EXPECT_NEAR(a.val_r.mean, a.model == "gpt" ? (4.01 - 3.51) / (4.01 - 2.01) : 0.5, 1e-12) << a.model;
    // R on the next-token accuracy, beside it for the language model only.
    EXPECT_EQ(a.r_accuracy.n, a.model == "gpt" ? 2 : 0) << a.model;
    if (a.model == "gpt") {
      EXPECT_NEAR(a.r_accuracy.mean, 0.9, 1e-12);
    }
  }
  const std::string cnn = markdown_table(aggs, "cnn");
  const std::string gpt = markdown_table(aggs, "gpt");
  EXPECT_NE(cnn.find("181: acc (± sd) | fid | R (± sd) |"), std::string::npos) << cnn;
  EXPECT_EQ(cnn.find("loss"), std::string::npos) << cnn;
  EXPECT_EQ(cnn.find("3.500"), std::string::npos) << cnn;  // no gpt row in the image table
  EXPECT_NE(cnn.find("| s0 | 0 | 50.0% | A1-frozen | 0.700 ± 0.000 | 0.700 | 0.50 ± 0.00 |"), std::string::npos) << cnn;
  EXPECT_NE(gpt.find("181: loss, nats/token (± sd) | fid | R on loss (± sd) |"), std::string::npos) << gpt;
  EXPECT_EQ(gpt.find("acc (± sd)"), std::string::npos) << gpt;
  EXPECT_EQ(gpt.find("0.700"), std::string::npos) << gpt;  // no cnn row in the gpt table
  EXPECT_NE(gpt.find("| s0 | 0 | 50.0% | A1-frozen | 3.500 ± 0.000 | 0.190 | 0.25 ± 0.00 |"), std::string::npos) << gpt;
  const std::string gpt_headline = headline_table(aggs, "gpt", 181, 4);
  EXPECT_NE(gpt_headline.find("R on test loss"), std::string::npos);
  EXPECT_NE(gpt_headline.find(" | 0.25 ± 0.00 | 0.25 … 0.25 | 0.90 ± 0.00 | 2 |\n"), std::string::npos) << gpt_headline;
  EXPECT_EQ(headline_table(aggs, "cnn", 181, 4).find("loss"), std::string::npos);
  EXPECT_EQ(headline_table(aggs, "cnn", 181, 4).find("next-token"), std::string::npos);
}
