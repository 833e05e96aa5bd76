// One training step of the paper's small models (train::Trainer: forward,
// next-token MSE, backward, global-norm clipping, AdamW), float, on the linear
// dynamics task (docs/paper.md §2), n = 10, T = 50, key and value size 20.
// Constructed tokens (width 4n = 40, no embedding, read-out slice, clip 4):
// linear-1L (2 heads), linear-2L, -4L, -6L, softmax-1L and mesa-1L (4 heads).
// Raw tokens: the hybrid softmax + mesa (Dense 10 -> 40 embedding, pre-LN,
// a 20-dimensional positional code on block 0, Dense read-out; as
// examples/raw_tokens.cpp). The batch is generated once, outside the timed
// loop, so the rate is the trainer's alone (the examples' tokens/s also
// include batch generation). Arguments: batch 64 or 256; shards 1 (the whole
// batch at once, the layers threading each op) or 0 (TrainerConfig::shards
// automatic: fixed shards on the threads, one barrier per step); 1 or 2
// threads. train_step_busy_core: the same with a thread of this program
// spinning on one core throughout (a shared machine; 2 threads should not be
// slower than 1). train_step_scaling: 1 and 2 threads in alternating turns
// of one run, for their ratio (see BM_TrainStepScaling). The peer:
// benchmarks/peers/train_step_jax.py.
//
// Counters (wall-clock rates):
//   tokens/s    B T tokens per step.
//   GFLOPS      flops of forward + backward + optimiser per step (one FMA = 2
//               flops): per layer, projections 3 (2 N D_in H (2d + dv) + 2 N H
//               dv D), and per head and sequence linear 16 d dv T, softmax T^2
//               (4 d + 3 dv), mesa (20 d^2 + 16 d dv) T (the op benchmarks'
//               counts); embedding and Dense read-out 3 x 2 N D_in D_out; the
//               optimiser 12 flops per parameter (clip: square-sum and scale;
//               AdamW: moments, bias-corrected update, weight decay). LayerNorm,
//               softmax exponentials, the loss and clipping of the stream are
//               not counted (a few flops per stream entry).
//   peak_frac   GFLOPS over the measured FP32 FMA peak of as many cores as
//               threads (mesaopt::bench::peak_flops<float>(threads)).
//
// Run:  ./build/benchmarks/bench_train --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <mesaopt/nn.hpp>
#include <mesaopt/tasks.hpp>
#include <mesaopt/train.hpp>

#include "paper_models.hpp"
#include "peak.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <thread>
#include <vector>

