#pragma once
// The paper's models as the training benchmarks build them (bench_train,
// bench_distributed): constructed tokens (width 4n = 40, no embedding, read-out
// slice, clip 4; docs/paper.md §2) for linear-1L/2L/4L/6L, softmax-1L and
// mesa-1L, and the raw-token hybrid (embedding, pre-LN softmax block with a
// positional code, then a mesa block).
#include <mesaopt/nn/model.hpp>

#include <cstddef>

namespace mesaopt::bench {

namespace nn = mesaopt::nn;
constexpr long kN = 10, kT = 50, kKey = 20, kWidth = 40, kPositional = 20;

struct Spec {
  nn::AttentionKind kind;
  long layers, heads;
  bool hybrid;  // raw tokens: softmax block then mesa block
};
constexpr Spec kSpecs[] = {{nn::AttentionKind::linear, 1, 2, false},  {nn::AttentionKind::linear, 2, 4, false},
                           {nn::AttentionKind::linear, 4, 4, false},  {nn::AttentionKind::linear, 6, 4, false},
                           {nn::AttentionKind::softmax, 1, 4, false}, {nn::AttentionKind::mesa, 1, 4, false},
                           {nn::AttentionKind::softmax, 2, 4, true}};

nn::ModelConfig model_config(const Spec& s, int threads) {
  nn::ModelConfig mc;
  mc.output_dim = kN;
  mc.num_threads = threads;
  nn::BlockConfig b;
  b.attention = s.kind;
  b.heads = s.heads;
  b.key_size = b.value_size = kKey;
  if (s.hybrid) {
    mc.input_dim = kN;
    mc.width = kWidth;
    mc.embed = true;
    b.layer_norm = true;
    b.positional_dim = kPositional;
    mc.blocks.push_back(b);
    b.attention = nn::AttentionKind::mesa;
    b.positional_dim = 0;
    mc.blocks.push_back(b);
  } else {
    mc.input_dim = mc.width = 4 * kN;
    mc.embed = false;
    mc.readout_slice = true;
    mc.clip = 4.0;
    mc.blocks.assign(std::size_t(s.layers), b);
  }
  return mc;
}

}  // namespace mesaopt::bench
