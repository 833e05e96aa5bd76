// The paper's Fig. 4 experiment (docs/paper.md §1-4): Transformers on constructed
// tokens e_t = [0, s_t, s_t, s_{t-1}] of a linear dynamical system. Trains
// linear-attention models of 1, 2, 4 and 6 layers and a 1-layer mesa model,
// evaluates them on fresh sequences, and prints loss vs context length beside
// the reference in-context learners (tuned ridge, tuned 1-step GD, 6-step
// Chebyshev with the paper's coefficients) and the noise floor. It then fits
// the step size of 1-step GD to the trained 1-layer linear model (the paper:
// eta about 0.032, losses within 1%) and reads the same step off its weights.
//
// Default: a reduced run (see kDefaults) that finishes in minutes on 2 cores.
// --full: the paper's settings (docs/paper.md §3).
//
// Under mpirun (docs/distributed.md): with several seeds, the seeds are spread
// over the ranks (seed k on rank k mod R) and rank 0 collects their results;
// with one seed the ranks train each model together, data-parallel. Either way
// the numbers equal those of one process.
#include "curve_report.hpp"
#include "option_reader.hpp"
#include "ranks.hpp"
#include "seed_sweep.hpp"

#include <mesaopt/analysis.hpp>
#include <mesaopt/learners.hpp>
#include <mesaopt/nn.hpp>
#include <mesaopt/tasks.hpp>
#include <mesaopt/train.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace mesaopt;
namespace ml = mesaopt::learners;
namespace mt = mesaopt::tasks;

