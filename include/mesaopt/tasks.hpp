#pragma once
// Module header: the paper's synthetic tasks (docs/paper.md §1, docs/math.md §5).
#include <mesaopt/tasks/random.hpp>
#include <mesaopt/tasks/linear_dynamics.hpp>
#include <mesaopt/tasks/linear_regression.hpp>
#include <mesaopt/tasks/prompted_regression.hpp>
