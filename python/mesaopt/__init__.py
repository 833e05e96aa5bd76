"""mesaopt: causal linear, softmax and mesa attention with hand-written backward passes.

NumPy bindings of the header-only C++ library (see docs/python.md). Every
function takes batched arrays of shape (B, H, T, d) -- batch, heads, tokens,
width -- in float32 or float64, C-contiguous, and runs the C++ op once per
(batch, head) slice, on ``threads`` threads with the GIL released. Inputs are
read in place (no copies); outputs are new arrays.

    out = mesaopt.mesa_forward(q, k, v, lam)
    dq, dk, dv, dlam = mesaopt.mesa_backward(q, k, v, lam, dout)
"""

import numbers
import os

import numpy as np

from . import _core
from ._core import MesaBreakdownError

__version__ = _core.__version__
simd = _core.simd  # instruction set the kernels were compiled for ("avx512", "avx2", ..., "sse2")

__all__ = [
    "linear_attention_forward",
    "linear_attention_backward",
    "linear_attention_step",
    "linear_attention_initial_state",
    "softmax_attention_forward",
    "softmax_attention_backward",
    "softmax_attention_step",
    "softmax_attention_initial_state",
    "mesa_forward",
    "mesa_backward",
    "mesa_step",
    "mesa_initial_state",
    "MesaBreakdownError",
    "get_num_threads",
    "set_num_threads",
]

# ---------------------------------------------------------------------------
# Threads


def _threads_from_env():
    v = os.environ.get("MESAOPT_NUM_THREADS", "")
    if v.strip():
        try:
            n = int(v)
        except ValueError:
            n = 0
        if n >= 1:
            return n
    return max(1, _core.hardware_threads())


_default_threads = _threads_from_env()


def get_num_threads():
    """Threads a call uses when ``threads`` is not given (default: MESAOPT_NUM_THREADS, else all hardware threads)."""
    return _default_threads


def set_num_threads(n):
    """Sets the default thread count of every function (an int >= 1)."""
    global _default_threads
    _default_threads = _check_threads("set_num_threads", n)


def _check_threads(where, threads):
    if threads is None:
        return _default_threads
    if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"{where}: threads must be an int >= 1 or None, got {type(threads).__name__} {threads!r}")
    if threads < 1:
        raise ValueError(f"{where}: threads must be >= 1, got {threads}")
    return int(min(threads, 1 << 16))


# ---------------------------------------------------------------------------
# Argument checks. Every check names the function, the argument and the values.

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _array(where, name, a, ndim):
    """a must be a C-contiguous float32/float64 NumPy array of the given ndim."""
    if not isinstance(a, np.ndarray):
        raise TypeError(
            f"{where}: {name} must be a numpy.ndarray, got {type(a).__module__}.{type(a).__name__}"
            " (convert with numpy.ascontiguousarray)"
        )
    if a.dtype not in _DTYPES or not a.dtype.isnative:
        raise TypeError(f"{where}: {name} must have dtype float32 or float64 (native byte order), got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{where}: {name} must have {ndim} dimensions, got ndim {a.ndim} (shape {a.shape})")
    if not a.flags.c_contiguous:
        raise ValueError(
            f"{where}: {name} must be C-contiguous, got shape {a.shape} with strides {a.strides}"
            " (use numpy.ascontiguousarray)"
        )
    if not a.flags.aligned:
        raise ValueError(f"{where}: {name} is not aligned to its element size")
    return a


def _same_dtype(where, dtype, **arrays):
    for name, a in arrays.items():
        if a is not None and a.dtype != dtype:
            raise TypeError(f"{where}: {name} has dtype {a.dtype} but q has {dtype} (all arrays must share one dtype)")


def _shape(where, name, a, expected, names):
    """a.shape must equal expected; names labels each dimension for the message."""
    if tuple(a.shape) != tuple(expected):
        want = ", ".join(f"{n}={e}" for n, e in zip(names, expected))
        raise ValueError(f"{where}: {name} has shape {tuple(a.shape)}, expected ({want})")


