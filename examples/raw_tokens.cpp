// The paper's full-model setting (docs/paper.md §2 "Full models", §3, §4) on the
// linear dynamical system of §1: the models see the raw states s_t (no
// constructed tokens) and must build the pair (s_{t-1}, s_t) themselves.
//
//   softmax+mesa-2L:  Embed(s_t) -> softmax block with sinusoidal positions
//                     -> mesa block -> Dense read-out        (the hybrid)
//   softmax-3L:       Embed(s_t) -> softmax block with positions
//                     -> 2 softmax blocks -> Dense read-out  (softmax only,
//                     the paper's 3-layer comparison; --softmax-layers L)
//
// Both are evaluated on held-out sequences (per-position loss beside ridge
// with lambda 1e-3 and the noise floor), then probed: where does the first
// block's attention mass go? The paper's "token construction" finding is that
// the first layer copies s_{t-1} next to s_t, i.e. some heads put most of
// their mass on key t-1 (docs/paper.md §2, §4).
//
// --observed N (with --state-dim): the paper's partially observed variant
// (docs/paper.md §4): the state has n dims, the models see and predict only its
// first N; ridge then also runs on windows of the last 2, 3 and 4 observations
// (ridge-window2..4; 4 is the shortest that can identify such a system), and
// the attention probe reports block 0's mass on each key t-j, j = 0..4, and
// how well a linear probe recovers s_{t-1}..s_{t-4} from the stream after it.
//
// --nonlinear: the nonlinear variant s_{t+1} = tanh(W* s_t) + eps
// (docs/paper.md §4, tasks::Transition::tanh).
//
// Default: a reduced run (batch 64, 3000 steps, higher peak lr) that finishes
// in about 6 minutes on 2 cores. --full: the paper's settings (batch 256, 10000 steps,
// warm-up 1000 to 8e-4 / hybrid 3e-4, cosine to 1e-5).
#include "curve_report.hpp"
#include "option_reader.hpp"
#include "ranks.hpp"
#include "raw_token_models.hpp"
#include "seed_sweep.hpp"

#include <mesaopt/analysis/capture.hpp>
#include <mesaopt/analysis/probe.hpp>
#include <mesaopt/analysis/probe_targets.hpp>
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

using raw_token::kDefault;
using raw_token::kFull;
using raw_token::kHeads;
using raw_token::kInitStd;
using raw_token::kKeySize;
using raw_token::kLrFloor;
using raw_token::kPositionalDim;
using raw_token::kValueSize;
using raw_token::kWeightDecay;
using raw_token::kWidth;
using raw_token::Settings;

struct Options {
  bool full = false;
  long batch = 0;  // 0: from the settings
  long steps = 0;  // 0: from the settings
  long softmax_layers = 3;
  long eval_sequences = 1000;
  long probe_sequences = 200;
  double softmax_lr = 0, hybrid_lr = 0;  // 0: from the settings
  bool layer_norm = true;
  bool gated = false;    // --gated: also train gated-mesa-2L
  bool only_gated = false;  // --only-gated: train gated-mesa-2L alone
  long gated_chunk = 0;  // --gated-chunk: the gated op's opt.chunk (0: token by token)
  MesaSolver gated_solver = MesaSolver::exact;  // --gated-solver
  int gated_cg_steps = 30;                   // --gated-cg-steps
  double gated_lr = 0;                       // --lr-gated; 0: the hybrid's
  double gated_forget_bias = std::numeric_limits<double>::quiet_NaN();  // --gated-forget-bias; NaN: the solver's default
  // Unit-norm keys make MesaNet's floor of 0.25 (initial lambda 1) a strong ridge
  // just where the task needs little, at t ~ n = 10 tokens: 0.01 and 0.1 measured
  // better for both solvers (docs/examples.md, "The gated mesa layer on raw tokens").
  double gated_lambda_floor = 0.01;  // --gated-lambda-floor
  double gated_lambda_init = 0.1;    // --gated-lambda-init
  long state_dim = 10;  // --state-dim: n, the dynamics' dimension
  long observed = 0;    // --observed: n_s, the observed coordinates (0: all)
  bool nonlinear = false;  // --nonlinear: s_{t+1} = tanh(W* s_t) + eps
  std::vector<unsigned long long> seeds = {1};
  int threads = 0;
  std::string csv;
};

