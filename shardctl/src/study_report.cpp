// The pure half of `shardctl study`: rows, exposure, CSV and the report.
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <iostream>
#include <limits>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <type_traits>

#include "shardguard/common/files.h"
#include "shardguard/common/process.h"
#include "shardguard/common/strings.h"
#include "shardguard/model/exposure.h"
#include "shardguard/model/model_desc.h"
#include "shardguard/shardctl/study_report.h"

namespace shardguard::shardctl {
namespace {

std::string held_str(const std::vector<int>& held) {
  std::string s;
  for (size_t i = 0; i < held.size(); ++i) s += (i ? "+" : "") + std::to_string(held[i]);
  return s;
}

StudyRow held_row(std::vector<int> held, int stages) {
  std::sort(held.begin(), held.end());
  held.erase(std::unique(held.begin(), held.end()), held.end());
  StudyRow r;
  r.held = held;
  if (held.empty()) {
    r.name = "none";
  } else if (static_cast<int>(held.size()) == stages) {
    r.name = "all";
  } else {
    r.name = "s" + held_str(held);
  }
  return r;
}

StudyRow sandwich_row(int i) {
  StudyRow r;
  r.name = "sw" + std::to_string(i);
  r.held = {i - 1, i + 1};
  r.sandwiched = i;
  return r;
}

std::vector<StudyRow> group(const std::string& name, int n) {
  std::vector<StudyRow> rows;
  if (name == "single") {
    for (int i = 0; i < n; ++i) rows.push_back(held_row({i}, n));
  } else if (name == "pair") {
    for (int i = 0; i + 1 < n; ++i) rows.push_back(held_row({i, i + 1}, n));
  } else if (name == "triple") {  // every n-1 of n
    for (int skip = n - 1; skip >= 0; --skip) {
      std::vector<int> held;
      for (int i = 0; i < n; ++i) {
        if (i != skip) held.push_back(i);
      }
      rows.push_back(held_row(held, n));
    }
  } else if (name == "sandwich") {
    for (int i = 1; i + 1 < n; ++i) rows.push_back(sandwich_row(i));
  }
  return rows;
}

bool parse_int(const std::string& s, int64_t* out) {
  if (s.empty() || s.size() > 18) return false;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
  }
  *out = std::stoll(s);
  return true;
}

}  // namespace

std::vector<StudyRow> default_rows(int n) {
  std::vector<StudyRow> rows{held_row({}, n)};
  for (const char* g : {"single", "pair", "triple"}) {
    for (auto& r : group(g, n)) {
      if (std::none_of(rows.begin(), rows.end(), [&](const StudyRow& x) { return x.name == r.name; })) {
        rows.push_back(r);
      }
    }
  }
  std::vector<int> all;
  for (int i = 0; i < n; ++i) all.push_back(i);
  if (n > 1) rows.push_back(held_row(all, n));
  for (auto& r : group("sandwich", n)) rows.push_back(r);
  return rows;
}

std::vector<StudyRow> parse_rows(const std::string& list, int n) {
  std::vector<StudyRow> out;
  auto add = [&](const StudyRow& r) {
    if (std::none_of(out.begin(), out.end(), [&](const StudyRow& x) { return x.name == r.name; })) out.push_back(r);
  };
  const std::string known = " (known: none, all, s<i>[+<j>...], sw<i>, single, pair, triple, sandwich, default)";
  for (const auto& raw : split(list, ',')) {
    const std::string e = trim(raw);
    if (e.empty()) throw StudyError("--rows \"" + list + "\": empty entry");
    if (e == "default") {
      for (auto& r : default_rows(n)) add(r);
    } else if (e == "none") {
      add(held_row({}, n));
    } else if (e == "all") {
      std::vector<int> all;
      for (int i = 0; i < n; ++i) all.push_back(i);
      add(held_row(all, n));
    } else if (e == "single" || e == "pair" || e == "triple" || e == "sandwich") {
      const auto rows = group(e, n);
      if (rows.empty()) throw StudyError("--rows " + e + ": a model of " + std::to_string(n) + " stages has no such row");
      for (auto& r : rows) add(r);
    } else if (e.rfind("sw", 0) == 0) {
      int64_t i = 0;
      if (!parse_int(e.substr(2), &i)) throw StudyError("--rows: unknown row \"" + e + "\"" + known);
      if (i < 1 || i + 1 >= n) {
        throw StudyError("--rows " + e + ": stage " + std::to_string(i) + " has no two neighbours in a model of " +
                         std::to_string(n) + " stages (sandwich needs 1 ≤ i ≤ " + std::to_string(n - 2) + ")");
      }
      add(sandwich_row(static_cast<int>(i)));
    } else if (e[0] == 's' && e.size() > 1) {
      std::vector<int> held;
      for (const auto& part : split(e.substr(1), '+')) {
        int64_t i = 0;
        if (!parse_int(part, &i)) throw StudyError("--rows: unknown row \"" + e + "\"" + known);
        if (i >= n) {
          throw StudyError("--rows " + e + ": stage " + std::to_string(i) + " does not exist (the model has " +
                           std::to_string(n) + " stages, 0.." + std::to_string(n - 1) + ")");
        }
        held.push_back(static_cast<int>(i));
      }
      add(held_row(held, n));
    } else {
      throw StudyError("--rows: unknown row \"" + e + "\"" + known);
    }
  }
  return out;
}

double row_exposure(const StudyRow& row, const std::vector<double>& shares) {
  // The operator's definition (model/exposure.h): a row holding stages i-1 and i+1
  // is exposed to stage i too, whether or not the row is a sandwich row.
  std::set<int> held(row.held.begin(), row.held.end());
  if (row.sandwiched >= 0) held.insert(row.sandwiched);
  return model::exposure_of(shares, held);
}

std::vector<std::string> row_attacks(const StudyRow& row, int stages, const std::vector<std::string>& wanted) {
  std::vector<std::string> out;
  for (const auto& a : all_attacks()) {
    if (std::find(wanted.begin(), wanted.end(), a) == wanted.end()) continue;
    if (a == "A4") {  // the query attacker: every row (its held stages frozen)
      out.push_back(a);
      continue;
    }
    if (row.sandwiched >= 0) {
      if (a == "A3") out.push_back(a);
      continue;
    }
    if (a == "A3") continue;
    if (row.held.empty() && a != "A1-frozen") continue;
    out.push_back(a);
  }
  return out;
}

std::vector<StudyPhase> attack_phases(const std::string& attack, int64_t steps, int64_t first_phase) {
  if (attack == "victim") return {};
  if (attack == "A2" || attack == "A3") {
    const int64_t first = first_phase > 0 ? first_phase : steps / 2;
    if (first < 1 || first >= steps) {
      throw StudyError("--fit-steps " + std::to_string(first) + ": the first phase of A2 and A3 must leave steps of the " +
                       std::to_string(steps) + " of --steps to the second (1 ≤ --fit-steps < --steps; 0 = half)");
    }
    return {{attack == "A2" ? "substitute" : "fit", first}, {"train", steps - first}};
  }
  return {{"train", steps}};
}