def _sequence(where, q, k, v):
    """q, k (B, H, T, d), v (B, H, T, dv); returns (B, H, T, d, dv, dtype)."""
    _array(where, "q", q, 4)
    _array(where, "k", k, 4)
    _array(where, "v", v, 4)
    _same_dtype(where, q.dtype, k=k, v=v)
    B, H, T, d = q.shape
    dv = v.shape[3]
    _shape(where, "k", k, (B, H, T, d), ("B", "H", "T", "d"))
    if tuple(v.shape[:3]) != (B, H, T):
        raise ValueError(
            f"{where}: v has shape {tuple(v.shape)}, expected (B={B}, H={H}, T={T}, dv) to match q {tuple(q.shape)}"
        )
    for n, x in (("B", B), ("H", H), ("T", T), ("d", d), ("dv", dv)):
        if x < 1:
            raise ValueError(f"{where}: {n} must be at least 1, got {n} = {x} (q {tuple(q.shape)}, v {tuple(v.shape)})")
    return B, H, T, d, dv, q.dtype


def _token(where, q, k, v):
    """One token per (batch, head): q, k (B, H, d), v (B, H, dv)."""
    _array(where, "q", q, 3)
    _array(where, "k", k, 3)
    _array(where, "v", v, 3)
    _same_dtype(where, q.dtype, k=k, v=v)
    B, H, d = q.shape
    dv = v.shape[2]
    _shape(where, "k", k, (B, H, d), ("B", "H", "d"))
    if tuple(v.shape[:2]) != (B, H):
        raise ValueError(f"{where}: v has shape {tuple(v.shape)}, expected (B={B}, H={H}, dv) to match q {tuple(q.shape)}")
    for n, x in (("B", B), ("H", H), ("d", d), ("dv", dv)):
        if x < 1:
            raise ValueError(f"{where}: {n} must be at least 1, got {n} = {x}")
    return B, H, d, dv, q.dtype


def _dout(where, dout, B, H, T, dv, dtype):
    _array(where, "dout", dout, 4)
    _same_dtype(where, dtype, dout=dout)
    _shape(where, "dout", dout, (B, H, T, dv), ("B", "H", "T", "dv"))
    return dout


def _fn(name, dtype):
    return getattr(_core, f"{name}_{np.dtype(dtype).name}")


def _pair(where, name, state, first, second):
    """A state given as a pair of arrays (e.g. (R, S)); returns the pair."""
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{where}: {name} must be a tuple ({first}, {second}) of arrays, got {type(state).__name__}")
    return state[0], state[1]


# ---------------------------------------------------------------------------
# Linear attention: o_t = S_t q_t, S_t = S_0 + sum_{i<=t} v_i k_i^T (docs/linear_attention.md)


def _linear_state(where, name, S, B, H, d, dv, dtype):
    _array(where, name, S, 4)
    _same_dtype(where, dtype, **{name: S})
    _shape(where, name, S, (B, H, dv, d), ("B", "H", "dv", "d"))
    return S


def linear_attention_initial_state(B, H, d, dv, dtype=np.float64):
    """The empty state S = 0, shape (B, H, dv, d)."""
    _check_dims("linear_attention_initial_state", B=B, H=H, d=d, dv=dv)
    return np.zeros((B, H, dv, d), dtype=_float_dtype("linear_attention_initial_state", dtype))


def linear_attention_forward(q, k, v, *, initial=None, return_final=False, threads=None):
    """Causal linear attention o_t = (S_0 + sum_{i<=t} v_i k_i^T) q_t.

    q, k: (B, H, T, d); v: (B, H, T, dv); initial: state S_0 (B, H, dv, d) or None (zero).
    Returns out (B, H, T, dv), or (out, final) with return_final=True (final: (B, H, dv, d)).
    """
    where = "linear_attention_forward"
    B, H, T, d, dv, dt = _sequence(where, q, k, v)
    if initial is not None:
        _linear_state(where, "initial", initial, B, H, d, dv, dt)
    th = _check_threads(where, threads)
    out = np.empty((B, H, T, dv), dtype=dt)
    final = np.empty((B, H, dv, d), dtype=dt) if return_final else None
    _fn("linear_attention_forward", dt)(q, k, v, out, initial, final, th)
    return (out, final) if return_final else out