void usage() {
  std::printf(
      "usage: raw_tokens [options]\n"
      "  The paper's full-model setting: linear dynamics (n = 10, T = 50) on raw tokens s_t.\n"
      "  Trains softmax+mesa-2L (softmax block with sinusoidal positions, then a mesa block) and\n"
      "  softmax-3L (three softmax blocks), prints held-out loss vs context length beside ridge\n"
      "  (lambda 1e-3) and the noise floor, then the first block's attention mass on keys t-1 and t.\n"
      "  --full              the paper's settings: batch 256, 10000 steps, warm-up 1000 to lr 8e-4\n"
      "                      (hybrid 3e-4), cosine to 1e-5 (prints an estimate of the run time first)\n"
      "                      default: batch %ld, %ld steps, warm-up %ld to lr %.0e (hybrid %.0e)\n"
      "  --steps N           training steps of each model (N >= 1)\n"
      "  --batch B           sequences per step (B >= 1)\n"
      "  --softmax-layers L  blocks of the softmax-only model, L >= 2 (default 3; row softmax-<L>L)\n"
      "  --lr-softmax X      peak lr of the softmax-only model (0 < X <= 1)\n"
      "  --lr-hybrid X       peak lr of the hybrid model (0 < X <= 1)\n"
      "  --no-layer-norm     no pre-LN before the blocks' attention (default: pre-LN on every block)\n"
      "  --gated             also train gated-mesa-2L: two MesaNet blocks (GatedMesaLayer: gates, short\n"
      "                      convolution on q and k, the exact solver; docs/gated_mesa.md), no\n"
      "                      positional code, the hybrid's lr\n"
      "  --gated-chunk C     the gated blocks' chunk size (0: token by token, the default; C > 0: the\n"
      "                      chunkwise form)\n"
      "  --gated-solver S    the gated blocks' solver: exact (the default: the decaying-ridge\n"
      "                      Sherman-Morrison recursion, docs/gated_mesa.md; its forget gates start at\n"
      "                      0.95 instead of 1/2, where float breaks down) or cg (MesaNet's, 30 steps)\n"
      "  --gated-cg-steps N  CG steps per solve of the cg solver (default 30, MesaNet's)\n"
      "  --lr-gated X        peak lr of gated-mesa-2L (0 < X <= 1; default: the hybrid's)\n"
      "  --gated-forget-bias X  initial bias of the forget gates, gamma = sigmoid(X) at x = 0\n"
      "                      (-20 <= X <= 20; default 0 for cg, MesaNet's, and 3 for exact)\n"
      "  --gated-lambda-floor X  floor of the gated blocks' regulariser, lambda = softplus(.) + X\n"
      "                      (0 < X <= 10; default 0.01; MesaNet's is 0.25)\n"
      "  --gated-lambda-init X   initial lambda of the gated blocks (X > the floor, <= 100; default 0.1;\n"
      "                      MesaNet's is 1)\n"
      "  --only-gated        train gated-mesa-2L alone (implies --gated; no attention probe)\n"
      "  --state-dim N       dimension n of the dynamics (default 10, the paper's)\n"
      "  --observed N        partially observed: the models see and predict only the first N of the n\n"
      "                      coordinates (1 <= N <= n; the paper's variant: --state-dim 20 --observed 5).\n"
      "                      Adds the rows ridge-window2..4 (ridge on the last 2, 3, 4 observations)\n"
      "                      and block 0's attention mass on keys t..t-4 and a linear probe of\n"
      "                      s_{t-1}..s_{t-4} from the stream before and after block 0 (--probe\n"
      "                      sequences to fit, as many to score); the noise floor then knows the\n"
      "                      hidden coordinates too\n"
      "  --nonlinear         the nonlinear variant: s_{t+1} = tanh(W* s_t) + noise (the noise floor\n"
      "                      uses tanh too; ridge stays linear)\n"
      "  --eval N            held-out evaluation sequences (default 1000)\n"
      "  --probe N           held-out sequences for the attention probe and the window probe (default\n"
      "                      200, at most --eval)\n"
      "  --seed N            seed of training data, initialisation and evaluation (default 1)\n"
      "  --seeds LIST        comma-separated seeds, run one after another (under mpirun: spread over\n"
      "                      the ranks); the table and the CSV give the mean over seeds and its\n"
      "                      standard error, the attention probe is printed per seed\n"
      "  --threads N         threads, N >= 0 (default 0: OpenMP default)\n"
      "  --csv FILE          write method,position,loss,stderr,seeds rows (positions 1..50)\n"
      "  --help              this text\n",
      kDefault.batch, kDefault.steps, kDefault.warmup, kDefault.softmax_lr, kDefault.hybrid_lr);
}

