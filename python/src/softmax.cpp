// Bindings of causal softmax attention (include/mesaopt/ops/softmax_attention.hpp).
#include <mesaopt/ops/softmax_attention.hpp>

#include "common.hpp"

namespace mesaopt_py {
namespace {

using mesaopt::SoftmaxCache;
using mesaopt::SoftmaxKVCache;

// What the backward needs from the forward, for all B*H slices: per slice the
// op's SoftmaxCache (log-sum-exp per row and a copy of the output).
template <class T>
struct SoftmaxBatchCache {
  long B = 0, H = 0, T_ = 0, d = 0, dv = 0, P = 0;
  std::vector<SoftmaxCache<T>> caches;
  std::atomic<bool> busy{false};
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto& c : caches) n += std::size_t(c.lse.size() + c.out.size()) * sizeof(T);
    return n;
  }
};

// Marks a cache as in use for the duration of one call (two Python threads
// passing the same cache object at once would share its scratch).
template <class C>
struct Claim {
  C* c;
  explicit Claim(C* cache, const char* where) : c(cache) {
    if (c != nullptr && c->busy.exchange(true))
      bad(std::string(where) + ": cache is in use by another call running concurrently");
  }
  ~Claim() {
    if (c != nullptr) c->busy.store(false);
  }
};

template <class T>
SoftmaxBatchCache<T>* get_cache(const char* where, nb::handle h) {
  return mesaopt_py::get_cache<SoftmaxBatchCache<T>>(where, h, "a SoftmaxCache of the same dtype from softmax_attention_forward(..., return_cache=True)");
}


// Length P of a (B, H, P, d) prefix array, or 0 for None.
template <class T>
long prefix_length(const char* where, nb::handle h) {
  if (h.is_none()) return 0;
  Array<const T> a;
  if (!nb::try_cast<Array<const T>>(h, a, false) || a.ndim() != 4)
    bad(std::string(where) + ": initial keys must be a C-contiguous array of ndim 4 (B, H, P, d)");
  return long(a.shape(2));
}

template <class T>
void forward(nb::handle hq, nb::handle hk, nb::handle hv, nb::handle hout, nb::handle hik, nb::handle hiv,
             nb::handle hcache, int threads) {
  const char* where = "softmax_attention_forward";
  const Dims s = dims<T>(where, hq, hv);
  const long P = prefix_length<T>(where, hik);
  auto q = view<T>(where, "q", hq, {s.B, s.H, s.T, s.d});
  auto k = view<T>(where, "k", hk, {s.B, s.H, s.T, s.d});
  auto v = view<T>(where, "v", hv, {s.B, s.H, s.T, s.dv});
  auto out = view_out<T>(where, "out", hout, {s.B, s.H, s.T, s.dv});
  auto ik = view<T>(where, "initial keys", hik, {s.B, s.H, P, s.d}, true);
  auto iv = view<T>(where, "initial values", hiv, {s.B, s.H, P, s.dv}, true);
  if (ik.present != iv.present) bad(std::string(where) + ": initial keys and values must both be given");
  SoftmaxBatchCache<T>* cache = get_cache<T>(where, hcache);
  Claim<SoftmaxBatchCache<T>> claim(cache, where);
  const long n = s.B * s.H;
  std::vector<SoftmaxCache<T>> scratch(cache ? 0 : std::size_t(std::max(1L, std::min<long>(threads, n))));
  if (cache) {
    cache->B = cache->H = cache->T_ = 0;  // unusable unless the whole forward succeeds
    cache->caches.resize(std::size_t(n));
  }
  run_slices(where, n, s.H, threads, [&](long i, int w) {
    SoftmaxCache<T>& sc = cache ? cache->caches[std::size_t(i)] : scratch[std::size_t(w)];
    const mesaopt::SoftmaxAttentionOptions opt{};
    if (ik.present) {
      const SoftmaxKVCache<T> init(CMap<T>(ik.slice(i), P, s.d), CMap<T>(iv.slice(i), P, s.dv));
      mesaopt::softmax_attention_forward<T>(CMap<T>(q.slice(i), s.T, s.d), CMap<T>(k.slice(i), s.T, s.d),
                                            CMap<T>(v.slice(i), s.T, s.dv), opt, Map<T>(out.slice(i), s.T, s.dv), sc,
                                            &init, nullptr);
    } else {
      mesaopt::softmax_attention_forward<T>(CMap<T>(q.slice(i), s.T, s.d), CMap<T>(k.slice(i), s.T, s.d),
                                            CMap<T>(v.slice(i), s.T, s.dv), opt, Map<T>(out.slice(i), s.T, s.dv), sc,
                                            nullptr, nullptr);
    }
  });
  if (cache) {
    cache->B = s.B;
    cache->H = s.H;
    cache->T_ = s.T;
    cache->d = s.d;
    cache->dv = s.dv;
    cache->P = P;
  }
}

