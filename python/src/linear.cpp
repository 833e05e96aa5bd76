// Bindings of causal linear attention (include/mesaopt/ops/linear_attention.hpp).
#include <mesaopt/ops/linear_attention.hpp>

#include "common.hpp"

namespace mesaopt_py {
namespace {

using mesaopt::LinearAttentionState;


template <class T>
void forward(nb::handle hq, nb::handle hk, nb::handle hv, nb::handle hout, nb::handle hinit, nb::handle hfinal,
             int threads) {
  const char* where = "linear_attention_forward";
  const Dims s = dims<T>(where, hq, hv);
  auto q = view<T>(where, "q", hq, {s.B, s.H, s.T, s.d});
  auto k = view<T>(where, "k", hk, {s.B, s.H, s.T, s.d});
  auto v = view<T>(where, "v", hv, {s.B, s.H, s.T, s.dv});
  auto out = view_out<T>(where, "out", hout, {s.B, s.H, s.T, s.dv});
  auto init = view<T>(where, "initial", hinit, {s.B, s.H, s.dv, s.d}, true);
  auto fin = view_out<T>(where, "final", hfinal, {s.B, s.H, s.dv, s.d}, true);
  run_slices(where, s.B * s.H, s.H, threads, [&](long i, int) {
    LinearAttentionState<T> st0, st1;
    if (init.present) st0.S = CMap<T>(init.slice(i), s.dv, s.d);
    mesaopt::linear_attention_forward<T>(CMap<T>(q.slice(i), s.T, s.d), CMap<T>(k.slice(i), s.T, s.d),
                                         CMap<T>(v.slice(i), s.T, s.dv), Map<T>(out.slice(i), s.T, s.dv),
                                         init.present ? &st0 : nullptr, fin.present ? &st1 : nullptr);
    if (fin.present) Map<T>(fin.slice(i), s.dv, s.d) = st1.S;
  });
}

template <class T>
void backward(nb::handle hq, nb::handle hk, nb::handle hv, nb::handle hdout, nb::handle hinit, nb::handle hgf,
              nb::handle hdq, nb::handle hdk, nb::handle hdv, nb::handle hgi, int threads) {
  const char* where = "linear_attention_backward";
  const Dims s = dims<T>(where, hq, hv);
  auto q = view<T>(where, "q", hq, {s.B, s.H, s.T, s.d});
  auto k = view<T>(where, "k", hk, {s.B, s.H, s.T, s.d});
  auto v = view<T>(where, "v", hv, {s.B, s.H, s.T, s.dv});
  auto dout = view<T>(where, "dout", hdout, {s.B, s.H, s.T, s.dv});
  auto init = view<T>(where, "initial", hinit, {s.B, s.H, s.dv, s.d}, true);
  auto gf = view<T>(where, "grad_final", hgf, {s.B, s.H, s.dv, s.d}, true);
  auto dq = view_out<T>(where, "dq", hdq, {s.B, s.H, s.T, s.d});
  auto dk = view_out<T>(where, "dk", hdk, {s.B, s.H, s.T, s.d});
  auto dv = view_out<T>(where, "grad_v", hdv, {s.B, s.H, s.T, s.dv});
  auto gi = view_out<T>(where, "grad_initial", hgi, {s.B, s.H, s.dv, s.d}, true);
  run_slices(where, s.B * s.H, s.H, threads, [&](long i, int) {
    LinearAttentionState<T> st0, g1, g0;
    if (init.present) st0.S = CMap<T>(init.slice(i), s.dv, s.d);
    if (gf.present) g1.S = CMap<T>(gf.slice(i), s.dv, s.d);
    mesaopt::linear_attention_backward<T>(CMap<T>(q.slice(i), s.T, s.d), CMap<T>(k.slice(i), s.T, s.d),
                                          CMap<T>(v.slice(i), s.T, s.dv), CMap<T>(dout.slice(i), s.T, s.dv),
                                          Map<T>(dq.slice(i), s.T, s.d), Map<T>(dk.slice(i), s.T, s.d),
                                          Map<T>(dv.slice(i), s.T, s.dv), init.present ? &st0 : nullptr,
                                          gf.present ? &g1 : nullptr, gi.present ? &g0 : nullptr);
    if (gi.present) Map<T>(gi.slice(i), s.dv, s.d) = g0.S;
  });
}

// One token per (batch, head): q, k (B, H, d), v (B, H, dv); state (B, H, dv, d) -> new_state, out (B, H, dv).
template <class T>
void step(nb::handle hq, nb::handle hk, nb::handle hv, nb::handle hstate, nb::handle hnew, nb::handle hout,
          int threads) {
  const char* where = "linear_attention_step";
  Array<const T> a, b;
  if (!nb::try_cast<Array<const T>>(hq, a, false) || !nb::try_cast<Array<const T>>(hv, b, false) || a.ndim() != 3 ||
      b.ndim() != 3)
    bad(std::string(where) + ": q and v must be C-contiguous arrays of ndim 3 (B, H, d)");
  const long B = long(a.shape(0)), H = long(a.shape(1)), d = long(a.shape(2)), dvv = long(b.shape(2));
  auto q = view<T>(where, "q", hq, {B, H, d});
  auto k = view<T>(where, "k", hk, {B, H, d});
  auto v = view<T>(where, "v", hv, {B, H, dvv});
  auto st = view<T>(where, "state", hstate, {B, H, dvv, d});
  auto nst = view_out<T>(where, "new_state", hnew, {B, H, dvv, d});
  auto out = view_out<T>(where, "out", hout, {B, H, dvv});
  run_slices(where, B * H, H, threads, [&](long i, int) {
    LinearAttentionState<T> S{CMap<T>(st.slice(i), dvv, d)};
    mesaopt::linear_attention_step<T>(CVMap<T>(q.slice(i), d), CVMap<T>(k.slice(i), d), CVMap<T>(v.slice(i), dvv), S,
                                      VMap<T>(out.slice(i), dvv));
    Map<T>(nst.slice(i), dvv, d) = S.S;
  });
}

template <class T>
void bind_type(nb::module_& m, const char* suffix) {
  const std::string sfx(suffix);
  m.def(("linear_attention_forward_" + sfx).c_str(), &forward<T>, nb::arg("q").none(), nb::arg("k").none(),
        nb::arg("v").none(), nb::arg("out").none(), nb::arg("init").none(), nb::arg("final").none(),
        nb::arg("threads"));
  m.def(("linear_attention_backward_" + sfx).c_str(), &backward<T>, nb::arg("q").none(), nb::arg("k").none(),
        nb::arg("v").none(), nb::arg("dout").none(), nb::arg("init").none(), nb::arg("gf").none(), nb::arg("dq").none(),
        nb::arg("dk").none(), nb::arg("dv").none(), nb::arg("gi").none(), nb::arg("threads"));
  m.def(("linear_attention_step_" + sfx).c_str(), &step<T>, nb::arg("q").none(), nb::arg("k").none(),
        nb::arg("v").none(), nb::arg("state").none(), nb::arg("new").none(), nb::arg("out").none(), nb::arg("threads"));
}

}  // namespace

void bind_linear(nb::module_& m) {
  bind_type<float>(m, "float32");
  bind_type<double>(m, "float64");
}

}  // namespace mesaopt_py
