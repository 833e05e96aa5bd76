// XLA FFI handlers of the ops, for mesaopt.jax (docs/python.md, "JAX"): the
// forward and backward of linear, softmax and mesa attention on (B, H, T, d)
// buffers that XLA owns, called from jit-compiled code without a Python
// callback. Compiled only when the jaxlib headers are found at build time
// (python/CMakeLists.txt); mesaopt.jax falls back to jax.pure_callback
// otherwise. Measured against pure_callback in docs/python.md.
//
// The Python side (python/mesaopt/jax.py) checks shapes, dtypes and ranges
// before the call and raises ValueError; the handlers re-check the shapes they
// index with and turn any C++ exception into an FFI error (XLA raises it as a
// JaxRuntimeError with the message). The backward recomputes the forward: XLA
// residuals are arrays, and the op caches are not.
#include "xla/ffi/api/ffi.h"

#include <mesaopt/ops/linear_attention.hpp>
#include <mesaopt/ops/mesa.hpp>
#include <mesaopt/ops/softmax_attention.hpp>

#include "common.hpp"

namespace mesaopt_py {
namespace {

namespace ffi = xla::ffi;

template <ffi::DataType D>
using In = ffi::Buffer<D>;
template <ffi::DataType D>
using Out = ffi::ResultBuffer<D>;

template <ffi::DataType D>
using Scalar = ffi::NativeType<D>;

// (B, H, T, d) of q and dv of v; every other buffer must match (checked).
template <ffi::DataType D>
Dims ffi_dims(const char* where, const In<D>& q, const In<D>& v) {
  const auto a = q.dimensions(), b = v.dimensions();
  if (a.size() != 4 || b.size() != 4) bad(std::string(where) + ": q and v must have ndim 4 (B, H, T, d)");
  return {long(a[0]), long(a[1]), long(a[2]), long(a[3]), long(b[3])};
}

template <class Buffer>
void check_shape(const char* where, const char* name, const Buffer& x, std::initializer_list<long> want) {
  const auto got = x.dimensions();
  bool ok = got.size() == want.size();
  std::size_t i = 0;
  for (long w : want) ok = ok && i < got.size() && long(got[i++]) == w;
  if (!ok) bad(std::string(where) + ": " + name + " has the wrong shape");
}

// Runs fn, mapping exceptions to FFI errors (they must not cross into XLA).
template <class Fn>
ffi::Error guarded(Fn&& fn) {
  try {
    fn();
    return ffi::Error::Success();
  } catch (const std::invalid_argument& e) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
}

int team_of(int64_t threads) { return int(std::max<int64_t>(1, threads)); }

// ---------------------------------------------------------------------------
// linear attention

template <ffi::DataType D>
ffi::Error linear_fwd(In<D> q, In<D> k, In<D> v, Out<D> out, int64_t threads) {
  using T = Scalar<D>;
  return guarded([&] {
    const char* where = "linear_attention (jax ffi)";
    const Dims s = ffi_dims<D>(where, q, v);
    check_shape(where, "k", k, {s.B, s.H, s.T, s.d});
    for_slices(where, s.B * s.H, s.H, team_of(threads), [&](long i, int) {
      mesaopt::linear_attention_forward<T>(CMap<T>(q.typed_data() + i * s.T * s.d, s.T, s.d),
                                           CMap<T>(k.typed_data() + i * s.T * s.d, s.T, s.d),
                                           CMap<T>(v.typed_data() + i * s.T * s.dv, s.T, s.dv),
                                           Map<T>(out->typed_data() + i * s.T * s.dv, s.T, s.dv));
    });
  });
}

template <ffi::DataType D>
ffi::Error linear_bwd(In<D> q, In<D> k, In<D> v, In<D> g, Out<D> dq, Out<D> dk, Out<D> dv, int64_t threads) {
  using T = Scalar<D>;
  return guarded([&] {
    const char* where = "linear_attention backward (jax ffi)";
    const Dims s = ffi_dims<D>(where, q, v);
    check_shape(where, "k", k, {s.B, s.H, s.T, s.d});
    check_shape(where, "dout", g, {s.B, s.H, s.T, s.dv});
    for_slices(where, s.B * s.H, s.H, team_of(threads), [&](long i, int) {
      const long a = i * s.T * s.d, b = i * s.T * s.dv;
      mesaopt::linear_attention_backward<T>(CMap<T>(q.typed_data() + a, s.T, s.d), CMap<T>(k.typed_data() + a, s.T, s.d),
                                            CMap<T>(v.typed_data() + b, s.T, s.dv),
                                            CMap<T>(g.typed_data() + b, s.T, s.dv), Map<T>(dq->typed_data() + a, s.T, s.d),
                                            Map<T>(dk->typed_data() + a, s.T, s.d),
                                            Map<T>(dv->typed_data() + b, s.T, s.dv));
    });
  });
}

// ---------------------------------------------------------------------------
// softmax attention

template <ffi::DataType D>
ffi::Error softmax_fwd(In<D> q, In<D> k, In<D> v, Out<D> out, int64_t threads) {
  using T = Scalar<D>;
  return guarded([&] {
    const char* where = "softmax_attention (jax ffi)";
    const Dims s = ffi_dims<D>(where, q, v);
    check_shape(where, "k", k, {s.B, s.H, s.T, s.d});
    std::vector<mesaopt::SoftmaxCache<T>> scratch(std::size_t(team_of(threads)));
    for_slices(where, s.B * s.H, s.H, team_of(threads), [&](long i, int w) {
      mesaopt::softmax_attention_forward<T>(CMap<T>(q.typed_data() + i * s.T * s.d, s.T, s.d),
                                            CMap<T>(k.typed_data() + i * s.T * s.d, s.T, s.d),
                                            CMap<T>(v.typed_data() + i * s.T * s.dv, s.T, s.dv),
                                            Map<T>(out->typed_data() + i * s.T * s.dv, s.T, s.dv),
                                            scratch[std::size_t(w)]);
    });
  });
}

template <ffi::DataType D>
ffi::Error softmax_bwd(In<D> q, In<D> k, In<D> v, In<D> g, Out<D> dq, Out<D> dk, Out<D> dv, int64_t threads) {
  using T = Scalar<D>;
  return guarded([&] {
    const char* where = "softmax_attention backward (jax ffi)";
    const Dims s = ffi_dims<D>(where, q, v);
    check_shape(where, "k", k, {s.B, s.H, s.T, s.d});
    check_shape(where, "dout", g, {s.B, s.H, s.T, s.dv});
    const std::size_t team = std::size_t(team_of(threads));
    std::vector<mesaopt::SoftmaxCache<T>> scratch(team);
    std::vector<mesaopt::RowMatrix<T>> outs(team);
    for_slices(where, s.B * s.H, s.H, team_of(threads), [&](long i, int w) {
      const long a = i * s.T * s.d, b = i * s.T * s.dv;
      const CMap<T> qi(q.typed_data() + a, s.T, s.d), ki(k.typed_data() + a, s.T, s.d), vi(v.typed_data() + b, s.T, s.dv);
      auto& sc = scratch[std::size_t(w)];
      auto& o = outs[std::size_t(w)];
      o.resize(s.T, s.dv);
      const mesaopt::SoftmaxAttentionOptions opt{};
      mesaopt::softmax_attention_forward<T>(qi, ki, vi, o, sc, opt);
      mesaopt::softmax_attention_backward<T>(qi, ki, vi, opt, CMap<T>(g.typed_data() + b, s.T, s.dv), sc,
                                             Map<T>(dq->typed_data() + a, s.T, s.d),
                                             Map<T>(dk->typed_data() + a, s.T, s.d),
                                             Map<T>(dv->typed_data() + b, s.T, s.dv));
    });
  });
}

// ---------------------------------------------------------------------------
// mesa: lam, forget (H,); the backward writes dlam, dforget per slice (B, H),
// summed over the batch by the caller (in a fixed order, as the NumPy API does).

template <ffi::DataType D>
ffi::Error mesa_fwd(In<D> q, In<D> k, In<D> v, In<D> lam, In<D> forget, Out<D> out, int64_t regularizer,
                    int64_t chunk, int64_t threads) {
  using T = Scalar<D>;
  return guarded([&] {
    const char* where = "mesa (jax ffi)";
    const Dims s = ffi_dims<D>(where, q, v);
    check_shape(where, "k", k, {s.B, s.H, s.T, s.d});
    check_shape(where, "lam", lam, {s.H});
    check_shape(where, "forget", forget, {s.H});
    const mesaopt::MesaRegularizer reg = regularizer_of(where, long(regularizer));
    std::vector<mesaopt::MesaCache<T>> scratch(std::size_t(team_of(threads)));
    for_slices(where, s.B * s.H, s.H, team_of(threads), [&](long i, int w) {
      const auto opt = mesa_options(lam.typed_data(), forget.typed_data(), i % s.H, reg, long(chunk));
      mesaopt::mesa_forward<T>(CMap<T>(q.typed_data() + i * s.T * s.d, s.T, s.d),
                               CMap<T>(k.typed_data() + i * s.T * s.d, s.T, s.d),
                               CMap<T>(v.typed_data() + i * s.T * s.dv, s.T, s.dv), opt,
                               Map<T>(out->typed_data() + i * s.T * s.dv, s.T, s.dv), scratch[std::size_t(w)]);
    });
  });
}

template <ffi::DataType D>
ffi::Error mesa_bwd(In<D> q, In<D> k, In<D> v, In<D> lam, In<D> forget, In<D> g, Out<D> dq, Out<D> dk, Out<D> dv,
                    Out<D> dlam, Out<D> dforget, int64_t regularizer, int64_t chunk, int64_t threads) {
  using T = Scalar<D>;
  return guarded([&] {
    const char* where = "mesa backward (jax ffi)";
    const Dims s = ffi_dims<D>(where, q, v);
    check_shape(where, "k", k, {s.B, s.H, s.T, s.d});
    check_shape(where, "lam", lam, {s.H});
    check_shape(where, "forget", forget, {s.H});
    check_shape(where, "dout", g, {s.B, s.H, s.T, s.dv});
    const mesaopt::MesaRegularizer reg = regularizer_of(where, long(regularizer));
    const std::size_t team = std::size_t(team_of(threads));
    std::vector<mesaopt::MesaCache<T>> scratch(team);
    std::vector<mesaopt::RowMatrix<T>> outs(team);
    for_slices(where, s.B * s.H, s.H, team_of(threads), [&](long i, int w) {
      const long a = i * s.T * s.d, b = i * s.T * s.dv;
      const CMap<T> qi(q.typed_data() + a, s.T, s.d), ki(k.typed_data() + a, s.T, s.d), vi(v.typed_data() + b, s.T, s.dv);
      const auto opt = mesa_options(lam.typed_data(), forget.typed_data(), i % s.H, reg, long(chunk));
      auto& c = scratch[std::size_t(w)];
      auto& o = outs[std::size_t(w)];
      o.resize(s.T, s.dv);
      mesaopt::mesa_forward<T>(qi, ki, vi, opt, o, c);
      T df = T(0);
      dlam->typed_data()[i] = mesaopt::mesa_backward<T>(
          qi, ki, vi, opt, CMap<T>(g.typed_data() + b, s.T, s.dv), c, Map<T>(dq->typed_data() + a, s.T, s.d),
          Map<T>(dk->typed_data() + a, s.T, s.d), Map<T>(dv->typed_data() + b, s.T, s.dv), &df);
      dforget->typed_data()[i] = df;
    });
  });
}

// The handlers, one per op, direction and dtype: a function of XLA's C ABI each.
#define MESAOPT_FFI_ATTENTION(name, fwd, bwd, D)                                                              \
  XLA_FFI_DEFINE_HANDLER(name##_fwd, fwd<D>,                                                                 \
                         ffi::Ffi::Bind().Arg<In<D>>().Arg<In<D>>().Arg<In<D>>().Ret<In<D>>().Attr<int64_t>( \
                             "threads"));                                                                    \
  XLA_FFI_DEFINE_HANDLER(name##_bwd, bwd<D>,                                                                 \
                         ffi::Ffi::Bind()                                                                    \
                             .Arg<In<D>>()                                                                   \
                             .Arg<In<D>>()                                                                   \
                             .Arg<In<D>>()                                                                   \
                             .Arg<In<D>>()                                                                   \
                             .Ret<In<D>>()                                                                   \
                             .Ret<In<D>>()                                                                   \
                             .Ret<In<D>>()                                                                   \
                             .Attr<int64_t>("threads"));

#define MESAOPT_FFI_MESA(name, D)                                                                           \
  XLA_FFI_DEFINE_HANDLER(name##_fwd, mesa_fwd<D>,                                                          \
                         ffi::Ffi::Bind()                                                                  \
                             .Arg<In<D>>()                                                                 \
                             .Arg<In<D>>()                                                                 \
                             .Arg<In<D>>()                                                                 \
                             .Arg<In<D>>()                                                                 \
                             .Arg<In<D>>()                                                                 \
                             .Ret<In<D>>()                                                                 \
                             .Attr<int64_t>("regularizer")                                                 \
                             .Attr<int64_t>("chunk")                                                       \
                             .Attr<int64_t>("threads"));                                                   \
  XLA_FFI_DEFINE_HANDLER(name##_bwd, mesa_bwd<D>,                                                          \
                         ffi::Ffi::Bind()                                                                  \
                             .Arg<In<D>>()                                                                 \
                             .Arg<In<D>>()                                                                 \
                             .Arg<In<D>>()                                                                 \
                             .Arg<In<D>>()                                                                 \
                             .Arg<In<D>>()                                                                 \
                             .Arg<In<D>>()                                                                 \
                             .Ret<In<D>>()                                                                 \
                             .Ret<In<D>>()                                                                 \
                             .Ret<In<D>>()                                                                 \
                             .Ret<In<D>>()                                                                 \
                             .Ret<In<D>>()                                                                 \
                             .Attr<int64_t>("regularizer")                                                 \
                             .Attr<int64_t>("chunk")                                                       \
                             .Attr<int64_t>("threads"));

MESAOPT_FFI_ATTENTION(linear_f32, linear_fwd, linear_bwd, ffi::F32)
MESAOPT_FFI_ATTENTION(linear_f64, linear_fwd, linear_bwd, ffi::F64)
MESAOPT_FFI_ATTENTION(softmax_f32, softmax_fwd, softmax_bwd, ffi::F32)
MESAOPT_FFI_ATTENTION(softmax_f64, softmax_fwd, softmax_bwd, ffi::F64)
MESAOPT_FFI_MESA(mesa_f32, ffi::F32)
MESAOPT_FFI_MESA(mesa_f64, ffi::F64)

}  // namespace

// _core.jax_ffi_targets(): {"mesaopt_<op>_<dtype>_<fwd|bwd>": capsule}, for jax.ffi.register_ffi_target.
void bind_jax_ffi(nb::module_& m) {
  m.def("jax_ffi_targets", [] {
    nb::dict d;
    auto add = [&](const char* name, XLA_FFI_Handler* h) { d[name] = nb::capsule(reinterpret_cast<void*>(h)); };
    add("mesaopt_linear_f32_fwd", linear_f32_fwd);
    add("mesaopt_linear_f32_bwd", linear_f32_bwd);
    add("mesaopt_linear_f64_fwd", linear_f64_fwd);
    add("mesaopt_linear_f64_bwd", linear_f64_bwd);
    add("mesaopt_softmax_f32_fwd", softmax_f32_fwd);
    add("mesaopt_softmax_f32_bwd", softmax_f32_bwd);
    add("mesaopt_softmax_f64_fwd", softmax_f64_fwd);
    add("mesaopt_softmax_f64_bwd", softmax_f64_bwd);
    add("mesaopt_mesa_f32_fwd", mesa_f32_fwd);
    add("mesaopt_mesa_f32_bwd", mesa_f32_bwd);
    add("mesaopt_mesa_f64_fwd", mesa_f64_fwd);
    add("mesaopt_mesa_f64_bwd", mesa_f64_bwd);
    return d;
  });
}

}  // namespace mesaopt_py