namespace {

namespace nn = mesaopt::nn;
namespace train = mesaopt::train;
using namespace mesaopt::bench;

double step_flops(const nn::ModelConfig& mc, long batch, long parameters) {
  const double N = double(batch * kT), D = double(mc.width), T = double(kT);
  double flops = 12.0 * double(parameters);
  if (mc.embed) flops += 3 * 2 * N * double(mc.input_dim) * D;
  if (!mc.readout_slice) flops += 3 * 2 * N * D * double(mc.output_dim);
  for (const nn::BlockConfig& b : mc.blocks) {
    const double H = double(b.heads), d = double(b.key_size), dv = double(b.value_size);
    const double Din = D + double(b.positional_dim);
    flops += 3 * (2 * N * Din * H * (2 * d + dv) + 2 * N * H * dv * D);
    double head = 0;
    switch (b.attention) {
      case nn::AttentionKind::linear: head = 16 * d * dv * T; break;
      case nn::AttentionKind::softmax: head = T * T * (4 * d + 3 * dv); break;
      case nn::AttentionKind::mesa: head = (20 * d * d + 16 * d * dv) * T; break;
      case nn::AttentionKind::gated_mesa:  // rough: cg solves cost ~2 d^2 a step, three solves a token
        head = (b.gated_solver == mesaopt::MesaSolver::cg ? 6.0 * b.gated_cg_steps * d * d + 20 * d * d : 20 * d * d) * T +
               14 * d * dv * T;
        break;
    }
    flops += double(batch) * H * head;
  }
  return flops;
}

// A thread that keeps one core busy for its lifetime (the "shared machine"
// rows: another program's busy loop on one of the cores).
class BusyCore {
 public:
  BusyCore() : worker_([this] {
    volatile unsigned long spin = 0;
    while (!stop_.load(std::memory_order_relaxed)) spin = spin + 1;
  }) {}
  ~BusyCore() {
    stop_ = true;
    worker_.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::thread worker_;
};

// The benchmarks' batch of the linear dynamics task: constructed tokens, or
// raw tokens for the hybrid.
train::TrainBatch<float> paper_batch(const Spec& spec, long batch_size) {
  mesaopt::tasks::DynamicsConfig dc;
  dc.state_dim = kN;
  dc.seq_len = kT;
  const auto db = mesaopt::tasks::make_dynamics_batch<float>(dc, batch_size, 1);
  train::TrainBatch<float> batch;
  batch.inputs = spec.hybrid ? db.inputs : mesaopt::tasks::constructed_tokens<float>(db);
  batch.targets = db.targets;
  batch.seq_len = db.seq_len;
  return batch;
}

// AdamW (weight decay 1e-4), global-norm clip 1, constant lr 1e-4, endless.
train::TrainerConfig bench_trainer_config(long shards, int threads) {
  train::TrainerConfig tc;
  tc.steps = 1L << 40;
  tc.adam.weight_decay = 1e-4;
  tc.clip_norm = 1.0;
  tc.schedule.peak = 1e-4;  // constant
  tc.progress = false;
  tc.shards = shards;
  tc.threads = threads;
  return tc;
}

void BM_TrainStep(benchmark::State& state) {
  const Spec& spec = kSpecs[state.range(0)];
  const long batch_size = state.range(1), shards = state.range(2);
  const int threads = int(state.range(3));
  const bool contended = state.range(4) != 0;
  const train::TrainBatch<float> batch = paper_batch(spec, batch_size);

  const nn::ModelConfig mc = model_config(spec, threads);
  nn::Model<float> model(mc);
  model.init(1, 0.05);
  long parameters = 0;
  for (const auto& p : model.parameters()) parameters += long(p.size);
  const train::TrainerConfig tc = bench_trainer_config(shards, threads);
  train::Trainer<float> trainer(model, [&batch](long) { return batch; }, tc);
  trainer.run(1);  // the first step resolves the shards and sizes the buffers
  std::unique_ptr<BusyCore> busy;
  if (contended) busy = std::make_unique<BusyCore>();
  for (auto _ : state) trainer.run(trainer.step() + 1);
  busy.reset();

  const double flops = step_flops(mc, batch_size, parameters);
  state.counters["tokens/s"] = benchmark::Counter(double(batch_size * kT), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_frac"] = benchmark::Counter(flops / mesaopt::bench::peak_flops<float>(threads),
                                                   benchmark::Counter::kIsIterationInvariantRate);
  state.counters["shards"] = double(trainer.shards());
}

// 2 threads over 1, side by side: a 1-thread and a 2-thread trainer of the
// same model on the same batch take turns, kTurnSteps steps each, and each
// turn is timed on its own. A slow stretch of a shared or virtual machine
// (tokens/s drift by 10-20 % over seconds here) then slows both alike,
// where two separate runs of train_step can land in different stretches and
// their ratio with them. Counters: tokens/s_1, tokens/s_2, speedup (the
// 1-thread time over the 2-thread time, summed over the turns) and
// speedup_median (the median over the pairs of turns of the same ratio). A
// stretch in which the machine gives the two threads one core's worth (seen
// on the development VM; docs/training.md, "Stop 46") lowers the pairs it
// covers, and the summed ratio in proportion to its length. Each turn's
// first step wakes the 2-thread trainer's helper, asleep during the other
// turn. In a run of consecutive steps it is woken at every step too, but for
// linear-1L: the step's serial end (78-407 us for the other models, 28-39 us
// for linear-1L) outlasts its 50 us spin (common/worker_team.hpp;
// docs/training.md, "Stop 46").
constexpr int kTurnSteps = 8;

double median(std::vector<double> x) {
  if (x.empty()) return 0;
  const auto mid = x.begin() + std::ptrdiff_t(x.size() / 2);
  std::nth_element(x.begin(), mid, x.end());
  if (x.size() % 2 == 1) return *mid;
  return (*std::max_element(x.begin(), mid) + *mid) / 2;
}

void BM_TrainStepScaling(benchmark::State& state) {
  const Spec& spec = kSpecs[state.range(0)];
  const long batch_size = state.range(1);
  const train::TrainBatch<float> batch = paper_batch(spec, batch_size);
  std::unique_ptr<nn::Model<float>> models[2];
  std::unique_ptr<train::Trainer<float>> trainers[2];
  for (int i = 0; i < 2; ++i) {
    models[i] = std::make_unique<nn::Model<float>>(model_config(spec, i + 1));
    models[i]->init(1, 0.05);
    trainers[i] = std::make_unique<train::Trainer<float>>(*models[i], [&batch](long) { return batch; },
                                                         bench_trainer_config(0, i + 1));
    trainers[i]->run(1);
  }
  double seconds[2] = {0, 0};
  std::vector<double> turn_ratios;  // per pair of turns: 1-thread time over 2-thread time
  for (auto _ : state) {
    double turn[2];
    for (int i = 0; i < 2; ++i) {
      const auto start = std::chrono::steady_clock::now();
      trainers[i]->run(trainers[i]->step() + kTurnSteps);
      turn[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      seconds[i] += turn[i];
    }
    turn_ratios.push_back(turn[0] / turn[1]);
  }
  const double tokens = double(state.iterations()) * kTurnSteps * double(batch_size * kT);
  state.counters["tokens/s_1"] = tokens / seconds[0];
  state.counters["tokens/s_2"] = tokens / seconds[1];
  state.counters["speedup"] = seconds[0] / seconds[1];
  state.counters["speedup_median"] = median(turn_ratios);
  state.counters["shards"] = double(trainers[1]->shards());
}

void grid(benchmark::internal::Benchmark* b) {
  b->ArgNames({"model", "batch", "shards", "threads", "busy"});
  for (long m = 0; m < long(sizeof kSpecs / sizeof kSpecs[0]); ++m)
    for (long batch : {64, 256})
      for (long shards : {1, 0})
        for (long threads : {1, 2}) b->Args({m, batch, shards, threads, 0});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

// With a busy core: linear-2L and softmax-1L at batch 64, unsharded and
// automatic shards, 1 and 2 threads.
void busy_grid(benchmark::internal::Benchmark* b) {
  b->ArgNames({"model", "batch", "shards", "threads", "busy"});
  for (long m : {1, 4})
    for (long shards : {1, 0})
      for (long threads : {1, 2}) b->Args({m, 64, shards, threads, 1});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

// model: 0 linear-1L, 1 linear-2L, 2 linear-4L, 3 linear-6L, 4 softmax-1L, 5 mesa-1L, 6 hybrid (raw tokens)
BENCHMARK(BM_TrainStep)->Name("train_step")->Apply(grid);
BENCHMARK(BM_TrainStep)->Name("train_step_busy_core")->Apply(busy_grid);
BENCHMARK(BM_TrainStepScaling)
    ->Name("train_step_scaling")
    ->ArgNames({"model", "batch"})
    ->ArgsProduct({{0, 1, 2, 3, 4, 5, 6}, {64, 256}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