def linear_attention_backward(q, k, v, dout, *, initial=None, grad_final=None, threads=None):
    """Gradients of linear attention given dout = dL/dout (B, H, T, dv).

    Returns (dq, dk, dv), plus grad_initial = dL/dS_0 (B, H, dv, d) when initial is given.
    grad_final (B, H, dv, d): dL/d(final state) from a later piece of the sequence.
    """
    where = "linear_attention_backward"
    B, H, T, d, dv, dt = _sequence(where, q, k, v)
    _dout(where, dout, B, H, T, dv, dt)
    if initial is not None:
        _linear_state(where, "initial", initial, B, H, d, dv, dt)
    if grad_final is not None:
        _linear_state(where, "grad_final", grad_final, B, H, d, dv, dt)
    th = _check_threads(where, threads)
    dq = np.empty((B, H, T, d), dtype=dt)
    dk = np.empty((B, H, T, d), dtype=dt)
    gv = np.empty((B, H, T, dv), dtype=dt)
    gi = np.empty((B, H, dv, d), dtype=dt) if initial is not None else None
    _fn("linear_attention_backward", dt)(q, k, v, dout, initial, grad_final, dq, dk, gv, gi, th)
    return (dq, dk, gv) if initial is None else (dq, dk, gv, gi)


def linear_attention_step(q, k, v, state, *, threads=None):
    """One token per (batch, head): S <- S + v k^T, out = S q.

    q, k: (B, H, d); v: (B, H, dv); state: (B, H, dv, d). Returns (out (B, H, dv), new_state);
    the given state is not modified.
    """
    where = "linear_attention_step"
    B, H, d, dv, dt = _token(where, q, k, v)
    _linear_state(where, "state", state, B, H, d, dv, dt)
    th = _check_threads(where, threads)
    out = np.empty((B, H, dv), dtype=dt)
    new = np.empty_like(state)
    _fn("linear_attention_step", dt)(q, k, v, state, new, out, th)
    return out, new


# ---------------------------------------------------------------------------
# Softmax attention: o_t = sum_{i<=t} softmax_i(q_t . k_i / sqrt(d)) v_i (docs/softmax_attention.md)


def _kv_state(where, name, state, B, H, d, dv, dtype, length=None):
    K, V = _pair(where, name, state, "keys", "values")
    _array(where, f"{name} keys", K, 4)
    _array(where, f"{name} values", V, 4)
    _same_dtype(where, dtype, **{f"{name} keys": K, f"{name} values": V})
    P = K.shape[2] if length is None else length
    _shape(where, f"{name} keys", K, (B, H, P, d), ("B", "H", "P", "d"))
    _shape(where, f"{name} values", V, (B, H, P, dv), ("B", "H", "P", "dv"))
    return K, V


def softmax_attention_initial_state(B, H, d, dv, dtype=np.float64):
    """The empty KV state: (keys (B, H, 0, d), values (B, H, 0, dv))."""
    _check_dims("softmax_attention_initial_state", B=B, H=H, d=d, dv=dv)
    dt = _float_dtype("softmax_attention_initial_state", dtype)
    return np.zeros((B, H, 0, d), dtype=dt), np.zeros((B, H, 0, dv), dtype=dt)