namespace {

// One trained model of the experiment: architecture (docs/paper.md §2) and the
// training schedule of the paper (§3) and of the reduced default run.
struct ModelSpec {
  std::string name;
  nn::AttentionKind kind;
  long layers, heads;
  long full_steps;
  double full_lr;
  long default_steps;
  double default_lr;
};

// Paper: batch 256, constant lr 1e-4 (mesa 4e-4), 5000/5000/10000/15000/5000
// steps. The reduced run uses batch 64 and a 10x larger lr with far fewer
// steps; the step counts grow with depth as in the paper.
const std::vector<ModelSpec> kSpecs = {
    {"linear-1L", nn::AttentionKind::linear, 1, 2, 5000, 1e-4, 600, 1e-3},
    {"linear-2L", nn::AttentionKind::linear, 2, 4, 5000, 1e-4, 800, 1e-3},
    {"linear-4L", nn::AttentionKind::linear, 4, 4, 10000, 1e-4, 1000, 1e-3},
    {"linear-6L", nn::AttentionKind::linear, 6, 4, 15000, 1e-4, 1200, 1e-3},
    {"mesa-1L", nn::AttentionKind::mesa, 1, 4, 5000, 4e-4, 600, 4e-3},
};
constexpr long kDefaultBatch = 64, kFullBatch = 256;
// Held-out sequences per seed: the paper's code tests on 5 batches of 256.
constexpr long kDefaultEval = 1000, kFullEval = 5 * 256;
// The paper averages 5 seeds; --full runs these unless --seeds says otherwise.
const std::vector<unsigned long long> kPaperSeeds = {1, 2, 3, 4, 5};

struct Options {
  bool full = false;
  long batch = 0;          // 0: kDefaultBatch or kFullBatch
  long steps = 0;          // 0: per model from kSpecs
  double steps_scale = 1;  // multiplies the per-model step counts
  double lr = 0;           // 0: per model from kSpecs
  long eval_sequences = 0;  // 0: kDefaultEval or kFullEval
  long tune_sequences = 250;  // sequences that tune the learners' hyperparameters
  std::vector<unsigned long long> seeds;  // empty: {1}, or kPaperSeeds with --full
  int threads = 0;
  double init_std = 0.0002;  // docs/paper.md §2: N(0, 0.0002^2) for constructed tokens
  // The paper's code's training details (docs/paper.md §3); "" = by --full:
  std::string clip;     // "norm" (global norm 1; default run) or "element" (to [-1, 1]; --full)
  std::string mask_1l;  // "on" (1-layer models see [0, 0, s_t, s_{t-1}]; --full) or "off" (default run)
  std::string lambda;   // mesa lambda: "softplus" (of lambda_raw; default run) or "raw" (R_0 = lambda_raw I; --full)
  std::string decay;    // weight decay on "matrices" (default run) or "all" parameters (--full)
  bool clip_report = false;  // --clip-report: how often the activation clip binds (see clip_report)
  bool compress = false;     // --compress: evaluate the trained linear models' compressed algorithms
  std::vector<std::string> models;
  std::string csv, history;
  // --checkpoint DIR: each (model, seed) training saves DIR/<model>_s<seed>.ckpt
  // every checkpoint_every steps and at its end, and resumes from that file
  // when it exists (train/trainer.hpp: exact resume, bit for bit).
  std::string checkpoint_dir;
  long checkpoint_every = 500;
};

void usage() {
  std::printf(
      "usage: linear_dynamics [options]\n"
      "  The paper's constructed-token experiment (Fig. 4): trains linear-attention models\n"
      "  of 1, 2, 4, 6 layers and a 1-layer mesa model on linear dynamics (n = 10, T = 50),\n"
      "  then prints held-out loss vs context length beside tuned ridge, tuned 1-step GD,\n"
      "  6-step Chebyshev and the noise floor, and fits GD's step size to linear-1L.\n"
      "  --full             the paper's settings: batch 256, lr 1e-4 (mesa 4e-4), 5000-15000 steps,\n"
      "                     5 x 256 held-out sequences, seeds 1,2,3,4,5\n"
      "                     (default: batch 64, lr 1e-3 (mesa 4e-3), 600-1200 steps, 1000 held-out\n"
      "                     sequences, seed 1)\n"
      "  --models LIST      comma-separated subset of linear-1L,linear-2L,linear-4L,linear-6L,mesa-1L\n"
      "  --steps N          train every model for N steps\n"
      "  --steps-scale X    multiply every model's step count by X\n"
      "  --batch B          sequences per step\n"
      "  --lr X             constant learning rate for every model\n"
      "  --eval N           held-out evaluation sequences per seed (default 1000; --full 1280)\n"
      "  --tune N           sequences for tuning the learners' hyperparameters (default 250)\n"
      "  --init-std X       standard deviation of the initial weights (default 0.0002, the paper's\n"
      "                     code; its text says variance 0.0002, i.e. X = 0.0141)\n"
      "  --seed N           seed of training data, initialisation and evaluation (default 1)\n"
      "  --seeds LIST       comma-separated seeds, run one after another; the table and the CSV\n"
      "                     give the mean over seeds and its standard error\n"
      "  --clip MODE        gradient clipping: norm (global norm 1; default) or element (each\n"
      "                     entry to [-1, 1], as the paper's code; --full)\n"
      "  --mask-1l on|off   1-layer models get tokens [0, 0, s_t, s_{t-1}] as the paper's code\n"
      "                     masks them (--full: on; default: off)\n"
      "  --lambda MAP       the mesa lambda: softplus (lambda = softplus(lambda_raw); default) or\n"
      "                     raw (R_0 = lambda_raw I, unconstrained, as the paper's code; --full)\n"
      "  --decay SCOPE      weight decay 0.1 on matrices (default) or on all parameters, biases\n"
      "                     and the mesa lambda included, as the paper's code (--full)\n"
      "  --threads N        threads (default: OpenMP default)\n"
      "  --csv FILE         write method,position,loss,stderr,seeds rows (positions 1..50; loss is\n"
      "                     the mean over seeds, stderr its standard error, nan for one seed)\n"
      "  --history FILE     write model,step,loss,seed rows of the training loss\n"
      "  --clip-report      after training, print per block and position how often the +-4 activation\n"
      "                     clip binds on the held-out set, and add a row <model>/no-clip: the same\n"
      "                     trained weights evaluated without the clip\n"
      "  --compress         after training, evaluate each linear model reduced to its compressed\n"
      "                     algorithm (docs/analysis.md): rows <model>/compressed (CompressedAlg-K:\n"
      "                     every 4x4 token-slot block of each head's products replaced by a scaled\n"
      "                     identity) and, for linear-1L, linear-1L/prop1 (the paper's Proposition 1\n"
      "                     model, 12 scalars)\n"
      "  --checkpoint DIR   save each model's training to DIR/<model>_s<seed>.ckpt every\n"
      "                     --checkpoint-every steps (default 500) and at its end, and resume from\n"
      "                     that file if it exists: an interrupted run, started again with the same\n"
      "                     options, continues where it stopped and gives the same results bit for bit\n"
      "                     (a finished model is loaded instead of trained; the directory must exist)\n"
      "  --checkpoint-every N  see --checkpoint\n"
      "  --help             this text\n");
}

[[noreturn]] void bad_option(const std::string& msg) { examples::option_error("linear_dynamics", msg); }

Options parse(int argc, char** argv) {
  Options o;
  examples::OptionReader args("linear_dynamics", argc, argv);
  while (args.next()) {
    const std::string& a = args.flag();
    auto value = [&] { return args.value(); };
    auto number = [&](double lo) { return args.number(lo); };
    auto integer = [&](long long lo) { return args.integer(lo, 1000000000000LL); };
    if (a == "--help" || a == "-h") {
      usage();
      std::exit(0);
    } else if (a == "--full") o.full = true;
    else if (a == "--batch") o.batch = static_cast<long>(integer(1));
    else if (a == "--steps") o.steps = static_cast<long>(integer(1));
    else if (a == "--steps-scale") o.steps_scale = number(1e-6);
    else if (a == "--lr") o.lr = number(1e-12);
    else if (a == "--eval") o.eval_sequences = static_cast<long>(integer(1));
    else if (a == "--tune") o.tune_sequences = static_cast<long>(integer(1));
    else if (a == "--init-std") o.init_std = number(1e-12);
    else if (a == "--seed" || a == "--seeds") {
      if (!o.seeds.empty()) bad_option("give the seeds once (--seed N or --seeds LIST)");
      o.seeds = examples::seeds_option(a, value(), bad_option);
    }
    else if (a == "--threads") o.threads = static_cast<int>(integer(0));
    else if (a == "--csv") o.csv = value();
    else if (a == "--clip") {
      o.clip = value();
      if (o.clip != "norm" && o.clip != "element") bad_option("--clip needs norm or element, got '" + o.clip + "'");
    } else if (a == "--mask-1l") {
      o.mask_1l = value();
      if (o.mask_1l != "on" && o.mask_1l != "off") bad_option("--mask-1l needs on or off, got '" + o.mask_1l + "'");
    } else if (a == "--lambda") {
      o.lambda = value();
      if (o.lambda != "softplus" && o.lambda != "raw")
        bad_option("--lambda needs softplus or raw, got '" + o.lambda + "'");
    } else if (a == "--decay") {
      o.decay = value();
      if (o.decay != "matrices" && o.decay != "all") bad_option("--decay needs matrices or all, got '" + o.decay + "'");
    }
    else if (a == "--history") o.history = value();
    else if (a == "--clip-report") o.clip_report = true;
    else if (a == "--compress") o.compress = true;
    else if (a == "--checkpoint") {
      o.checkpoint_dir = value();
      if (!std::filesystem::is_directory(o.checkpoint_dir))
        bad_option("--checkpoint needs an existing directory, got '" + o.checkpoint_dir + "'");
    }
    else if (a == "--checkpoint-every") o.checkpoint_every = static_cast<long>(integer(1));
    else if (a == "--models") {
      std::stringstream ss(value());
      for (std::string m; std::getline(ss, m, ',');) {
        const bool known = std::any_of(kSpecs.begin(), kSpecs.end(), [&](const ModelSpec& s) { return s.name == m; });
        if (!known) bad_option("unknown model '" + m + "' in --models");
        o.models.push_back(m);
      }
    } else bad_option("unknown option " + a);
  }
  return o;
}

// docs/paper.md §2: no embedding, read-out = the first n entries of the stream (the
// slot the constructed token leaves zero), activations clipped to ±4 after each
// block, no LayerNorm, no MLP, key size 20 (value size = key size).
nn::ModelConfig model_config(const ModelSpec& s, long n, int threads,
                             LambdaParametrization lambda = LambdaParametrization::softplus) {
  nn::ModelConfig mc;
  mc.input_dim = mc.width = 4 * n;
  mc.output_dim = n;
  mc.embed = false;
  mc.readout_slice = true;
  mc.clip = 4.0;
  mc.num_threads = threads;
  nn::BlockConfig b;
  b.attention = s.kind;
  b.heads = s.heads;
  b.key_size = b.value_size = 20;
  b.lambda_parametrization = lambda;  // used by mesa blocks only
  mc.blocks.assign(static_cast<std::size_t>(s.layers), b);
  return mc;
}

// --clip-report: where the activation clip (docs/paper.md §2) binds in a trained
// model. For each block, the fraction of stream entries beyond +-clip before
// clipping, per position (averaged over the held-out sequences) and per slot of
// the constructed token [prediction, s_t, s_t, s_{t-1}] at the last position.
void print_clip_report(const std::string& name, const nn::ModelCache<float>& cache, double clip, long n, long T) {
  const std::vector<long> show = {1, 10, 20, 30, 40, 45, 47, 48, 49, 50};
  std::printf("  clip report %s: fraction of stream entries with |h| > %g before the clip, per block and position\n",
              name.c_str(), clip);
  std::printf("    block  ");
  for (long t : show) std::printf(" t=%-7ld", t);
  std::printf(" | slots at t=%ld: pred  s_t  s_t  s_t-1 | max |h|\n", T);
  for (std::size_t l = 0; l < cache.blocks.size(); ++l) {
    const RowMatrix<float>& h = cache.blocks[l].pre_clip;
    if (h.size() == 0) continue;  // the clip is off
    const long B = h.rows() / T, W = h.cols();
    std::printf("    %5zu  ", l);
    for (long t : show) {
      long over = 0;
      for (long b = 0; b < B; ++b)
        over += (h.row(b * T + t - 1).array().abs() > float(clip)).count();
      std::printf(" %-9.3g", double(over) / double(B * W));
    }
    std::printf(" |");
    for (long slot = 0; slot < W / n; ++slot) {
      long over = 0;
      for (long b = 0; b < B; ++b)
        over += (h.block(b * T + T - 1, slot * n, 1, n).array().abs() > float(clip)).count();
      std::printf(" %-5.3g", double(over) / double(B * n));
    }
    std::printf("| %.3g\n", double(h.cwiseAbs().maxCoeff()));
  }
}

// --clip-report, second part: how the held-out loss at a position is spread over
// the sequences (a mean driven by a few sequences has a heavy tail): the mean,
// the median, the 99th percentile, the largest, and the share of the mean that
// the worst 1 % of sequences carry.
void print_tail_report(const std::string& name, const RowMatrix<double>& pred, const RowMatrix<double>& y, long T) {
  const std::vector<long> show = {10, 20, 30, 40, 45, 48, 50};
  const long B = pred.rows() / T;
  std::printf("  loss tail %s (per-sequence loss at a position)\n    %-6s %-10s %-10s %-10s %-10s %s\n", name.c_str(),
              "t", "mean", "median", "p99", "max", "share of worst 1%");
  for (long t : show) {
    std::vector<double> l(static_cast<std::size_t>(B));
    for (long b = 0; b < B; ++b) l[std::size_t(b)] = 0.5 * (pred.row(b * T + t - 1) - y.row(b * T + t - 1)).squaredNorm();
    std::sort(l.begin(), l.end());
    double sum = 0, top = 0;
    const long k = std::max(1L, B / 100);
    for (long b = 0; b < B; ++b) (b >= B - k ? top : sum) += l[std::size_t(b)];
    sum += top;
    std::printf("    %-6ld %-10.4g %-10.4g %-10.4g %-10.4g %.2f\n", t, sum / double(B), l[std::size_t(B / 2)],
                l[std::size_t(std::min(B - 1, (99 * B) / 100))], l.back(), top / sum);
  }
}

// The GD step a trained 1-layer linear model implements, read off its weights.
// Head h adds A_h e_{t'} (e_{t'}^T B_h e_t) to the read-out slot, with
// A_h = W_o[0:n, h] W_v[h] and B_h = W_k[h]^T W_q[h] (docs/math.md M1-M2). One GD
// step from zero adds eta s_{t'} (s_{t'-1} . s_t) (docs/paper.md §5), so with
// e = [0, s_t, s_t, s_{t-1}] the relevant blocks are A_h's columns of the two
// s_t slots and B_h's rows of the s_{t-1} slot against columns of the s_t
// slots; eta_h = (mean diagonal of A_h's block) (mean diagonal of B_h's).
double step_size_from_weights(nn::Model<float>& model, long n, long heads, long d) {
  std::map<std::string, ParameterView<float>> p;
  for (const auto& v : model.parameters()) p.emplace(v.name, v);
  const long D = 4 * n;
  auto mat = [&](const char* name, long rows, long cols) {
    return Eigen::Map<const RowMatrix<float>>(p.at(name).value, rows, cols).cast<double>().eval();
  };
  const RowMatrix<double> Wq = mat("block0.attn.W_q", heads * d, D), Wk = mat("block0.attn.W_k", heads * d, D),
                          Wv = mat("block0.attn.W_v", heads * d, D), Wo = mat("block0.attn.W_o", D, heads * d);
  double eta = 0;
  for (long h = 0; h < heads; ++h) {
    const RowMatrix<double> A = Wo.block(0, h * d, n, d) * Wv.middleRows(h * d, d);
    const RowMatrix<double> B = Wk.middleRows(h * d, d).transpose() * Wq.middleRows(h * d, d);
    const double a = (A.block(0, n, n, n) + A.block(0, 2 * n, n, n)).trace() / double(n);
    const double b = (B.block(3 * n, n, n, n) + B.block(3 * n, 2 * n, n, n)).trace() / double(n);
    eta += a * b;
  }
  return eta;
}

// Step s trains on sequences [s B, (s + 1) B) of the training seed: fresh
// sequences every step, and the same ones for every model.
// Generated on `team` (the data's bits do not depend on its size): threads
// that sleep between steps, where an OpenMP region would leave libgomp's
// threads spinning for milliseconds after it, on the cores the sharded step's
// workers need (docs/training.md, "Shards and threads" and "Stop 44").
train::BatchSource<float> make_source(const mt::DynamicsConfig& dc, long batch, std::uint64_t seed,
                                      std::shared_ptr<WorkerTeam> team, mt::TokenSlots slots = mt::TokenSlots::both) {
  return [dc, batch, seed, team, slots](long step) {
    const auto db = mt::make_dynamics_batch<float>(dc, batch, seed, std::uint64_t(step) * std::uint64_t(batch), *team);
    train::TrainBatch<float> tb;
    tb.inputs = mt::constructed_tokens<float>(db, slots);
    tb.targets = db.targets;
    tb.seq_len = db.seq_len;
    return tb;
  };
}

// The threads that generate each step's batch (make_source): --threads of them.
std::shared_ptr<WorkerTeam> make_batch_team(const Options& opt) {
  return std::make_shared<WorkerTeam>(opt.threads > 0 ? opt.threads : default_num_threads());
}

// A model's step count and learning rate under the options: --steps / --lr
// when given, else the paper's (--full) or the reduced run's, times --steps-scale.
long steps_of(const Options& opt, const ModelSpec& s) {
  const long base = opt.steps > 0 ? opt.steps : (opt.full ? s.full_steps : s.default_steps);
  return std::max(1L, static_cast<long>(std::lround(double(base) * opt.steps_scale)));
}
double lr_of(const Options& opt, const ModelSpec& s) { return opt.lr > 0 ? opt.lr : (opt.full ? s.full_lr : s.default_lr); }

// What one seed's run produces: the trained models' and the learners' loss
// curves on that seed's held-out set, the training histories, and the
// linear-1L vs GD comparison (empty without linear-1L).
// opt: with its defaults filled in (with_defaults). group: the ranks that
// train together (data-parallel), or nullptr.
examples::SeedRun run_seed(const Options& opt, unsigned long long seed, const std::vector<ModelSpec>& specs,
                           const mt::DynamicsConfig& dc, train::ProcessGroup* group) {
  const long n = dc.state_dim, T = dc.seq_len;
  examples::SeedRun run;
  // Held-out data: a different seed from training; learners' hyperparameters
  // are tuned on a third set (as in icl_baselines).
  const long batch = opt.batch;
  const auto batch_team = make_batch_team(opt);
  const auto eval = mt::make_dynamics_batch<double>(dc, opt.eval_sequences, seed + 1000003, 0, opt.threads);
  const auto tune = mt::make_dynamics_batch<double>(dc, opt.tune_sequences, seed + 2000003, 0, opt.threads);
  const bool element_clip = opt.clip == "element", mask_1l = opt.mask_1l == "on";
  const LambdaParametrization lambda =
      opt.lambda == "raw" ? LambdaParametrization::raw : LambdaParametrization::softplus;
  const RowMatrix<double>&x = eval.inputs, &y = eval.targets;

  RowMatrix<double> linear1_pred;
  double linear1_weight_eta = std::nan("");
  const auto started = std::chrono::steady_clock::now();
  for (const ModelSpec& s : specs) {
    const long steps = steps_of(opt, s);
    const double lr = lr_of(opt, s);
    const mt::TokenSlots slots = mask_1l && s.layers == 1 ? mt::TokenSlots::last_only : mt::TokenSlots::both;
    nn::Model<float> model(model_config(s, n, opt.threads, lambda));
    model.init(seed, opt.init_std);
    const train::BatchSource<float> source = make_source(dc, batch, seed, batch_team, slots);
    train::TrainerConfig tc;
    tc.steps = steps;
    tc.adam = train::adamw_config(0.1);  // docs/paper.md §3: AdamW (0.9, 0.999, 1e-8), weight decay 0.1
    tc.schedule = train::constant_schedule(lr);
    (element_clip ? tc.clip_value : tc.clip_norm) = 1.0;  // docs/paper.md §3
    tc.decay = opt.decay == "all" ? train::DecayScope::all : train::DecayScope::matrices;
    tc.threads = opt.threads;  // workers of the sharded steps (automatic shards, docs/training.md)
    tc.process_group = group;
    if (!opt.checkpoint_dir.empty()) {
      tc.checkpoint_path = opt.checkpoint_dir + "/" + s.name + "_s" + std::to_string(seed) + ".ckpt";
      tc.checkpoint_every = opt.checkpoint_every;
    }
    train::Trainer<float> trainer(model, source, tc);
    if (!tc.checkpoint_path.empty() && std::ifstream(tc.checkpoint_path).good()) {
      trainer.resume(tc.checkpoint_path);  // refuses a file of another model or training setting
      if (trainer.step() > steps)
        throw std::invalid_argument("checkpoint '" + tc.checkpoint_path + "' is at step " +
                                    std::to_string(trainer.step()) + ", beyond this run's " + std::to_string(steps) +
                                    " steps");
      std::printf("  resumed %-9s from %s at step %ld of %ld\n", s.name.c_str(), tc.checkpoint_path.c_str(),
                  trainer.step(), steps);
      std::fflush(stdout);
    }
    const auto r = trainer.run();
    const std::size_t tail = std::min<std::size_t>(50, r.losses.size());
    double last = 0;
    for (std::size_t i = r.losses.size() - tail; i < r.losses.size(); ++i) last += r.losses[i] / double(tail);
    std::printf("  trained %-9s %6ld steps, lr %.0e: train loss %.4f -> %.4f (mean of last %zu), %6.1f s, %.0f tokens/s\n",
                s.name.c_str(), steps, lr, r.losses.front(), last, tail, r.seconds, r.tokens_per_second);
    std::fflush(stdout);

    typename nn::Model<float>::Cache cache;
    const RowMatrix<float> eval_tokens = mt::constructed_tokens<double>(eval, slots).cast<float>();
    const RowMatrix<double> pred = model.forward(eval_tokens, T, cache).cast<double>();
    run.rows.push_back({s.name, examples::format_number("%.0f steps", double(steps)), ml::loss_curve(pred, y, T)});
    if (opt.clip_report) {
      const nn::ModelConfig mc = model.config();
      print_clip_report(s.name, cache, mc.clip, n, T);
      print_tail_report(s.name, pred, y, T);
      // The same weights without the clip.
      nn::ModelConfig unclipped = mc;
      unclipped.clip = 0;
      nn::Model<float> free(unclipped);
      const auto from = model.parameters();
      const auto to = free.parameters();
      for (std::size_t i = 0; i < from.size(); ++i) std::copy(from[i].value, from[i].value + from[i].size, to[i].value);
      typename nn::Model<float>::Cache free_cache;
      const RowMatrix<double> free_pred = free.forward(eval_tokens, T, free_cache).cast<double>();
      run.rows.push_back({s.name + "/no-clip", "same weights", ml::loss_curve(free_pred, y, T)});
    }
    if (opt.compress && s.kind == nn::AttentionKind::linear) {
      // The compressed algorithms (docs/analysis.md, docs/math.md M27-M28): the
      // same model with each head's products reduced to scaled-identity blocks.
      auto add_compressed = [&](const std::string& suffix, const analysis::CompressionOptions& co) {
        const long scalars = analysis::compressed_scalar_count(model, co);
        const auto compressed = analysis::compressed_model(model, co);
        typename nn::Model<float>::Cache ccache;
        const RowMatrix<double> cpred = compressed->forward(eval_tokens, T, ccache).cast<double>();
        run.rows.push_back({s.name + suffix, examples::format_number("%.0f scalars", double(scalars)),
                            ml::loss_curve(cpred, y, T)});
      };
      add_compressed("/compressed", analysis::compressed_alg_options(n));
      if (s.layers == 1 && s.heads == 2) add_compressed("/prop1", analysis::proposition1_options(n));
    }
    run.histories.push_back({s.name, seed, r.losses});
    if (s.name == "linear-1L") {
      linear1_pred = pred;
      linear1_weight_eta = step_size_from_weights(model, n, s.heads, 20);
    }
  }
  run.train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  // Reference learners on the same held-out sequences.
  auto tuned = [&](auto make, double lo, double hi) {
    return ml::tune_for_loss<double>(make, tune.inputs, tune.targets, T, lo, hi, true, opt.threads).argmin;
  };
  auto add = [&](const std::string& name, const std::string& setting, const RowMatrix<double>& pred) {
    run.rows.push_back({name, setting, ml::loss_curve(pred, y, T)});
  };
  {
    const double reg = tuned([](double r) { return ml::Ridge::from_regularizer(r); }, 1e-6, 10.0);
    add("ridge-tuned", examples::format_number("reg %.3g", reg),
        ml::Ridge::from_regularizer(reg).predict<double>(x, y, T, opt.threads));
    add("ridge", "reg 1e-3", ml::Ridge::from_regularizer(1e-3).predict<double>(x, y, T, opt.threads));
  }
  const double gd_eta = tuned([](double e) { return ml::GradientDescent{1, e, 0.0}; }, 1e-3, 1.0);
  add("gd-1step-tuned", examples::format_number("eta %.4g", gd_eta),
      ml::GradientDescent{1, gd_eta, 0.0}.predict<double>(x, y, T, opt.threads));
  // The paper's own baseline rows, as its code computes them (docs/learners.md,
  // "The paper's rows"): fixed step 0.032, the lagged ridge and the lagged
  // 6-step Chebyshev matrix polynomial with the learned coefficients.
  add("gd-0.032", "paper eta", ml::GradientDescent{1, 0.032, 0.0}.predict<double>(x, y, T, opt.threads));
  add("lsq-lagged", "reg 1e-3, lag 1", ml::Ridge::from_regularizer(1e-3, 1).predict<double>(x, y, T, opt.threads));
  add("chebyshev-6", "paper, lag 1", ml::ChebyshevPolynomial::paper_six_step().predict<double>(x, y, T, opt.threads));
  add("noise-floor", "true W*", mt::predict_with_true_dynamics(eval));

  if (linear1_pred.size() > 0) {
    // Which GD step does linear-1L implement? Fit eta to its predictions.
    const auto fit = ml::fit_to_model<double>([](double e) { return ml::GradientDescent{1, e, 0.0}; }, linear1_pred,
                                              x, y, T, 1e-3, 1.0, true, opt.threads);
    const auto gd_fit_curve =
        ml::loss_curve(ml::GradientDescent{1, fit.value, 0.0}.predict<double>(x, y, T, opt.threads), y, T);
    const double model_avg = ml::mean_of(run.rows.front().curve), gd_avg = ml::mean_of(gd_fit_curve);
    char line[512];
    std::snprintf(line, sizeof line,
                  "linear-1L vs 1-step GD: best-fitting eta %.4f (paper: about 0.032); from the weights (sum over heads)"
                  " %.4f\n  agreement at that eta: mean squared prediction difference %.3g, mean cosine %.4f;"
                  " avg loss %.4f (model) vs %.4f (GD), %+.2f%%\n",
                  fit.value, linear1_weight_eta, fit.residual, fit.cosine, model_avg, gd_avg,
                  100.0 * (model_avg - gd_avg) / gd_avg);
    run.report = line;
  }
  return run;
}

// The options with what was left to --full or the default run filled in.
Options with_defaults(Options o) {
  if (o.batch == 0) o.batch = o.full ? kFullBatch : kDefaultBatch;
  if (o.eval_sequences == 0) o.eval_sequences = o.full ? kFullEval : kDefaultEval;
  if (o.seeds.empty()) o.seeds = o.full ? kPaperSeeds : std::vector<unsigned long long>{1};
  if (o.clip.empty()) o.clip = o.full ? "element" : "norm";
  if (o.mask_1l.empty()) o.mask_1l = o.full ? "on" : "off";
  if (o.lambda.empty()) o.lambda = o.full ? "raw" : "softplus";
  if (o.decay.empty()) o.decay = o.full ? "all" : "matrices";
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  examples::Ranks ranks(argc, argv, "linear_dynamics");
  const Options opt = with_defaults(parse(argc, argv));
  try {
    const mt::DynamicsConfig dc;  // docs/paper.md §1: n = 10, T = 50, noise 0.01
    const long n = dc.state_dim, T = dc.seq_len;
    const long batch = opt.batch, eval_sequences = opt.eval_sequences;
    const std::vector<unsigned long long>& seeds = opt.seeds;
    const auto batch_team = make_batch_team(opt);

    std::vector<ModelSpec> specs;
    for (const ModelSpec& s : kSpecs)
      if (opt.models.empty() || std::find(opt.models.begin(), opt.models.end(), s.name) != opt.models.end())
        specs.push_back(s);

    std::printf("linear dynamics, constructed tokens (docs/paper.md §1-3): n = %ld, T = %ld, batch %ld, %s settings, "
                "%zu seed%s\n  gradient clip %s, 1-layer input mask %s, mesa lambda %s, weight decay on %s, "
                "%ld held-out sequences per seed, init N(0, %g^2)\n",
                n, T, batch, opt.full ? "paper (--full)" : "reduced default", seeds.size(), seeds.size() > 1 ? "s" : "",
                opt.clip == "element" ? "element-wise to [-1, 1]" : "global norm 1", opt.mask_1l.c_str(),
                opt.lambda.c_str(), opt.decay.c_str(), eval_sequences, opt.init_std);

    // A few timed steps per model say how long the whole run will take.
    {
      double estimate = 0;
      for (const ModelSpec& s : specs) {
        nn::Model<float> probe(model_config(s, n, opt.threads));
        probe.init(seeds.front(), opt.init_std);
        train::TrainerConfig tc;
        tc.steps = 1;
        tc.schedule = train::constant_schedule(lr_of(opt, s));
        tc.threads = opt.threads;
        tc.progress = false;
        train::Trainer<float>(probe, make_source(dc, batch, seeds.front(), batch_team), tc).run();  // warms up
        tc.steps = 3;
        const auto r = train::Trainer<float>(probe, make_source(dc, batch, seeds.front(), batch_team), tc).run();
        estimate += r.seconds / 3.0 * double(steps_of(opt, s));
      }
      // Seeds spread over the ranks run side by side (data-parallel ranks: not estimated).
      const std::size_t R = seeds.size() > 1 ? std::size_t(ranks.size()) : 1;
      estimate *= double((seeds.size() + R - 1) / R);
      if (estimate < 120)
        std::printf("estimated training time: %.0f s (%zu models x %zu seeds)\n", estimate, specs.size(), seeds.size());
      else
        std::printf("estimated training time: %.1f min = %.2f h (%zu models x %zu seeds)\n", estimate / 60.0,
                    estimate / 3600.0, specs.size(), seeds.size());
      std::fflush(stdout);
    }

    const auto sweep_start = std::chrono::steady_clock::now();
    std::vector<examples::SeedRun> runs = examples::run_seeds(
        seeds, ranks, [&](unsigned long long seed, train::ProcessGroup* group) {
          return run_seed(opt, seed, specs, dc, group);
        });
    const double sweep_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - sweep_start).count();
    if (!ranks.root()) return 0;  // rank 0 reports
    const examples::SweepResult sweep = examples::combine_seeds(seeds, runs);
    const std::vector<examples::CurveRow>& rows = sweep.rows;

    const std::vector<long> show = {1, 2, 5, 10, 20, 30, 40, 50};
    if (seeds.size() > 1)
      std::printf("\nheld-out loss per position (sum of squared errors / 2), mean over %zu seeds of %ld sequences "
                  "each; settings of seed %llu\n",
                  seeds.size(), eval_sequences, seeds.front());
    else
      std::printf("\nheld-out loss per position (sum of squared errors / 2, mean over %ld sequences)\n", eval_sequences);
    examples::print_curve_table(rows, show, 22, 13);

    if (!sweep.reports.empty()) std::printf("\n");
    for (const std::string& line : sweep.reports) std::printf("%s", line.c_str());
    std::printf("\ntraining took %.0f s in all (%.0f s of wall time for the seeds%s)\n", sweep.train_seconds, sweep_seconds,
                ranks.size() > 1 ? (", " + std::to_string(ranks.size()) + " ranks").c_str() : "");

    if (!opt.csv.empty()) examples::write_curve_csv(opt.csv, rows, T);
    if (!opt.history.empty()) examples::write_history_csv(opt.history, sweep.histories);
  } catch (const std::exception& e) {
    ranks.fail(std::string("error: ") + e.what());  // under mpirun: ends every rank
  }
  return 0;
}
