"""PyTorch wrappers of the mesaopt ops: autograd Functions and nn.Modules (CPU).

    import mesaopt.torch as mt
    out = mt.mesa(q, k, v, lam)                      # q, k (B, H, T, d), v (B, H, T, dv) -> (B, H, T, dv)
    out = mt.mesa(q, k, v, lam, forget=0.95)         # lam, forget: floats or tensors of shape (H,) (or 0-dim)
    out = mt.linear_attention(q, k, v)
    out = mt.softmax_attention(q, k, v)

    layer = mt.MesaAttention(dim=40, heads=4, head_dim=20)   # (B, T, dim) -> (B, T, dim)

The functions are ``torch.autograd.Function``s whose forward and backward call
the ops of ``mesaopt`` (the NumPy functions for linear and softmax attention, the
compiled mesa_forward / mesa_backward for mesa, whose arguments mesa() checks)
on the tensors' memory (no copy for contiguous inputs); with nothing to
differentiate, mesa() calls the op without an autograd node. The forward of softmax
and mesa keeps the op's cache (``return_cache=True``) on the autograd context,
so the backward does not recompute the forward (docs/python.md, "Backward:
cache or recompute"); the first backward releases it (a second backward through
a graph kept with retain_graph=True recomputes the forward). Gradients flow to q, k, v and, for mesa, to lam and
forget when they are tensors that require grad (a float or a tensor without
grad is a constant). The backward is not itself differentiable (no double
backward).

Tensors must be CPU tensors of dtype float32 or float64, all of one dtype;
non-contiguous inputs are made contiguous (a copy). CUDA tensors raise
ValueError (there is no GPU kernel), another dtype TypeError, a wrong shape
ValueError; each message names the function and the argument.

No carried state (initial / final) here: use the NumPy API for that.
"""

import atexit
import math
import numbers
import weakref

import numpy as np

try:
    import torch
    from torch import nn
    from torch.autograd.function import once_differentiable
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "mesaopt.torch needs PyTorch, which is not installed in this environment "
        "(pip install torch, or bash scripts/python-env.sh --torch)"
    ) from e

import mesaopt as _m

__all__ = [
    "linear_attention",
    "softmax_attention",
    "mesa",
    "LinearAttentionFunction",
    "SoftmaxAttentionFunction",
    "MesaFunction",
    "LinearAttention",
    "SoftmaxAttention",
    "MesaAttention",
]

_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------
# Argument checks (named after the public function)


def _tensor(where, name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__module__}.{type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"{where}: {name} is on device {x.device}; mesaopt.torch runs on the CPU only "
                         f"(move it with {name}.cpu())")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{where}: {name} must have dtype torch.float32 or torch.float64, got {x.dtype}")
    return x


