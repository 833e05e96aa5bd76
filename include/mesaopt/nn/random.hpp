#pragma once
// The seeded generator the nn blocks initialise from; it lives in
// common/random.hpp and is shared with the synthetic tasks.
#include <mesaopt/common/random.hpp>

namespace mesaopt::nn {
using mesaopt::fill_normal;
using mesaopt::SplitMix64;
}  // namespace mesaopt::nn
