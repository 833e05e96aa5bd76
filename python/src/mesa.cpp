// Bindings of the mesa op (include/mesaopt/ops/mesa.hpp).
#include <mesaopt/ops/mesa.hpp>

#include "common.hpp"

namespace mesaopt_py {
namespace {

using mesaopt::MesaCache;
using mesaopt::MesaOptions;
using mesaopt::MesaRegularizer;
using mesaopt::MesaState;

// What the backward needs from the forward, for all B*H slices: per slice the
// op's MesaCache (checkpoints every C tokens, docs/mesa.md).
template <class T>
struct MesaBatchCache {
  long B = 0, H = 0, T_ = 0, d = 0, dv = 0;
  bool has_initial = false;
  int regularizer = 0;
  std::vector<MesaCache<T>> caches;
  std::atomic<bool> busy{false};
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto& c : caches) n += c.bytes();
    return n;
  }
};

struct Claim {
  std::atomic<bool>* busy;
  Claim(std::atomic<bool>* b, const char* where) : busy(b) {
    if (busy != nullptr && busy->exchange(true))
      bad(std::string(where) + ": cache is in use by another call running concurrently");
  }
  ~Claim() {
    if (busy != nullptr) busy->store(false);
  }
};

template <class T>
MesaBatchCache<T>* get_cache(const char* where, nb::handle h) {
  return mesaopt_py::get_cache<MesaBatchCache<T>>(where, h, "a MesaCache of the same dtype from mesa_forward(..., return_cache=True)");
}


template <class T>
MesaOptions<T> options(const View<T>& lam, const View<T>& forget, long h, MesaRegularizer reg, long chunk) {
  return mesa_options(lam.ptr, forget.ptr, h, reg, chunk);
}

template <class T>
void forward(nb::handle hq, nb::handle hk, nb::handle hv, nb::handle hlam, nb::handle hforget, int reg_i, long chunk,
             nb::handle hout, nb::handle hiR, nb::handle hiS, nb::handle hfR, nb::handle hfS, nb::handle hcache,
             int threads) {
  const char* where = "mesa_forward";
  const Dims s = dims<T>(where, hq, hv);
  const MesaRegularizer reg = regularizer_of(where, reg_i);
  auto q = view<T>(where, "q", hq, {s.B, s.H, s.T, s.d});
  auto k = view<T>(where, "k", hk, {s.B, s.H, s.T, s.d});
  auto v = view<T>(where, "v", hv, {s.B, s.H, s.T, s.dv});
  auto lam = view<T>(where, "lam", hlam, {s.H});
  auto forget = view<T>(where, "forget", hforget, {s.H});
  auto out = view_out<T>(where, "out", hout, {s.B, s.H, s.T, s.dv});
  auto iR = view<T>(where, "initial R", hiR, {s.B, s.H, s.d, s.d}, true);
  auto iS = view<T>(where, "initial S", hiS, {s.B, s.H, s.dv, s.d}, true);
  auto fR = view_out<T>(where, "final R", hfR, {s.B, s.H, s.d, s.d}, true);
  auto fS = view_out<T>(where, "final S", hfS, {s.B, s.H, s.dv, s.d}, true);
  if (iR.present != iS.present) bad(std::string(where) + ": initial R and S must both be given");
  if (fR.present != fS.present) bad(std::string(where) + ": final R and S must both be given");
  MesaBatchCache<T>* cache = get_cache<T>(where, hcache);
  Claim claim(cache ? &cache->busy : nullptr, where);
  const long n = s.B * s.H;
  std::vector<MesaCache<T>> scratch(cache ? 0 : std::size_t(std::max(1L, std::min<long>(threads, n))));
  if (cache) {
    cache->B = cache->H = cache->T_ = 0;  // unusable unless the whole forward succeeds
    cache->caches.resize(std::size_t(n));
  }
  run_slices(where, n, s.H, threads, [&](long i, int w) {
    MesaCache<T>& c = cache ? cache->caches[std::size_t(i)] : scratch[std::size_t(w)];
    const MesaOptions<T> opt = options(lam, forget, i % s.H, reg, chunk);
    MesaState<T> init, fin;
    if (iR.present) init = {CMap<T>(iR.slice(i), s.d, s.d), CMap<T>(iS.slice(i), s.dv, s.d)};
    mesaopt::mesa_forward<T>(CMap<T>(q.slice(i), s.T, s.d), CMap<T>(k.slice(i), s.T, s.d),
                             CMap<T>(v.slice(i), s.T, s.dv), opt, Map<T>(out.slice(i), s.T, s.dv), c,
                             iR.present ? &init : nullptr, fR.present ? &fin : nullptr);
    if (fR.present) {
      Map<T>(fR.slice(i), s.d, s.d) = fin.R;
      Map<T>(fS.slice(i), s.dv, s.d) = fin.S;
    }
  });
  if (cache) {
    cache->B = s.B;
    cache->H = s.H;
    cache->T_ = s.T;
    cache->d = s.d;
    cache->dv = s.dv;
    cache->has_initial = iR.present;
    cache->regularizer = reg_i;
  }
}

