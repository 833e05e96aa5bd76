#pragma once
// Module header: reference in-context learners (docs/math.md §4, docs/paper.md §5) and
// the tools for comparing a model with them.
#include <mesaopt/learners/context.hpp>
#include <mesaopt/learners/least_squares.hpp>
#include <mesaopt/learners/gradient_descent.hpp>
#include <mesaopt/learners/chebyshev.hpp>
#include <mesaopt/learners/chebyshev_polynomial.hpp>
#include <mesaopt/learners/kernel_regression.hpp>
#include <mesaopt/learners/compare.hpp>
