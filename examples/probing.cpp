// Linear probes of a softmax model trained on raw tokens (docs/paper.md §4,
// "Probing"; docs/analysis.md, "Linear probes"): what can a linear read-out
// recover from the residual stream after each block?
//
// Trains softmax-<L>L of examples/raw_tokens.cpp (Embed(s_t) -> a softmax block
// with sinusoidal positions -> L-1 softmax blocks -> Dense read-out; default
// L = 3; the paper probes a deeper softmax model, its deepest has 7 layers), then
// captures the residual stream h_0 (after the embedding) .. h_L (after block L)
// on two held-out sets of sequences, fits a ridge probe per layer and position
// on the first set and scores it (R², MSE) on the second, for four targets
// (analysis/probe_targets.hpp): s_{t-1}, s_t, s_{t+1} (the prediction target)
// and the preconditioned input (S_tᵀ S_t + ρ I)⁻¹ s_t of M26.
//
// The paper's findings: after the first layer s_{t-1} is decodable from the
// token at t almost perfectly (the first layer builds the pair (s_{t-1}, s_t));
// the preconditioned input and the next state become decodable with
// increasing accuracy with depth and context length.
//
// Default: raw_tokens' reduced budget (batch 64, 3000 steps, warm-up 300, peak
// lr 3e-3), a few minutes on 2 cores. --full: the paper's (batch 256, 10000
// steps, warm-up 1000 to 8e-4, cosine to 1e-5).
#include "curve_report.hpp"
#include "option_reader.hpp"
#include "ranks.hpp"
#include "raw_token_models.hpp"
#include "seed_sweep.hpp"

#include <mesaopt/analysis.hpp>
#include <mesaopt/learners.hpp>
#include <mesaopt/nn.hpp>
#include <mesaopt/tasks.hpp>
#include <mesaopt/train.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

using namespace mesaopt;
namespace ml = mesaopt::learners;
namespace mt = mesaopt::tasks;
namespace raw_token = mesaopt::examples::raw_token;