std::string scratch_run_name(int run) { return run <= 1 ? "scratch" : "scratch-" + std::to_string(run); }

bool is_scratch(const std::string& attack) { return attack == "scratch" || attack.rfind("scratch-", 0) == 0; }

std::vector<int64_t> parse_sizes(const std::string& flag, const std::string& list) {
  std::vector<int64_t> out;
  for (const auto& raw : split(list, ',')) {
    int64_t v = 0;
    if (!parse_int(trim(raw), &v) || v < 1) {
      throw StudyError(flag + " \"" + list + "\": \"" + trim(raw) + "\" is not a positive integer");
    }
    if (std::find(out.begin(), out.end(), v) == out.end()) out.push_back(v);
  }
  return out;
}

std::string CellResult::key() const {
  return model + "|" + row + "|" + attack + "|" + std::to_string(samples) + "|" + std::to_string(seed) +
         (queries > 0 ? "|q" + std::to_string(queries) : "");
}

std::string csv_header() {
  return "model,row,held,exposure,attack,samples,seed,accuracy,fidelity,wall_s,val_accuracy,queries,loss,val_loss";
}

namespace {

// "0+2" → {0, 2}; "" → {}.
std::set<int> held_set(const std::string& held) {
  std::set<int> out;
  if (held.empty()) return out;
  for (const auto& part : split(held, '+')) {
    int64_t v = 0;
    if (parse_int(part, &v) && v >= 0) out.insert(static_cast<int>(v));
  }
  return out;
}

}  // namespace

int restate_exposure(std::vector<CellResult>& cells, const std::map<std::string, std::vector<double>>& shares) {
  int changed = 0;
  for (CellResult& c : cells) {
    if (c.row == "-") continue;
    const auto it = shares.find(c.model);
    if (it == shares.end()) continue;
    const double e = model::exposure_of(it->second, held_set(c.held));
    if (std::fabs(e - c.exposure) > 5e-7) {  // the CSV keeps 6 decimals
      c.exposure = e;
      ++changed;
    }
  }
  return changed;
}

std::string to_csv_line(const CellResult& c) {
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s,%s,%s,%.6f,%s,%lld,%d,%.6f,%.6f,%.3f", c.model.c_str(), c.row.c_str(),
                c.held.c_str(), c.exposure, c.attack.c_str(), static_cast<long long>(c.samples), c.seed, c.accuracy,
                c.fidelity, c.wall_seconds);
  std::string line = buf;
  // A cell of the first study (no validation split) keeps its 10 fields.
  if (!std::isnan(c.val_accuracy) || c.queries > 0 || c.on_loss()) {
    std::snprintf(buf, sizeof buf, ",%.6f", c.val_accuracy);
    line += buf;
  }
  // Only A4 lines carry the query budget; the others keep their fields as before.
  if (c.queries > 0 || c.on_loss()) line += "," + (c.queries > 0 ? std::to_string(c.queries) : std::string());
  // Only a language model's lines carry its losses (nats per token).
  if (c.on_loss()) {
    std::snprintf(buf, sizeof buf, ",%.6f,%.6f", c.loss, c.val_loss);
    line += buf;
  }
  return line;
}

namespace {

// One CSV line that is not a result: the reason, for CsvSkipped.
struct BadLine : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Field `i` of a line as a whole number or a floating-point number: all of it (no
// leading space or sign other than '-', as the writer never makes one), within T's
// range, or BadLine.
template <typename T>
T csv_number(const std::vector<std::string>& f, size_t i) {
  static const std::vector<std::string> names = split(csv_header(), ',');
  const std::string& s = f[i];
  size_t used = 0;
  T v{};
  try {
    if constexpr (std::is_floating_point_v<T>) {
      v = static_cast<T>(std::stod(s, &used));
    } else {
      const long long n = std::stoll(s, &used);
      if (n < std::numeric_limits<T>::min() || n > std::numeric_limits<T>::max()) used = 0;
      v = static_cast<T>(n);
    }
  } catch (const std::exception&) {
    used = 0;
  }
  const bool plain = !s.empty() && (s[0] == '-' || std::isalnum(static_cast<unsigned char>(s[0])));
  if (!plain || used != s.size()) throw BadLine(names[i] + " '" + s + "' is not a number");
  return v;
}

// A measured value that must be finite (the controls' and attacks' accuracy, fidelity, time).
double csv_finite(const std::vector<std::string>& f, size_t i) {
  const double v = csv_number<double>(f, i);
  if (!std::isfinite(v)) throw BadLine(split(csv_header(), ',')[i] + " '" + f[i] + "' is not finite");
  return v;
}

CellResult parse_csv_line(const std::string& line) {
  const auto f = split(line, ',');
  if (f.size() < 10 || f.size() > 14 || f.size() == 13) {
    throw BadLine(std::to_string(f.size()) + " fields, a result has 10, 11, 12 or 14");
  }
  CellResult c;
  c.model = f[0];
  c.row = f[1];
  c.held = f[2];
  c.exposure = csv_finite(f, 3);
  if (c.exposure < 0 || c.exposure > 1) throw BadLine("exposure " + f[3] + " is outside [0, 1]");
  c.attack = f[4];
  if (c.model.empty() || c.row.empty() || c.attack.empty()) throw BadLine("model, row and attack may not be empty");
  c.samples = csv_number<long long>(f, 5);
  c.seed = csv_number<int>(f, 6);
  c.accuracy = csv_finite(f, 7);
  c.fidelity = csv_finite(f, 8);
  c.wall_seconds = csv_finite(f, 9);
  if (f.size() >= 11) c.val_accuracy = csv_number<double>(f, 10);
  if (f.size() >= 12 && !f[11].empty()) c.queries = csv_number<long long>(f, 11);
  if (c.samples < 0 || c.queries < 0) throw BadLine("samples and queries may not be negative");
  if (f.size() == 14) {
    c.loss = csv_number<double>(f, 12);
    c.val_loss = csv_number<double>(f, 13);
  }
  return c;
}

}  // namespace

std::vector<CellResult> parse_csv(const std::string& text, CsvSkipped* skipped) {
  std::vector<CellResult> out;
  size_t pos = 0;
  int number = 0;
  while (pos < text.size()) {
    const size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) {  // a line cut short by an interruption
      if (skipped != nullptr) skipped->cut_short = number + 1;
      break;
    }
    std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (number == 1 && line.rfind("\xEF\xBB\xBF", 0) == 0) line.erase(0, 3);  // a UTF-8 byte order mark
    if (line.empty() || (number == 1 && line.rfind("model,", 0) == 0)) continue;
    try {
      if (line.rfind("model,", 0) == 0) throw BadLine("a second header line (a study's CSV has one, on line 1)");
      out.push_back(parse_csv_line(line));
    } catch (const BadLine& e) {
      if (skipped == nullptr) continue;
      if (skipped->lines++ == 0) skipped->first = "line " + std::to_string(number) + ": " + e.what();
    }
  }
  return out;
}

