// The paper's layer-replacement experiment (docs/paper.md §4; docs/analysis.md,
// "Linearisation"): train a 7-layer softmax model on raw tokens (the
// softmax-<L>L model of examples/raw_tokens.cpp), then for each layer l replace
// that softmax block by linear attention (analysis::linearize_block: the
// projections W_q, W_k, W_v, W_o and everything else are kept), train only
// that block for a short while (the rest frozen), and report the test-loss
// ratio linearised / original. The paper: ratio 1.0-1.2 for layers >= 3, 2-3.6
// for layer 1 (the layer that builds the pair (s_{t-1}, s_t) needs softmax's
// sharp attention on t-1).
//
// The block training is this program's own loop (forward, MSE, backward,
// global-norm clip 1 and AdamW on the block's parameters only, warm-up then
// cosine): train::Trainer updates every parameter, and analysis/ holds no
// training. --control also retrains each softmax block the same way without
// changing its kind, so that the ratio's change from training alone is seen.
//
// Default: a reduced budget (batch 64, 1000 steps for the 7-layer model, 300
// steps per replaced block). --full: the paper's model training (batch 256,
// 10000 steps, warm-up 1000 to 8e-4, cosine to 1e-5) and 1000 steps per block
// at peak lr 3e-3.
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
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

using namespace mesaopt;
namespace ml = mesaopt::learners;
namespace mt = mesaopt::tasks;
namespace raw_token = mesaopt::examples::raw_token;