namespace {

struct Options {
  bool full = false;
  long batch = 0;  // 0: from the settings
  long steps = 0;  // 0: from the settings
  long layers = 3;
  double lr = 0;  // 0: from the settings
  bool layer_norm = true;
  long fit_sequences = 1000;
  long eval_sequences = 1000;
  double ridge = 1e-6;
  double rho = 1e-3;
  std::vector<unsigned long long> seeds = {1};
  int threads = 0;
  std::string csv;
};

void usage() {
  const raw_token::Settings& d = raw_token::kDefault;
  std::printf(
      "usage: probing [options]\n"
      "  Linear probes of a softmax model trained on raw tokens (linear dynamics, n = 10, T = 50; the\n"
      "  softmax-<L>L model of raw_tokens). Fits a ridge probe per layer (the residual stream after the\n"
      "  embedding and after every block) and position on one held-out set of sequences and scores it\n"
      "  (R^2, MSE) on another, for the targets s_{t-1}, s_t, s_{t+1} and (S_t^T S_t + rho I)^-1 s_t.\n"
      "  --full          the paper's settings: batch 256, 10000 steps, warm-up 1000 to lr 8e-4, cosine\n"
      "                  to 1e-5; default: batch %ld, %ld steps, warm-up %ld to lr %.0e\n"
      "  --layers L      blocks of the softmax model, L >= 1 (default 3)\n"
      "  --steps N       training steps (N >= 1)\n"
      "  --batch B       sequences per step (B >= 1)\n"
      "  --lr X          peak lr (0 < X <= 1)\n"
      "  --no-layer-norm no pre-LN before the blocks' attention (default: pre-LN on every block)\n"
      "  --fit N         held-out sequences the probes are fitted on (default 1000; N >= 2)\n"
      "  --eval N        other held-out sequences the probes are scored on (default 1000; N >= 2)\n"
      "  --ridge X       the probes' ridge (absolute, >= 0; default 1e-6)\n"
      "  --rho X         the preconditioned target's regulariser rho > 0 (default 1e-3, the paper's)\n"
      "  --seed N        seed of training data, initialisation and held-out data (default 1)\n"
      "  --seeds LIST    comma-separated seeds, run one after another (under mpirun: spread over the\n"
      "                  ranks); tables and CSV give the mean over seeds and its standard error\n"
      "  --threads N     threads, N >= 0 (default 0: OpenMP default)\n"
      "  --csv FILE      write target,layer,position,r2,r2_stderr,mse,mse_stderr,seeds rows (positions\n"
      "                  1..50 and 'mean', the mean over the positions where R^2 is defined)\n"
      "  --help          this text\n",
      d.batch, d.steps, d.warmup, d.softmax_lr);
}

[[noreturn]] void bad_option(const std::string& msg) { examples::option_error("probing", msg); }

Options parse(int argc, char** argv) {
  Options o;
  examples::OptionReader args("probing", argc, argv);
  while (args.next()) {
    const std::string& a = args.flag();
    auto value = [&] { return args.value(); };
    auto integer = [&](long long lo, long long hi) { return args.integer(lo, hi); };
    auto number = [&](double lo, bool open, double hi) { return args.number(lo, hi, open); };
    if (a == "--help" || a == "-h") {
      usage();
      std::exit(0);
    } else if (a == "--full") o.full = true;
    else if (a == "--layers") o.layers = long(integer(1, 64));
    else if (a == "--steps") o.steps = long(integer(1, 100000000));
    else if (a == "--batch") o.batch = long(integer(1, 1000000));
    else if (a == "--lr") o.lr = number(0, true, 1.0);
    else if (a == "--no-layer-norm") o.layer_norm = false;
    else if (a == "--fit") o.fit_sequences = long(integer(2, 10000000));
    else if (a == "--eval") o.eval_sequences = long(integer(2, 10000000));
    else if (a == "--ridge") o.ridge = number(0, false, 1e6);
    else if (a == "--rho") o.rho = number(0, true, 1e6);
    else if (a == "--seed" || a == "--seeds") o.seeds = examples::seeds_option(a, value(), bad_option);
    else if (a == "--threads") o.threads = int(integer(0, 1024));
    else if (a == "--csv") {
      o.csv = value();
      if (o.csv.empty()) bad_option("--csv needs a file name");
    } else bad_option("unknown option '" + a + "'");
  }
  return o;
}

const char* const kTargets[] = {"s_{t-1}", "s_t", "s_{t+1}", "precond"};
const char* const kTargetKeys[] = {"previous", "current", "next", "preconditioned"};  // CSV names
constexpr int kTargetCount = 4;

// Mean of the finite entries (NaN if none): R² is NaN where the evaluation
// target has no variance (s_{t-1} at t = 1).
double finite_mean(const double* v, std::size_t count) {
  double sum = 0;
  long k = 0;
  for (std::size_t i = 0; i < count; ++i)
    if (std::isfinite(v[i])) {
      sum += v[i];
      ++k;
    }
  return k > 0 ? sum / double(k) : std::numeric_limits<double>::quiet_NaN();
}

// The rows of one seed: for target k and layer l, row 2 (k (L+1) + l) holds R²
// and the next one MSE; entry t-1 is position t, entry T the finite mean over
// positions.
std::string row_name(int target, long layer, bool r2) {
  return std::string(kTargets[target]) + "@" + std::to_string(layer) + (r2 ? ":r2" : ":mse");
}

}  // namespace