def softmax_attention_forward(q, k, v, *, initial=None, return_final=False, return_cache=False, threads=None):
    """Causal softmax attention with scale 1/sqrt(d) (flash-style tiled kernel).

    q, k: (B, H, T, d); v: (B, H, T, dv). initial: (keys (B, H, P, d), values (B, H, P, dv)),
    tokens before this piece that every query also attends to.
    Returns out (B, H, T, dv); with return_final also the final state (keys and values with
    P + T tokens), with return_cache also a cache for softmax_attention_backward:
    out | (out, final) | (out, cache) | (out, final, cache).
    """
    where = "softmax_attention_forward"
    B, H, T, d, dv, dt = _sequence(where, q, k, v)
    K0 = V0 = None
    if initial is not None:
        K0, V0 = _kv_state(where, "initial", initial, B, H, d, dv, dt)
    th = _check_threads(where, threads)
    out = np.empty((B, H, T, dv), dtype=dt)
    cache = (_core.SoftmaxCacheFloat32 if dt == np.float32 else _core.SoftmaxCacheFloat64)() if return_cache else None
    _fn("softmax_attention_forward", dt)(q, k, v, out, K0, V0, cache, th)
    res = [out]
    if return_final:
        if K0 is None:
            res.append((k.copy(), v.copy()))
        else:
            res.append((np.concatenate([K0, k], axis=2), np.concatenate([V0, v], axis=2)))
    if return_cache:
        res.append(cache)
    return res[0] if len(res) == 1 else tuple(res)


def softmax_attention_backward(q, k, v, dout, *, cache=None, initial=None, grad_final=None, threads=None):
    """Gradients of softmax attention given dout = dL/dout (B, H, T, dv).

    cache: from softmax_attention_forward(..., return_cache=True) on the same inputs, or None
    (the forward is recomputed). initial: the forward's initial state; grad_final: gradient of
    the final state (keys (B, H, P + T, d), values (B, H, P + T, dv)).
    Returns (dq, dk, dv), plus grad_initial = (dkeys (B, H, P, d), dvalues (B, H, P, dv)) when
    initial is given.
    """
    where = "softmax_attention_backward"
    B, H, T, d, dv, dt = _sequence(where, q, k, v)
    _dout(where, dout, B, H, T, dv, dt)
    K0 = V0 = GK = GV = None
    P = 0
    if initial is not None:
        K0, V0 = _kv_state(where, "initial", initial, B, H, d, dv, dt)
        P = K0.shape[2]
    if grad_final is not None:
        GK, GV = _kv_state(where, "grad_final", grad_final, B, H, d, dv, dt, length=P + T)
    if cache is not None:
        want = _core.SoftmaxCacheFloat32 if dt == np.float32 else _core.SoftmaxCacheFloat64
        if not isinstance(cache, want):
            raise TypeError(f"{where}: cache must be a {want.__name__} (from softmax_attention_forward with "
                            f"return_cache=True on {dt} inputs), got {type(cache).__name__}")
    th = _check_threads(where, threads)
    dq = np.empty((B, H, T, d), dtype=dt)
    dk = np.empty((B, H, T, d), dtype=dt)
    gv = np.empty((B, H, T, dv), dtype=dt)
    GIK = np.zeros((B, H, P, d), dtype=dt) if initial is not None else None
    GIV = np.zeros((B, H, P, dv), dtype=dt) if initial is not None else None
    _fn("softmax_attention_backward", dt)(q, k, v, dout, cache, K0, V0, GK, GV, dq, dk, gv, GIK, GIV, th)
    return (dq, dk, gv) if initial is None else (dq, dk, gv, (GIK, GIV))


def softmax_attention_step(q, k, v, state, *, threads=None):
    """One token per (batch, head): appends (k, v) to the state, attends q over all of it.

    q, k: (B, H, d); v: (B, H, dv); state: (keys (B, H, P, d), values (B, H, P, dv)).
    Returns (out (B, H, dv), new_state with P + 1 tokens); the given state is not modified.
    """
    where = "softmax_attention_step"
    B, H, d, dv, dt = _token(where, q, k, v)
    K, V = _kv_state(where, "state", state, B, H, d, dv, dt)
    P = K.shape[2]
    th = _check_threads(where, threads)
    out = np.empty((B, H, dv), dtype=dt)
    NK = np.empty((B, H, P + 1, d), dtype=dt)
    NV = np.empty((B, H, P + 1, dv), dtype=dt)
    _fn("softmax_attention_step", dt)(q, k, v, K, V, NK, NV, out, th)
    return out, (NK, NV)