namespace {

// The reduced default: raw_tokens' batch and peak lr, a third of its steps (the
// 7-layer model took 264 s for 1000 steps on one thread here), and a short
// block training.
constexpr raw_token::Settings kReduced{64, 1000, 100, 3e-3, 0};
// Block training: 100 steps left layer 1 at ratio 6.6 and layer 2 at 2.9 in
// the default model, 300 steps at 3.1 and 1.3 (docs/examples.md, "linearize").
constexpr long kReducedBlockSteps = 300, kFullBlockSteps = 1000;
// --full's block-training peak lr: the model's 8e-4 left the replaced blocks
// far from trained after 1000 steps (layer 1 at ratio 8.8; docs/examples.md,
// "linearize", measured), 3e-3 (the reduced run's) does not.
constexpr double kFullBlockLr = 3e-3;

struct Options {
  bool full = false;
  long batch = 0;  // 0: from the settings
  long steps = 0;  // 0: from the settings
  long layers = 7;
  double lr = 0;  // 0: from the settings
  long block_steps = -1;   // -1: from the settings
  double block_lr = 0;     // 0: kFullBlockLr with --full, else the model's peak lr
  bool layer_norm = true;
  bool control = false;
  long eval_sequences = 1000;
  std::vector<unsigned long long> seeds = {1};
  int threads = 0;
  std::string csv;
};

void usage() {
  std::printf(
      "usage: linearize [options]\n"
      "  The paper's layer-replacement experiment on raw tokens (linear dynamics, n = 10, T = 50): trains\n"
      "  softmax-<L>L (raw_tokens' softmax-only model), then for each layer replaces its softmax attention\n"
      "  by linear attention (weights kept), trains only that block, and reports the held-out test-loss\n"
      "  ratio linearised / original per layer (before and after the block training).\n"
      "  --full          the paper's settings: batch 256, 10000 steps, warm-up 1000 to lr 8e-4, cosine\n"
      "                  to 1e-5, %ld block-training steps at peak lr %.0e; default: batch %ld, %ld steps,\n"
      "                  warm-up %ld to lr %.0e, %ld block-training steps at the model's lr\n"
      "  --layers L      blocks of the softmax model, L >= 1 (default 7, the paper's)\n"
      "  --steps N       training steps of the model (N >= 1)\n"
      "  --batch B       sequences per step, of the model and of the block training (B >= 1)\n"
      "  --lr X          peak lr of the model (0 < X <= 1)\n"
      "  --block-steps N steps of training each replaced block (N >= 0; warm-up N/10 then cosine)\n"
      "  --block-lr X    peak lr of the block training (default: %.0e with --full, else the model's\n"
      "                  peak lr)\n"
      "  --control       also retrain each softmax block alone without replacing it (the same\n"
      "                  steps): the ratio that training alone gives\n"
      "  --no-layer-norm no pre-LN before the blocks' attention (default: pre-LN on every block)\n"
      "  --eval N        held-out test sequences (default 1000)\n"
      "  --seed N        seed of training data, initialisation and held-out data (default 1)\n"
      "  --seeds LIST    comma-separated seeds, run one after another (under mpirun: spread over the\n"
      "                  ranks); the table and the CSV give the mean over seeds and its standard error\n"
      "  --threads N     threads, N >= 0 (default 0: OpenMP default)\n"
      "  --csv FILE      write model,layer,kind,trained,loss,loss_stderr,ratio,ratio_stderr,seeds rows\n"
      "  --help          this text\n",
      kFullBlockSteps, kFullBlockLr, kReduced.batch, kReduced.steps, kReduced.warmup, kReduced.softmax_lr,
      kReducedBlockSteps, kFullBlockLr);
}

[[noreturn]] void bad_option(const std::string& msg) { examples::option_error("linearize", msg); }

Options parse(int argc, char** argv) {
  Options o;
  examples::OptionReader args("linearize", argc, argv);
  while (args.next()) {
    const std::string& a = args.flag();
    auto value = [&] { return args.value(); };
    auto integer = [&](long long lo, long long hi) { return args.integer(lo, hi); };
    auto positive = [&](double hi) { return args.number(0, hi, true); };
    if (a == "--help" || a == "-h") {
      usage();
      std::exit(0);
    } else if (a == "--full") o.full = true;
    else if (a == "--layers") o.layers = long(integer(1, 64));
    else if (a == "--steps") o.steps = long(integer(1, 100000000));
    else if (a == "--batch") o.batch = long(integer(1, 1000000));
    else if (a == "--lr") o.lr = positive(1.0);
    else if (a == "--block-steps") o.block_steps = long(integer(0, 100000000));
    else if (a == "--block-lr") o.block_lr = positive(1.0);
    else if (a == "--control") o.control = true;
    else if (a == "--no-layer-norm") o.layer_norm = false;
    else if (a == "--eval") o.eval_sequences = long(integer(1, 10000000));
    else if (a == "--seed" || a == "--seeds") o.seeds = examples::seeds_option(a, value(), bad_option);
    else if (a == "--threads") o.threads = int(integer(0, 1024));
    else if (a == "--csv") {
      o.csv = value();
      if (o.csv.empty()) bad_option("--csv needs a file name");
    } else bad_option("unknown option '" + a + "'");
  }
  return o;
}

// Trains block `block` of `model` alone for `steps` steps on the batches
// source(first_step + s): forward, MSE, backward (every gradient is computed,
// only the block's are used), global-norm clip 1 over the block's gradients,
// AdamW (weight decay on its matrices) with warm-up steps/10 then cosine from
// peak_lr to 1e-5. Returns the loss of every step. The other parameters do
// not change (checked by the caller).
std::vector<double> train_block(nn::Model<float>& model, long block, const train::BatchSource<float>& source,
                                long first_step, long steps, double peak_lr) {
  std::vector<double> losses;
  if (steps == 0) return losses;
  const std::vector<ParameterView<float>> all = model.parameters();
  const std::vector<ParameterView<float>> mine =
      analysis::select_parameters(all, analysis::block_parameter_mask(model, block));
  train::Adam<float> adam(mine, train::adamw_config(raw_token::kWeightDecay), train::default_decay_mask(mine));
  const train::LrSchedule schedule =
      train::warmup_cosine_schedule(peak_lr, std::max(1L, steps / 10), steps, raw_token::kLrFloor);
  typename nn::Model<float>::Cache cache;
  for (long s = 0; s < steps; ++s) {
    const train::TrainBatch<float> b = source(first_step + s);
    zero_grad(all);
    const RowMatrix<float> pred = model.forward(b.inputs, b.seq_len, cache);
    const train::MseLoss loss = train::mse_loss_forward<float>(pred, b.targets, b.seq_len);
    if (!std::isfinite(loss.loss))
      throw std::runtime_error("block " + std::to_string(block) + " training: non-finite loss at step " +
                               std::to_string(s));
    RowMatrix<float> dpred(pred.rows(), pred.cols());
    train::mse_loss_backward<float>(pred, b.targets, b.seq_len, dpred);
    model.backward(dpred, cache);
    const double norm = train::clip_grad_norm(mine, 1.0);
    if (!std::isfinite(norm))
      throw std::runtime_error("block " + std::to_string(block) + " training: non-finite gradient at step " +
                               std::to_string(s));
    adam.step(schedule(s));
    losses.push_back(loss.loss);
  }
  return losses;
}

// Whether every parameter outside block `block` of `a` equals `b`'s, bit for bit.
bool others_unchanged(nn::Model<float>& a, nn::Model<float>& b, long block) {
  const std::vector<bool> mask = analysis::block_parameter_mask(a, block);
  const std::vector<ParameterView<float>> pa = a.parameters(), pb = b.parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    if (mask[i]) continue;
    for (std::size_t j = 0; j < pb.size(); ++j)
      if (pb[j].name == pa[i].name) {
        if (pb[j].size != pa[i].size) return false;
        for (std::size_t e = 0; e < pa[i].size; ++e)
          if (pa[i].value[e] != pb[j].value[e]) return false;
      }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  examples::Ranks ranks(argc, argv, "linearize");  // under mpirun: data-parallel training, rank 0 reports
  const Options opt = parse(argc, argv);
  try {
    const mt::DynamicsConfig dc;  // docs/paper.md §1: n = 10, T = 50, noise 0.01, W* Haar orthogonal
    const long n = dc.state_dim, T = dc.seq_len;
    const raw_token::Settings& st = opt.full ? raw_token::kFull : kReduced;
    const long batch = opt.batch > 0 ? opt.batch : st.batch;
    const long steps = opt.steps > 0 ? opt.steps : st.steps;
    const long warmup = std::min(steps, opt.steps > 0 ? std::max(1L, steps / 10) : st.warmup);
    const double lr = opt.lr > 0 ? opt.lr : st.softmax_lr;
    const long block_steps = opt.block_steps >= 0 ? opt.block_steps : (opt.full ? kFullBlockSteps : kReducedBlockSteps);
    const double block_lr = opt.block_lr > 0 ? opt.block_lr : opt.full ? kFullBlockLr : lr;
    const long L = opt.layers;
    const std::string name = "softmax-" + std::to_string(L) + "L";
    const nn::ModelConfig mc = raw_token::model_config(n, raw_token::softmax_blocks(L, opt.layer_norm), opt.threads);

    std::printf(
        "layer replacement in %s on raw tokens s_t (docs/paper.md §1-4): n = %ld, T = %ld; width %ld, %ld heads, "
        "key/value size %ld/%ld, positional code %ld dims on block 0\n"
        "%s settings: batch %ld, %ld steps, AdamW wd %.2g, clip 1, warm-up %ld then cosine to %.0e, peak lr %.0e, "
        "pre-LN %s, no MLP\n"
        "each block: softmax -> linear attention (weights kept), then %ld steps training that block alone (peak lr "
        "%.0e, warm-up %ld, cosine); test loss on %ld held-out sequences\n",
        name.c_str(), n, T, raw_token::kWidth, raw_token::kHeads, raw_token::kKeySize, raw_token::kValueSize,
        raw_token::kPositionalDim, opt.full ? "paper (--full)" : "reduced default", batch, steps,
        raw_token::kWeightDecay, warmup, raw_token::kLrFloor, lr, opt.layer_norm ? "on" : "off", block_steps, block_lr,
        std::max(1L, block_steps / 10), opt.eval_sequences);
    std::fflush(stdout);

    // One seed. Rows: the original model's loss curve, then per block l the
    // linearised model before and after its block training (and the retrained
    // softmax control), then the ratio rows (entry l = block l).
    auto run_one = [&](unsigned long long seed, train::ProcessGroup* group) {
      examples::SeedRun run;
      nn::Model<float> model(mc);
      model.init(seed, raw_token::kInitStd);
      train::TrainerConfig tc = raw_token::trainer_config(lr, warmup, steps, opt.threads);
      tc.progress = true;  // drawn only on a terminal
      tc.process_group = group;
      const train::BatchSource<float> source = raw_token::batch_source(dc, batch, seed);
      train::Trainer<float> trainer(model, source, tc);
      const auto r = trainer.run();
      run.train_seconds = r.seconds;
      run.histories.push_back({name, seed, r.losses});
      char line[320];
      std::snprintf(line, sizeof line, "trained %s: %ld steps, train loss %.4f -> %.4f (last step), %.1f s\n",
                    name.c_str(), steps, r.losses.front(), r.losses.back(), r.seconds);
      run.report += line;

      const auto eval = raw_token::held_out(dc, opt.eval_sequences, seed, raw_token::kEvalOffset, opt.threads);
      const RowMatrix<float> x = eval.inputs.cast<float>(), y = eval.targets.cast<float>();
      const std::vector<double> original = analysis::model_loss_curve(model, x, y, T);
      const double original_avg = ml::mean_of(original);
      run.rows.push_back({name, "original", original});

      std::vector<double> ratio_before, ratio_after, ratio_control;
      const auto started = std::chrono::steady_clock::now();
      for (long l = 0; l < L; ++l) {
        std::unique_ptr<nn::Model<float>> lin = analysis::linearize_block(model, l);
        const std::vector<double> before = analysis::model_loss_curve(*lin, x, y, T);
        // Fresh training batches: the stream continues after the model's last step.
        const std::vector<double> losses = train_block(*lin, l, source, steps, block_steps, block_lr);
        if (!others_unchanged(*lin, model, l))
          throw std::logic_error("block training changed a parameter outside block " + std::to_string(l));
        const std::vector<double> after = analysis::model_loss_curve(*lin, x, y, T);
        run.rows.push_back({"linear@" + std::to_string(l + 1), "untrained", before});
        run.rows.push_back({"linear@" + std::to_string(l + 1), examples::format_number("%.0f steps", double(block_steps)), after});
        ratio_before.push_back(ml::mean_of(before) / original_avg);
        ratio_after.push_back(ml::mean_of(after) / original_avg);
        std::snprintf(line, sizeof line,
                      "  block %ld -> linear: ratio %.3f untrained, %.3f after %ld steps (block train loss %.4f -> "
                      "%.4f)\n",
                      l + 1, ratio_before.back(), ratio_after.back(), block_steps,
                      losses.empty() ? std::nan("") : losses.front(), losses.empty() ? std::nan("") : losses.back());
        run.report += line;
        std::printf("%s", line);
        std::fflush(stdout);
        if (opt.control) {
          std::unique_ptr<nn::Model<float>> same = analysis::replace_attention_kind(model, l, nn::AttentionKind::softmax);
          train_block(*same, l, source, steps, block_steps, block_lr);
          const std::vector<double> c = analysis::model_loss_curve(*same, x, y, T);
          run.rows.push_back({"softmax@" + std::to_string(l + 1), examples::format_number("%.0f steps", double(block_steps)), c});
          ratio_control.push_back(ml::mean_of(c) / original_avg);
        }
      }
      const double block_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      std::snprintf(line, sizeof line, "block replacement and training: %.1f s\n", block_seconds);
      run.report += line;
      run.rows.push_back({"ratio", "untrained", ratio_before});
      run.rows.push_back({"ratio", "trained", ratio_after});
      if (opt.control) run.rows.push_back({"ratio", "control", ratio_control});
      return run;
    };

    std::vector<examples::SeedRun> runs = examples::run_seeds(opt.seeds, ranks, run_one);
    if (!ranks.root()) return 0;  // rank 0 reports and writes the files
    const examples::SweepResult sweep = examples::combine_seeds(opt.seeds, runs);
    const std::vector<examples::CurveRow>& rows = sweep.rows;
    const std::size_t S = opt.seeds.size();
    std::printf("\n");
    for (const std::string& report : sweep.reports) std::printf("%s", report.c_str());

    const examples::CurveRow& original = rows[0];
    const std::size_t per_block = opt.control ? 3 : 2;
    auto find_ratio = [&](const char* setting) -> const examples::CurveRow& {
      for (const examples::CurveRow& r : rows)
        if (r.method == "ratio" && r.setting == setting) return r;
      throw std::logic_error("no ratio row");
    };
    const examples::CurveRow &before = find_ratio("untrained"), &after = find_ratio("trained");
    const examples::CurveRow* control = opt.control ? &find_ratio("control") : nullptr;
    auto se = [&](const examples::CurveRow& r, std::size_t i) {
      return r.standard_error.empty() ? std::nan("") : r.standard_error[i];
    };

    std::printf("\ntest-loss ratio linearised / original per layer (avg loss over t = 1..%ld on %ld held-out "
                "sequences%s)\n",
                T, opt.eval_sequences, S > 1 ? (", mean over " + std::to_string(S) + " seeds").c_str() : "");
    std::printf("original %s: avg %.4f, t=50 %.4f\n", name.c_str(), ml::mean_of(original.curve),
                original.curve[std::size_t(T - 1)]);
    std::printf("%-6s %10s %10s %10s %10s", "layer", "untrained", "trained", "avg loss", "t=50 loss");
    if (opt.control) std::printf(" %14s", "softmax retr.");
    if (S > 1) std::printf(" %16s", "trained +- s.e.");
    std::printf("\n");
    for (long l = 0; l < L; ++l) {
      const examples::CurveRow& lin = rows[1 + std::size_t(l) * per_block + 1];
      std::printf("%-6ld %10.3f %10.3f %10.4f %10.4f", l + 1, before.curve[std::size_t(l)],
                  after.curve[std::size_t(l)], ml::mean_of(lin.curve), lin.curve[std::size_t(T - 1)]);
      if (control) std::printf(" %14.3f", control->curve[std::size_t(l)]);
      if (S > 1) std::printf(" %16.3f", se(after, std::size_t(l)));
      std::printf("\n");
    }
    std::printf("(docs/paper.md §4, 7-layer softmax models at the paper's settings: ratio 1.0-1.2 for layers >= 3, "
                "2-3.6 for layer 1)\n");
    std::printf("\ntraining took %.0f s in all (the model; the block training is reported above)\n",
                sweep.train_seconds);

    if (!opt.csv.empty()) {
      std::FILE* f = std::fopen(opt.csv.c_str(), "w");
      if (f == nullptr) throw std::runtime_error("cannot open --csv file " + opt.csv);
      std::fprintf(f, "model,layer,kind,trained,loss,loss_stderr,ratio,ratio_stderr,seeds\n");
      // The mean over seeds of each seed's average loss, and its standard error.
      auto avg = [&](const examples::CurveRow& r) { return ml::mean_of(r.curve); };
      auto avg_se = [&](const examples::CurveRow& r) { return S > 1 ? r.average_standard_error : std::nan(""); };
      std::fprintf(f, "%s,0,softmax,0,%.9g,%.9g,1,nan,%zu\n", name.c_str(), avg(original), avg_se(original), S);
      for (long l = 0; l < L; ++l) {
        const auto u = std::size_t(l);
        const examples::CurveRow& untrained = rows[1 + u * per_block];
        const examples::CurveRow& trained = rows[1 + u * per_block + 1];
        std::fprintf(f, "%s,%ld,linear,0,%.9g,%.9g,%.9g,%.9g,%zu\n", name.c_str(), l + 1, avg(untrained),
                     avg_se(untrained), before.curve[u], se(before, u), S);
        std::fprintf(f, "%s,%ld,linear,%ld,%.9g,%.9g,%.9g,%.9g,%zu\n", name.c_str(), l + 1, block_steps, avg(trained),
                     avg_se(trained), after.curve[u], se(after, u), S);
        if (control) {
          const examples::CurveRow& c = rows[1 + u * per_block + 2];
          std::fprintf(f, "%s,%ld,softmax,%ld,%.9g,%.9g,%.9g,%.9g,%zu\n", name.c_str(), l + 1, block_steps, avg(c),
                       avg_se(c), control->curve[u], se(*control, u), S);
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