[[noreturn]] void bad_option(const std::string& msg) { examples::option_error("raw_tokens", msg); }

Options parse(int argc, char** argv) {
  Options o;
  examples::OptionReader args("raw_tokens", argc, argv);
  while (args.next()) {
    const std::string& a = args.flag();
    auto value = [&] { return args.value(); };
    auto integer = [&](long long lo, long long hi) { return args.integer(lo, hi); };
    auto positive = [&](double hi) { return args.number(0, hi, true); };
    if (a == "--help" || a == "-h") {
      usage();
      std::exit(0);
    } else if (a == "--full") o.full = true;
    else if (a == "--steps") o.steps = long(integer(1, 100000000));
    else if (a == "--batch") o.batch = long(integer(1, 1000000));
    else if (a == "--softmax-layers") o.softmax_layers = long(integer(2, 64));
    else if (a == "--state-dim") o.state_dim = long(integer(1, 1000));
    else if (a == "--observed") o.observed = long(integer(1, 1000));
    else if (a == "--nonlinear") o.nonlinear = true;
    else if (a == "--eval") o.eval_sequences = long(integer(1, 10000000));
    else if (a == "--probe") o.probe_sequences = long(integer(1, 100000));
    else if (a == "--lr-softmax") o.softmax_lr = positive(1.0);
    else if (a == "--lr-hybrid") o.hybrid_lr = positive(1.0);
    else if (a == "--no-layer-norm") o.layer_norm = false;
    else if (a == "--gated") o.gated = true;
    else if (a == "--gated-chunk") o.gated_chunk = long(integer(0, 1000000));
    else if (a == "--only-gated") o.gated = o.only_gated = true;
    else if (a == "--gated-solver") {
      const std::string v = value();
      if (v != "cg" && v != "exact") bad_option("--gated-solver needs cg or exact, got '" + v + "'");
      o.gated_solver = v == "cg" ? MesaSolver::cg : MesaSolver::exact;
    } else if (a == "--gated-cg-steps") o.gated_cg_steps = int(integer(1, 100000));
    else if (a == "--lr-gated") o.gated_lr = positive(1.0);
    else if (a == "--gated-forget-bias") o.gated_forget_bias = args.number(-20.0, 20.0);
    else if (a == "--gated-lambda-floor") o.gated_lambda_floor = positive(10.0);
    else if (a == "--gated-lambda-init") o.gated_lambda_init = positive(100.0);
    else if (a == "--seed" || a == "--seeds") {
      o.seeds = examples::seeds_option(a, value(), bad_option);
    }
    else if (a == "--threads") o.threads = int(integer(0, 1024));
    else if (a == "--csv") {
      o.csv = value();
      if (o.csv.empty()) bad_option("--csv needs a file name");
    } else bad_option("unknown option '" + a + "'");
  }
  if (o.observed > o.state_dim)
    bad_option("--observed (" + std::to_string(o.observed) + ") must not exceed --state-dim (" +
               std::to_string(o.state_dim) + ")");
  if (!(o.gated_lambda_init > o.gated_lambda_floor))
    bad_option("--gated-lambda-init (" + std::to_string(o.gated_lambda_init) + ") must exceed --gated-lambda-floor (" +
               std::to_string(o.gated_lambda_floor) + ")");
  return o;
}