# ---------------------------------------------------------------------------
# The mesa layer: o_t = S_t R_t q_t, a ridge regression per token (docs/mesa.md)

_REGULARIZERS = {"decaying": 0, "constant": 1}


def _per_head(where, name, x, H, dtype, check):
    """A float or an array of shape (H,) -> (array (H,) of dtype, was_scalar)."""
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{where}: {name} must be a float or an array of shape (H,), got bool")
    if isinstance(x, numbers.Real):
        arr = np.full((H,), float(x), dtype=np.float64)
        scalar = True
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise TypeError(f"{where}: {name} must be a real array, got dtype {x.dtype}")
        if x.ndim == 0:
            arr = np.full((H,), float(x), dtype=np.float64)
            scalar = True
        else:
            if x.shape != (H,):
                raise ValueError(f"{where}: {name} must be a float or an array of shape (H,) = ({H},), got shape {x.shape}")
            arr = x.astype(np.float64)
            scalar = False
    else:
        raise TypeError(f"{where}: {name} must be a float or a numpy array of shape (H,), got {type(x).__name__}")

    def label(h):  # "lam = 0.5" for a float, "lam[2] = 0.5" for a per-head array
        return f"{name} = {float(arr[h])!r}" if scalar else f"{name}[{h}] = {float(arr[h])!r}"

    check(where, name, arr, label)
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=dtype)
    # The op needs normal numbers in the computation's precision (docs/mesa.md, "Errors").
    fi = np.finfo(dtype)
    bad = np.nonzero(~((out >= fi.tiny) & np.isfinite(out)))[0]
    if bad.size:
        raise ValueError(f"{where}: {label(int(bad[0]))} is not a finite normal number in {np.dtype(dtype)} "
                         f"(range [{fi.tiny}, {fi.max}])")
    return out, scalar


def _check_lam(where, name, arr, label):
    bad = np.nonzero(~(np.isfinite(arr) & (arr > 0)))[0]
    if bad.size:
        raise ValueError(f"{where}: {name} must be finite and > 0, got {label(int(bad[0]))}")


def _check_forget(where, name, arr, label):
    bad = np.nonzero(~((arr > 0) & (arr <= 1)))[0]
    if bad.size:
        raise ValueError(f"{where}: {name} must lie in (0, 1], got {label(int(bad[0]))}")


def _regularizer(where, r):
    if r not in _REGULARIZERS:
        raise ValueError(f"{where}: regularizer must be 'decaying' or 'constant', got {r!r}")
    return _REGULARIZERS[r]


def _chunk(where, chunk):
    if isinstance(chunk, (bool, np.bool_)) or not isinstance(chunk, numbers.Integral):
        raise TypeError(f"{where}: chunk must be an int >= 0, got {type(chunk).__name__}")
    if chunk < 0:
        raise ValueError(f"{where}: chunk must be >= 0 (0 = automatic), got {chunk}")
    return int(chunk)


def _mesa_state(where, name, state, B, H, d, dv, dtype):
    R, S = _pair(where, name, state, "R", "S")
    _array(where, f"{name} R", R, 4)
    _array(where, f"{name} S", S, 4)
    _same_dtype(where, dtype, **{f"{name} R": R, f"{name} S": S})
    _shape(where, f"{name} R", R, (B, H, d, d), ("B", "H", "d", "d"))
    _shape(where, f"{name} S", S, (B, H, dv, d), ("B", "H", "dv", "d"))
    return R, S


