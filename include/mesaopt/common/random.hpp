#pragma once
// The one random generator of mesaopt: explicitly seeded, for parameter
// initialisation (nn/) and for the synthetic tasks (tasks/random.hpp keys one
// stream per sequence from it).
//
// Why not <random>: std::mt19937_64 is portable, but std::normal_distribution
// is implementation-defined (libstdc++, libc++ and MSVC draw different
// numbers), and std::random_device is not reproducible at all. A model
// initialised from seed 42 must get the same weights on every machine, so the
// generator (SplitMix64, Steele/Lea/Flood 2014, as in Vigna's reference code)
// and the normal transform (Box-Muller) are written out here.
//
// Reproducibility: next() and uniform01() are bit-identical everywhere (integer
// arithmetic and an exact power-of-two scaling). normal() calls std::log,
// std::sqrt, std::cos and std::sin; sqrt is correctly rounded by IEEE 754, the
// others are within an ulp in every mainstream libm and agree bit for bit
// between machines sharing a libm (glibc on Linux).
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace mesaopt {

// The SplitMix64 output function (a bijective 64-bit mixer).
inline std::uint64_t splitmix64_mix(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : state_(seed) {}

  // The next 64 random bits.
  std::uint64_t next() {
    state_ += 0x9e3779b97f4a7c15ULL;
    return splitmix64_mix(state_);
  }

  // Uniform on [0, 1): the top 53 bits scaled by 2^-53 (exact in double).
  double uniform01() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

  // Standard normal by Box-Muller; the second value of each pair is kept for
  // the next call, so consecutive calls use both.
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = 1.0 - uniform01();  // (0, 1]: log(u1) is finite
    const double u2 = uniform01();
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = 6.283185307179586476925286766559 * u2;
    spare_ = r * std::sin(theta);
    has_spare_ = true;
    return r * std::cos(theta);
  }

 private:
  std::uint64_t state_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

// p[0..n) = stddev * N(0, 1) draws, in order.
template <class T>
void fill_normal(T* p, std::size_t n, double stddev, SplitMix64& rng) {
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<T>(stddev * rng.normal());
}

}  // namespace mesaopt