struct ModelSpec {
  std::string name;
  nn::ModelConfig config;
  double peak_lr;
  bool probe = true;  // block 0 is a softmax block whose attention the report probes
};

// Share of block-0 attention mass per head on key t-1 and on key t, averaged
// over query positions t >= 2 (1-based; t = 1 has no t-1) and sequences; and
// on each key t-j, j = 0..kMaxLag, averaged over the positions t > j that
// have that key (the partially observed task's report: does block 0 gather
// the window of past observations that identifies the hidden state?).
constexpr long kMaxLag = 4;

struct HeadShares {
  std::vector<double> prev, self;
  std::vector<std::vector<double>> lag;  // lag[h][j]: mass on key t-j
};

HeadShares attention_shares(nn::Model<float>& model, const RowMatrix<float>& x, long T, long block) {
  const long H = model.config().blocks[std::size_t(block)].heads;
  const std::vector<RowMatrix<float>> probs = model.attention_probabilities(x, T, block);
  const long B = long(probs.size()) / H;
  HeadShares s{std::vector<double>(std::size_t(H), 0.0), std::vector<double>(std::size_t(H), 0.0),
               std::vector<std::vector<double>>(std::size_t(H), std::vector<double>(kMaxLag + 1, 0.0))};
  for (long b = 0; b < B; ++b)
    for (long h = 0; h < H; ++h) {
      const RowMatrix<float>& a = probs[std::size_t(b * H + h)];
      for (long t = 1; t < T; ++t) {  // 0-based row t is position t + 1 >= 2
        s.prev[std::size_t(h)] += a(t, t - 1);
        s.self[std::size_t(h)] += a(t, t);
      }
      for (long j = 0; j <= kMaxLag; ++j)
        for (long t = j; t < T; ++t) s.lag[std::size_t(h)][std::size_t(j)] += a(t, t - j);
    }
  const double count = double(B) * double(T - 1);
  for (long h = 0; h < H; ++h) {
    s.prev[std::size_t(h)] /= count;
    s.self[std::size_t(h)] /= count;
    for (long j = 0; j <= kMaxLag; ++j) s.lag[std::size_t(h)][std::size_t(j)] /= double(B) * double(T - j);
  }
  return s;
}

