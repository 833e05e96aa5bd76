// Few-shot (in-context) linear regression: a trained Transformer against the
// reference in-context learners (issue 5, item 3; docs/math.md §5, docs/paper.md §2-5).
//
// Task (tasks/linear_regression.hpp): a fresh W (dy x dx, entries
// N(0, 1/dx), so every y entry has unit variance) per sequence, x_i ~ N(0, I),
// y_i = W x_i + eps_i, eps_i ~ N(0, noise^2 I). At every position t the model
// must predict y_t from the query x_t and the pairs (x_i, y_i), i < t — the
// learners' convention (learners/context.hpp), so model and learners are scored
// on the same predictions of the same held-out sequences.
//
// Tokens: the regression analogue of the paper's constructed tokens
// e_t = [0, s_t, s_t, s_{t-1}] (docs/paper.md §2):
//
//     e_t = [0 (dy), x_t (dx), y_{t-1} (dy), x_{t-1} (dx)],   x_0 = y_0 = 0,
//
// and the model writes its prediction of y_t into the first (zero) slot. With
// keys from x_{t-1}, values from y_{t-1} and queries from x_t, one linear-
// attention layer (M1-M2) can compute eta sum_{i<t} y_i (x_i . x_t) — exactly
// one step of GD from W = 0 — and one mesa layer (M7-M9) can compute the ridge
// prediction G_t (H_t + I/lambda)^{-1} x_t (docs/math.md §4-5). Trained on the task
// they should find these: linear-1L close to tuned 1-step GD, mesa-1L close to
// tuned ridge (which, with a Gaussian W and Gaussian noise, is the Bayes-optimal
// predictor at regulariser noise^2 dx).
//
// The program trains the models (linear-1L, linear-2L, mesa-1L by default),
// evaluates them on fresh held-out sequences (a different seed), prints loss vs
// context position beside ridge (regulariser tuned on a separate tuning set, and
// the Bayes-optimal one), least squares, tuned 1-step GD and the noise floor,
// and fits the step size of 1-step GD to linear-1L's predictions.
#include "curve_report.hpp"
#include "option_reader.hpp"
#include "ranks.hpp"
#include "seed_sweep.hpp"

#include <mesaopt/learners.hpp>
#include <mesaopt/nn.hpp>
#include <mesaopt/tasks.hpp>
#include <mesaopt/train.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using namespace mesaopt;
namespace ml = mesaopt::learners;
namespace mt = mesaopt::tasks;