def mesa_initial_state(B, H, d, dv, lam, dtype=np.float64):
    """The empty mesa state: (R = lam_h I (B, H, d, d), S = 0 (B, H, dv, d)); lam a float or (H,)."""
    where = "mesa_initial_state"
    _check_dims(where, B=B, H=H, d=d, dv=dv)
    dt = _float_dtype(where, dtype)
    lam_h, _ = _per_head(where, "lam", lam, H, dt, _check_lam)
    R = np.zeros((B, H, d, d), dtype=dt)
    idx = np.arange(d)
    R[:, :, idx, idx] = lam_h[None, :, None]
    return R, np.zeros((B, H, dv, d), dtype=dt)


def _mesa_cache_type(dt):
    return _core.MesaCacheFloat32 if dt == np.float32 else _core.MesaCacheFloat64


def mesa_forward(q, k, v, lam, *, forget=None, initial=None, return_final=False, return_cache=False,
                 regularizer="decaying", chunk=0, threads=None):
    """The mesa layer: at every t a ridge regression over the tokens so far, applied to q_t.

    o_t = S_t R_t q_t with R_t = (sum_{i<=t} f^{t-i} k_i k_i^T + f^t/lam I)^{-1},
    S_t = sum_{i<=t} f^{t-i} v_i k_i^T (f = forget, per head).
    q, k: (B, H, T, d); v: (B, H, T, dv); lam > 0 and forget in (0, 1] (default 1): a float or
    an array of shape (H,), one value per head. initial: (R (B, H, d, d), S (B, H, dv, d)) or None.
    regularizer: 'decaying' (M5) or 'constant' (M20, MesaNet); chunk: checkpoint interval (0 = auto).
    Returns out (B, H, T, dv) | (out, final) | (out, cache) | (out, final, cache).
    Raises MesaBreakdownError (a RuntimeError) when rounding breaks the recursion (docs/mesa.md).
    """
    where = "mesa_forward"
    B, H, T, d, dv, dt = _sequence(where, q, k, v)
    lam_h, _ = _per_head(where, "lam", lam, H, dt, _check_lam)
    forget_h, _ = _per_head(where, "forget", 1.0 if forget is None else forget, H, dt, _check_forget)
    reg = _regularizer(where, regularizer)
    ch = _chunk(where, chunk)
    R0 = S0 = None
    if initial is not None:
        R0, S0 = _mesa_state(where, "initial", initial, B, H, d, dv, dt)
    th = _check_threads(where, threads)
    out = np.empty((B, H, T, dv), dtype=dt)
    RT = np.empty((B, H, d, d), dtype=dt) if return_final else None
    ST = np.empty((B, H, dv, d), dtype=dt) if return_final else None
    cache = _mesa_cache_type(dt)() if return_cache else None
    _fn("mesa_forward", dt)(q, k, v, lam_h, forget_h, reg, ch, out, R0, S0, RT, ST, cache, th)
    res = [out]
    if return_final:
        res.append((RT, ST))
    if return_cache:
        res.append(cache)
    return res[0] if len(res) == 1 else tuple(res)