template <class T>
void backward(nb::handle hq, nb::handle hk, nb::handle hv, nb::handle hlam, nb::handle hforget, int reg_i, long chunk,
              nb::handle hdout, nb::handle hcache, nb::handle hiR, nb::handle hiS, nb::handle hgR, nb::handle hgS,
              nb::handle hdq, nb::handle hdk, nb::handle hdv, nb::handle hdlam, nb::handle hdforget, nb::handle hgiR,
              nb::handle hgiS, int threads) {
  const char* where = "mesa_backward";
  const Dims s = dims<T>(where, hq, hv);
  const MesaRegularizer reg = regularizer_of(where, reg_i);
  auto q = view<T>(where, "q", hq, {s.B, s.H, s.T, s.d});
  auto k = view<T>(where, "k", hk, {s.B, s.H, s.T, s.d});
  auto v = view<T>(where, "v", hv, {s.B, s.H, s.T, s.dv});
  auto lam = view<T>(where, "lam", hlam, {s.H});
  auto forget = view<T>(where, "forget", hforget, {s.H});
  auto dout = view<T>(where, "dout", hdout, {s.B, s.H, s.T, s.dv});
  auto iR = view<T>(where, "initial R", hiR, {s.B, s.H, s.d, s.d}, true);
  auto iS = view<T>(where, "initial S", hiS, {s.B, s.H, s.dv, s.d}, true);
  auto gR = view<T>(where, "grad_final R", hgR, {s.B, s.H, s.d, s.d}, true);
  auto gS = view<T>(where, "grad_final S", hgS, {s.B, s.H, s.dv, s.d}, true);
  auto dq = view_out<T>(where, "dq", hdq, {s.B, s.H, s.T, s.d});
  auto dk = view_out<T>(where, "dk", hdk, {s.B, s.H, s.T, s.d});
  auto dv = view_out<T>(where, "grad_v", hdv, {s.B, s.H, s.T, s.dv});
  auto dlam = view_out<double>(where, "dlam (per slice)", hdlam, {s.B, s.H});
  auto dforget = view_out<double>(where, "dforget (per slice)", hdforget, {s.B, s.H}, true);
  auto giR = view_out<T>(where, "grad_initial R", hgiR, {s.B, s.H, s.d, s.d}, true);
  auto giS = view_out<T>(where, "grad_initial S", hgiS, {s.B, s.H, s.dv, s.d}, true);
  if (iR.present != iS.present) bad(std::string(where) + ": initial R and S must both be given");
  if (gR.present != gS.present) bad(std::string(where) + ": grad_final R and S must both be given");
  if (giR.present != giS.present) bad(std::string(where) + ": grad_initial R and S must both be given");
  MesaBatchCache<T>* cache = get_cache<T>(where, hcache);
  Claim claim(cache ? &cache->busy : nullptr, where);
  if (cache && (cache->B != s.B || cache->H != s.H || cache->T_ != s.T || cache->d != s.d || cache->dv != s.dv)) {
    std::ostringstream os;
    os << where << ": cache was made for (B, H, T, d, dv) = (" << cache->B << ", " << cache->H << ", " << cache->T_
       << ", " << cache->d << ", " << cache->dv << ") but the inputs have (" << s.B << ", " << s.H << ", " << s.T
       << ", " << s.d << ", " << s.dv << ")" << (cache->B == 0 ? " (the cache was never filled)" : "");
    bad(os.str());
  }
  if (cache && cache->has_initial != iR.present)
    bad(std::string(where) + ": cache was made " + (cache->has_initial ? "with" : "without") +
        " an initial state, but initial is " + (iR.present ? "given" : "None"));
  const long n = s.B * s.H;
  const std::size_t team = std::size_t(std::max(1L, std::min<long>(threads, n)));
  std::vector<MesaCache<T>> scratch(cache ? 0 : team);
  std::vector<mesaopt::RowMatrix<T>> scratch_out(cache ? 0 : team);
  run_slices(where, n, s.H, threads, [&](long i, int w) {
    const MesaOptions<T> opt = options(lam, forget, i % s.H, reg, chunk);
    const CMap<T> qi(q.slice(i), s.T, s.d), ki(k.slice(i), s.T, s.d), vi(v.slice(i), s.T, s.dv);
    MesaState<T> init, gfin, ginit;
    if (iR.present) init = {CMap<T>(iR.slice(i), s.d, s.d), CMap<T>(iS.slice(i), s.dv, s.d)};
    if (gR.present) gfin = {CMap<T>(gR.slice(i), s.d, s.d), CMap<T>(gS.slice(i), s.dv, s.d)};
    MesaCache<T>* c;
    if (cache) {
      c = &cache->caches[std::size_t(i)];
    } else {  // recompute the forward (checkpoints only; about 30 % of forward + backward)
      c = &scratch[std::size_t(w)];
      auto& o = scratch_out[std::size_t(w)];
      o.resize(s.T, s.dv);
      mesaopt::mesa_forward<T>(qi, ki, vi, opt, o, *c, iR.present ? &init : nullptr, nullptr);
    }
    T df = T(0);
    const T dl = mesaopt::mesa_backward<T>(
        qi, ki, vi, opt, CMap<T>(dout.slice(i), s.T, s.dv), *c, Map<T>(dq.slice(i), s.T, s.d),
        Map<T>(dk.slice(i), s.T, s.d), Map<T>(dv.slice(i), s.T, s.dv), dforget.present ? &df : nullptr,
        iR.present ? &init : nullptr, gR.present ? &gfin : nullptr, giR.present ? &ginit : nullptr);
    dlam.ptr[i] = double(dl);
    if (dforget.present) dforget.ptr[i] = double(df);
    if (giR.present) {
      Map<T>(giR.slice(i), s.d, s.d) = ginit.R;
      Map<T>(giS.slice(i), s.dv, s.d) = ginit.S;
    }
  });
}

