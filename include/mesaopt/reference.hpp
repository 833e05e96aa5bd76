#pragma once
// Module header: the plain references of the ops, in namespace mesaopt::reference
// (every forward and backward, with the carried state of docs/math.md §6). They
// are the definitions the fast ops are tested and benchmarked against: simple,
// slow, O(seq_len^2) or O(seq_len d^2) memory. Production code does not include
// them (the umbrella header mesaopt/mesaopt.hpp does not either).
#include <mesaopt/ops/gated_mesa_reference.hpp>
#include <mesaopt/ops/linear_attention_reference.hpp>
#include <mesaopt/ops/mesa_reference.hpp>
#include <mesaopt/ops/softmax_attention_reference.hpp>
