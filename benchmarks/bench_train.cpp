// One training step of the paper's small models (train::Trainer: forward,
// next-token MSE, backward, global-norm clipping, AdamW), float, on the
// constructed tokens of the linear-dynamics task (docs/paper.md §2): n = 10,
// width 4n = 40, key and value size 20, no embedding, read-out slice, clip 4,
// T = 50, batch 64. The batch is generated once, outside the timed loop, so
// the rate is the trainer's alone (the examples' tokens/s also include batch
// generation). Models: linear-1L (2 heads), linear-2L and linear-6L (4 heads),
// softmax-1L (4 heads) and mesa-1L (4 heads); shards 1 (the whole batch at
// once, the layers threading each op) and 8 (TrainerConfig::shards: 8 shards
// of 8 sequences on the threads, one barrier per step); 1 and 2 threads.
// The peer: benchmarks/peers/train_step_jax.py (the same models in JAX).
//
// Counters (wall-clock rates):
//   tokens/s    B T tokens per step.
//   GFLOPS      model flops of forward + backward per step (one FMA = 2 flops):
//               per layer, projections 3 (2 N D H (2d + dv) + 2 N H dv D), and per
//               head and sequence linear 16 d dv T, softmax T^2 (4 d + 3 dv),
//               mesa (20 d^2 + 14 d dv) T (the op benchmarks' counts); the
//               loss, clipping and optimiser are not counted.
//   peak_frac   GFLOPS over the measured FP32 FMA peak of as many cores as
//               threads (mesaopt::bench::peak_flops<float>(threads)).
//
// Run:  ./build/benchmarks/bench_train --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <mesaopt/nn.hpp>
#include <mesaopt/tasks.hpp>
#include <mesaopt/train.hpp>

#include "peak.hpp"

#include <cstddef>

namespace {

namespace nn = mesaopt::nn;
namespace train = mesaopt::train;
constexpr long kN = 10, kT = 50, kBatch = 64, kKey = 20;

struct Spec {
  nn::AttentionKind kind;
  long layers, heads;
};
constexpr Spec kSpecs[] = {{nn::AttentionKind::linear, 1, 2},
                           {nn::AttentionKind::linear, 2, 4},
                           {nn::AttentionKind::linear, 6, 4},
                           {nn::AttentionKind::softmax, 1, 4},
                           {nn::AttentionKind::mesa, 1, 4}};

nn::ModelConfig model_config(const Spec& s, int threads) {
  nn::ModelConfig mc;
  mc.input_dim = mc.width = 4 * kN;
  mc.output_dim = kN;
  mc.embed = false;
  mc.readout_slice = true;
  mc.clip = 4.0;
  mc.num_threads = threads;
  nn::BlockConfig b;
  b.attention = s.kind;
  b.heads = s.heads;
  b.key_size = b.value_size = kKey;
  mc.blocks.assign(std::size_t(s.layers), b);
  return mc;
}

double step_flops(const Spec& s) {
  const double N = double(kBatch * kT), D = double(4 * kN), H = double(s.heads), d = double(kKey), dv = d, T = double(kT);
  const double projections = 3 * (2 * N * D * H * (2 * d + dv) + 2 * N * H * dv * D);
  double heads = 0;
  switch (s.kind) {
    case nn::AttentionKind::linear: heads = 16 * d * dv * T; break;
    case nn::AttentionKind::softmax: heads = T * T * (4 * d + 3 * dv); break;
    case nn::AttentionKind::mesa: heads = (20 * d * d + 14 * d * dv) * T; break;
  }
  return double(s.layers) * (projections + double(kBatch) * H * heads);
}

void BM_TrainStep(benchmark::State& state) {
  const Spec& spec = kSpecs[state.range(0)];
  const long shards = state.range(1);
  const int threads = int(state.range(2));
  mesaopt::tasks::DynamicsConfig dc;
  dc.state_dim = kN;
  dc.seq_len = kT;
  const auto db = mesaopt::tasks::make_dynamics_batch<float>(dc, kBatch, 1);
  train::TrainBatch<float> batch;
  batch.inputs = mesaopt::tasks::constructed_tokens<float>(db);
  batch.targets = db.targets;
  batch.seq_len = db.seq_len;

  nn::Model<float> model(model_config(spec, threads));
  model.init(1, 0.05);
  train::TrainerConfig tc;
  tc.steps = 1L << 40;
  tc.adam.weight_decay = 1e-4;
  tc.clip_norm = 1.0;
  tc.schedule.peak = 1e-4;  // constant
  tc.progress = false;
  tc.shards = shards;
  tc.threads = threads;
  train::Trainer<float> trainer(model, [&batch](long) { return batch; }, tc);
  for (auto _ : state) trainer.run(trainer.step() + 1);

  const double flops = step_flops(spec);
  state.counters["tokens/s"] = benchmark::Counter(double(kBatch * kT), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_frac"] = benchmark::Counter(flops / mesaopt::bench::peak_flops<float>(threads),
                                                   benchmark::Counter::kIsIterationInvariantRate);
}

void grid(benchmark::internal::Benchmark* b) {
  b->ArgNames({"model", "shards", "threads"});
  for (long m = 0; m < long(sizeof kSpecs / sizeof kSpecs[0]); ++m)
    for (long shards : {1, 8})
      for (long threads : {1, 2}) b->Args({m, shards, threads});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

// model: 0 linear-1L, 1 linear-2L, 2 linear-6L, 3 softmax-1L, 4 mesa-1L
BENCHMARK(BM_TrainStep)->Name("train_step")->Apply(grid);
BENCHMARK_MAIN();