int main(int argc, char** argv) {
  examples::Ranks ranks(argc, argv, "probing");  // under mpirun: data-parallel training, rank 0 reports
  const Options opt = parse(argc, argv);
  try {
    const mt::DynamicsConfig dc;  // docs/paper.md §1: n = 10, T = 50, noise 0.01, W* Haar orthogonal
    const long n = dc.state_dim, T = dc.seq_len;
    const raw_token::Budget budget = raw_token::resolve_budget(opt.full, opt.batch, opt.steps, opt.lr, false);
    const long batch = budget.batch, steps = budget.steps, warmup = budget.warmup;
    const double lr = budget.lr;
    const long L = opt.layers;
    const std::string name = "softmax-" + std::to_string(L) + "L";
    const nn::ModelConfig mc =
        raw_token::model_config(n, raw_token::softmax_blocks(L, opt.layer_norm), opt.threads);

    std::printf(
        "linear probes of %s on raw tokens s_t (docs/paper.md §1-4): n = %ld, T = %ld; width %ld, %ld heads, key/value "
        "size %ld/%ld, positional code %ld dims on block 0\n"
        "%s settings: batch %ld, %ld steps, AdamW wd %.2g, clip 1, warm-up %ld then cosine to %.0e, peak lr %.0e, "
        "pre-LN %s, no MLP\n"
        "probes: ridge %.0e with intercept, one per layer and position, fitted on %ld held-out sequences and scored on "
        "%ld others; preconditioned target with rho = %.0e\n",
        name.c_str(), n, T, raw_token::kWidth, raw_token::kHeads, raw_token::kKeySize, raw_token::kValueSize,
        raw_token::kPositionalDim, opt.full ? "paper (--full)" : "reduced default", batch, steps,
        raw_token::kWeightDecay, warmup, raw_token::kLrFloor, lr, opt.layer_norm ? "on" : "off", opt.ridge,
        opt.fit_sequences, opt.eval_sequences, opt.rho);
    std::fflush(stdout);

    const analysis::ProbeOptions probe_options{opt.ridge, true};
    auto run_one = [&](unsigned long long seed, train::ProcessGroup* group) {
      examples::SeedRun run;
      nn::Model<float> model(mc);
      const auto r = raw_token::train_fresh(model, dc, budget, seed, opt.threads, group);
      run.train_seconds = r.seconds;
      run.histories.push_back({name, seed, r.losses});

      // Two held-out sets (streams disjoint from training and from each other).
      const auto fit = raw_token::held_out(dc, opt.fit_sequences, seed, raw_token::kProbeFitOffset, opt.threads);
      const auto eval = raw_token::held_out(dc, opt.eval_sequences, seed, raw_token::kEvalOffset, opt.threads);
      const RowMatrix<float> fit_x = fit.inputs.cast<float>(), eval_x = eval.inputs.cast<float>();

      const auto started = std::chrono::steady_clock::now();
      const analysis::Activations<float> fit_a = analysis::capture_activations(model, fit_x, T, {false});
      const analysis::Activations<float> eval_a = analysis::capture_activations(model, eval_x, T, {false});
      run.rows.push_back(
          {name, examples::format_number("%.0f steps", double(steps)),
           ml::loss_curve(eval_a.predictions.cast<double>(), eval.targets, T)});  // the model's held-out loss

      const analysis::DynamicsProbeTargets<double> fit_y = analysis::dynamics_probe_targets(fit, opt.rho);
      const analysis::DynamicsProbeTargets<double> eval_y = analysis::dynamics_probe_targets(eval, opt.rho);
      const RowMatrix<double>* fit_targets[] = {&fit_y.previous, &fit_y.current, &fit_y.next, &fit_y.preconditioned};
      const RowMatrix<double>* eval_targets[] = {&eval_y.previous, &eval_y.current, &eval_y.next,
                                                 &eval_y.preconditioned};
      for (int k = 0; k < kTargetCount; ++k)
        for (long l = 0; l <= L; ++l) {
          const std::vector<analysis::ProbeScore> s =
              analysis::probe_per_position(fit_a.stream[std::size_t(l)], *fit_targets[k], eval_a.stream[std::size_t(l)],
                                           *eval_targets[k], T, probe_options);
          std::vector<double> r2(std::size_t(T + 1)), mse(std::size_t(T + 1));
          for (long t = 0; t < T; ++t) {
            r2[std::size_t(t)] = s[std::size_t(t)].r2;
            mse[std::size_t(t)] = s[std::size_t(t)].mse;
          }
          // The mean over the positions where R² is defined, for both.
          std::vector<double> mse_defined(mse.begin(), mse.end() - 1);
          for (long t = 0; t < T; ++t)
            if (!std::isfinite(r2[std::size_t(t)])) mse_defined[std::size_t(t)] = std::nan("");
          r2[std::size_t(T)] = finite_mean(r2.data(), std::size_t(T));
          mse[std::size_t(T)] = finite_mean(mse_defined.data(), std::size_t(T));
          run.rows.push_back({row_name(k, l, true), "", r2});
          run.rows.push_back({row_name(k, l, false), "", mse});
        }
      char line[256];
      std::snprintf(line, sizeof line, "trained %s: %ld steps, train loss %.4f -> %.4f (last step), %.1f s; probes %.1f s\n",
                    name.c_str(), steps, r.losses.front(), r.losses.back(), r.seconds,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
      run.report = line;
      return run;
    };

    std::vector<examples::SeedRun> runs = examples::run_seeds(opt.seeds, ranks, run_one);
    if (!ranks.root()) return 0;  // rank 0 reports and writes the files
    const examples::SweepResult sweep = examples::combine_seeds(opt.seeds, runs);
    const std::vector<examples::CurveRow>& rows = sweep.rows;
    const std::size_t S = opt.seeds.size();
    for (const std::string& report : sweep.reports) std::printf("%s", report.c_str());

    // rows[0]: the model's loss curve; then the probe rows.
    auto at = [&](int k, long l, bool r2) -> const examples::CurveRow& {
      return rows[std::size_t(1 + 2 * (k * (L + 1) + l) + (r2 ? 0 : 1))];
    };
    std::printf("\n%s held-out loss (sum of squared errors / 2, mean over %ld sequences%s)\n", name.c_str(),
                opt.eval_sequences, S > 1 ? (", mean over " + std::to_string(S) + " seeds").c_str() : "");
    examples::print_curve_table({rows[0]}, {1, 2, 5, 10, 20, 30, 40, 50}, 12, 11);
    std::printf("(docs/paper.md §4, paper settings: 3-layer softmax avg 0.315, t=50 0.057; 7-layer 0.230, 0.012)\n");

    std::printf("\nprobe R^2 and MSE per layer, mean over positions (t = 2..%ld for s_{t-1}, where t = 1 has no "
                "variance; t = 1..%ld otherwise)%s\n",
                T, T, S > 1 ? (", mean over " + std::to_string(S) + " seeds").c_str() : "");
    std::printf("%-22s %-39s   %s\n", "", "R^2", "MSE");
    std::printf("%-22s", "layer");
    for (int k = 0; k < kTargetCount; ++k) std::printf(" %9s", kTargets[k]);
    std::printf("  ");
    for (int k = 0; k < kTargetCount; ++k) std::printf(" %10s", kTargets[k]);
    std::printf("\n");
    for (long l = 0; l <= L; ++l) {
      std::printf("%-22s", l == 0 ? "0 (embedding)" : (std::to_string(l) + " (after block " + std::to_string(l) + ")").c_str());
      for (int k = 0; k < kTargetCount; ++k) std::printf(" %9.4f", at(k, l, true).curve[std::size_t(T)]);
      std::printf("  ");
      for (int k = 0; k < kTargetCount; ++k) std::printf(" %10.4g", at(k, l, false).curve[std::size_t(T)]);
      std::printf("\n");
    }

    const std::vector<long> show = {1, 2, 3, 5, 10, 11, 20, 30, 40, 50};
    std::printf("\nprobe R^2 per position (one probe per layer and position)\n");
    for (int k = 0; k < kTargetCount; ++k) {
      std::printf("%-10s %-7s", kTargets[k], "layer");
      for (long t : show) std::printf(" %7s", ("t=" + std::to_string(t)).c_str());
      std::printf("\n");
      for (long l = 0; l <= L; ++l) {
        std::printf("%-10s %-7ld", "", l);
        for (long t : show) std::printf(" %7.4f", at(k, l, true).curve[std::size_t(t - 1)]);
        std::printf("\n");
      }
    }
    std::printf("(docs/paper.md §4: after the first layer s_{t-1} is linearly decodable from the token at t almost "
                "perfectly; s_{t+1} and the preconditioned input become decodable with depth and context length)\n");
    std::printf("\ntraining took %.0f s in all\n", sweep.train_seconds);

    if (!opt.csv.empty()) {
      std::FILE* f = std::fopen(opt.csv.c_str(), "w");
      if (f == nullptr) throw std::runtime_error("cannot open --csv file " + opt.csv);
      std::fprintf(f, "target,layer,position,r2,r2_stderr,mse,mse_stderr,seeds\n");
      for (int k = 0; k < kTargetCount; ++k)
        for (long l = 0; l <= L; ++l) {
          const examples::CurveRow &r2 = at(k, l, true), &mse = at(k, l, false);
          for (long i = 0; i <= T; ++i) {
            const auto u = std::size_t(i);
            const double r2_se = r2.standard_error.empty() ? std::nan("") : r2.standard_error[u];
            const double mse_se = mse.standard_error.empty() ? std::nan("") : mse.standard_error[u];
            const std::string position = i < T ? std::to_string(i + 1) : "mean";
            std::fprintf(f, "%s,%ld,%s,%.9g,%.9g,%.9g,%.9g,%zu\n", kTargetKeys[k], l, position.c_str(), r2.curve[u], r2_se,
                         mse.curve[u], mse_se, S);
          }
        }
      if (std::fclose(f) != 0) throw std::runtime_error("cannot write --csv file " + opt.csv);
      std::printf("wrote %s\n", opt.csv.c_str());
    }
  } catch (const std::exception& e) {
    ranks.fail(std::string("error: ") + e.what());  // under mpirun: ends every rank
  }
  return 0;
}
