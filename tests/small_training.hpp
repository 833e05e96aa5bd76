#pragma once
// The small models, batches and trainer settings the sharded and distributed
// training tests share (test_sharded_training, test_process_group,
// mpi/mpi_train): two blocks of one attention kind (the first with pre-LN and
// an MLP), clip 4; random batches that are a function of the step alone.
#include <mesaopt/nn/model.hpp>
#include <mesaopt/train/trainer.hpp>

#include "test_util.hpp"

#include <cstdint>

namespace mesaopt::test {

constexpr long kSmallIn = 3, kSmallWidth = 8, kSmallOut = 2;

inline nn::ModelConfig small_model_config(nn::AttentionKind kind) {
  nn::ModelConfig c;
  c.input_dim = kSmallIn;
  c.width = kSmallWidth;
  c.output_dim = kSmallOut;
  c.clip = 4.0;
  nn::BlockConfig b;
  b.attention = kind;
  b.heads = 2;
  b.key_size = 3;
  b.value_size = 3;
  nn::BlockConfig first = b;
  first.layer_norm = true;
  first.mlp = true;
  first.mlp_hidden = 6;
  c.blocks = {first, b};
  return c;
}

// Batch s: `sequences` sequences of seq_len tokens, inputs and targets drawn
// from seeds seed_base + 2 s and seed_base + 2 s + 1.
template <class T>
train::BatchSource<T> random_source(long sequences, long seq_len, std::uint64_t seed_base) {
  return [=](long s) {
    train::TrainBatch<T> b;
    b.inputs = random_matrix<T>(sequences * seq_len, kSmallIn, seed_base + 2 * std::uint64_t(s));
    b.targets = random_matrix<T>(sequences * seq_len, kSmallOut, seed_base + 1 + 2 * std::uint64_t(s));
    b.seq_len = seq_len;
    return b;
  };
}

// AdamW (wd 0.01), constant lr 1e-2, global-norm clip 1, no progress line.
inline train::TrainerConfig small_trainer_config(long steps, long shards, int threads) {
  train::TrainerConfig tc;
  tc.steps = steps;
  tc.adam = train::adamw_config(0.01);
  tc.schedule = train::constant_schedule(1e-2);
  tc.clip_norm = 1.0;
  tc.progress = false;
  tc.shards = shards;
  tc.threads = threads;
  return tc;
}

}  // namespace mesaopt::test