std::string describe_skipped(const std::string& path, const CsvSkipped& skipped) {
  std::string out = path + ":";
  if (skipped.lines > 0) {
    out += " " + std::to_string(skipped.lines) +
           (skipped.lines == 1 ? " line is not a study result" : " lines are not study results") + " (first: " +
           skipped.first + ")";
  }
  if (skipped.cut_short > 0) {
    out += std::string(skipped.lines > 0 ? ";" : "") + " line " + std::to_string(skipped.cut_short) +
           " has no newline (a write cut short)";
  }
  return out + "; mend or delete such lines to have them read";
}

Stat stat_of(const std::vector<double>& v) {
  Stat s;
  s.n = static_cast<int>(v.size());
  if (v.empty()) return s;
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / s.n;
  if (s.n > 1) {
    double ss = 0;
    for (double x : v) ss += (x - s.mean) * (x - s.mean);
    s.std = std::sqrt(ss / (s.n - 1));
  }
  return s;
}

double recovered_fraction(double attack, double scratch, double victim) {
  const double gap = victim - scratch;
  if (std::fabs(gap) < 1e-12) return std::nan("");
  return (attack - scratch) / gap;
}

double t_quantile_975(int df) {
  // Student's t, two-sided 95 %: exact to 3 decimals up to 30 degrees of freedom.
  static const double kT[] = {12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
                              2.201,  2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
                              2.080,  2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042};
  if (df < 1) return std::nan("");
  if (df <= 30) return kT[df - 1];
  return 1.960 + 2.4 / df;  // within 0.002 of the exact value above 30
}

double rerun_half_width(const Stat& s) {
  if (s.n < 2) return std::nan("");
  return t_quantile_975(s.n - 1) * s.std * std::sqrt(2.0 / s.n);
}

std::vector<Aggregate> aggregate(const std::vector<CellResult>& cells) {
  // Controls per (model, samples, seed): the scratch runs' accuracies (their mean is
  // the seed's scratch level), the victim's.
  struct Runs {
    std::vector<double> test, val, fid, loss, val_loss;
  };
  std::map<std::string, Runs> scratch_runs;
  std::map<std::string, const CellResult*> victim;
  auto ctl = [](const CellResult& c) { return c.model + "|" + std::to_string(c.samples) + "|" + std::to_string(c.seed); };
  {
    std::set<std::string> seen;
    for (const auto& c : cells) {
      if (!seen.insert(c.key()).second) continue;
      if (is_scratch(c.attack)) {
        scratch_runs[ctl(c)].test.push_back(c.accuracy);
        scratch_runs[ctl(c)].val.push_back(c.val_accuracy);
        scratch_runs[ctl(c)].fid.push_back(c.fidelity);
        scratch_runs[ctl(c)].loss.push_back(c.loss);
        scratch_runs[ctl(c)].val_loss.push_back(c.val_loss);
      }
      if (c.attack == "victim") victim[ctl(c)] = &c;
    }
  }
  auto mean = [](const std::vector<double>& v) {
    double sum = 0;
    for (double x : v) sum += x;
    return v.empty() ? std::nan("") : sum / static_cast<double>(v.size());  // NaN when any value is NaN
  };
  struct Acc {
    Aggregate a;
    std::vector<double> acc, fid, loss, r, val_r, r_accuracy, wall;
  };
  std::vector<std::string> order;
  std::map<std::string, Acc> groups;
  std::set<std::string> seen, scratch_seeds;
  for (const auto& c : cells) {
    if (!seen.insert(c.key()).second) continue;  // a cell measured twice counts once
    const bool scratch = is_scratch(c.attack);
    // The scratch runs of one seed enter their group once, as their mean.
    if (scratch && !scratch_seeds.insert(ctl(c)).second) continue;
    const std::string attack = scratch ? "scratch" : c.attack;
    const std::string g = c.model + "|" + c.row + "|" + attack + "|" + std::to_string(c.samples) +
                          (c.queries > 0 ? "|q" + std::to_string(c.queries) : "");
    auto [it, fresh] = groups.try_emplace(g);
    if (fresh) {
      order.push_back(g);
      it->second.a.model = c.model;
      it->second.a.row = c.row;
      it->second.a.held = c.held;
      it->second.a.exposure = c.exposure;
      it->second.a.attack = attack;
      it->second.a.samples = c.samples;
      it->second.a.queries = c.queries;
      it->second.a.on_loss = c.on_loss();
    }
    const auto s = scratch_runs.find(ctl(c));
    it->second.acc.push_back(scratch ? mean(s->second.test) : c.accuracy);
    it->second.fid.push_back(scratch ? mean(s->second.fid) : c.fidelity);
    if (c.on_loss()) it->second.loss.push_back(scratch ? mean(s->second.loss) : c.loss);
    it->second.wall.push_back(c.wall_seconds);
    const auto v = victim.find(ctl(c));
    if (scratch || s == scratch_runs.end() || v == victim.end()) continue;
    // A language model's R is on the loss: (scratch − attack) / (scratch − victim) is
    // recovered_fraction's (attack − scratch) / (victim − scratch) with the losses.
    const bool on_loss = c.on_loss();
    const double r = on_loss ? recovered_fraction(c.loss, mean(s->second.loss), v->second->loss)
                             : recovered_fraction(c.accuracy, mean(s->second.test), v->second->accuracy);
    if (!std::isnan(r)) it->second.r.push_back(r);
    const double vr = on_loss ? recovered_fraction(c.val_loss, mean(s->second.val_loss), v->second->val_loss)
                              : recovered_fraction(c.val_accuracy, mean(s->second.val), v->second->val_accuracy);
    if (!std::isnan(vr)) it->second.val_r.push_back(vr);
    if (on_loss) {
      const double ra = recovered_fraction(c.accuracy, mean(s->second.test), v->second->accuracy);
      if (!std::isnan(ra)) it->second.r_accuracy.push_back(ra);
    }
  }
  std::vector<Aggregate> out;
  for (const auto& g : order) {
    auto& x = groups[g];
    x.a.accuracy = stat_of(x.acc);
    x.a.fidelity = stat_of(x.fid);
    x.a.loss = stat_of(x.loss);
    x.a.r = stat_of(x.r);
    x.a.val_r = stat_of(x.val_r);
    x.a.r_accuracy = stat_of(x.r_accuracy);
    x.a.wall = stat_of(x.wall);
    out.push_back(x.a);
  }
  return out;
}

