#pragma once
// Module header: the paper's synthetic tasks (PAPER.md §1, MATH.md §5).
#include <mesaopt/tasks/random.hpp>
#include <mesaopt/tasks/linear_dynamics.hpp>
#include <mesaopt/tasks/linear_regression.hpp>
