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
#include <cmath>
#include <cstdint>

namespace mesaopt::tasks {

namespace detail {
// The SplitMix64 output function (a bijective 64-bit mixer).
inline std::uint64_t splitmix_mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}
}  // namespace detail

// One independent random stream keyed by (seed, stream).
class CounterRng {
 public:
  CounterRng(std::uint64_t seed, std::uint64_t stream)
      : state_(detail::splitmix_mix(detail::splitmix_mix(seed + 0x632BE59BD9B4E019ULL) ^
                                    (stream * 0x9E3779B97F4A7C15ULL + 0xD1B54A32D192ED03ULL))) {}

  // Next 64 random bits (SplitMix64: a Weyl sequence passed through the mixer).
  std::uint64_t next_u64() {
    state_ += 0x9E3779B97F4A7C15ULL;
    return detail::splitmix_mix(state_);
  }

  // Uniform on [0, 1) with 53 random bits.
  double uniform01() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

  // Uniform on [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform01(); }

  // Standard normal by Box-Muller; the second value of each pair is cached.
  double normal() {
    if (has_cached_) {
      has_cached_ = false;
      return cached_;
    }
    const double u1 = 1.0 - uniform01();  // in (0, 1]: log is finite
    const double u2 = uniform01();
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = 6.283185307179586476925 * u2;
    cached_ = r * std::sin(theta);
    has_cached_ = true;
    return r * std::cos(theta);
  }

 private:
  std::uint64_t state_;
  double cached_ = 0.0;
  bool has_cached_ = false;
};

}  // namespace mesaopt::tasks
