#pragma once
// Module header: nn, the building blocks of trainable models (Dense, LayerNorm,
// GELU, MLP, sinusoidal positions, activation clipping, the pre-LN residual
// pattern) and the seeded generator that initialises them. See docs/training.md.
#include <mesaopt/nn/clip.hpp>
#include <mesaopt/nn/dense.hpp>
#include <mesaopt/nn/gelu.hpp>
#include <mesaopt/nn/layer_norm.hpp>
#include <mesaopt/nn/mlp.hpp>
#include <mesaopt/nn/positional.hpp>
#include <mesaopt/nn/random.hpp>
#include <mesaopt/nn/residual.hpp>
#include <mesaopt/nn/model.hpp>