namespace {

// One trained model: architecture and its default training schedule.
struct ModelSpec {
  std::string name;
  nn::AttentionKind kind;
  long layers, heads;
  long steps;  // default training steps
  double lr;   // constant learning rate (AdamW)
};

// Paper (docs/paper.md §3): lr 1e-4 (mesa 4e-4) for 5000+ steps at batch 256. The
// short default run uses batch 64 and a 10x larger lr, as linear_dynamics does.
// linear-1L and mesa-1L have converged by 1500 steps (their held-out avg moves
// by < 0.2% from 1500 to 4000 steps); linear-2L still improves then
// (avg 0.230 at 1500 steps, 0.187 at 4000), so it trains longer.
const std::vector<ModelSpec> kSpecs = {
    {"linear-1L", nn::AttentionKind::linear, 1, 2, 1500, 1e-3},
    {"linear-2L", nn::AttentionKind::linear, 2, 2, 4000, 1e-3},
    {"mesa-1L", nn::AttentionKind::mesa, 1, 2, 1500, 4e-3},
};
const char* const kDefaultModels = "linear-1L,linear-2L,mesa-1L";

struct Options {
  long dx = 8, dy = 1, pairs = 24;
  double noise = 0.2;
  long steps = 0, batch = 64;  // steps 0: per model from kSpecs
  double lr = 0;           // 0: per model from kSpecs
  double lr_scale = 1;     // multiplies every model's lr
  long key_size = 0;       // 0: 2 dx
  double clip = 0;         // stream clip after each block; 0 = off
  double init_std = 0.0002;  // docs/paper.md §2: N(0, 0.0002^2) for constructed tokens
  long eval_sequences = 1000, tune_sequences = 250;
  std::vector<unsigned long long> seeds = {1};
  int threads = 1;  // the models are tiny: one thread beat two on this 2-core machine (see --help)
  std::vector<std::string> models;
  std::string csv, history;
};

void usage() {
  std::printf(
      "usage: regression_fewshot [options]\n"
      "  In-context linear regression: trains 1- and 2-layer linear-attention models and a\n"
      "  1-layer mesa model on sequences of pairs (x_i, y_i = W x_i + noise), a fresh W per\n"
      "  sequence, then prints held-out loss vs context position beside ridge (tuned and\n"
      "  Bayes-optimal regulariser), least squares, tuned 1-step GD and the noise floor,\n"
      "  and the step size of the 1-step GD that best fits linear-1L.\n"
      "  Tokens e_t = [0, x_t, y_{t-1}, x_{t-1}]; the model writes y_t into the first slot.\n"
      "  Loss per position: sum over the dy outputs of squared error / 2, mean over sequences.\n"
      "  --dx N             input dimension (default 8)\n"
      "  --dy N             output dimension (default 1)\n"
      "  --pairs N          pairs per sequence = positions T (default 24, >= 2)\n"
      "  --noise X          label noise std (default 0.2); W entries ~ N(0, 1/dx)\n"
      "  --models LIST      comma-separated subset of linear-1L,linear-2L,mesa-1L (default all)\n"
      "  --steps N          training steps for every model (default 1500, linear-2L 4000)\n"
      "  --batch B          sequences per step (default 64)\n"
      "  --lr X             constant learning rate for every model\n"
      "                     (default 1e-3 for linear, 4e-3 for mesa; AdamW, weight decay 0.1)\n"
      "  --lr-scale X       multiply every model's learning rate by X (default 1)\n"
      "  --key-size N       key = value size per head (default 2 dx); 2 heads per layer\n"
      "  --clip X           clip the residual stream to +-X after each block (default 0 = off)\n"
      "  --init-std X       weight initialisation std (default 0.0002, docs/paper.md §2)\n"
      "  --eval N           held-out evaluation sequences (default 1000)\n"
      "  --tune N           sequences for tuning the learners' hyperparameters (default 250)\n"
      "  --seed N           seed of training data and initialisation; evaluation and tuning\n"
      "                     use seed + 1000003 and seed + 2000003 (default 1)\n"
      "  --seeds LIST       comma-separated seeds, run one after another (under mpirun: spread over\n"
      "                     the ranks); the table and the CSV give the mean over seeds and its\n"
      "                     standard error\n"
      "  --threads N        threads for training and the learners (default 1: at these sizes one thread\n"
      "                     trained faster than two on a 2-core machine; 0 = OpenMP default);\n"
      "                     results do not depend on it\n"
      "  --csv FILE         write method,position,loss,stderr,seeds rows (positions 1..T)\n"
      "  --history FILE     write model,step,loss,seed rows of the training loss\n"
      "  --help             this text\n");
}

[[noreturn]] void bad_option(const std::string& msg) { examples::option_error("regression_fewshot", msg); }

Options parse(int argc, char** argv) {
  Options o;
  examples::OptionReader args("regression_fewshot", argc, argv);
  while (args.next()) {
    const std::string& a = args.flag();
    auto value = [&] { return args.value(); };
    auto number = [&](double lo, double hi) { return args.number(lo, hi); };
    auto integer = [&](long lo, long hi) { return long(args.integer(lo, hi)); };
    if (a == "--help" || a == "-h") {
      usage();
      std::exit(0);
    } else if (a == "--dx") o.dx = integer(1, 1024);
    else if (a == "--dy") o.dy = integer(1, 1024);
    else if (a == "--pairs") o.pairs = integer(2, 100000);
    else if (a == "--noise") o.noise = number(0, 1e6);
    else if (a == "--steps") o.steps = integer(1, 100000000);
    else if (a == "--batch") o.batch = integer(1, 1000000);
    else if (a == "--lr") {
      o.lr = number(0, 10);
      if (o.lr <= 0) bad_option("--lr must be > 0");
    } else if (a == "--lr-scale") {
      o.lr_scale = number(0, 1e6);
      if (o.lr_scale <= 0) bad_option("--lr-scale must be > 0");
    } else if (a == "--key-size") o.key_size = integer(1, 4096);
    else if (a == "--clip") o.clip = number(0, 1e6);
    else if (a == "--init-std") {
      o.init_std = number(0, 10);
      if (o.init_std <= 0) bad_option("--init-std must be > 0");
    } else if (a == "--eval") o.eval_sequences = integer(1, 10000000);
    else if (a == "--tune") o.tune_sequences = integer(1, 10000000);
    else if (a == "--seed" || a == "--seeds") {
      o.seeds = examples::seeds_option(a, value(), bad_option);
    }
    else if (a == "--threads") o.threads = static_cast<int>(integer(0, 1024));
    else if (a == "--csv") o.csv = value();
    else if (a == "--history") o.history = value();
    else if (a == "--models") {
      std::stringstream ss(value());
      for (std::string m; std::getline(ss, m, ',');) {
        const bool known = std::any_of(kSpecs.begin(), kSpecs.end(), [&](const ModelSpec& s) { return s.name == m; });
        if (!known) bad_option("unknown model '" + m + "' in --models (known: " + kDefaultModels + ")");
        if (std::find(o.models.begin(), o.models.end(), m) == o.models.end()) o.models.push_back(m);
      }
      if (o.models.empty()) bad_option("--models needs at least one model");
    } else bad_option("unknown option " + a);
  }
  return o;
}

// Constructed tokens (B*T, 2 dy + 2 dx): row t of a sequence is
// [0, x_t, y_{t-1}, x_{t-1}] with x_0 = y_0 = 0 (see the file comment).
template <class T>
RowMatrix<T> constructed_tokens(const mt::RegressionBatch<T>& b) {
  const long N = b.num_pairs, dx = b.input_dim, dy = b.output_dim;
  RowMatrix<T> e = RowMatrix<T>::Zero(b.batch * N, 2 * (dx + dy));
  for (long s = 0; s < b.batch; ++s)
    for (long t = 0; t < N; ++t) {
      const long r = s * N + t;
      e.row(r).segment(dy, dx) = b.x.row(r);
      if (t > 0) {
        e.row(r).segment(dy + dx, dy) = b.y.row(r - 1);
        e.row(r).segment(2 * dy + dx, dx) = b.x.row(r - 1);
      }
    }
  return e;
}

// No embedding, read-out = the first dy entries of the stream (the slot the
// token leaves zero), no LayerNorm, no MLP (docs/paper.md §2, constructed tokens).
nn::ModelConfig model_config(const ModelSpec& s, const Options& o) {
  nn::ModelConfig mc;
  mc.input_dim = mc.width = 2 * (o.dx + o.dy);
  mc.output_dim = o.dy;
  mc.embed = false;
  mc.readout_slice = true;
  mc.clip = o.clip;
  mc.num_threads = o.threads;
  nn::BlockConfig b;
  b.attention = s.kind;
  b.heads = s.heads;
  b.key_size = b.value_size = o.key_size > 0 ? o.key_size : 2 * o.dx;
  mc.blocks.assign(static_cast<std::size_t>(s.layers), b);
  return mc;
}

// The GD step a trained 1-layer linear model implements, read off its weights.
// Head h adds A_h e_{t'} (e_{t'}^T B_h e_t) to the read-out slot, with
// A_h = W_o[0:dy, h] W_v[h] (dy, D) and B_h = W_k[h]^T W_q[h] (D, D; rows: key
// token e_{t'}, columns: query token e_t) (docs/math.md M1-M2). One GD step from zero
// adds eta y_{i,k} (x_i . x_t) to output k for i = t' - 1. A head can build that
// product two ways: value y_{t'-1}, key x_{t'-1} (A's y_{t-1} columns Ay times
// B's x_{t-1}-row/x_t-column block Bx), or value x_{t'-1}, key y_{t'-1} (A's
// x_{t-1} columns Ax times B's y_{t-1}-row/x_t-column block By); trained models
// use both (one head's stray off-diagonal terms are cancelled by another's).
// The step is the projection of their sum onto the GD map:
//   eta = sum_h (tr(Ay_h) tr(Bx_h) + <Ax_h, By_h>_F) / (dx dy).
double step_size_from_weights(nn::Model<float>& model, long dx, long dy, long heads, long d) {
  std::map<std::string, ParameterView<float>> p;
  for (const auto& v : model.parameters()) p.emplace(v.name, v);
  const long D = 2 * (dx + dy);
  auto mat = [&](const char* name, long rows, long cols) {
    return Eigen::Map<const RowMatrix<float>>(p.at(name).value, rows, cols).cast<double>().eval();
  };
  const RowMatrix<double> Wq = mat("block0.attn.W_q", heads * d, D), Wk = mat("block0.attn.W_k", heads * d, D),
                          Wv = mat("block0.attn.W_v", heads * d, D), Wo = mat("block0.attn.W_o", D, heads * d);
  double eta = 0;
  for (long h = 0; h < heads; ++h) {
    const RowMatrix<double> A = Wo.block(0, h * d, dy, d) * Wv.middleRows(h * d, d);
    const RowMatrix<double> B = Wk.middleRows(h * d, d).transpose() * Wq.middleRows(h * d, d);
    const double route_y = A.block(0, dy + dx, dy, dy).trace() * B.block(2 * dy + dx, dy, dx, dx).trace();
    const double route_x = (A.block(0, 2 * dy + dx, dy, dx).array() * B.block(dy + dx, dy, dy, dx).array()).sum();
    eta += (route_y + route_x) / double(dx * dy);
  }
  return eta;
}

}  // namespace