def _sequence(where, q, k, v):
    """Checks q, k (B, H, T, d), v (B, H, T, dv); returns (B, H, T, d, dv, dtype)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _tensor(where, name, x)
        if x.dim() != 4:
            raise ValueError(f"{where}: {name} must have 4 dimensions (B, H, T, d), got shape {tuple(x.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{where}: {name} has dtype {x.dtype} but q has {q.dtype} (all tensors must share one dtype)")
    B, H, T, d = q.shape
    if tuple(k.shape) != (B, H, T, d):
        raise ValueError(f"{where}: k has shape {tuple(k.shape)}, expected (B={B}, H={H}, T={T}, d={d}) like q")
    if tuple(v.shape[:3]) != (B, H, T):
        raise ValueError(f"{where}: v has shape {tuple(v.shape)}, expected (B={B}, H={H}, T={T}, dv) like q")
    for n, x in (("B", B), ("H", H), ("T", T), ("d", d), ("dv", v.shape[3])):
        if x == 0:
            raise ValueError(f"{where}: {n} must be at least 1, got q shape {tuple(q.shape)}, v shape {tuple(v.shape)}")
    return B, H, T, d, v.shape[3], q.dtype


def _per_head(where, name, x, H, dtype):
    """A float, a 0-dim tensor or a tensor of shape (H,) -> a tensor (H,) of dtype (autograd-connected)."""
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{where}: {name} must be a float or a tensor of shape (H,), got bool")
    if isinstance(x, numbers.Real):
        return torch.full((H,), float(x), dtype=dtype)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.asarray(x, dtype=np.float64))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a float or a torch.Tensor of shape (H,), got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"{where}: {name} is on device {x.device}; mesaopt.torch runs on the CPU only")
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        return x.to(dtype).expand(H)
    if tuple(x.shape) != (H,):
        raise ValueError(f"{where}: {name} must be a float or a tensor of shape (H,) = ({H},), got shape {tuple(x.shape)}")
    return x.to(dtype)


def _check_values(where, name, x, t, ok, ok_scalar, what):
    """Every entry of x (a float or tensor, before the cast) must satisfy ok (ok_scalar for a
    float), and of t (x as a per-head tensor in the op's dtype) be a normal number; the message
    labels the entry like the NumPy API.

    This runs on every call (at B*H = 8, T = 256 the op itself takes about half a
    millisecond), so the passing cases are cheap: a float is checked in Python, a tensor
    with one reduction; only a failing check builds the message."""
    tiny = _TINY[t.dtype]
    if isinstance(x, numbers.Real):
        if ok_scalar(float(x)) and float(t[0]) >= tiny:
            return
    elif bool((ok(torch.as_tensor(x).detach().double()) & (t.detach() >= tiny)).all()):
        return
    scalar = not (isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim == 1)
    orig = torch.as_tensor(x).detach().double().reshape(-1) if not isinstance(x, numbers.Real) else \
        torch.tensor([float(x)], dtype=torch.float64)

    def label(h, vals):
        return f"{name} = {float(vals[h])!r}" if scalar else f"{name}[{h}] = {float(vals[h])!r}"

    bad = torch.nonzero(~ok(orig)).flatten()
    if bad.numel():
        raise ValueError(f"{where}: {name} must {what}, got {label(int(bad[0]), orig)}")
    bad = torch.nonzero(~(t.detach() >= tiny)).flatten()
    h = 0 if scalar or not bad.numel() else int(bad[0])
    raise ValueError(f"{where}: {label(h, orig)} is not a normal number in {t.dtype} (at least {tiny})")


_TINY = {dt: torch.finfo(dt).tiny for dt in _DTYPES}


def _np(x):
    """A contiguous CPU tensor's memory as a NumPy array (no copy)."""
    return x.detach().contiguous().numpy()


# ---------------------------------------------------------------------------
# The op caches kept on autograd contexts. A cache is used by the first backward
# and then released (a second backward through a retained graph recomputes the
# forward instead), so its memory goes when the graph's first backward is done.
# Caches of graphs still alive at interpreter exit are released by an atexit
# hook, before the extension module is torn down (else nanobind reports them as
# leaked objects).


class _CacheHolder:
    __slots__ = ("cache", "__weakref__")

    def __init__(self, cache):
        self.cache = cache

    def take(self):
        cache, self.cache = self.cache, None
        return cache


_live_holders = weakref.WeakSet()


def _hold(cache):
    h = _CacheHolder(cache)
    _live_holders.add(h)
    return h


@atexit.register
def _release_caches():
    for h in list(_live_holders):
        h.cache = None


# ---------------------------------------------------------------------------
# autograd Functions. Their forward takes checked, contiguous tensors; use the
# plain functions below (they check and convert the arguments).


class LinearAttentionFunction(torch.autograd.Function):
    """Causal linear attention o_t = sum_{i<=t} (k_i . q_t) v_i. apply(q, k, v, threads)."""

    @staticmethod
    def forward(ctx, q, k, v, threads):
        ctx.threads = threads
        ctx.save_for_backward(q, k, v)
        return torch.from_numpy(_m.linear_attention_forward(_np(q), _np(k), _np(v), threads=threads))

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = _m.linear_attention_backward(_np(q), _np(k), _np(v), _np(dout), threads=ctx.threads)
        return torch.from_numpy(dq), torch.from_numpy(dk), torch.from_numpy(dv), None


class SoftmaxAttentionFunction(torch.autograd.Function):
    """Causal softmax attention with scale 1/sqrt(d). apply(q, k, v, threads); keeps the forward's cache."""

    @staticmethod
    def forward(ctx, q, k, v, threads):
        out, cache = _m.softmax_attention_forward(_np(q), _np(k), _np(v), return_cache=True, threads=threads)
        ctx.threads = threads
        ctx.cache = _hold(cache)
        ctx.save_for_backward(q, k, v)
        return torch.from_numpy(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = _m.softmax_attention_backward(_np(q), _np(k), _np(v), _np(dout), cache=ctx.cache.take(),
                                                   threads=ctx.threads)
        return torch.from_numpy(dq), torch.from_numpy(dk), torch.from_numpy(dv), None


class MesaFunction(torch.autograd.Function):
    """The mesa layer. apply(q, k, v, lam, forget, regularizer, chunk, threads).

    lam: tensor (H,) > 0; forget: tensor (H,) in (0, 1], or None (no forgetting, no gradient).
    Keeps the forward's cache (checkpoints every ~sqrt(T) tokens) for the first backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, lam, forget, regularizer, chunk, threads):
        # The compiled op directly, not mesaopt.mesa_forward: mesa() has checked the
        # arguments already, and the per-call overhead is what separates small
        # problems from the C++ speed (docs/python.md, "Against the C++ benchmark").
        # The compiled function checks shapes, dtypes and values again.
        threads = _m._check_threads("mesaopt.torch.MesaFunction", threads)
        out, cache = _mesa_forward_core(q, k, v, lam, forget, regularizer, chunk, threads, True)
        ctx.kw = (regularizer, chunk, threads)
        ctx.cache = _hold(cache)
        ctx.has_forget = forget is not None
        if forget is None:
            ctx.save_for_backward(q, k, v, lam)
        else:
            ctx.save_for_backward(q, k, v, lam, forget)
        return torch.from_numpy(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        q, k, v, lam = saved[:4]
        forget = saved[4] if ctx.has_forget else None
        regularizer, chunk, threads = ctx.kw
        qn, kn, vn = _np(q), _np(k), _np(v)
        B, H, T, d = qn.shape
        dv, dt = vn.shape[3], qn.dtype
        cache = ctx.cache.take()
        dq = np.empty((B, H, T, d), dtype=dt)
        dk = np.empty((B, H, T, d), dtype=dt)
        gv = np.empty((B, H, T, dv), dtype=dt)
        dlam = np.empty((B, H), dtype=np.float64)
        dforget = np.empty((B, H), dtype=np.float64) if forget is not None else None
        _m._fn("mesa_backward", dt)(qn, kn, vn, _np(lam), _forget_array(forget, H, dt),
                                    _m._regularizer("mesaopt.torch.MesaFunction", regularizer), chunk,
                                    _np(dout), cache, None, None, None, None, dq, dk, gv, dlam, dforget, None, None,
                                    threads)
        # per-slice (B, H) parameter gradients, summed over the batch in float64, as the NumPy API does
        dlam_t = torch.from_numpy(_m._reduce_per_head(dlam, False, dt))
        dforget_t = torch.from_numpy(_m._reduce_per_head(dforget, False, dt)) if forget is not None else None
        return (torch.from_numpy(dq), torch.from_numpy(dk), torch.from_numpy(gv), dlam_t, dforget_t, None, None,
                None)


def _forget_array(forget, H, dt):
    """The per-head forget factors as the compiled op takes them (ones for None: no forgetting)."""
    return np.ones(H, dtype=dt) if forget is None else _np(forget)


def _mesa_forward_core(q, k, v, lam, forget, regularizer, chunk, threads, with_cache):
    """The compiled mesa forward on checked, contiguous tensors; returns (out array, cache or None)."""
    qn, kn, vn = _np(q), _np(k), _np(v)
    B, H, T, _ = qn.shape
    dt = qn.dtype
    out = np.empty((B, H, T, vn.shape[3]), dtype=dt)
    cache = _m._mesa_cache_type(dt)() if with_cache else None
    _m._fn("mesa_forward", dt)(qn, kn, vn, _np(lam), _forget_array(forget, H, dt),
                               _m._regularizer("mesaopt.torch.MesaFunction", regularizer), chunk, out, None, None,
                               None, None, cache, threads)
    return out, cache


# ---------------------------------------------------------------------------
# Functions


def linear_attention(q, k, v, *, threads=None):
    """Causal linear attention o_t = sum_{i<=t} (k_i . q_t) v_i (no softmax, no scaling).

    q, k: (B, H, T, d); v: (B, H, T, dv); CPU float32/float64. Returns (B, H, T, dv).
    Differentiable in q, k, v. threads: as in the NumPy API (None: mesaopt.get_num_threads()).
    """
    where = "mesaopt.torch.linear_attention"
    _sequence(where, q, k, v)
    return LinearAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), _m._check_threads(where, threads))


def softmax_attention(q, k, v, *, threads=None):
    """Causal softmax attention with scale 1/sqrt(d); q, k (B, H, T, d), v (B, H, T, dv) -> (B, H, T, dv)."""
    where = "mesaopt.torch.softmax_attention"
    _sequence(where, q, k, v)
    return SoftmaxAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), _m._check_threads(where, threads))


def mesa(q, k, v, lam, forget=None, *, regularizer="decaying", chunk=0, threads=None):
    """The mesa layer (docs/mesa.md): o_t = S_t R_t q_t, a ridge regression per token.

    q, k: (B, H, T, d); v: (B, H, T, dv) -> (B, H, T, dv). lam (> 0) and forget (in (0, 1];
    None = 1, no forgetting): floats, 0-dim tensors or tensors of shape (H,); tensors that
    require grad get gradients (dlam, dforget from the C++ backward, summed over the batch).
    regularizer: 'decaying' or 'constant'; chunk: checkpoint interval (0 = automatic).
    Invalid lam/forget values raise ValueError naming the argument (a value that is not a
    normal number in the op's dtype: the ValueError of mesaopt.mesa_forward); numerical
    breakdown raises mesaopt.MesaBreakdownError.
    """
    where = "mesaopt.torch.mesa"
    B, H, T, d, dv, dt = _sequence(where, q, k, v)
    lam_t = _per_head(where, "lam", lam, H, dt)
    _check_values(where, "lam", lam, lam_t, lambda x: torch.isfinite(x) & (x > 0), lambda x: math.isfinite(x) and x > 0,
                  "be finite and > 0")
    forget_t = None
    if forget is not None:
        forget_t = _per_head(where, "forget", forget, H, dt)
        _check_values(where, "forget", forget, forget_t, lambda x: (x > 0) & (x <= 1), lambda x: 0 < x <= 1,
                      "lie in (0, 1]")
    _m._regularizer(where, regularizer)
    chunk = _m._chunk(where, chunk)
    args = (q.contiguous(), k.contiguous(), v.contiguous(), lam_t.contiguous(),
            None if forget_t is None else forget_t.contiguous(), regularizer, chunk, _m._check_threads(where, threads))
    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args[:5])):
        # Nothing to differentiate (torch.no_grad(), or no input requires grad): the
        # op alone, without an autograd node or a cache for a backward that cannot come.
        return torch.from_numpy(_mesa_forward_core(*args, False)[0])
    return MesaFunction.apply(*args)


# ---------------------------------------------------------------------------
# nn.Modules: projections in PyTorch, the sequence mixing in mesaopt


class _Attention(nn.Module):
    """x (B, T, dim) -> q, k, v (B, H, T, .) -> mixing -> (B, T, H * value_dim) -> o projection -> (B, T, dim)."""

    def __init__(self, dim, heads, head_dim, value_dim=None, bias=False, threads=None, dtype=None):
        super().__init__()
        for n, x in (("dim", dim), ("heads", heads), ("head_dim", head_dim)):
            if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
                raise ValueError(f"{type(self).__name__}: {n} must be an int >= 1, got {x!r}")
        value_dim = head_dim if value_dim is None else value_dim
        if isinstance(value_dim, bool) or not isinstance(value_dim, numbers.Integral) or value_dim < 1:
            raise ValueError(f"{type(self).__name__}: value_dim must be an int >= 1, got {value_dim!r}")
        self.dim, self.heads, self.head_dim, self.value_dim = int(dim), int(heads), int(head_dim), int(value_dim)
        self.threads = threads
        kw = dict(bias=bias, dtype=dtype)
        self.q_proj = nn.Linear(dim, heads * head_dim, **kw)
        self.k_proj = nn.Linear(dim, heads * head_dim, **kw)
        self.v_proj = nn.Linear(dim, heads * value_dim, **kw)
        self.o_proj = nn.Linear(heads * value_dim, dim, **kw)

    def _split(self, y, width):  # (B, T, H * width) -> (B, H, T, width)
        B, T, _ = y.shape
        return y.view(B, T, self.heads, width).transpose(1, 2)

    def _mix(self, q, k, v):
        raise NotImplementedError

    def forward(self, x):
        where = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[2] != self.dim:
            raise ValueError(f"{where}: x must have shape (B, T, dim={self.dim}), got {tuple(x.shape)}")
        q = self._split(self.q_proj(x), self.head_dim)
        k = self._split(self.k_proj(x), self.head_dim)
        v = self._split(self.v_proj(x), self.value_dim)
        o = self._mix(q, k, v)  # (B, H, T, dv)
        B, H, T, dv = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * dv))

    def extra_repr(self):
        return f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, value_dim={self.value_dim}"


class LinearAttention(_Attention):
    """Causal linear self-attention (no softmax, no scaling): LinearAttention(dim, heads, head_dim, value_dim=None).

    (B, T, dim) -> (B, T, dim); q, k, v, o projections are nn.Linear (no bias by default).
    """

    def _mix(self, q, k, v):
        return linear_attention(q, k, v, threads=self.threads)


class SoftmaxAttention(_Attention):
    """Causal softmax self-attention (scale 1/sqrt(head_dim)): SoftmaxAttention(dim, heads, head_dim, value_dim=None)."""

    def _mix(self, q, k, v):
        return softmax_attention(q, k, v, threads=self.threads)


def _softplus_inverse(y):
    return y + math.log(-math.expm1(-y))  # log(exp(y) - 1), stable for large y


class MesaAttention(_Attention):
    """Mesa self-attention: MesaAttention(dim, heads, head_dim, value_dim=None, lambda_init=1.0, ...).

    (B, T, dim) -> (B, T, dim). Like the C++ MesaLayer (include/mesaopt/layers/mesa_layer.hpp):
    a learnable per-head lambda, by default lambda_h = softplus(lambda_raw_h) > 0
    (lambda_parametrization='softplus'), or lambda_h = lambda_raw_h itself ('raw', the paper's
    code: it must stay > 0, else the forward raises ValueError). lambda_raw is initialised so that
    lambda = lambda_init (default 1, the paper's). The forget factor gamma is fixed at
    forget_init (default 1: no forgetting) or, with learn_forget=True, learnable per head as
    gamma_h = sigmoid(forget_raw_h), initialised to forget_init in (0, 1).
    regularizer: 'decaying' (default) or 'constant'; chunk: checkpoint interval of the backward.
    The properties ``lam`` and ``forget`` give the values the op uses (tensors (H,)).
    """

    def __init__(self, dim, heads, head_dim, value_dim=None, *, lambda_init=1.0, lambda_parametrization="softplus",
                 learn_forget=False, forget_init=1.0, regularizer="decaying", chunk=0, bias=False, threads=None,
                 dtype=None):
        super().__init__(dim, heads, head_dim, value_dim, bias=bias, threads=threads, dtype=dtype)
        if not (math.isfinite(lambda_init) and lambda_init > 0):
            raise ValueError(f"MesaAttention: lambda_init must be finite and > 0, got {lambda_init!r}")
        if lambda_parametrization not in ("softplus", "raw"):
            raise ValueError(f"MesaAttention: lambda_parametrization must be 'softplus' or 'raw', "
                             f"got {lambda_parametrization!r}")
        if learn_forget:
            if not (0 < forget_init < 1):
                raise ValueError(f"MesaAttention: forget_init must lie in (0, 1) when learn_forget is set "
                                 f"(gamma = sigmoid(forget_raw) cannot reach 1), got {forget_init!r}")
        elif not (0 < forget_init <= 1):
            raise ValueError(f"MesaAttention: forget_init must lie in (0, 1], got {forget_init!r}")
        if regularizer not in ("decaying", "constant"):
            raise ValueError(f"MesaAttention: regularizer must be 'decaying' or 'constant', got {regularizer!r}")
        self.lambda_parametrization = lambda_parametrization
        self.regularizer = regularizer
        self.chunk = chunk
        self.learn_forget = bool(learn_forget)
        self.forget_init = float(forget_init)
        raw = _softplus_inverse(float(lambda_init)) if lambda_parametrization == "softplus" else float(lambda_init)
        self.lambda_raw = nn.Parameter(torch.full((heads,), raw, dtype=dtype or torch.get_default_dtype()))
        if self.learn_forget:
            f = float(forget_init)
            self.forget_raw = nn.Parameter(torch.full((heads,), math.log(f / (1 - f)),
                                                      dtype=dtype or torch.get_default_dtype()))
        else:
            self.register_parameter("forget_raw", None)

    @property
    def lam(self):
        """lambda per head, (H,), as the op uses it."""
        if self.lambda_parametrization == "softplus":
            return nn.functional.softplus(self.lambda_raw)
        return self.lambda_raw

    @property
    def forget(self):
        """gamma per head, (H,), or None when fixed at 1."""
        if self.learn_forget:
            return torch.sigmoid(self.forget_raw)
        if self.forget_init == 1.0:
            return None
        return torch.full((self.heads,), self.forget_init, dtype=self.lambda_raw.dtype)

    def _mix(self, q, k, v):
        return mesa(q, k, v, self.lam.to(q.dtype), None if self.forget is None else self.forget.to(q.dtype),
                    regularizer=self.regularizer, chunk=self.chunk, threads=self.threads)

    def extra_repr(self):
        return (super().extra_repr() + f", lambda_parametrization={self.lambda_parametrization!r}, "
                f"learn_forget={self.learn_forget}, regularizer={self.regularizer!r}")