template <class T>
void backward(nb::handle hq, nb::handle hk, nb::handle hv, nb::handle hdout, nb::handle hcache, nb::handle hik,
              nb::handle hiv, nb::handle hgk, nb::handle hgv, nb::handle hdq, nb::handle hdk, nb::handle hdv,
              nb::handle hik_grad, nb::handle hiv_grad, int threads) {
  const char* where = "softmax_attention_backward";
  const Dims s = dims<T>(where, hq, hv);
  const long P = prefix_length<T>(where, hik);
  auto q = view<T>(where, "q", hq, {s.B, s.H, s.T, s.d});
  auto k = view<T>(where, "k", hk, {s.B, s.H, s.T, s.d});
  auto v = view<T>(where, "v", hv, {s.B, s.H, s.T, s.dv});
  auto dout = view<T>(where, "dout", hdout, {s.B, s.H, s.T, s.dv});
  auto ik = view<T>(where, "initial keys", hik, {s.B, s.H, P, s.d}, true);
  auto iv = view<T>(where, "initial values", hiv, {s.B, s.H, P, s.dv}, true);
  auto gk = view<T>(where, "grad_final keys", hgk, {s.B, s.H, P + s.T, s.d}, true);
  auto gv = view<T>(where, "grad_final values", hgv, {s.B, s.H, P + s.T, s.dv}, true);
  auto dq = view_out<T>(where, "dq", hdq, {s.B, s.H, s.T, s.d});
  auto dk = view_out<T>(where, "dk", hdk, {s.B, s.H, s.T, s.d});
  auto dv = view_out<T>(where, "grad_v", hdv, {s.B, s.H, s.T, s.dv});
  auto gik = view_out<T>(where, "grad_initial keys", hik_grad, {s.B, s.H, P, s.d}, true);
  auto giv = view_out<T>(where, "grad_initial values", hiv_grad, {s.B, s.H, P, s.dv}, true);
  if (ik.present != iv.present) bad(std::string(where) + ": initial keys and values must both be given");
  if (gk.present != gv.present) bad(std::string(where) + ": grad_final keys and values must both be given");
  if (gik.present != giv.present) bad(std::string(where) + ": grad_initial keys and values must both be given");
  if (gik.present && !ik.present) bad(std::string(where) + ": grad_initial needs initial");
  SoftmaxBatchCache<T>* cache = get_cache<T>(where, hcache);
  Claim<SoftmaxBatchCache<T>> claim(cache, where);
  if (cache && (cache->B != s.B || cache->H != s.H || cache->T_ != s.T || cache->d != s.d || cache->dv != s.dv ||
                cache->P != P)) {
    std::ostringstream os;
    os << where << ": cache was made for (B, H, T, d, dv) = (" << cache->B << ", " << cache->H << ", " << cache->T_
       << ", " << cache->d << ", " << cache->dv << ") with an initial state of length " << cache->P
       << ", but the inputs have (" << s.B << ", " << s.H << ", " << s.T << ", " << s.d << ", " << s.dv
       << ") and initial length " << P;
    bad(os.str());
  }
  const long n = s.B * s.H;
  const std::size_t team = std::size_t(std::max(1L, std::min<long>(threads, n)));
  std::vector<SoftmaxCache<T>> scratch(cache ? 0 : team);
  std::vector<mesaopt::RowMatrix<T>> scratch_out(cache ? 0 : team);
  run_slices(where, n, s.H, threads, [&](long i, int w) {
    const mesaopt::SoftmaxAttentionOptions opt{};
    const CMap<T> qi(q.slice(i), s.T, s.d), ki(k.slice(i), s.T, s.d);
    const CMap<T> vi(v.slice(i), s.T, s.dv), gi(dout.slice(i), s.T, s.dv);
    SoftmaxKVCache<T> init, gfin, ginit;
    if (ik.present) init = SoftmaxKVCache<T>(CMap<T>(ik.slice(i), P, s.d), CMap<T>(iv.slice(i), P, s.dv));
    if (gk.present) gfin = SoftmaxKVCache<T>(CMap<T>(gk.slice(i), P + s.T, s.d), CMap<T>(gv.slice(i), P + s.T, s.dv));
    const SoftmaxKVCache<T>* pinit = ik.present ? &init : nullptr;
    const SoftmaxCache<T>* sc;
    if (cache) {
      sc = &cache->caches[std::size_t(i)];
    } else {  // recompute the forward (it is cheaper than the backward: no dq, dk, dv GEMMs)
      auto& o = scratch_out[std::size_t(w)];
      o.resize(s.T, s.dv);
      mesaopt::softmax_attention_forward<T>(qi, ki, vi, opt, o, scratch[std::size_t(w)], pinit, nullptr);
      sc = &scratch[std::size_t(w)];
    }
    mesaopt::softmax_attention_backward<T>(qi, ki, vi, opt, gi, *sc, Map<T>(dq.slice(i), s.T, s.d),
                                           Map<T>(dk.slice(i), s.T, s.d), Map<T>(dv.slice(i), s.T, s.dv), pinit,
                                           gk.present ? &gfin : nullptr, gik.present ? &ginit : nullptr);
    if (gik.present && P > 0) {
      Map<T>(gik.slice(i), P, s.d) = ginit.keys();
      Map<T>(giv.slice(i), P, s.dv) = ginit.values();
    }
  });
}