// One token per (batch, head): q, k (B, H, d), v (B, H, dv); state R (B, H, d, d),
// S (B, H, dv, d) -> new R, S and out (B, H, dv).
template <class T>
void step(nb::handle hq, nb::handle hk, nb::handle hv, nb::handle hlam, nb::handle hforget, int reg_i, nb::handle hR,
          nb::handle hS, nb::handle hnR, nb::handle hnS, nb::handle hout, int threads) {
  const char* where = "mesa_step";
  Array<const T> a, b;
  if (!nb::try_cast<Array<const T>>(hq, a, false) || !nb::try_cast<Array<const T>>(hv, b, false) || a.ndim() != 3 ||
      b.ndim() != 3)
    bad(std::string(where) + ": q and v must be C-contiguous arrays of ndim 3 (B, H, d)");
  const long B = long(a.shape(0)), H = long(a.shape(1)), d = long(a.shape(2)), dvv = long(b.shape(2));
  const MesaRegularizer reg = regularizer_of(where, reg_i);
  auto q = view<T>(where, "q", hq, {B, H, d});
  auto k = view<T>(where, "k", hk, {B, H, d});
  auto v = view<T>(where, "v", hv, {B, H, dvv});
  auto lam = view<T>(where, "lam", hlam, {H});
  auto forget = view<T>(where, "forget", hforget, {H});
  auto R = view<T>(where, "state R", hR, {B, H, d, d});
  auto S = view<T>(where, "state S", hS, {B, H, dvv, d});
  auto nR = view_out<T>(where, "new R", hnR, {B, H, d, d});
  auto nS = view_out<T>(where, "new S", hnS, {B, H, dvv, d});
  auto out = view_out<T>(where, "out", hout, {B, H, dvv});
  run_slices(where, B * H, H, threads, [&](long i, int) {
    const MesaOptions<T> opt = options(lam, forget, i % H, reg, 0);
    MesaState<T> st{CMap<T>(R.slice(i), d, d), CMap<T>(S.slice(i), dvv, d)};
    mesaopt::mesa_step<T>(CVMap<T>(q.slice(i), d), CVMap<T>(k.slice(i), d), CVMap<T>(v.slice(i), dvv), opt, st,
                          VMap<T>(out.slice(i), dvv));
    Map<T>(nR.slice(i), d, d) = st.R;
    Map<T>(nS.slice(i), dvv, d) = st.S;
  });
}

