#pragma once
// Seeds of an example program (docs/distributed.md, "Seed sweeps"): the
// --seeds LIST option, one seed's results, and the sweep that runs the seeds
// one after another on one process or spreads them over mpirun's ranks and
// collects them at rank 0, with the same numbers either way.
#include "curve_report.hpp"
#include "ranks.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace mesaopt::examples {

// "1,2,3" -> {1, 2, 3}: non-negative integers <= 2^62, none twice, at least
// one. Throws std::invalid_argument naming `option` and the bad item.
inline std::vector<unsigned long long> parse_seed_list(const std::string& option, const std::string& text) {
  std::vector<unsigned long long> seeds;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(item.c_str(), &end, 10);
    if (item.empty() || item[0] == '-' || end == item.c_str() || *end != '\0' || v > (1ULL << 62))
      throw std::invalid_argument(option + " needs non-negative integers, got '" + item + "'");
    if (std::find(seeds.begin(), seeds.end(), v) != seeds.end())
      throw std::invalid_argument(option + " lists seed " + item + " twice");
    seeds.push_back(v);
  }
  if (seeds.empty()) throw std::invalid_argument(option + " needs at least one seed");
  return seeds;
}

// The value of --seed (one seed) or --seeds (a list) as the examples parse it;
// a bad value goes to fail(message), which must not return.
template <class Fail>
std::vector<unsigned long long> seeds_option(const std::string& option, const std::string& text, Fail fail) {
  std::vector<unsigned long long> seeds;
  try {
    seeds = parse_seed_list(option, text);
  } catch (const std::invalid_argument& e) {
    fail(e.what());
  }
  if (option == "--seed" && seeds.size() != 1) fail("--seed takes one seed (--seeds takes a list)");
  return seeds;
}

// One seed's results: its rows (models and learners), training histories,
// the text it reports after the table, and its training time.
struct SeedRun {
  std::vector<CurveRow> rows;
  std::vector<TrainingHistory> histories;
  std::string report;
  double train_seconds = 0;
};

inline std::string encode_seed_run(const SeedRun& run) {
  Encoder e;
  e.put(run.rows);
  e.put(run.histories);
  e.put(run.report);
  e.put(run.train_seconds);
  return e.bytes();
}

inline SeedRun decode_seed_run(const std::string& bytes) {
  Decoder d(bytes);
  SeedRun run;
  run.rows = d.rows();
  run.histories = d.histories();
  run.report = d.text();
  run.train_seconds = d.real();
  return run;
}

// run_one(seed, group) for every seed; every seed's run at rank 0, in the
// order of `seeds` (the other ranks get an empty list). One process, or one
// seed: the seeds one after another, the ranks training each model together
// (group = ranks.group()). Several ranks and seeds: seed k on rank k mod R,
// alone (group = nullptr), then gathered as bytes (nothing is rounded).
inline std::vector<SeedRun> run_seeds(const std::vector<unsigned long long>& seeds, const Ranks& ranks,
                                      const std::function<SeedRun(unsigned long long, train::ProcessGroup*)>& run_one) {
  std::vector<SeedRun> runs;
  if (ranks.size() == 1 || seeds.size() == 1) {
    for (unsigned long long seed : seeds) {
      if (seeds.size() > 1) std::printf("seed %llu\n", seed);
      runs.push_back(run_one(seed, ranks.group()));
    }
    return runs;
  }
  Encoder mine;
  for (std::size_t k = std::size_t(ranks.rank()); k < seeds.size(); k += std::size_t(ranks.size())) {
    std::printf("seed %llu (rank %d)\n", seeds[k], ranks.rank());
    mine.put(long(k));
    mine.put(encode_seed_run(run_one(seeds[k], nullptr)));
  }
  const std::vector<std::string> all = train::gather_strings(*ranks.group(), mine.bytes());
  if (!ranks.root()) return runs;
  runs.resize(seeds.size());
  for (const std::string& bytes : all) {
    Decoder d(bytes);
    while (!d.done()) {
      const long k = d.integer();
      runs.at(std::size_t(k)) = decode_seed_run(d.text());
    }
  }
  std::printf("%zu seeds on %d ranks\n", seeds.size(), ranks.size());
  return runs;
}

// The runs' rows averaged over seeds (mean_over_seeds), their histories and
// reports in seed order (each report headed "seed N: " when there are
// several), and their summed training time.
struct SweepResult {
  std::vector<CurveRow> rows;
  std::vector<TrainingHistory> histories;
  std::vector<std::string> reports;
  double train_seconds = 0;
};

inline SweepResult combine_seeds(const std::vector<unsigned long long>& seeds, std::vector<SeedRun>& runs) {
  SweepResult out;
  std::vector<std::vector<CurveRow>> per_seed;
  for (std::size_t k = 0; k < runs.size(); ++k) {
    SeedRun& run = runs[k];
    per_seed.push_back(std::move(run.rows));
    out.histories.insert(out.histories.end(), run.histories.begin(), run.histories.end());
    if (!run.report.empty())
      out.reports.push_back((seeds.size() > 1 ? "seed " + std::to_string(seeds[k]) + ": " : std::string()) +
                            run.report);
    out.train_seconds += run.train_seconds;
  }
  out.rows = mean_over_seeds(per_seed);
  return out;
}

}  // namespace mesaopt::examples
