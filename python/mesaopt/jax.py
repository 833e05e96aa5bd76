"""JAX wrappers of the mesaopt ops with custom VJPs (CPU).

    import mesaopt.jax as mj
    out = mj.mesa(q, k, v, lam)                      # q, k (B, H, T, d), v (B, H, T, dv), lam float or (H,)
    out = mj.mesa(q, k, v, lam, forget)              # forget: float or (H,), differentiable too
    out = mj.linear_attention(q, k, v)
    out = mj.softmax_attention(q, k, v)

Each function is a ``jax.custom_vjp`` whose forward and backward run the C++
ops, usable under ``jit``, ``grad`` and ``vmap`` (vmap runs the op once per
mapped element). Two ways into C++ (``backend=``):

- ``"ffi"`` (the default when available): XLA FFI handlers compiled into the
  extension (python/src/jax_ffi.cpp), called from the compiled program on XLA's
  own buffers. Available when jax was installed before mesaopt was built
  (``mesaopt.jax.HAS_FFI``).
- ``"callback"``: ``jax.pure_callback`` into the NumPy functions of mesaopt.

Both give the same numbers; the FFI path skips the host callback (measured in
docs/python.md, "JAX"). The backward recomputes the forward (a cache cannot
travel through JAX's residuals). float32 by default, float64 with
``jax_enable_x64``. Arrays live on the CPU; there is no GPU kernel.

Shapes and dtypes are checked when the function is traced (ValueError /
TypeError naming the argument); values (lam > 0, forget in (0, 1]) are checked
by the op: with concrete arrays the callback path raises ValueError, inside jit
the error surfaces as JAX's runtime error carrying the same message.

Sequence functions only, without initial or final states (use the NumPy API
for carried state).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import mesaopt as _m
from mesaopt import _core

__all__ = ["linear_attention", "softmax_attention", "mesa", "HAS_FFI", "DEFAULT_BACKEND"]

# ---------------------------------------------------------------------------
# The FFI targets, registered once at import.

_TARGETS = _core.jax_ffi_targets() if hasattr(_core, "jax_ffi_targets") else {}
for _name, _capsule in _TARGETS.items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
HAS_FFI = bool(_TARGETS)
DEFAULT_BACKEND = "ffi" if HAS_FFI else "callback"


def _backend(where, backend):
    if backend is None:
        return DEFAULT_BACKEND
    if backend not in ("ffi", "callback"):
        raise ValueError(f"{where}: backend must be 'ffi', 'callback' or None, got {backend!r}")
    if backend == "ffi" and not HAS_FFI:
        raise ValueError(
            f"{where}: backend='ffi' needs mesaopt built with jax installed (the XLA FFI headers come with"
            " jaxlib): reinstall mesaopt after jax, or use backend='callback'"
        )
    return backend


def _check_sequence(where, q, k, v):
    """q, k (B, H, T, d), v (B, H, T, dv) of one float dtype; returns H."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{where}: {name} must have 4 dimensions (B, H, T, d), got shape {jnp.shape(x)}")
        if jnp.result_type(x) not in (jnp.float32, jnp.float64):
            raise TypeError(f"{where}: {name} must have dtype float32 or float64, got {jnp.result_type(x)}")
    if not (jnp.result_type(q) == jnp.result_type(k) == jnp.result_type(v)):
        raise TypeError(f"{where}: q, k and v must share one dtype, got {jnp.result_type(q)}, "
                        f"{jnp.result_type(k)}, {jnp.result_type(v)}")
    if jnp.shape(k) != jnp.shape(q):
        raise ValueError(f"{where}: k has shape {jnp.shape(k)}, expected q's shape {jnp.shape(q)}")
    if jnp.shape(v)[:3] != jnp.shape(q)[:3]:
        raise ValueError(f"{where}: v has shape {jnp.shape(v)}, expected (B, H, T) = {jnp.shape(q)[:3]} as q")
    if min(jnp.shape(q) + jnp.shape(v)[3:]) < 1:
        raise ValueError(f"{where}: every dimension must be at least 1, got q {jnp.shape(q)}, v {jnp.shape(v)}")
    return jnp.shape(q)[1]


def _np(x):
    return np.ascontiguousarray(np.asarray(x))


def _call(fn, shapes, *args):
    return jax.pure_callback(fn, shapes, *args, vmap_method="sequential")


def _ffi(op, direction, shapes, *args, **attrs):
    dtype = "f32" if args[0].dtype == jnp.float32 else "f64"
    call = jax.ffi.ffi_call(f"mesaopt_{op}_{dtype}_{direction}", shapes, vmap_method="sequential")
    return call(*args, **{key: np.int64(val) for key, val in attrs.items()})