// One seed: train the models, evaluate them and the learners on that seed's
// held-out set, and report the GD step that best fits linear-1L. group: the
// ranks that train together (data-parallel), or nullptr.
examples::SeedRun run_seed(const Options& opt, unsigned long long seed, const std::vector<ModelSpec>& specs,
                           const mt::RegressionConfig& rc, train::ProcessGroup* group) {
  const long T = rc.num_pairs, dx = rc.input_dim, dy = rc.output_dim;
  auto lr_of = [&](const ModelSpec& s) { return (opt.lr > 0 ? opt.lr : s.lr) * opt.lr_scale; };
  examples::SeedRun run;
  // Held-out data: a different seed from training; the learners'
  // hyperparameters are tuned on a third set.
  const auto eval = mt::make_regression_batch<double>(rc, opt.eval_sequences, seed + 1000003, 0, opt.threads);
  const auto tune = mt::make_regression_batch<double>(rc, opt.tune_sequences, seed + 2000003, 0, opt.threads);
  const RowMatrix<float> eval_tokens = constructed_tokens<double>(eval).cast<float>();
  const RowMatrix<double>&x = eval.x, &y = eval.y;

  RowMatrix<double> linear1_pred;
  double linear1_weight_eta = std::nan("");
  const auto started = std::chrono::steady_clock::now();
  for (const ModelSpec& s : specs) {
    const double lr = lr_of(s);
    const long steps = opt.steps > 0 ? opt.steps : s.steps;
    const nn::ModelConfig mc = model_config(s, opt);
    nn::Model<float> model(mc);
    model.init(seed, opt.init_std);
    // On the calling thread, as in linear_dynamics (make_source): no OpenMP
    // threads left spinning beside the sharded step's workers.
    train::BatchSource<float> source = [rc, batch = opt.batch, data_seed = std::uint64_t(seed)](long step) {
      const auto db = mt::make_regression_batch<float>(rc, batch, data_seed, step * batch, 1);
      train::TrainBatch<float> tb;
      tb.inputs = constructed_tokens<float>(db);
      tb.targets = db.y;
      tb.seq_len = db.num_pairs;
      return tb;
    };
    train::TrainerConfig tc;
    tc.steps = steps;
    tc.adam = train::adamw_config(0.1);  // docs/paper.md §3: AdamW (0.9, 0.999, 1e-8), weight decay 0.1
    tc.schedule = train::constant_schedule(lr);
    tc.clip_norm = 1.0;
    tc.threads = opt.threads;  // workers of the sharded steps (automatic shards: min(batch, 8))
    tc.process_group = group;
    train::Trainer<float> trainer(model, source, tc);
    const auto r = trainer.run();
    const std::size_t tail = std::min<std::size_t>(50, r.losses.size());
    double last = 0;
    for (std::size_t i = r.losses.size() - tail; i < r.losses.size(); ++i) last += r.losses[i] / double(tail);
    std::printf(
        "  trained %-9s %6ld steps, lr %.1e: train loss %.4f -> %.4f (mean of last %zu), %6.1f s, %.0f tokens/s\n",
        s.name.c_str(), steps, lr, r.losses.front(), last, tail, r.seconds, r.tokens_per_second);
    std::fflush(stdout);

    typename nn::Model<float>::Cache cache;
    const RowMatrix<double> pred = model.forward(eval_tokens, T, cache).cast<double>();
    run.rows.push_back({s.name, examples::format_number("%.0f steps", double(steps)), ml::loss_curve(pred, y, T)});
    run.histories.push_back({s.name, seed, r.losses});
    if (s.name == "linear-1L") {
      linear1_pred = pred;
      linear1_weight_eta = step_size_from_weights(model, dx, dy, s.heads, mc.blocks[0].key_size);
    }
  }
  run.train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

  // Reference learners on the same held-out sequences (learners/context.hpp:
  // each predicts y_t from the pairs i < t and x_t, 0 at t = 1).
  auto tuned = [&](auto make, double lo, double hi) {
    return ml::tune_for_loss<double>(make, tune.x, tune.y, T, lo, hi, true, opt.threads).argmin;
  };
  auto add = [&](const std::string& name, const std::string& setting, const RowMatrix<double>& pred) {
    run.rows.push_back({name, setting, ml::loss_curve(pred, y, T)});
  };
  const double reg = tuned([](double r) { return ml::Ridge::from_regularizer(r); }, 1e-4, 100.0);
  add("ridge-tuned", examples::format_number("reg %.3g", reg),
      ml::Ridge::from_regularizer(reg).predict<double>(x, y, T, opt.threads));
  // Posterior mean of W under its N(0, 1/dx) prior and N(0, noise^2) noise:
  // ridge with regulariser noise^2 dx (docs/math.md M5: prior variance lambda).
  if (opt.noise > 0) {
    const double bayes = opt.noise * opt.noise * double(dx);
    add("ridge-bayes", examples::format_number("reg %.3g", bayes),
        ml::Ridge::from_regularizer(bayes).predict<double>(x, y, T, opt.threads));
  }
  add("least-squares", "min-norm", ml::LeastSquares{}.predict<double>(x, y, T, opt.threads));
  const double gd_eta = tuned([](double e) { return ml::GradientDescent{1, e, 0.0}; }, 1e-3, 1.0);
  add("gd-1step-tuned", examples::format_number("eta %.4g", gd_eta),
      ml::GradientDescent{1, gd_eta, 0.0}.predict<double>(x, y, T, opt.threads));
  add("noise-floor", "true W", mt::predict_with_true_weights(eval));

  if (linear1_pred.size() > 0) {
    // Which GD step does linear-1L implement? Fit eta to its predictions.
    auto avg_of = [&](const std::string& name) {
      for (const examples::CurveRow& r : run.rows)
        if (r.method == name) return ml::mean_of(r.curve);
      return std::nan("");
    };
    const auto fit = ml::fit_to_model<double>([](double e) { return ml::GradientDescent{1, e, 0.0}; }, linear1_pred,
                                              x, y, T, 1e-3, 1.0, true, opt.threads);
    const auto gd_fit_curve =
        ml::loss_curve(ml::GradientDescent{1, fit.value, 0.0}.predict<double>(x, y, T, opt.threads), y, T);
    const double model_avg = avg_of("linear-1L"), gd_avg = ml::mean_of(gd_fit_curve);
    const double model_power = linear1_pred.squaredNorm() / double(linear1_pred.rows());  // mean ||pred_t||^2
    char line[1024];
    std::snprintf(
        line, sizeof line,
        "linear-1L vs 1-step GD: best-fitting eta %.4f (tuned for loss: %.4f); from the weights (sum over heads)"
        " %.4f\n  agreement at that eta: mean squared prediction difference %.3g (%.2f%% of the model's mean"
        " squared prediction),\n  mean cosine %.4f%s;\n  avg loss %.4f (model) vs %.4f (GD at fitted eta), %+.2f%%\n",
        fit.value, gd_eta, linear1_weight_eta, fit.residual, 100.0 * fit.residual / model_power, fit.cosine,
        dy == 1 ? " (with dy = 1 this is 2 x (share of equal signs) - 1)" : "", model_avg, gd_avg,
        100.0 * (model_avg - gd_avg) / gd_avg);
    run.report = line;
  }
  return run;
}

