#pragma once
// The paper's full-model setting on raw tokens (docs/paper.md §2 "Full
// models", §3), shared by the programs that train such models: raw_tokens
// (loss vs context, first-block attention), probing (linear probes of the
// residual stream) and linearize (the layer-replacement experiment).
//
// The models see the raw states s_t of the linear dynamical system
// (docs/paper.md §1) and must build the pair (s_{t-1}, s_t) themselves:
//
//   Embed Dense n -> 40
//   -> block 0: softmax attention whose keys and queries also see a sinusoidal
//      positional code (kPositionalDim columns) -- the "token construction" layer
//   -> blocks 1..L-1: softmax (softmax-<L>L), or one mesa block (the hybrid)
//   -> Dense read-out 40 -> n
//
// 4 heads, key = value size 20, width 40, pre-LayerNorm before every block's
// attention (default), no MLP, no clipping; init N(0, 0.05^2), AdamW weight
// decay 0.05, gradient clip 1 (global norm), warm-up then cosine to 1e-5.
#include <mesaopt/nn.hpp>
#include <mesaopt/tasks.hpp>
#include <mesaopt/train.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace mesaopt::examples::raw_token {

// docs/paper.md §2: width 40, 4 heads, key size 20. Value size 20 (= key size, as
// in the constructed-token models). The positional code concatenated to the
// first block's input has kPositionalDim columns (sin/cos pairs at 10
// frequencies from 1 to ~1e-4 rad/step: the fastest pairs tell neighbours
// apart, which is what attending to t-1 needs).
constexpr long kWidth = 40, kHeads = 4, kKeySize = 20, kValueSize = 20, kPositionalDim = 20;
constexpr double kInitStd = 0.05;      // docs/paper.md §2: N(0, 0.05^2) for full models
constexpr double kWeightDecay = 0.05;  // docs/paper.md §3
constexpr double kLrFloor = 1e-5;      // docs/paper.md §3: cosine decay to 1e-5

// A training budget: batch, steps, warm-up and the peak lr of the
// softmax-only and the hybrid models.
struct Settings {
  long batch, steps, warmup;
  double softmax_lr, hybrid_lr;
};
// Paper: batch 256, 10000 steps, warm-up 1000, peak 8e-4 (hybrid 3e-4).
constexpr Settings kFull{256, 10000, 1000, 8e-4, 3e-4};
// Reduced (raw_tokens' default): 8x smaller batch, 8x fewer steps, a proportionally short warm-up
// and a higher peak lr (measured to train both models in this budget).
// Measured (1000 steps, seed 1, 300 held-out sequences): without LayerNorm
// softmax-2L reached avg 1.05 (lr 3e-3) and 1.35 (lr 1e-3) with a t = 1 loss of
// 2.33; with pre-LN 0.57; the hybrid 0.200-0.203 either way. At batch 32 and
// 1000 steps the hybrid's t = 50 loss stayed at 0.0165 (paper 0.0023) and the
// attention probe was ambiguous; batch 64 and 3000 steps (342 s of training)
// gave hybrid avg 0.1850 / t = 50 0.0023, softmax-3L 0.3265 / 0.0886, and
// block-0 heads with 0.64 of their mass on t-1.
constexpr Settings kDefault{64, 3000, 300, 3e-3, 2e-3};

inline nn::BlockConfig block(nn::AttentionKind kind, long positional_dim, bool layer_norm) {
  nn::BlockConfig b;
  b.layer_norm = layer_norm;
  b.attention = kind;
  b.heads = kHeads;
  b.key_size = kKeySize;
  b.value_size = kValueSize;
  b.positional_dim = positional_dim;
  return b;
}

// Embed Dense n -> 40, blocks, Dense read-out 40 -> n. Pre-LN before each
// attention (default; it made the softmax-only model train in the reduced
// budget, see kDefault), no MLP (attention-only blocks as in docs/paper.md §2's
// dynamics runs; it also keeps the default run short), no clipping.
inline nn::ModelConfig model_config(long n, const std::vector<nn::BlockConfig>& blocks, int threads) {
  nn::ModelConfig mc;
  mc.input_dim = n;
  mc.width = kWidth;
  mc.output_dim = n;
  mc.embed = true;
  mc.readout_slice = false;
  mc.blocks = blocks;
  mc.num_threads = threads;
  return mc;
}

