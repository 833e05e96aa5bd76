#pragma once
// Module header: the SIMD kernel layer and its scalar references.
#include <mesaopt/kernels/adam_update.hpp>
#include <mesaopt/kernels/gemm.hpp>
#include <mesaopt/kernels/gemv.hpp>
#include <mesaopt/kernels/rank1.hpp>
#include <mesaopt/kernels/rank2.hpp>
#include <mesaopt/kernels/reference.hpp>
#include <mesaopt/kernels/sherman_morrison.hpp>
#include <mesaopt/kernels/simd.hpp>
#include <mesaopt/kernels/state_sweep.hpp>
#include <mesaopt/kernels/state_update.hpp>
#include <mesaopt/kernels/vector_ops.hpp>
