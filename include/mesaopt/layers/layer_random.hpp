#pragma once
// Seeded normal numbers for initialising layer weights: SplitMix64 (Steele,
// Lea, Flood 2014) with Box-Muller. std::normal_distribution is not used
// because its output differs between standard libraries. Results are bitwise
// reproducible for a given compiler, flags and libm (std::log, std::sqrt,
// std::cos, std::sin), and agree to rounding elsewhere.
//
// Local to the layers (a general nn/random.hpp had not landed when they were
// written); each parameter tensor draws from its own stream keyed by
// (seed, stream), so adding a parameter never changes the others' values.
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace mesaopt::detail {

class LayerRng {
 public:
  LayerRng(std::uint64_t seed, std::uint64_t stream)
      : state_(mix(mix(seed + 0x632BE59BD9B4E019ULL) ^ (stream * 0x9E3779B97F4A7C15ULL + 0xD1B54A32D192ED03ULL))) {}

  // Next 64 random bits: a Weyl sequence through the SplitMix64 mixer.
  std::uint64_t next_u64() {
    state_ += 0x9E3779B97F4A7C15ULL;
    return mix(state_);
  }

  // Uniform on [0, 1) with 53 random bits.
  double uniform01() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

  // Standard normal (Box-Muller; the second value of each pair is kept).
  double normal() {
    if (has_cached_) {
      has_cached_ = false;
      return cached_;
    }
    const double u1 = 1.0 - uniform01();  // (0, 1]: the log is finite
    const double u2 = uniform01();
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = 6.283185307179586476925 * u2;
    cached_ = r * std::sin(theta);
    has_cached_ = true;
    return r * std::cos(theta);
  }

 private:
  static std::uint64_t mix(std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }

  std::uint64_t state_;
  double cached_ = 0;
  bool has_cached_ = false;
};

// p[0..n) = stddev * N(0, 1) from stream (seed, stream).
template <class T>
void fill_normal(T* p, std::size_t n, std::uint64_t seed, std::uint64_t stream, double stddev) {
  LayerRng rng(seed, stream);
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<T>(stddev * rng.normal());
}

}  // namespace mesaopt::detail