// softmax-<layers>L: a softmax block with positions, then layers - 1 softmax blocks.
inline std::vector<nn::BlockConfig> softmax_blocks(long layers, bool layer_norm) {
  std::vector<nn::BlockConfig> blocks{block(nn::AttentionKind::softmax, kPositionalDim, layer_norm)};
  for (long l = 1; l < layers; ++l) blocks.push_back(block(nn::AttentionKind::softmax, 0, layer_norm));
  return blocks;
}

// softmax+mesa-2L: a softmax block with positions, then a mesa block (the paper's hybrid).
inline std::vector<nn::BlockConfig> hybrid_blocks(bool layer_norm) {
  return {block(nn::AttentionKind::softmax, kPositionalDim, layer_norm), block(nn::AttentionKind::mesa, 0, layer_norm)};
}

// Training batches: step s gets sequences [s*batch, (s+1)*batch) of the
// dynamics stream of data_seed; inputs are the raw states s_t.
// Generated on the calling thread (threads = 1; the data's bits do not depend
// on it): an OpenMP region here would leave libgomp's threads spinning for
// milliseconds after it, on the cores the sharded step's workers need
// (docs/training.md, "Shards and threads").
inline train::BatchSource<float> batch_source(const tasks::DynamicsConfig& dc, long batch, std::uint64_t data_seed) {
  return [dc, batch, data_seed](long step) {
    const auto db = tasks::make_dynamics_batch<float>(dc, batch, data_seed, std::uint64_t(step) * batch, 1);
    train::TrainBatch<float> tb;
    tb.inputs = db.inputs;  // raw s_t
    tb.targets = db.targets;
    tb.seq_len = db.seq_len;
    return tb;
  };
}

// AdamW (0.9, 0.999, 1e-8, weight decay kWeightDecay), warm-up of
// min(warmup, total) steps to peak_lr then cosine to kLrFloor, global-norm clip 1,
// no progress line.
inline train::TrainerConfig trainer_config(double peak_lr, long warmup, long total, int threads) {
  train::TrainerConfig tc;
  tc.steps = total;
  tc.adam = train::adamw_config(kWeightDecay);  // AdamW (0.9, 0.999, 1e-8)
  tc.schedule = train::warmup_cosine_schedule(peak_lr, std::min(warmup, total), total, kLrFloor);
  tc.clip_norm = 1.0;
  tc.threads = threads;  // workers of the sharded steps (automatic shards: min(batch, 8))
  tc.progress = false;
  return tc;
}

// A training budget as the programs resolve it from their options: the
// paper's (`--full`) or the reduced default, each of batch, steps and peak lr
// overridden when the option gives one (> 0). An overridden step count gets
// a warm-up of a tenth of its steps; the settings' warm-up never exceeds the
// steps.
struct Budget {
  long batch, steps, warmup;
  double lr;
};
inline Budget resolve_budget(bool full, long batch, long steps, double lr, bool hybrid) {
  const Settings& st = full ? kFull : kDefault;
  Budget b;
  b.batch = batch > 0 ? batch : st.batch;
  b.steps = steps > 0 ? steps : st.steps;
  b.warmup = std::min(b.steps, steps > 0 ? std::max(1L, b.steps / 10) : st.warmup);
  b.lr = lr > 0 ? lr : (hybrid ? st.hybrid_lr : st.softmax_lr);
  return b;
}

// Initialises `model` from `seed` (N(0, kInitStd^2)) and trains it for the
// budget on the dynamics stream of `seed` (trainer_config; a progress line on
// a terminal; data-parallel over `group` when given).
inline train::TrainResult train_fresh(nn::Model<float>& model, const tasks::DynamicsConfig& dc, const Budget& b,
                                      std::uint64_t seed, int threads, train::ProcessGroup* group) {
  model.init(seed, kInitStd);
  train::TrainerConfig tc = trainer_config(b.lr, b.warmup, b.steps, threads);
  tc.progress = true;  // drawn only on a terminal
  tc.process_group = group;
  train::Trainer<float> trainer(model, batch_source(dc, b.batch, seed), tc);
  return trainer.run();
}

// Held-out sequences of seed `seed`: a dynamics stream disjoint from the
// training stream (seed + offset), in double. raw_tokens evaluates on
// offset kEvalOffset; probing fits its probes on kProbeFitOffset.
constexpr std::uint64_t kEvalOffset = 1000003, kProbeFitOffset = 2000003;
inline tasks::DynamicsBatch<double> held_out(const tasks::DynamicsConfig& dc, long sequences, std::uint64_t seed,
                                             std::uint64_t offset, int threads) {
  return tasks::make_dynamics_batch<double>(dc, sequences, seed + offset, 0, threads);
}

}  // namespace mesaopt::examples::raw_token