double selection_r(const Aggregate& a) { return a.val_r.n > 0 ? a.val_r.mean : a.r.mean; }

std::string markdown_table(const std::vector<Aggregate>& aggs, const std::string& model) {
  std::vector<int64_t> sizes;
  std::vector<std::pair<std::string, std::string>> lines;  // (row, attack) in order
  std::map<std::string, const Aggregate*> by;
  // A4 (query budgets) has its own table (a4_table); a size with controls only (A4's
  // data-free scratch level) gets no column here.
  for (const auto& a : aggs) {
    if (a.model != model || a.queries > 0 || a.row == "-") continue;
    if (std::find(sizes.begin(), sizes.end(), a.samples) == sizes.end()) sizes.push_back(a.samples);
  }
  for (const auto& a : aggs) {
    if (a.model != model || a.queries > 0) continue;
    if (std::find(sizes.begin(), sizes.end(), a.samples) == sizes.end()) continue;
    const std::pair<std::string, std::string> key{a.row, a.attack};
    if (std::find(lines.begin(), lines.end(), key) == lines.end()) lines.push_back(key);
    by[a.row + "|" + a.attack + "|" + std::to_string(a.samples)] = &a;
  }
  std::sort(sizes.begin(), sizes.end());
  // Controls first, then rows in the order measured.
  std::stable_partition(lines.begin(), lines.end(), [](const auto& l) { return l.first == "-"; });
  // A language model's table shows its loss (nats per token) and R on the loss; the
  // tables are per model, so a language model's rows never share one with images.
  const bool on_loss = std::any_of(aggs.begin(), aggs.end(), [&](const Aggregate& a) { return a.model == model && a.on_loss; });
  std::ostringstream o;
  o << "| row | held | exposure | attack |";
  for (auto n : sizes) {
    o << " " << n << (on_loss ? ": loss, nats/token (± sd) | fid | R on loss (± sd) |" : ": acc (± sd) | fid | R (± sd) |");
  }
  o << " seeds |\n|---|---|---|---|";
  for (size_t i = 0; i < sizes.size(); ++i) o << "---|---|---|";
  o << "---|\n";
  char buf[128];
  for (const auto& [row, attack] : lines) {
    const Aggregate* any = nullptr;
    int seeds = 0;
    for (auto n : sizes) {
      auto it = by.find(row + "|" + attack + "|" + std::to_string(n));
      if (it != by.end()) {
        any = it->second;
        seeds = std::max(seeds, it->second->accuracy.n);
      }
    }
    std::snprintf(buf, sizeof buf, "%.1f%%", any ? 100 * any->exposure : 0.0);
    o << "| " << row << " | " << (any && !any->held.empty() ? any->held : "–") << " | " << (row == "-" ? "–" : buf)
      << " | " << attack << " |";
    for (auto n : sizes) {
      auto it = by.find(row + "|" + attack + "|" + std::to_string(n));
      if (it == by.end()) {
        o << " … | … | … |";
        continue;
      }
      const Aggregate& a = *it->second;
      const Stat& shown = on_loss ? a.loss : a.accuracy;
      // With one seed there is no spread to show: the mean alone.
      if (shown.n > 1) {
        std::snprintf(buf, sizeof buf, " %.3f ± %.3f | %.3f |", shown.mean, shown.std, a.fidelity.mean);
      } else {
        std::snprintf(buf, sizeof buf, " %.3f | %.3f |", shown.mean, a.fidelity.mean);
      }
      o << buf;
      if (a.r.n == 0 || attack == "victim" || attack == "scratch") {
        o << " – |";
      } else if (a.r.n > 1) {
        std::snprintf(buf, sizeof buf, " %.2f ± %.2f |", a.r.mean, a.r.std);
        o << buf;
      } else {
        std::snprintf(buf, sizeof buf, " %.2f |", a.r.mean);
        o << buf;
      }
    }
    o << " " << seeds << " |\n";
  }
  return o.str();
}

namespace {

// Per row of `model` at `samples` (table order; not the controls), the aggregate of
// the attack with the highest selection_r (validation R where the cells have it);
// rows without R are left out.
std::vector<const Aggregate*> best_per_row(const std::vector<Aggregate>& aggs, const std::string& model,
                                           int64_t samples) {
  std::vector<const Aggregate*> best;
  for (const auto& a : aggs) {
    if (a.model != model || a.row == "-" || a.samples != samples || a.r.n == 0 || a.queries > 0) continue;
    auto it = std::find_if(best.begin(), best.end(), [&](const Aggregate* b) { return b->row == a.row; });
    if (it == best.end()) {
      best.push_back(&a);
    } else if (selection_r(a) > selection_r(**it)) {
      *it = &a;
    }
  }
  return best;
}

}  // namespace

std::string headline_table(const std::vector<Aggregate>& aggs, const std::string& model, int64_t samples,
                           int stages) {
  const auto best = best_per_row(aggs, model, samples);
  const bool on_validation =
      !best.empty() && std::all_of(best.begin(), best.end(), [](const Aggregate* a) { return a->val_r.n > 0; });
  const bool on_loss = std::any_of(best.begin(), best.end(), [](const Aggregate* a) { return a->on_loss; });
  std::ostringstream o;
  o << "| group | row | exposure | best attack (chosen on " << (on_validation ? "validation" : "test")
    << ") | R on test" << (on_loss ? " loss" : "") << ", mean ± sd over seeds | 95 % interval for a rerun's mean |"
    << (on_loss ? " R on next-token accuracy (same attack) |" : "") << " seeds |\n"
    << "|---|---|---|---|---|---|" << (on_loss ? "---|" : "") << "---|\n";
  char buf[96];
  for (const Aggregate* a : best) {
    const size_t held = a->held.empty() ? 0 : split(a->held, '+').size();
    std::string grp = std::to_string(held) + (stages > 0 ? " of " + std::to_string(stages) : " held");
    if (a->row.rfind("sw", 0) == 0) grp = "sandwich";
    std::snprintf(buf, sizeof buf, "%.1f%%", 100 * a->exposure);
    o << "| " << grp << " | " << a->row << " | " << buf << " | " << a->attack
      << (on_validation || a->val_r.n == 0 ? "" : " (on validation)") << " | ";
    std::snprintf(buf, sizeof buf, a->r.n > 1 ? "%.2f ± %.2f" : "%.2f", a->r.mean, a->r.std);
    o << buf << " | ";
    const double h = rerun_half_width(a->r);
    if (std::isnan(h)) {
      o << "–";
    } else {
      std::snprintf(buf, sizeof buf, "%.2f … %.2f", a->r.mean - h, a->r.mean + h);
      o << buf;
    }
    if (on_loss) {
      // Secondary: a language model's R on the accuracy does not punish the overconfidence
      // of an attacker that overfit its few windows, which R on the loss does.
      std::snprintf(buf, sizeof buf, a->r_accuracy.n > 1 ? " | %.2f ± %.2f" : " | %.2f", a->r_accuracy.mean,
                    a->r_accuracy.std);
      o << (a->r_accuracy.n > 0 ? buf : " | –");
    }
    o << " | " << a->r.n << " |\n";
  }
  return o.str();
}