def _sds(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _out_shape(q, v):
    return jax.ShapeDtypeStruct(q.shape[:3] + (v.shape[3],), q.dtype)


# ---------------------------------------------------------------------------
# linear and softmax attention: the same custom_vjp around different ops


# threads: an int (resolved by the caller, so that set_num_threads applies to later calls)
@functools.lru_cache(maxsize=None)
def _attention(op, threads, backend):
    np_fwd = getattr(_m, f"{op}_attention_forward")
    np_bwd = getattr(_m, f"{op}_attention_backward")

    @jax.custom_vjp
    def f(q, k, v):
        if backend == "ffi":
            return _ffi(op, "fwd", _out_shape(q, v), q, k, v, threads=threads)
        return _call(lambda q, k, v: np_fwd(_np(q), _np(k), _np(v), threads=threads), _out_shape(q, v), q, k, v)

    def fwd(q, k, v):
        return f(q, k, v), (q, k, v)

    def bwd(res, g):
        q, k, v = res
        shapes = (_sds(q), _sds(k), _sds(v))
        if backend == "ffi":
            return tuple(_ffi(op, "bwd", shapes, q, k, v, g, threads=threads))

        def cb(q, k, v, g):
            return np_bwd(_np(q), _np(k), _np(v), _np(g), threads=threads)

        return tuple(_call(cb, shapes, q, k, v, g))

    f.defvjp(fwd, bwd)
    return f


def linear_attention(q, k, v, *, threads=None, backend=None):
    """Causal linear attention o_t = sum_{i<=t} (k_i . q_t) v_i; q, k (B, H, T, d), v (B, H, T, dv)."""
    where = "mesaopt.jax.linear_attention"
    _check_sequence(where, q, k, v)
    return _attention("linear", _m._check_threads(where, threads), _backend(where, backend))(q, k, v)


def softmax_attention(q, k, v, *, threads=None, backend=None):
    """Causal softmax attention with scale 1/sqrt(d); q, k (B, H, T, d), v (B, H, T, dv)."""
    where = "mesaopt.jax.softmax_attention"
    _check_sequence(where, q, k, v)
    return _attention("softmax", _m._check_threads(where, threads), _backend(where, backend))(q, k, v)


# ---------------------------------------------------------------------------
# mesa


@functools.lru_cache(maxsize=None)
def _mesa(regularizer, chunk, threads, backend):
    kw = dict(regularizer=regularizer, chunk=chunk, threads=threads)
    attrs = dict(regularizer=_m._regularizer("mesaopt.jax.mesa", regularizer),
                 chunk=_m._chunk("mesaopt.jax.mesa", chunk), threads=threads)

    @jax.custom_vjp
    def f(q, k, v, lam, forget):
        if backend == "ffi":
            return _ffi("mesa", "fwd", _out_shape(q, v), q, k, v, lam, forget, **attrs)

        def cb(q, k, v, lam, forget):
            return _m.mesa_forward(_np(q), _np(k), _np(v), _np(lam), forget=_np(forget), **kw)

        return _call(cb, _out_shape(q, v), q, k, v, lam, forget)

    def fwd(q, k, v, lam, forget):
        return f(q, k, v, lam, forget), (q, k, v, lam, forget)

    def bwd(res, g):
        q, k, v, lam, forget = res
        if backend == "ffi":
            per_slice = jax.ShapeDtypeStruct(q.shape[:2], q.dtype)  # dlam, dforget per (batch, head)
            dq, dk, dv, dlam, dforget = _ffi("mesa", "bwd", (_sds(q), _sds(k), _sds(v), per_slice, per_slice),
                                             q, k, v, lam, forget, g, **attrs)
            return dq, dk, dv, jnp.sum(dlam, axis=0), jnp.sum(dforget, axis=0)

        def cb(q, k, v, lam, forget, g):
            dq, dk, dv, dlam, dforget = _m.mesa_backward(_np(q), _np(k), _np(v), _np(lam), _np(g),
                                                         forget=_np(forget), **kw)
            return dq, dk, dv, dlam.astype(lam.dtype), dforget.astype(forget.dtype)

        return tuple(_call(cb, (_sds(q), _sds(k), _sds(v), _sds(lam), _sds(forget)), q, k, v, lam, forget, g))

    f.defvjp(fwd, bwd)
    return f


def _per_head(where, name, x, H, dtype):
    x = jnp.asarray(x, dtype=dtype)
    if x.ndim == 0:
        return jnp.broadcast_to(x, (H,))
    if x.shape != (H,):
        raise ValueError(f"{where}: {name} must be a float or an array of shape (H,) = ({H},), got shape {x.shape}")
    return x


def mesa(q, k, v, lam, forget=1.0, *, regularizer="decaying", chunk=0, threads=None, backend=None):
    """The mesa layer (docs/mesa.md): q, k (B, H, T, d), v (B, H, T, dv) -> (B, H, T, dv).

    lam (> 0) and forget (in (0, 1]) are floats or arrays of shape (H,); both are
    differentiable (the gradient of a float broadcast to all heads is the sum over heads).
    """
    where = "mesaopt.jax.mesa"
    H = _check_sequence(where, q, k, v)
    dt = jnp.result_type(q)
    return _mesa(regularizer, chunk, _m._check_threads(where, threads), _backend(where, backend))(
        q, k, v, _per_head(where, "lam", lam, H, dt), _per_head(where, "forget", forget, H, dt))
