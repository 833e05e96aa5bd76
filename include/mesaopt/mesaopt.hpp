#pragma once
// mesaopt: header-only mesa-optimization sequence layers. Include this one
// header, or a module header (mesaopt/kernels.hpp, mesaopt/ops.hpp, ...).
#include <mesaopt/version.hpp>
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/common/random.hpp>
#include <mesaopt/common/parallel.hpp>
#include <mesaopt/kernels.hpp>
#include <mesaopt/ops.hpp>
#include <mesaopt/layers.hpp>
#include <mesaopt/tasks.hpp>
#include <mesaopt/learners.hpp>
#include <mesaopt/nn.hpp>
#include <mesaopt/analysis.hpp>
#include <mesaopt/io.hpp>
#include <mesaopt/train.hpp>