std::map<int64_t, std::vector<PlotPoint>> best_r_by_size(const std::vector<Aggregate>& aggs, const std::string& model) {
  std::map<int64_t, std::vector<PlotPoint>> out;
  for (const auto& a : aggs) {
    if (a.model != model || a.row == "-" || a.r.n == 0 || a.queries > 0 || out.count(a.samples)) continue;
    auto& pts = out[a.samples];
    for (const Aggregate* b : best_per_row(aggs, model, a.samples)) {
      const double h = rerun_half_width(b->r);
      pts.push_back({b->row, b->exposure, b->r.mean, std::isnan(h) ? 0.0 : h, b->attack});
    }
    std::stable_sort(pts.begin(), pts.end(), [](const PlotPoint& x, const PlotPoint& y) { return x.exposure < y.exposure; });
  }
  return out;
}

int64_t queries_to_reach(const std::vector<std::pair<int64_t, double>>& r_by_budget, double target,
                         double* interpolated) {
  *interpolated = std::nan("");
  for (size_t i = 0; i < r_by_budget.size(); ++i) {
    const auto [q, r] = r_by_budget[i];
    if (std::isnan(r) || r < target) continue;
    if (i == 0) {
      *interpolated = static_cast<double>(q);
    } else {
      const auto [q0, r0] = r_by_budget[i - 1];
      const double f = std::isnan(r0) ? 1.0 : (target - r0) / (r - r0);  // r0 < target ≤ r
      *interpolated = std::exp(std::log(static_cast<double>(q0)) +
                               f * (std::log(static_cast<double>(q)) - std::log(static_cast<double>(q0))));
    }
    return q;
  }
  return 0;
}

std::string a4_table(const std::vector<Aggregate>& aggs, const std::string& model, int64_t samples) {
  std::vector<int64_t> budgets;
  std::vector<std::string> rows;
  std::map<std::string, const Aggregate*> by;  // row|queries
  for (const auto& a : aggs) {
    if (a.model != model || a.samples != samples || a.queries <= 0 || a.attack != "A4") continue;
    if (std::find(budgets.begin(), budgets.end(), a.queries) == budgets.end()) budgets.push_back(a.queries);
    if (std::find(rows.begin(), rows.end(), a.row) == rows.end()) rows.push_back(a.row);
    by[a.row + "|" + std::to_string(a.queries)] = &a;
  }
  if (budgets.empty()) return "";
  std::sort(budgets.begin(), budgets.end());
  std::ostringstream o;
  o << "| row | held | exposure |";
  for (auto q : budgets) o << " " << q << " queries: acc (± sd) | fid | R (± sd) |";
  o << " R ≥ 0.5 first at | R = 0.5 at (log-interpolated) | seeds |\n|---|---|---|";
  for (size_t i = 0; i < budgets.size(); ++i) o << "---|---|---|";
  o << "---|---|---|\n";
  char buf[128];
  for (const auto& row : rows) {
    const Aggregate* any = nullptr;
    int seeds = 0;
    std::vector<std::pair<int64_t, double>> curve;
    for (auto q : budgets) {
      const auto it = by.find(row + "|" + std::to_string(q));
      if (it == by.end()) continue;
      any = it->second;
      seeds = std::max(seeds, it->second->accuracy.n);
      curve.emplace_back(q, it->second->r.n > 0 ? it->second->r.mean : std::nan(""));
    }
    std::snprintf(buf, sizeof buf, "%.1f%%", 100 * any->exposure);
    o << "| " << row << " | " << (any->held.empty() ? "–" : any->held) << " | " << buf << " |";
    for (auto q : budgets) {
      const auto it = by.find(row + "|" + std::to_string(q));
      if (it == by.end()) {
        o << " … | … | … |";
        continue;
      }
      const Aggregate& a = *it->second;
      std::snprintf(buf, sizeof buf, a.accuracy.n > 1 ? " %.3f ± %.3f | %.3f |" : " %.3f | %.3f |", a.accuracy.mean,
                    a.accuracy.n > 1 ? a.accuracy.std : a.fidelity.mean, a.fidelity.mean);
      o << buf;
      if (a.r.n == 0) {
        o << " – |";
      } else {
        std::snprintf(buf, sizeof buf, a.r.n > 1 ? " %.2f ± %.2f |" : " %.2f |", a.r.mean, a.r.std);
        o << buf;
      }
    }
    double at = 0;
    const int64_t first = queries_to_reach(curve, 0.5, &at);
    if (first == 0) {
      o << " not reached | – |";
    } else {
      std::snprintf(buf, sizeof buf, " %lld | %s%.0f |", static_cast<long long>(first),
                    first == curve.front().first ? "≤ " : "≈ ", at);
      o << buf;
    }
    o << " " << seeds << " |\n";
  }
  return o.str();
}

std::string data_vs_queries_table(const std::vector<Aggregate>& aggs, const std::string& model) {
  // Rows in table order; the data columns by size, A4's by (labelled samples, budget).
  std::vector<std::string> rows;
  std::map<std::string, const Aggregate*> any;  // a row's exposure and holding
  std::map<std::pair<int64_t, int64_t>, std::map<std::string, const Aggregate*>> a4;
  for (const auto& a : aggs) {
    if (a.model != model || a.row == "-" || a.r.n == 0) continue;
    if (any.emplace(a.row, &a).second) rows.push_back(a.row);
    if (a.queries > 0) a4[{a.samples, a.queries}][a.row] = &a;
  }
  const auto data = best_r_by_size(aggs, model);
  if (data.empty() || a4.empty()) return "";
  std::ostringstream o;
  o << "| row | held | exposure |";
  for (const auto& [n, points] : data) o << " data: " << n << " samples, best attack R |";
  for (const auto& [key, by_row] : a4) o << " queries: A4 " << key.second << " (" << key.first << " labelled), R |";
  o << "\n|---|---|---|";
  for (size_t i = 0; i < data.size() + a4.size(); ++i) o << "---|";
  o << "\n";
  char buf[96];
  for (const auto& row : rows) {
    const Aggregate& first = *any.at(row);
    std::snprintf(buf, sizeof buf, "%.1f%%", 100 * first.exposure);
    o << "| " << row << " | " << (first.held.empty() ? "–" : first.held) << " | " << buf << " |";
    for (const auto& [n, points] : data) {
      const auto p = std::find_if(points.begin(), points.end(), [&](const PlotPoint& x) { return x.row == row; });
      if (p == points.end()) {
        o << " … |";
        continue;
      }
      std::snprintf(buf, sizeof buf, " %.2f (%s) |", p->r, p->attack.c_str());
      o << buf;
    }
    for (const auto& [key, by_row] : a4) {
      const auto it = by_row.find(row);
      if (it == by_row.end()) {
        o << " … |";
        continue;
      }
      const Stat& r = it->second->r;
      std::snprintf(buf, sizeof buf, r.n > 1 ? " %.2f ± %.2f |" : " %.2f |", r.mean, r.std);
      o << buf;
    }
    o << "\n";
  }
  return o.str();
}

