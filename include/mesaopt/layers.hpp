#pragma once
// Module header: the multi-head layers with parameters (projections W_q, W_k,
// W_v, W_o around the per-head ops of mesaopt/ops.hpp). See docs/layers.md.
#include <mesaopt/layers/attention_projections.hpp>
#include <mesaopt/layers/gated_mesa_layer.hpp>
#include <mesaopt/layers/linear_attention_layer.hpp>
#include <mesaopt/layers/mesa_layer.hpp>
#include <mesaopt/layers/multi_head_attention.hpp>
#include <mesaopt/layers/softmax_attention_layer.hpp>