template <class T>
void bind_type(nb::module_& m, const char* suffix, const char* cache_name) {
  const std::string sfx(suffix);
  nb::class_<MesaBatchCache<T>>(m, cache_name,
                                "Opaque result of mesa_forward(..., return_cache=True): per (batch, head) the op's "
                                "checkpoints (every C tokens), for mesa_backward.")
      .def(nb::init<>())
      .def_prop_ro(
          "shape", [](const MesaBatchCache<T>& c) { return nb::make_tuple(c.B, c.H, c.T_, c.d, c.dv); },
          "(B, H, T, d, dv) of the forward that filled it; zeros before")
      .def_prop_ro("has_initial_state", [](const MesaBatchCache<T>& c) { return c.has_initial; })
      .def_prop_ro("regularizer",
                   [](const MesaBatchCache<T>& c) { return c.regularizer == 1 ? "constant" : "decaying"; })
      .def_prop_ro("nbytes", &MesaBatchCache<T>::bytes, "bytes held (checkpoints and scratch)")
      .def_prop_ro("dtype", [](const MesaBatchCache<T>&) { return sizeof(T) == 4 ? "float32" : "float64"; });
  m.def(("mesa_forward_" + sfx).c_str(), &forward<T>, nb::arg("q").none(), nb::arg("k").none(), nb::arg("v").none(),
        nb::arg("lam").none(), nb::arg("forget").none(), nb::arg("reg_i"), nb::arg("chunk"), nb::arg("out").none(),
        nb::arg("iR").none(), nb::arg("iS").none(), nb::arg("fR").none(), nb::arg("fS").none(), nb::arg("cache").none(),
        nb::arg("threads"));
  m.def(("mesa_backward_" + sfx).c_str(), &backward<T>, nb::arg("q").none(), nb::arg("k").none(), nb::arg("v").none(),
        nb::arg("lam").none(), nb::arg("forget").none(), nb::arg("reg_i"), nb::arg("chunk"), nb::arg("dout").none(),
        nb::arg("cache").none(), nb::arg("iR").none(), nb::arg("iS").none(), nb::arg("gR").none(), nb::arg("gS").none(),
        nb::arg("dq").none(), nb::arg("dk").none(), nb::arg("dv").none(), nb::arg("dlam").none(),
        nb::arg("dforget").none(), nb::arg("giR").none(), nb::arg("giS").none(), nb::arg("threads"));
  m.def(("mesa_step_" + sfx).c_str(), &step<T>, nb::arg("q").none(), nb::arg("k").none(), nb::arg("v").none(),
        nb::arg("lam").none(), nb::arg("forget").none(), nb::arg("reg_i"), nb::arg("R").none(), nb::arg("S").none(),
        nb::arg("nR").none(), nb::arg("nS").none(), nb::arg("out").none(), nb::arg("threads"));
}

}  // namespace

void bind_mesa(nb::module_& m) {
  bind_type<float>(m, "float32", "MesaCacheFloat32");
  bind_type<double>(m, "float64", "MesaCacheFloat64");
}

}  // namespace mesaopt_py