void apply_quick(StudyOptions& o, const std::vector<std::string>& given) {
  auto unset = [&](const char* flag) { return std::find(given.begin(), given.end(), flag) == given.end(); };
  if (unset("--seeds")) o.seeds = 1;
  if (unset("--samples")) o.samples = "60,600";
  if (unset("--queries")) o.queries = "2000,10000";
  if (unset("--steps")) o.steps = 200;
  if (unset("--batch")) o.batch_size = 32;
  if (unset("--scratch-runs")) o.scratch_runs = 2;
  if (unset("--test-samples")) o.test_samples = 1000;
  if (unset("--val-samples")) o.val_samples = 1000;
  if (unset("--victim-samples")) o.victim_train_samples = 30000;
  if (unset("--victim-epochs")) o.victim_epochs = 2;
}

std::vector<StudyJob> load_study_jobs(const StudyOptions& o) {
  std::vector<StudyJob> jobs;
  std::set<std::string> models;
  for (const auto& f : o.job_files) {
    StudyJob j;
    j.file = f;
    try {
      j.spec = load_job_file(f);
    } catch (const std::exception& e) {
      throw StudyError("--job " + f + ": invalid job:\n" + e.what());
    }
    j.model = j.spec.model.architecture;
    if (!models.insert(j.model).second) {
      throw StudyError("--job " + f + ": a second job of model " + j.model + " (one job per architecture)");
    }
    const auto desc = model::describe_model(j.spec.model);
    try {
      j.cut = model::partition(desc, j.spec.sharding.shards, j.spec.sharding.balance);
    } catch (const std::exception& e) {
      throw StudyError("--job " + f + ": " + e.what());
    }
    for (const auto& s : j.cut) j.shares.push_back(model::parameter_share(desc, s));
    jobs.push_back(std::move(j));
  }
  return jobs;
}

std::map<std::string, std::vector<double>> shares_by_model(const std::vector<StudyJob>& jobs) {
  std::map<std::string, std::vector<double>> shares;
  for (const auto& j : jobs) shares[j.model] = j.shares;
  return shares;
}

namespace {

// A gnuplot single-quoted string: a quote inside is written twice.
std::string gnuplot_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

std::string plot_data(const std::map<int64_t, std::vector<PlotPoint>>& points) {
  std::ostringstream d;
  for (const auto& [n, list] : points) {
    d << "# samples " << n << "\n";
    for (const auto& p : list) d << p.exposure << " " << p.r << " " << p.r_err << " " << p.row << "\n";
    d << "\n\n";
  }
  return d.str();
}

// `lm`: a language model's plot (its sizes are training windows, its R on the loss).
std::string plot_script(const std::string& model, const std::string& dat, const std::string& png,
                        const std::map<int64_t, std::vector<PlotPoint>>& points, bool lm = false) {
  std::ostringstream g;
  g << "set terminal pngcairo size 900,560 font 'sans,10'\n"
    << "set output " << gnuplot_quote(png) << "\n"
    << "set title " << gnuplot_quote("Exposure study, " + model + ": best attack per row") << "\n"
    << "set xlabel 'exposure (share of parameters held or sandwiched)'\n"
    << "set ylabel '" << (lm ? "recovered fraction R (on the loss, nats/token)" : "recovered fraction R") << "'\n"
    << "set xrange [-0.02:1.02]\nset yrange [*<-0.3:1.15<*]\nset grid\nset key left top\n"
    << "plot ";
  size_t i = 0;
  for (const auto& entry : points) {
    g << (i ? ", \\\n     " : "") << gnuplot_quote(dat) << " index " << i << " using 1:2:3 with yerrorbars pt "
      << (5 + 2 * i) << " title '" << entry.first << (lm ? " training windows'" : " samples'");
    ++i;
  }
  // Row names next to the points of the first series.
  g << ", \\\n     " << gnuplot_quote(dat) << " index 0 using 1:2:4 with labels offset 0.6,0.6 left font ',7' notitle\n";
  return g.str();
}

// Runs gnuplot on one script, at most a minute; its output goes to `log`.
bool run_gnuplot(const std::string& gnuplot, const std::string& script, const std::string& log) {
  SpawnOptions o;
  o.argv = {gnuplot, script};
  o.log_file = log;
  Process p(o);
  auto status = p.wait_for(std::chrono::minutes(1));
  if (!status) {
    p.terminate(std::chrono::seconds(2));
    std::fprintf(stderr, "study: gnuplot ran past a minute on %s; stopped it (log %s)\n", script.c_str(), log.c_str());
    return false;
  }
  if (!status->exited || status->code != 0) {
    std::fprintf(stderr, "study: gnuplot failed on %s (%s; log %s)\n", script.c_str(), status->str().c_str(),
                 log.c_str());
    return false;
  }
  std::remove(log.c_str());  // kept only when gnuplot failed
  return true;
}

// Writes BASE.dat and, with gnuplot (a path; "" for none), BASE.gp from
// script(dat, png) and draws BASE.png.
void write_plot(const std::string& gnuplot, const std::string& base, const std::string& data,
                const std::function<std::string(const std::string&, const std::string&)>& script) {
  write_file_atomic(base + ".dat", data);
  if (gnuplot.empty()) return;
  write_file_atomic(base + ".gp", script(base + ".dat", base + ".png"));
  run_gnuplot(gnuplot, base + ".gp", base + ".gnuplot.log");
}

}  // namespace

std::string a4_plot_data(const std::vector<Aggregate>& aggs, const std::string& model, int64_t samples) {
  std::vector<std::string> rows;
  std::map<std::string, std::vector<const Aggregate*>> by_row;
  for (const auto& a : aggs) {
    if (a.model != model || a.samples != samples || a.queries <= 0 || a.attack != "A4" || a.r.n == 0) continue;
    if (!by_row.count(a.row)) rows.push_back(a.row);
    by_row[a.row].push_back(&a);
  }
  std::ostringstream d;
  for (const auto& row : rows) {
    auto& points = by_row[row];
    std::sort(points.begin(), points.end(), [](const Aggregate* x, const Aggregate* y) { return x->queries < y->queries; });
    d << "# " << row << " " << points.front()->exposure << "\n";
    for (const Aggregate* a : points) d << a->queries << " " << a->r.mean << " " << (a->r.n > 1 ? a->r.std : 0.0) << "\n";
    d << "\n\n";
  }
  return d.str();
}

