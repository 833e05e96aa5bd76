#pragma once
// Module header: the per-head sequence ops (functional, no parameters).
#include <mesaopt/ops/gated_mesa.hpp>
#include <mesaopt/ops/linear_attention.hpp>
#include <mesaopt/ops/mesa.hpp>
#include <mesaopt/ops/softmax_attention.hpp>