int main(int argc, char** argv) {
  examples::Ranks ranks(argc, argv, "regression_fewshot");  // under mpirun: see examples/seed_sweep.hpp
  const Options opt = parse(argc, argv);
  try {
    const auto started = std::chrono::steady_clock::now();
    mt::RegressionConfig rc;
    rc.input_dim = opt.dx;
    rc.output_dim = opt.dy;
    rc.num_pairs = opt.pairs;
    rc.noise_std = opt.noise;
    rc.weight_std = 1.0 / std::sqrt(double(opt.dx));  // unit-variance y entries
    const long T = rc.num_pairs, dx = rc.input_dim, dy = rc.output_dim;
    const std::vector<unsigned long long>& seeds = opt.seeds;

    std::vector<ModelSpec> specs;
    for (const ModelSpec& s : kSpecs)
      if (opt.models.empty() || std::find(opt.models.begin(), opt.models.end(), s.name) != opt.models.end())
        specs.push_back(s);

    std::printf(
        "in-context linear regression: dx = %ld, dy = %ld, T = %ld pairs, noise %.3g, W ~ N(0, 1/dx); "
        "batch %ld, %zu seed%s\n",
        dx, dy, T, opt.noise, opt.batch, seeds.size(), seeds.size() > 1 ? "s" : "");

    std::vector<examples::SeedRun> runs = examples::run_seeds(
        seeds, ranks,
        [&](unsigned long long seed, train::ProcessGroup* group) { return run_seed(opt, seed, specs, rc, group); });
    if (!ranks.root()) return 0;  // rank 0 reports and writes the files
    const examples::SweepResult sweep = examples::combine_seeds(seeds, runs);
    const std::vector<examples::CurveRow>& rows = sweep.rows;

    // Positions shown: a fixed ladder, t = dx + 1 (dx context pairs: where
    // least squares interpolates the noise and its loss peaks) and t = T.
    std::vector<long> show;
    for (long t : {1L, 2L, 5L, 10L, 15L, 20L, 30L, 40L, 50L, 100L, dx + 1})
      if (t < T) show.push_back(t);
    show.push_back(T);
    std::sort(show.begin(), show.end());
    show.erase(std::unique(show.begin(), show.end()), show.end());
    if (seeds.size() > 1)
      std::printf("\nheld-out loss per position (sum over dy of squared error / 2), mean over %zu seeds of %ld "
                  "sequences each; settings of seed %llu\n",
                  seeds.size(), opt.eval_sequences, seeds.front());
    else
      std::printf("\nheld-out loss per position (sum over dy of squared error / 2, mean over %ld sequences)\n",
                  opt.eval_sequences);
    examples::print_curve_table(rows, show, 15, 12);

    if (opt.noise > 0 && dx + 1 <= T)
      std::printf(
          "(least-squares at t = %ld, dx context pairs, interpolates the noise: its loss there is heavy-tailed and\n"
          " dominates its avg)\n",
          dx + 1);
    // Summary lines: each model against the learner it should implement.
    auto avg_of = [&](const std::string& name) {
      for (const examples::CurveRow& r : rows)
        if (r.method == name) return ml::mean_of(r.curve);
      return std::nan("");
    };
    const double ridge_avg = avg_of("ridge-tuned");
    std::printf("\n");
    for (const ModelSpec& s : specs) {
      const double m = avg_of(s.name);
      std::printf("%-9s avg %.4f: %+.1f%% vs ridge-tuned, %+.1f%% vs gd-1step-tuned\n", s.name.c_str(), m,
                  100.0 * (m - ridge_avg) / ridge_avg, 100.0 * (m - avg_of("gd-1step-tuned")) / avg_of("gd-1step-tuned"));
    }
    for (const std::string& report : sweep.reports) std::printf("\n%s", report.c_str());
    const double total_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    std::printf("\ntraining took %.0f s; %.0f s in all\n", sweep.train_seconds, total_seconds);

    if (!opt.csv.empty()) examples::write_curve_csv(opt.csv, rows, T);
    if (!opt.history.empty()) examples::write_history_csv(opt.history, sweep.histories);
  } catch (const std::exception& e) {
    ranks.fail(std::string("error: ") + e.what());  // under mpirun: ends every rank
  }
  return 0;
}