// One token per (batch, head): q, k (B, H, d), v (B, H, dv); keys (B, H, P, d),
// values (B, H, P, dv) -> new keys/values with P + 1 tokens, out (B, H, dv).
template <class T>
void step(nb::handle hq, nb::handle hk, nb::handle hv, nb::handle hK, nb::handle hV, nb::handle hnK, nb::handle hnV,
          nb::handle hout, int threads) {
  const char* where = "softmax_attention_step";
  Array<const T> a, b, c;
  if (!nb::try_cast<Array<const T>>(hq, a, false) || !nb::try_cast<Array<const T>>(hv, b, false) ||
      !nb::try_cast<Array<const T>>(hK, c, false) || a.ndim() != 3 || b.ndim() != 3 || c.ndim() != 4)
    bad(std::string(where) + ": q, v must be C-contiguous arrays of ndim 3 and the keys of ndim 4");
  const long B = long(a.shape(0)), H = long(a.shape(1)), d = long(a.shape(2)), dvv = long(b.shape(2));
  const long P = long(c.shape(2));
  auto q = view<T>(where, "q", hq, {B, H, d});
  auto k = view<T>(where, "k", hk, {B, H, d});
  auto v = view<T>(where, "v", hv, {B, H, dvv});
  auto K = view<T>(where, "state keys", hK, {B, H, P, d});
  auto V = view<T>(where, "state values", hV, {B, H, P, dvv});
  auto nK = view_out<T>(where, "new keys", hnK, {B, H, P + 1, d});
  auto nV = view_out<T>(where, "new values", hnV, {B, H, P + 1, dvv});
  auto out = view_out<T>(where, "out", hout, {B, H, dvv});
  run_slices(where, B * H, H, threads, [&](long i, int) {
    SoftmaxKVCache<T> kv(CMap<T>(K.slice(i), P, d), CMap<T>(V.slice(i), P, dvv));
    mesaopt::softmax_attention_step<T>(CVMap<T>(q.slice(i), d), CVMap<T>(k.slice(i), d), CVMap<T>(v.slice(i), dvv), kv,
                                       VMap<T>(out.slice(i), dvv));
    Map<T>(nK.slice(i), P + 1, d) = kv.keys();
    Map<T>(nV.slice(i), P + 1, dvv) = kv.values();
  });
}

template <class T>
void bind_type(nb::module_& m, const char* suffix, const char* cache_name) {
  const std::string sfx(suffix);
  nb::class_<SoftmaxBatchCache<T>>(
      m, cache_name,
      "Opaque result of softmax_attention_forward(..., return_cache=True): per (batch, head) "
      "the row log-sum-exp and a copy of the output, for softmax_attention_backward.")
      .def(nb::init<>())
      .def_prop_ro(
          "shape", [](const SoftmaxBatchCache<T>& c) { return nb::make_tuple(c.B, c.H, c.T_, c.d, c.dv); },
          "(B, H, T, d, dv) of the forward that filled it; zeros before")
      .def_prop_ro(
          "prefix_length", [](const SoftmaxBatchCache<T>& c) { return c.P; },
          "tokens of the initial state the forward attended to")
      .def_prop_ro("nbytes", &SoftmaxBatchCache<T>::bytes, "bytes held")
      .def_prop_ro("dtype", [](const SoftmaxBatchCache<T>&) { return sizeof(T) == 4 ? "float32" : "float64"; });
  m.def(("softmax_attention_forward_" + sfx).c_str(), &forward<T>, nb::arg("q").none(), nb::arg("k").none(),
        nb::arg("v").none(), nb::arg("out").none(), nb::arg("ik").none(), nb::arg("iv").none(), nb::arg("cache").none(),
        nb::arg("threads"));
  m.def(("softmax_attention_backward_" + sfx).c_str(), &backward<T>, nb::arg("q").none(), nb::arg("k").none(),
        nb::arg("v").none(), nb::arg("dout").none(), nb::arg("cache").none(), nb::arg("ik").none(),
        nb::arg("iv").none(), nb::arg("gk").none(), nb::arg("gv").none(), nb::arg("dq").none(), nb::arg("dk").none(),
        nb::arg("dv").none(), nb::arg("ik_grad").none(), nb::arg("iv_grad").none(), nb::arg("threads"));
  m.def(("softmax_attention_step_" + sfx).c_str(), &step<T>, nb::arg("q").none(), nb::arg("k").none(),
        nb::arg("v").none(), nb::arg("K").none(), nb::arg("V").none(), nb::arg("nK").none(), nb::arg("nV").none(),
        nb::arg("out").none(), nb::arg("threads"));
}

}  // namespace

void bind_softmax(nb::module_& m) {
  bind_type<float>(m, "float32", "SoftmaxCacheFloat32");
  bind_type<double>(m, "float64", "SoftmaxCacheFloat64");
}

}  // namespace mesaopt_py
