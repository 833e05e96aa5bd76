"""JAX wrappers of the mesaopt ops with custom VJPs (CPU).

    import mesaopt.jax as mj
    out = mj.mesa(q, k, v, lam)                      # q, k (B, H, T, d), v (B, H, T, dv), lam float or (H,)
    out = mj.mesa(q, k, v, lam, forget)              # forget: float or (H,), differentiable too
    out = mj.linear_attention(q, k, v)
    out = mj.softmax_attention(q, k, v)

Each function is a ``jax.custom_vjp`` whose forward and backward call the
NumPy functions of ``mesaopt`` through ``jax.pure_callback`` (so they work
under ``jit``, ``grad`` and ``vmap``; vmap runs the callback once per mapped
element). The backward recomputes the forward (a cache cannot travel through
JAX's residuals). float32 by default, float64 with ``jax_enable_x64``.
Arrays live on the CPU; there is no GPU kernel.

Part of the first Python iteration: sequence functions only, without initial
or final states (use the NumPy API for carried state).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import mesaopt as _m

__all__ = ["linear_attention", "softmax_attention", "mesa"]


def _np(x):
    return np.ascontiguousarray(np.asarray(x))


def _call(fn, shapes, *args):
    return jax.pure_callback(fn, shapes, *args, vmap_method="sequential")


def _sds(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _out_shape(q, v):
    return jax.ShapeDtypeStruct(q.shape[:3] + (v.shape[3],), q.dtype)


# ---------------------------------------------------------------------------
# linear attention


@functools.lru_cache(maxsize=None)
def _linear(threads):
    @jax.custom_vjp
    def f(q, k, v):
        return _call(lambda q, k, v: _m.linear_attention_forward(_np(q), _np(k), _np(v), threads=threads),
                     _out_shape(q, v), q, k, v)

    def fwd(q, k, v):
        return f(q, k, v), (q, k, v)

    def bwd(res, g):
        q, k, v = res

        def cb(q, k, v, g):
            return _m.linear_attention_backward(_np(q), _np(k), _np(v), _np(g), threads=threads)

        return tuple(_call(cb, (_sds(q), _sds(k), _sds(v)), q, k, v, g))

    f.defvjp(fwd, bwd)
    return f


def linear_attention(q, k, v, *, threads=None):
    """Causal linear attention o_t = sum_{i<=t} (k_i . q_t) v_i; q, k (B, H, T, d), v (B, H, T, dv)."""
    return _linear(threads)(q, k, v)


# ---------------------------------------------------------------------------
# softmax attention


@functools.lru_cache(maxsize=None)
def _softmax(threads):
    @jax.custom_vjp
    def f(q, k, v):
        return _call(lambda q, k, v: _m.softmax_attention_forward(_np(q), _np(k), _np(v), threads=threads),
                     _out_shape(q, v), q, k, v)

    def fwd(q, k, v):
        return f(q, k, v), (q, k, v)

    def bwd(res, g):
        q, k, v = res

        def cb(q, k, v, g):
            return _m.softmax_attention_backward(_np(q), _np(k), _np(v), _np(g), threads=threads)

        return tuple(_call(cb, (_sds(q), _sds(k), _sds(v)), q, k, v, g))

    f.defvjp(fwd, bwd)
    return f


def softmax_attention(q, k, v, *, threads=None):
    """Causal softmax attention with scale 1/sqrt(d); q, k (B, H, T, d), v (B, H, T, dv)."""
    return _softmax(threads)(q, k, v)


# ---------------------------------------------------------------------------
# mesa


@functools.lru_cache(maxsize=None)
def _mesa(regularizer, chunk, threads):
    kw = dict(regularizer=regularizer, chunk=chunk, threads=threads)

    @jax.custom_vjp
    def f(q, k, v, lam, forget):
        def cb(q, k, v, lam, forget):
            return _m.mesa_forward(_np(q), _np(k), _np(v), _np(lam), forget=_np(forget), **kw)

        return _call(cb, _out_shape(q, v), q, k, v, lam, forget)

    def fwd(q, k, v, lam, forget):
        return f(q, k, v, lam, forget), (q, k, v, lam, forget)

    def bwd(res, g):
        q, k, v, lam, forget = res

        def cb(q, k, v, lam, forget, g):
            dq, dk, dv, dlam, dforget = _m.mesa_backward(_np(q), _np(k), _np(v), _np(lam), _np(g),
                                                         forget=_np(forget), **kw)
            return dq, dk, dv, dlam.astype(lam.dtype), dforget.astype(forget.dtype)

        return tuple(_call(cb, (_sds(q), _sds(k), _sds(v), _sds(lam), _sds(forget)), q, k, v, lam, forget, g))

    f.defvjp(fwd, bwd)
    return f


def _per_head(x, H, dtype):
    x = jnp.asarray(x, dtype=dtype)
    return jnp.broadcast_to(x, (H,)) if x.ndim == 0 else x


def mesa(q, k, v, lam, forget=1.0, *, regularizer="decaying", chunk=0, threads=None):
    """The mesa layer (docs/mesa.md): q, k (B, H, T, d), v (B, H, T, dv) -> (B, H, T, dv).

    lam (> 0) and forget (in (0, 1]) are floats or arrays of shape (H,); both are
    differentiable (the gradient of a float broadcast to all heads is the sum over heads).
    Argument errors raise inside the callback (as in the NumPy API, with its messages).
    """
    H = q.shape[1]
    return _mesa(regularizer, chunk, threads)(q, k, v, _per_head(lam, H, q.dtype), _per_head(forget, H, q.dtype))
