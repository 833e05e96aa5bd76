#pragma once
// The small model the safetensors fuzz target restores checkpoints into, and
// the seed-corpus generator saves: parameters of rank 2, 1 and 0 (one of them
// empty), with an AdamW optimiser, so a seed loads completely and mutations
// start from files that reach every check of load_checkpoint.
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/train/adam.hpp>

#include <string>
#include <vector>

namespace mesaopt::fuzz {

template <class T>
struct FuzzModel {
  std::vector<T> weight = std::vector<T>(6), bias = std::vector<T>(3), scale = std::vector<T>(1);
  std::vector<T> grad_weight = std::vector<T>(6), grad_bias = std::vector<T>(3), grad_scale = std::vector<T>(1);
  std::vector<ParameterView<T>> params;
  train::Adam<T> optimizer;

  explicit FuzzModel(T fill = T(0))
      : params{{"embed.weight", weight.data(), grad_weight.data(), 6, {2, 3}},
               {"embed.bias", bias.data(), grad_bias.data(), 3, {3}},
               {"scale", scale.data(), grad_scale.data(), 1, {}},
               {"empty", nullptr, nullptr, 0, {0, 4}}},
        optimizer(params, train::adamw_config(0.01)) {
    for (std::size_t i = 0; i < weight.size(); ++i) weight[i] = fill + T(i);
    for (std::size_t i = 0; i < bias.size(); ++i) bias[i] = fill - T(i);
    scale[0] = fill * T(2);
  }
};

}  // namespace mesaopt::fuzz