// Partially observed task: can a linear read-out recover the past observations
// s_{t-j}, j = 1..kMaxLag, from the residual stream before block 0 (h_0, the
// embedding of s_t) and after it (h_1, what block 1 reads)? The models must
// gather a window of 4 observations to identify the hidden state (docs/paper.md
// §4: the paper finds a longer decoding horizon on this task). One pooled probe
// per layer and lag (analysis::probe, M24-M25), over the positions t > kMaxLag
// (1-based) where every lag exists, fitted on `fit` and scored on `eval`.
// Returns r2[layer][j - 1].
std::vector<std::vector<double>> window_probe(nn::Model<float>& model, const tasks::DynamicsBatch<double>& fit,
                                              const tasks::DynamicsBatch<double>& eval, long T) {
  auto rows_with_every_lag = [&](const RowMatrix<double>& m) {
    const long B = m.rows() / T;
    RowMatrix<double> out(B * (T - kMaxLag), m.cols());
    for (long b = 0; b < B; ++b)
      out.middleRows(b * (T - kMaxLag), T - kMaxLag) = m.middleRows(b * T + kMaxLag, T - kMaxLag);
    return out;
  };
  auto lagged_targets = [&](const tasks::DynamicsBatch<double>& d) {
    std::vector<RowMatrix<double>> out;
    RowMatrix<double> lagged = d.inputs;
    for (long j = 1; j <= kMaxLag; ++j) {
      lagged = analysis::previous_states<double>(lagged, T);  // s_{t-j}
      out.push_back(rows_with_every_lag(lagged));
    }
    return out;
  };
  const RowMatrix<float> fit_x = fit.inputs.cast<float>(), eval_x = eval.inputs.cast<float>();
  const analysis::Activations<float> fa = analysis::capture_activations(model, fit_x, T, {false});
  const analysis::Activations<float> ea = analysis::capture_activations(model, eval_x, T, {false});
  const std::vector<RowMatrix<double>> fy = lagged_targets(fit), ey = lagged_targets(eval);
  std::vector<std::vector<double>> r2;
  for (std::size_t l = 0; l < 2; ++l) {
    const RowMatrix<double> fh = rows_with_every_lag(fa.stream[l].cast<double>());
    const RowMatrix<double> eh = rows_with_every_lag(ea.stream[l].cast<double>());
    r2.emplace_back();
    for (long j = 0; j < kMaxLag; ++j)
      r2.back().push_back(analysis::probe(fh, fy[std::size_t(j)], eh, ey[std::size_t(j)], {1e-6, true}).r2);
  }
  return r2;
}

}  // namespace