std::string a4_plot_script(const std::string& model, int64_t samples, const std::string& dat, const std::string& png,
                           const std::string& data) {
  std::vector<std::string> rows;
  std::istringstream in(data);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("# ", 0) == 0) rows.push_back(line.substr(2, line.find(' ', 2) - 2));
  }
  std::ostringstream g;
  g << "set terminal pngcairo size 900,560 font 'sans,10'\n"
    << "set output " << gnuplot_quote(png) << "\n"
    << "set title " << gnuplot_quote("Exposure study, " + model + ": A4, the query attacker (" + std::to_string(samples) +
                                     " labelled samples)") << "\n"
    << "set xlabel 'queries to the victim (log scale)'\nset ylabel 'recovered fraction R (mean over seeds, ± sd)'\n"
    << "set logscale x\nset offsets graph 0.04, graph 0.04, 0, 0\nset yrange [*<-0.3:1.15<*]\nset grid\n"
    << "set key outside right top\n"
    << "plot 0.5 with lines dt 2 lc 'gray' title 'R = 0.5'";
  for (size_t i = 0; i < rows.size(); ++i) {
    g << ", \\\n     " << gnuplot_quote(dat) << " index " << i << " using 1:2:3 with yerrorlines pt " << (1 + i % 13)
      << " title " << gnuplot_quote(rows[i]);
  }
  g << "\n";
  return g.str();
}

void write_report(const std::string& out_dir, bool plots, const std::map<std::string, std::vector<double>>& shares) {
  CsvSkipped skipped;
  auto cells = parse_csv(read_file(out_dir + "/results.csv"), &skipped);
  if (skipped.any()) std::cerr << "study: " << describe_skipped(out_dir + "/results.csv", skipped) << "\n";
  // The file is rewritten only when every line in it is a result: a rewrite drops the others.
  if (const int changed = restate_exposure(cells, shares); changed > 0 && skipped.any()) {
    std::printf("study: the exposure of %d cells is restated in the report only; results.csv keeps its lines\n",
                changed);
  } else if (changed > 0) {
    std::string csv = csv_header() + "\n";
    for (const auto& c : cells) csv += to_csv_line(c) + "\n";
    write_file_atomic(out_dir + "/results.csv", csv);
    std::printf("study: restated the exposure of %d cells from their holdings (held and sandwiched stages)\n", changed);
  }
  const auto aggs = aggregate(cells);
  std::vector<std::string> models;
  for (const auto& c : cells) {
    if (std::find(models.begin(), models.end(), c.model) == models.end()) models.push_back(c.model);
  }
  const std::string gnuplot = plots ? find_in_path("gnuplot") : "";
  if (plots && gnuplot.empty()) std::printf("study: gnuplot is not on PATH; writing the plot data without plots\n");
  std::ostringstream md;
  md << "<!-- written by shardctl study from results.csv -->\n";
  // Headlines first (best attack per row, per size in the CSV's order), then the
  // full tables.
  for (const auto& m : models) {
    std::vector<int64_t> sizes;
    for (const auto& c : cells) {
      if (c.model == m && c.row != "-" && c.queries == 0 &&
          std::find(sizes.begin(), sizes.end(), c.samples) == sizes.end()) {
        sizes.push_back(c.samples);
      }
    }
    const auto sh = shares.find(m);
    const int stages = sh == shares.end() ? 0 : static_cast<int>(sh->second.size());
    // A language model's samples are training windows, its R is on the loss.
    const bool lm = std::any_of(cells.begin(), cells.end(), [&](const CellResult& c) { return c.model == m && c.on_loss(); });
    for (int64_t n : sizes) {
      md << "\n### Headline: " << m << ", " << n << (lm ? " training windows (R on the loss, nats/token, on the test windows from validation.tokens)" : " samples")
         << "\n\n" << headline_table(aggs, m, n, stages);
    }
  }
  // A4, the query attacker: R per row and query budget, per labelled-sample count.
  for (const auto& m : models) {
    std::vector<int64_t> sizes;
    for (const auto& c : cells) {
      if (c.model == m && c.queries > 0 && std::find(sizes.begin(), sizes.end(), c.samples) == sizes.end()) {
        sizes.push_back(c.samples);
      }
    }
    for (int64_t n : sizes) {
      md << "\n### A4 (query attacker): " << m << ", " << n << " labelled samples\n\n" << a4_table(aggs, m, n);
      const std::string data = a4_plot_data(aggs, m, n);
      if (data.empty()) continue;
      write_plot(gnuplot, out_dir + "/plot-" + m + "-a4-n" + std::to_string(n), data,
                 [&](const std::string& dat, const std::string& png) { return a4_plot_script(m, n, dat, png, data); });
    }
    if (const std::string t = data_vs_queries_table(aggs, m); !t.empty()) {
      md << "\n### Attacker with data vs attacker with queries: " << m << "\n\n" << t;
    }
  }
  // The study turned into placement: the worst R one untrusted principal can reach,
  // per attacker, with no stage, each stage alone or both ends trusted, under four caps.
  for (const auto& m : models) {
    const auto sh = shares.find(m);
    if (sh == shares.end()) continue;
    if (const std::string t = placement_table(aggs, m, sh->second); !t.empty()) {
      md << "\n### Placement: " << m
         << ", the worst R one untrusted principal can reach (its row in brackets; a trusted stage stays on the data "
            "owner's nodes)\n\n"
         << t;
    }
  }
  for (const auto& m : models) {
    // A model measured with A4 only has no table of the other attacks.
    if (std::none_of(cells.begin(), cells.end(),
                     [&](const CellResult& c) { return c.model == m && c.row != "-" && c.queries == 0; })) {
      continue;
    }
    const bool lm = std::any_of(cells.begin(), cells.end(), [&](const CellResult& c) { return c.model == m && c.on_loss(); });
    md << "\n### " << m << (lm ? " (language model: loss in nats/token on the test windows, R on the loss)" : "") << "\n\n"
       << markdown_table(aggs, m);
    const auto points = best_r_by_size(aggs, m);
    if (points.empty()) continue;
    write_plot(gnuplot, out_dir + "/plot-" + m, plot_data(points),
               [&](const std::string& dat, const std::string& png) { return plot_script(m, dat, png, points, lm); });
  }
  write_file_atomic(out_dir + "/results.md", md.str());
  std::printf("study: wrote %s/results.csv and results.md\n", out_dir.c_str());
}

int study_exit_code(const std::function<int()>& body) {
  try {
    return body();
  } catch (const StudyError& e) {
    std::cerr << "shardctl study: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "shardctl study: " << e.what() << "\n";
    return 1;
  }
}

