// mesaopt._core: the compiled half of the mesaopt Python package. The public
// API (argument checks, output allocation, dtype dispatch) is in
// python/mesaopt/__init__.py; see docs/python.md.
#include <mesaopt/version.hpp>

#include "common.hpp"

namespace mesaopt_py {
void bind_linear(nb::module_& m);
void bind_softmax(nb::module_& m);
void bind_mesa(nb::module_& m);
void bind_learners(nb::module_& m);
#if defined(MESAOPT_PY_JAX_FFI)
void bind_jax_ffi(nb::module_& m);
#endif
}  // namespace mesaopt_py

NB_MODULE(_core, m) {
  namespace nb = nanobind;
  m.doc() = "mesaopt C++ ops (internal; use the functions of the mesaopt package)";
  // MesaBreakdownError (a std::runtime_error in C++): the arguments were valid,
  // the arithmetic failed (docs/mesa.md, "Numerical safety").
  nb::exception<mesaopt::MesaBreakdownError>(m, "MesaBreakdownError", PyExc_RuntimeError);
  m.attr("__version__") = MESAOPT_VERSION_STRING;
  m.def("hardware_threads", [] { return std::max(1u, std::thread::hardware_concurrency()); });
#if defined(__AVX512F__)
  m.attr("simd") = "avx512";
#elif defined(__AVX2__)
  m.attr("simd") = "avx2";
#elif defined(__AVX__)
  m.attr("simd") = "avx";
#elif defined(__SSE2__)
  m.attr("simd") = "sse2";
#else
  m.attr("simd") = "none";
#endif
  mesaopt_py::bind_linear(m);
  mesaopt_py::bind_softmax(m);
  mesaopt_py::bind_mesa(m);
  mesaopt_py::bind_learners(m);  // the task and the reference learners (mesaopt.tasks, mesaopt.learners)
#if defined(MESAOPT_PY_JAX_FFI)
  mesaopt_py::bind_jax_ffi(m);  // XLA FFI handlers for mesaopt.jax (built when jaxlib's headers were found)
#endif
}