int main(int argc, char** argv) {
  examples::Ranks ranks(argc, argv, "raw_tokens");  // under mpirun: data-parallel training, rank 0 reports
  const Options opt = parse(argc, argv);
  try {
    mt::DynamicsConfig dc;  // docs/paper.md §1: n = 10, T = 50, noise 0.01, W* Haar orthogonal
    dc.state_dim = opt.state_dim;
    dc.observed_dim = opt.observed;
    if (opt.nonlinear) dc.transition = mt::Transition::tanh;
    const bool partial = opt.observed > 0 && opt.observed < opt.state_dim;
    // The models see and predict the observed coordinates only.
    const long n = opt.observed > 0 ? opt.observed : dc.state_dim, T = dc.seq_len;
    const Settings& st = opt.full ? kFull : kDefault;
    const long batch = opt.batch > 0 ? opt.batch : st.batch;
    const long steps = opt.steps > 0 ? opt.steps : st.steps;
    const long warmup = std::min(steps, opt.steps > 0 ? std::max(1L, steps / 10) : st.warmup);

    std::vector<ModelSpec> specs;
    if (!opt.only_gated) {
      specs.push_back({"softmax+mesa-2L",
                       raw_token::model_config(n, raw_token::hybrid_blocks(opt.layer_norm), opt.threads),
                       opt.hybrid_lr > 0 ? opt.hybrid_lr : st.hybrid_lr});
      specs.push_back(
          {"softmax-" + std::to_string(opt.softmax_layers) + "L",
           raw_token::model_config(n, raw_token::softmax_blocks(opt.softmax_layers, opt.layer_norm), opt.threads),
           opt.softmax_lr > 0 ? opt.softmax_lr : st.softmax_lr});
    }
    if (opt.gated) {  // MesaNet's layer twice: its short convolution can build (s_{t-1}, s_t) itself
      nn::BlockConfig g = raw_token::block(nn::AttentionKind::gated_mesa, 0, opt.layer_norm);
      g.mesa_chunk = opt.gated_chunk;
      g.gated_solver = opt.gated_solver;
      // The exact solver's regulariser decays with the forget gate: at MesaNet's
      // initial gamma = sigmoid(0) = 1/2 its state R_t grows like 2^t and float
      // breaks down within T = 50 (measured: at t = 48 in the first step), so it
      // starts at gamma = sigmoid(3) = 0.95 instead.
      if (opt.gated_solver == MesaSolver::exact) g.gated_forget_bias_init = 3.0;
      if (!std::isnan(opt.gated_forget_bias)) g.gated_forget_bias_init = opt.gated_forget_bias;
      g.gated_cg_steps = opt.gated_cg_steps;
      g.gated_lambda_floor = opt.gated_lambda_floor;
      g.gated_lambda_init = opt.gated_lambda_init;
      specs.push_back({"gated-mesa-2L", raw_token::model_config(n, {g, g}, opt.threads),
                       opt.gated_lr > 0 ? opt.gated_lr : opt.hybrid_lr > 0 ? opt.hybrid_lr : st.hybrid_lr, false});
    }

    std::printf(
        "%s dynamics on raw tokens s_t (docs/paper.md §1-3): n = %ld%s, T = %ld; width %ld, %ld heads, key/value size "
        "%ld/%ld, positional code %ld dims on block 0\n"
        "%s settings: batch %ld, %ld steps, AdamW wd %.2g, clip 1, warm-up %ld then cosine to %.0e, init N(0, %.2g^2), "
        "pre-LN %s, no MLP\n",
        opt.nonlinear ? "nonlinear (tanh)" : "linear", dc.state_dim,
        partial ? (", of which the first " + std::to_string(n) + " observed").c_str() : "", T, kWidth, kHeads, kKeySize,
        kValueSize, kPositionalDim, opt.full ? "paper (--full)" : "reduced default",
        batch, steps, kWeightDecay, warmup, kLrFloor, kInitStd, opt.layer_norm ? "on" : "off");

    const std::vector<unsigned long long>& seeds = opt.seeds;
    auto make_source = [&](std::uint64_t data_seed) { return raw_token::batch_source(dc, batch, data_seed); };
    auto trainer_config = [&](double peak_lr, long total) {
      return raw_token::trainer_config(peak_lr, warmup, total, opt.threads);
    };

    if (opt.full) {  // time 3 steps of each model (after one warm-up step) and extrapolate
      double seconds_per_run = 0;
      for (const ModelSpec& s : specs) {
        nn::Model<float> probe_model(s.config);
        probe_model.init(seeds.front(), kInitStd);
        train::Trainer<float> trainer(probe_model, make_source(seeds.front()), trainer_config(s.peak_lr, 4));
        trainer.run(1);
        const auto r = trainer.run(4);
        seconds_per_run += r.seconds / double(r.steps_run) * double(steps);
      }
      std::printf("estimated training time: %.0f s (%.1f h) for both models, from 3 timed steps each\n",
                  seconds_per_run, seconds_per_run / 3600.0);
    }
    std::fflush(stdout);

    const long probe_n = std::min(opt.probe_sequences, opt.eval_sequences);
    // One seed: train both models, evaluate them beside ridge and the noise
    // floor, and probe block 0's attention (the report). group: the ranks that
    // train together (data-parallel), or nullptr.
    auto run_one = [&](unsigned long long seed, train::ProcessGroup* group) {
      examples::SeedRun run;
      // Held-out data: seeds disjoint from the training stream.
      const auto eval = raw_token::held_out(dc, opt.eval_sequences, seed, raw_token::kEvalOffset, opt.threads);
      const RowMatrix<float> eval_x = eval.inputs.cast<float>();
      const RowMatrix<float> probe_x = eval_x.topRows(probe_n * T);
      const RowMatrix<double>&x = eval.inputs, &y = eval.targets;

      std::vector<std::pair<std::string, HeadShares>> shares;
      std::vector<std::pair<std::string, std::vector<std::vector<double>>>> windows;  // partial: window_probe's R²
      // Two disjoint sets for it: the first probe_n evaluation sequences, and as many others.
      const auto probe_fit = partial ? raw_token::held_out(dc, probe_n, seed, raw_token::kProbeFitOffset, opt.threads)
                                     : mt::DynamicsBatch<double>{};
      const auto probe_eval =
          partial ? raw_token::held_out(dc, probe_n, seed, raw_token::kEvalOffset, opt.threads) : mt::DynamicsBatch<double>{};
      const auto started = std::chrono::steady_clock::now();
      for (const ModelSpec& s : specs) {
        nn::Model<float> model(s.config);
        model.init(seed, kInitStd);
        train::TrainerConfig tc = trainer_config(s.peak_lr, steps);
        tc.progress = true;  // drawn only on a terminal
        tc.process_group = group;
        train::Trainer<float> trainer(model, make_source(seed), tc);
        const auto r = trainer.run();
        const std::size_t tail = std::min<std::size_t>(50, r.losses.size());
        double last = 0;
        for (std::size_t i = r.losses.size() - tail; i < r.losses.size(); ++i) last += r.losses[i] / double(tail);
        std::printf("  trained %-16s %6ld steps, peak lr %.0e: train loss %.4f -> %.4f (mean of last %zu), %6.1f s, "
                    "%.0f training tokens/s\n",
                    s.name.c_str(), steps, s.peak_lr, r.losses.front(), last, tail, r.seconds, r.tokens_per_second);
        std::fflush(stdout);

        typename nn::Model<float>::Cache cache;
        const RowMatrix<double> pred = model.forward(eval_x, T, cache).cast<double>();
        run.rows.push_back({s.name, examples::format_number("%.0f steps", double(steps)), ml::loss_curve(pred, y, T)});
        run.histories.push_back({s.name, seed, r.losses});
        if (s.probe) shares.emplace_back(s.name, attention_shares(model, probe_x, T, 0));
        if (s.probe && partial)
          windows.emplace_back(s.name, window_probe(model, probe_fit, probe_eval, T));
      }
      run.train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

      run.rows.push_back({"ridge", "reg 1e-3",
                          ml::loss_curve(ml::Ridge::from_regularizer(1e-3).predict<double>(x, y, T, opt.threads), y, T)});
      if (partial) {
        // [s_t, s_{t-1}, ..., s_{t-w+1}] (zeros before the sequence starts): an
        // n = 20, n_s = 5 system is identifiable from 4 consecutive observations;
        // windows 2 and 3 show what a model that gathers fewer of them can reach.
        for (long window = 2; window <= 4; ++window) {
          RowMatrix<double> history(x.rows(), window * n), lagged = x;
          for (long lag = 0; lag < window; ++lag) {
            history.middleCols(lag * n, n) = lagged;
            lagged = analysis::previous_states<double>(lagged, T);  // s_{t-lag-1}, zero before the start
          }
          run.rows.push_back(
              {"ridge-window" + std::to_string(window), "reg 1e-3",
               ml::loss_curve(ml::Ridge::from_regularizer(1e-3).predict<double>(history, y, T, opt.threads), y, T)});
        }
      }
      run.rows.push_back({"noise-floor", partial ? "true W*, s_t" : "true W*",
                          ml::loss_curve(mt::predict_with_true_dynamics(eval), y, T)});

      // Token construction: block 0's attention mass on keys t-1 and t.
      double uniform_prev = 0;  // uniform causal attention puts 1/t on each key
      for (long t = 2; t <= T; ++t) uniform_prev += 1.0 / double(t) / double(T - 1);
      auto append = [&](const char* format, auto... values) {
        char line[256];
        std::snprintf(line, sizeof line, format, values...);
        run.report += line;
      };
      if (shares.empty()) return run;  // --only-gated: no softmax block 0 to probe
      append("block 0 (softmax + positions) attention mass, mean over positions t = 2..%ld and %ld held-out "
             "sequences\n(uniform causal attention would give %.3f on each of t-1 and t)\n",
             T, probe_n, uniform_prev);
      append("%-16s %-6s %10s %10s %10s\n", "model", "head", "on t-1", "on t", "elsewhere");
      for (const auto& [name, sh] : shares) {
        double prev = 0, self = 0;
        for (std::size_t h = 0; h < sh.prev.size(); ++h) {
          append("%-16s %-6zu %10.3f %10.3f %10.3f\n", name.c_str(), h, sh.prev[h], sh.self[h],
                 1.0 - sh.prev[h] - sh.self[h]);
          prev += sh.prev[h] / double(sh.prev.size());
          self += sh.self[h] / double(sh.prev.size());
        }
        const auto best = std::max_element(sh.prev.begin(), sh.prev.end());
        append("%-16s %-6s %10.3f %10.3f %10.3f   (head %ld puts the most on t-1: %.3f)\n", name.c_str(), "mean", prev,
               self, 1.0 - prev - self, long(best - sh.prev.begin()), *best);
      }
      if (partial) {
        append("block 0 attention mass on key t-j (mean over the positions t > j that have it)\n%-16s %-6s %8s",
               "model", "head", "on t");
        for (long j = 1; j <= kMaxLag; ++j) append("  on t-%ld", j);
        append("\n");
        for (const auto& [name, sh] : shares)
          for (std::size_t h = 0; h < sh.lag.size(); ++h) {
            append("%-16s %-6zu", name.c_str(), h);
            for (const double m : sh.lag[h]) append(" %8.3f", m);
            append("\n");
          }
        append("linear probe R^2 of the past observations s_{t-j} from the residual stream before block 0 (h0) and\n"
               "after it (h1), pooled over positions t = %ld..%ld, fitted on %ld held-out sequences, scored on %ld others\n"
               "%-16s %-6s", kMaxLag + 1, T, probe_n, probe_n, "model", "layer");
        for (long j = 1; j <= kMaxLag; ++j) append("   s_{t-%ld}", j);
        append("\n");
        for (const auto& [name, r2] : windows)
          for (std::size_t l = 0; l < r2.size(); ++l) {
            append("%-16s h%-5zu", name.c_str(), l);
            for (const double v : r2[l]) append(" %9.3f", v);
            append("\n");
          }
      }
      return run;
    };

    std::vector<examples::SeedRun> runs = examples::run_seeds(seeds, ranks, run_one);
    if (!ranks.root()) return 0;  // rank 0 reports and writes the files
    const examples::SweepResult sweep = examples::combine_seeds(seeds, runs);
    const std::vector<examples::CurveRow>& rows = sweep.rows;

    const std::vector<long> show = {1, 2, 5, 10, 20, 30, 40, 50};
    if (seeds.size() > 1)
      std::printf("\nheld-out loss per position (sum of squared errors / 2), mean over %zu seeds of %ld sequences "
                  "each\n",
                  seeds.size(), opt.eval_sequences);
    else
      std::printf("\nheld-out loss per position (sum of squared errors / 2, mean over %ld sequences)\n",
                  opt.eval_sequences);
    examples::print_curve_table(rows, show, 16, 11);
    if (opt.nonlinear && !partial)
      std::printf("(docs/paper.md §4, nonlinear variant, paper settings: hybrid avg 0.0375, 7-layer softmax 0.0392)\n");
    else if (partial)
      std::printf("(docs/paper.md §4, partially observed n_s = 5 of n = 20, paper settings: 7-layer softmax and the "
                  "hybrid avg about 0.80, t=50 0.063 and 0.035)\n");
    else
      std::printf("(docs/paper.md §4, paper settings: 3-layer softmax avg 0.315, t=50 0.057; hybrid softmax + 1 mesa "
                  "about 0.198, t=50 0.0023)\n");
    for (const std::string& report : sweep.reports) std::printf("\n%s", report.c_str());
    std::printf("\ntraining took %.0f s in all\n", sweep.train_seconds);

    if (!opt.csv.empty()) examples::write_curve_csv(opt.csv, rows, T);
  } catch (const std::exception& e) {
    ranks.fail(std::string("error: ") + e.what());  // under mpirun: ends every rank
  }
  return 0;
}