std::unique_ptr<FileLock> lock_study_out(const std::string& out_dir) {
  if (!std::filesystem::is_directory(out_dir)) return nullptr;
  try {
    return std::make_unique<FileLock>(out_dir + "/study.lock");
  } catch (const FileLockBusy& e) {
    throw StudyError("--out " + out_dir + ": another shardctl study (" + e.holder() +
                     ") is using it; wait for it to end or pass another --out (for a report while it runs, copy "
                     "its results.csv into a directory of its own and run --report-only there)");
  }
}

int RunStudyReport(const StudyOptions& options) {
  return study_exit_code([&] {
    if (options.job_files.empty()) throw StudyError("--job: at least one ShardedTrainingJob file is needed");
    if (options.out_dir.empty()) throw StudyError("--out: an output directory is needed");
    const auto lock = lock_study_out(options.out_dir);
    const auto jobs = load_study_jobs(options);
    write_report(options.out_dir, !options.no_plots, shares_by_model(jobs));
    return 0;
  });
}

std::string attacker_label(const RiskRow& w) {
  std::string label = std::to_string(w.samples) + (w.on_loss ? " training windows" : " samples");
  if (w.queries > 0) label += " + " + std::to_string(w.queries) + " queries";
  return label;
}

RiskReport worst_reachable_risk(const std::vector<Aggregate>& aggregates, const std::string& model,
                                const std::vector<double>& stage_weights, const std::set<int>& trusted,
                                double max_exposure) {
  RiskReport report;
  report.model = model;
  // The study's stage count: its "all" row holds every stage.
  for (const auto& a : aggregates) {
    if (a.model == model && a.row == "all") report.stages = static_cast<int>(held_set(a.held).size());
  }
  if (report.stages == 0) {
    throw StudyError("--risk: the study has no rows of model " + model + " (with its \"all\" row)");
  }
  if (report.stages != static_cast<int>(stage_weights.size())) {
    throw StudyError("--risk: the study's " + model + " rows are for " + std::to_string(report.stages) +
                     " stages, the job has " + std::to_string(stage_weights.size()) + " shards");
  }
  // By (A4 or not, samples, queries): the attackers with data first, then A4's budgets.
  std::map<std::tuple<bool, int64_t, int64_t>, RiskRow> worst;
  std::set<std::string> out_of_reach;
  for (const Aggregate& a : aggregates) {
    if (a.model != model || a.row == "-" || a.r.n == 0) continue;
    const std::set<int> held = held_set(a.held);
    bool reachable = true;
    for (int i : held) reachable = reachable && !trusted.count(i);
    const double e = model::exposure_of(stage_weights, held, trusted);
    if (!reachable || e > max_exposure + 1e-12) {
      if (out_of_reach.insert(a.row).second) {
        report.out_of_reach.push_back(a.row + (reachable ? " (exposure " + format_ratio(e) + ")" : " (trusted)"));
      }
      continue;
    }
    // The worst (row, attack) chosen as the study's headline chooses: on validation.
    auto [it, fresh] = worst.try_emplace({a.queries > 0, a.samples, a.queries});
    if (fresh || selection_r(a) > it->second.selection) {
      it->second = {a.samples, a.queries, a.on_loss, a.r, a.row, a.attack, e, selection_r(a)};
    }
  }
  for (const auto& [key, row] : worst) report.worst.push_back(row);
  return report;
}

RiskReport worst_reachable_risk(const std::vector<CellResult>& cells, const JobSpec& job,
                                const std::vector<int64_t>& stage_params) {
  return worst_reachable_risk(aggregate(cells), job.model.architecture,
                              std::vector<double>(stage_params.begin(), stage_params.end()),
                              job.protection.trusted_stages, job.protection.max_exposure);
}

std::string placement_table(const std::vector<Aggregate>& aggregates, const std::string& model,
                            const std::vector<double>& stage_shares) {
  const std::vector<double> caps{0.25, 0.5, 0.75, 1.0};
  std::vector<std::set<int>> trusted_sets{{}};
  const int n = static_cast<int>(stage_shares.size());
  for (int i = 0; i < n; ++i) trusted_sets.push_back({i});
  if (n >= 3) trusted_sets.push_back({0, n - 1});  // both ends: the input and the output stage
  std::vector<std::string> trusted_labels;
  for (const auto& t : trusted_sets) {
    std::vector<std::string> listed;
    for (int i : t) listed.push_back(std::to_string(i));
    trusted_labels.push_back(listed.empty() ? "none" : join(listed, ", "));
  }
  double total = 0;
  for (double w : stage_shares) total += w;
  // A cap under an untrusted stage's share refuses the job: no placement exists.
  auto refused = [&](const std::set<int>& trusted, double cap) {
    for (int i = 0; i < static_cast<int>(stage_shares.size()); ++i) {
      if (!trusted.count(i) && stage_shares[i] / total > cap + 1e-12) return true;
    }
    return false;
  };
  // reports[t][c]: trusted set t, cap c.
  std::vector<std::vector<RiskReport>> reports;
  try {
    for (const auto& t : trusted_sets) {
      reports.emplace_back();
      for (double cap : caps) reports.back().push_back(worst_reachable_risk(aggregates, model, stage_shares, t, cap));
    }
  } catch (const StudyError&) {
    return "";  // no "all" row, or another stage count: nothing to place
  }
  // The attackers, in the reports' order (the one with no trusted stage and no cap
  // reaches every row, so it has every attacker).
  const std::vector<RiskRow>& attackers = reports[0].back().worst;
  if (attackers.empty()) return "";
  std::ostringstream o;
  o << "| attacker | trusted stages |";
  for (double cap : caps) o << " maxExposure " << format_ratio(cap).substr(0, 4) << " |";
  o << "\n|---|---|";
  for (size_t i = 0; i < caps.size(); ++i) o << "---|";
  o << "\n";
  char buf[96];
  for (const RiskRow& who : attackers) {
    const std::string name = attacker_label(who);
    for (size_t t = 0; t < trusted_sets.size(); ++t) {
      o << "| " << name << " | " << trusted_labels[t] << " |";
      for (size_t c = 0; c < caps.size(); ++c) {
        if (refused(trusted_sets[t], caps[c])) {
          o << " refused |";
          continue;
        }
        const RiskReport& r = reports[t][c];
        const auto it = std::find_if(r.worst.begin(), r.worst.end(), [&](const RiskRow& x) {
          return x.samples == who.samples && x.queries == who.queries;
        });
        if (it == r.worst.end()) {
          o << " – |";
          continue;
        }
        std::snprintf(buf, sizeof buf, " %.2f (%s) |", it->r.mean, it->row.c_str());
        o << buf;
      }
      o << "\n";
    }
  }
  return o.str();
}

}  // namespace shardguard::shardctl