def mesa_backward(q, k, v, lam, dout, *, forget=None, cache=None, initial=None, grad_final=None,
                  regularizer="decaying", chunk=0, threads=None):
    """Gradients of the mesa layer given dout = dL/dout (B, H, T, dv).

    Returns (dq, dk, dv, dlam), then dforget when forget is given, then grad_initial =
    (dR (B, H, d, d), dS (B, H, dv, d)) when initial is given. dlam and dforget have the form
    of lam and forget: a float for a float, an array (H,) (summed over the batch) for an array.
    With an initial state lam is not used by the decaying regulariser and dlam is 0.
    cache: from mesa_forward(..., return_cache=True) on the same inputs, or None (the forward
    is recomputed from q, k, v: about 30 % more work).
    """
    where = "mesa_backward"
    B, H, T, d, dv, dt = _sequence(where, q, k, v)
    lam_h, lam_scalar = _per_head(where, "lam", lam, H, dt, _check_lam)
    forget_h, forget_scalar = _per_head(where, "forget", 1.0 if forget is None else forget, H, dt, _check_forget)
    _dout(where, dout, B, H, T, dv, dt)
    reg = _regularizer(where, regularizer)
    ch = _chunk(where, chunk)
    R0 = S0 = GR = GS = None
    if initial is not None:
        R0, S0 = _mesa_state(where, "initial", initial, B, H, d, dv, dt)
    if grad_final is not None:
        GR, GS = _mesa_state(where, "grad_final", grad_final, B, H, d, dv, dt)
    if cache is not None:
        want = _mesa_cache_type(dt)
        if not isinstance(cache, want):
            raise TypeError(f"{where}: cache must be a {want.__name__} (from mesa_forward with return_cache=True "
                            f"on {dt} inputs), got {type(cache).__name__}")
        if cache.regularizer != regularizer:
            raise ValueError(f"{where}: cache was made with regularizer {cache.regularizer!r}, got {regularizer!r}")
    th = _check_threads(where, threads)
    dq = np.empty((B, H, T, d), dtype=dt)
    dk = np.empty((B, H, T, d), dtype=dt)
    gv = np.empty((B, H, T, dv), dtype=dt)
    dlam = np.empty((B, H), dtype=np.float64)
    dforget = np.empty((B, H), dtype=np.float64) if forget is not None else None
    GIR = np.empty((B, H, d, d), dtype=dt) if initial is not None else None
    GIS = np.empty((B, H, dv, d), dtype=dt) if initial is not None else None
    _fn("mesa_backward", dt)(q, k, v, lam_h, forget_h, reg, ch, dout, cache, R0, S0, GR, GS, dq, dk, gv, dlam,
                             dforget, GIR, GIS, th)
    res = [dq, dk, gv, _reduce_per_head(dlam, lam_scalar, dt)]
    if forget is not None:
        res.append(_reduce_per_head(dforget, forget_scalar, dt))
    if initial is not None:
        res.append((GIR, GIS))
    return tuple(res)


def _reduce_per_head(g, scalar, dt):
    """(B, H) per-slice gradients -> a float (scalar parameter) or an (H,) array, summed in float64."""
    if scalar:
        return float(g.sum())
    return g.sum(axis=0).astype(dt)


def mesa_step(q, k, v, lam, state, *, forget=None, regularizer="decaying", threads=None):
    """One token per (batch, head) of the mesa layer (decoding).

    q, k: (B, H, d); v: (B, H, dv); state: (R (B, H, d, d), S (B, H, dv, d)), e.g. from
    mesa_initial_state or mesa_forward(..., return_final=True). lam is used by the constant
    regulariser only (the decaying one carries it in R). Returns (out (B, H, dv), new_state);
    the given state is not modified.
    """
    where = "mesa_step"
    B, H, d, dv, dt = _token(where, q, k, v)
    lam_h, _ = _per_head(where, "lam", lam, H, dt, _check_lam)
    forget_h, _ = _per_head(where, "forget", 1.0 if forget is None else forget, H, dt, _check_forget)
    reg = _regularizer(where, regularizer)
    R, S = _mesa_state(where, "state", state, B, H, d, dv, dt)
    th = _check_threads(where, threads)
    out = np.empty((B, H, dv), dtype=dt)
    NR = np.empty_like(R)
    NS = np.empty_like(S)
    _fn("mesa_step", dt)(q, k, v, lam_h, forget_h, reg, R, S, NR, NS, out, th)
    return out, (NR, NS)


# ---------------------------------------------------------------------------


def _check_dims(where, **dims):
    for n, x in dims.items():
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{where}: {n} must be an int, got {type(x).__name__}")
        if x < 1:
            raise ValueError(f"{where}: {n} must be at least 1, got {x}")


def _float_dtype(where, dtype):
    dt = np.dtype(dtype)
    if dt not in _DTYPES:
        raise TypeError(f"{where}: dtype must be float32 or float64, got {dt}")
    return dt


# The paper's task and reference learners (NumPy in, NumPy out; docs/python.md).
from . import learners, tasks  # noqa: E402  (they use _check_threads above)
