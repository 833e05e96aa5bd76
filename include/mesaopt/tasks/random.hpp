#pragma once
// Reproducible random numbers for the synthetic tasks.
//
// Every sequence b of a batch draws from its own stream, keyed by
// (seed, first_sequence + b), so a batch is the same whatever the thread count
// or the order in which sequences are generated, and a batch of 2000 sequences
// starts with the same 100 sequences as a batch of 100. The generator is
// SplitMix64 (Steele, Lea, Flood 2014); uniforms and normals come from our own
// transforms (std::normal_distribution is implementation-defined across
// standard libraries, so it is not used). Normals use Box-Muller with std::log,
// std::sqrt, std::cos and std::sin: results are bitwise identical for a given
// compiler, flags and libm, and agree to rounding elsewhere.
#include <mesaopt/common/random.hpp>

#include <cstdint>

namespace mesaopt::tasks {

// One independent random stream keyed by (seed, stream): SplitMix64 started
// from a state that mixes both keys.
class CounterRng : public SplitMix64 {
 public:
  CounterRng(std::uint64_t seed, std::uint64_t stream)
      : SplitMix64(splitmix64_mix(splitmix64_mix(seed + 0x632BE59BD9B4E019ULL) ^
                                  (stream * 0x9E3779B97F4A7C15ULL + 0xD1B54A32D192ED03ULL))) {}

  // Next 64 random bits.
  std::uint64_t next_u64() { return next(); }

  // Uniform on [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform01(); }
};

}  // namespace mesaopt::tasks
