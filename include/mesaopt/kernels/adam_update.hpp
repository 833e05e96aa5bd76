#pragma once
// The Adam/AdamW update of a flat run of parameters (the equations are in
// train/adam.hpp's header, docs/paper.md §3; train::Adam calls this once per
// tensor). The arithmetic is in double whatever T is, as train::Adam has
// always done it: double batches, T converted on load and store.
//
// Why a kernel: the scalar loop spent about 5 ns per parameter (three
// divisions and a square root per entry, one entry at a time; the compiler
// could not vectorise it because std::sqrt may set errno). The optimiser runs
// on one thread after the shards' parallel work, so its time is a serial part
// of every training step (docs/kernels.md, "adam_update").
#include <mesaopt/kernels/reference.hpp>
#include <mesaopt/kernels/simd.hpp>

#include <algorithm>
#include <cstddef>
#include <type_traits>

namespace mesaopt::kernels {

#if MESAOPT_SIMD
namespace detail {

// W = simd_width<double> entries of T as doubles, and back. For float the
// conversion is one instruction on a half-width load: xsimd's load_as went
// through the stack (two 32-byte stores read back by one 64-byte load), and
// the failed store forwarding cost more than the arithmetic.
template <class T>
simd_batch<double> load_as_double(const T* p) {
  using D = simd_batch<double>;
  if constexpr (std::is_same_v<T, double>) {
    return D::load_unaligned(p);
  } else {
#if defined(__AVX512F__)
    static_assert(D::size == 8);
    return D(_mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(p)));  // maskz: GCC 12 warns on the unmasked form's undefined source
#elif defined(__AVX__)
    static_assert(D::size == 4);
    return D(_mm256_cvtps_pd(_mm_loadu_ps(p)));
#elif defined(__SSE2__)
    static_assert(D::size == 2);
    return D(_mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
    alignas(64) double buf[D::size];
    for (std::size_t j = 0; j < D::size; ++j) buf[j] = static_cast<double>(p[j]);
    return D::load_aligned(buf);
#endif
  }
}

template <class T>
void store_from_double(const simd_batch<double>& x, T* p) {
  using D = simd_batch<double>;
  if constexpr (std::is_same_v<T, double>) {
    x.store_unaligned(p);
  } else {
#if defined(__AVX512F__)
    static_assert(D::size == 8);
    _mm256_storeu_ps(p, _mm512_maskz_cvtpd_ps(0xFF, x));
#elif defined(__AVX__)
    static_assert(D::size == 4);
    _mm_storeu_ps(p, _mm256_cvtpd_ps(x));
#elif defined(__SSE2__)
    static_assert(D::size == 2);
    _mm_storel_pi(reinterpret_cast<__m64*>(p), _mm_cvtpd_ps(x));
#else
    alignas(64) double buf[D::size];
    x.store_aligned(buf);
    for (std::size_t j = 0; j < D::size; ++j) p[j] = static_cast<T>(buf[j]);
#endif
  }
}

// Entries [0, W) of one batch of the update, W = simd_width<double>.
template <class T>
void adam_update_batch(T* value, const T* grad, T* m, T* v, const AdamCoefficients& c) {
  using D = simd_batch<double>;
  const D theta = load_as_double(value);
  D g = load_as_double(grad);
  // Every multiply-add written as one (fma_exact), where reference::adam_update
  // writes fused(): the bits are the reference's, whatever the compiler would
  // have contracted.
  if (!c.decoupled) g = fma_exact(D(c.weight_decay), theta, g);
  const D mi = fma_exact(D(c.beta1), load_as_double(m), D(1.0 - c.beta1) * g);
  const D vi = fma_exact(D(c.beta2), load_as_double(v), (D(1.0 - c.beta2) * g) * g);
  store_from_double(mi, m);
  store_from_double(vi, v);
  D step = (mi / D(c.bias1)) / (xsimd::sqrt(vi / D(c.bias2)) + D(c.eps));
  if (c.decoupled) step = fma_exact(D(c.weight_decay), theta, step);
  store_from_double(fma_exact(D(-c.lr), step, theta), value);
}

}  // namespace detail
#endif

// One Adam update of n entries: m, v (T, n each) are the moments, value the
// parameters, grad their gradients (read only). c.bias1 = 1 - beta1^t and
// c.bias2 = 1 - beta2^t for the 1-based step t. The buffers must not overlap.
// Each entry goes through the same instructions wherever it lies: the tail
// (n not a multiple of the batch width) runs through one zero-padded batch.
template <class T>
void adam_update(std::size_t n, T* value, const T* grad, T* m, T* v, const AdamCoefficients& c) {
#if MESAOPT_SIMD
  constexpr std::size_t W = simd_width<double>;
  std::size_t i = 0;
  for (; i + W <= n; i += W) detail::adam_update_batch(value + i, grad + i, m + i, v + i, c);
  if (i < n) {
    // Zeros in the padding give vhat = 0 and a finite step there.
    T tail[4][W] = {};
    const std::size_t r = n - i;
    std::copy(value + i, value + n, tail[0]);
    std::copy(grad + i, grad + n, tail[1]);
    std::copy(m + i, m + n, tail[2]);
    std::copy(v + i, v + n, tail[3]);
    detail::adam_update_batch(tail[0], tail[1], tail[2], tail[3], c);
    std::copy(tail[0], tail[0] + r, value + i);
    std::copy(tail[2], tail[2] + r, m + i);
    std::copy(tail[3], tail[3] + r, v + i);
  }
#else
  reference::adam_update(n, value, grad, m, v, c);
#endif
}

}  // namespace mesaopt::kernels
