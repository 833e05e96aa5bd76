"""mesaopt.jax: custom VJPs through jax.pure_callback (skipped without jax, unless
MESAOPT_REQUIRE_FRONTENDS names it: conftest.py)."""

import numpy as np
import pytest

from conftest import import_or_skip, required  # noqa: E402

jax = import_or_skip("jax")
jax.config.update("jax_enable_x64", True)  # float64 for the comparisons below
import jax.numpy as jnp  # noqa: E402

import mesaopt  # noqa: E402
import mesaopt.jax as mj  # noqa: E402
import reference as ref  # noqa: E402
from conftest import make_inputs  # noqa: E402

# A required jax must come with the XLA FFI handlers too (a build without jax in
# its environment has only the pure_callback path, and would skip their tests).
if required("jax") and not mj.HAS_FFI:
    raise ImportError("MESAOPT_REQUIRE_FRONTENDS names jax, but mesaopt was built without its XLA FFI handlers")


@pytest.mark.parametrize("size", [(1, 1, 1, 1, 1), (2, 3, 9, 5, 3)])
def test_forward_and_grad_match_numpy(rng, size):
    B, H, T, d, dv = size
    q, k, v = make_inputs(rng, *size)
    w = rng.standard_normal((B, H, T, dv))
    lam = rng.uniform(0.5, 2.0, size=H)
    forget = rng.uniform(0.85, 1.0, size=H)
    cases = [
        (lambda q, k, v: mj.linear_attention(q, k, v), mesaopt.linear_attention_forward(q, k, v),
         mesaopt.linear_attention_backward(q, k, v, w)),
        (lambda q, k, v: mj.softmax_attention(q, k, v), mesaopt.softmax_attention_forward(q, k, v),
         mesaopt.softmax_attention_backward(q, k, v, w)),
    ]
    for fn, out, grads in cases:
        assert np.array_equal(np.asarray(jax.jit(fn)(q, k, v)), out)
        g = jax.grad(lambda q, k, v: jnp.sum(w * fn(q, k, v)), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(g, grads):
            assert np.array_equal(np.asarray(a), b)
    out = mj.mesa(q, k, v, lam, forget)
    assert np.array_equal(np.asarray(out), mesaopt.mesa_forward(q, k, v, lam, forget=forget))
    g = jax.jit(jax.grad(lambda *a: jnp.sum(w * mj.mesa(*a)), argnums=(0, 1, 2, 3, 4)))(q, k, v, lam, forget)
    want = mesaopt.mesa_backward(q, k, v, lam, w, forget=forget)
    for a, b in zip(g, want):
        assert ref.rel_err(np.asarray(a), b) < 1e-14


def test_scalar_lam_gradient_and_float32(rng):
    q, k, v = make_inputs(rng, 2, 2, 6, 3, 2)
    w = rng.standard_normal((2, 2, 6, 2))
    g = jax.grad(lambda lam: jnp.sum(w * mj.mesa(q, k, v, lam)))(0.8)
    assert abs(float(g) - mesaopt.mesa_backward(q, k, v, 0.8, w)[3]) < 1e-12
    q32, k32, v32 = (jnp.asarray(x, dtype=jnp.float32) for x in (q, k, v))
    out = mj.mesa(q32, k32, v32, 0.8)
    assert out.dtype == jnp.float32
    assert ref.rel_err(np.asarray(out), mesaopt.mesa_forward(q, k, v, 0.8)) < 1e-5


def test_check_grads_and_vmap(rng):
    from jax.test_util import check_grads

    q, k, v = make_inputs(rng, 1, 2, 5, 3, 2)
    lam = np.array([0.7, 1.3])
    forget = np.array([0.9, 0.95])
    check_grads(lambda q, k, v, lam, forget: mj.mesa(q, k, v, lam, forget), (q, k, v, lam, forget), order=1,
                modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)
    check_grads(mj.softmax_attention, (q, k, v), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)
    qs = np.stack([q, 2 * q, 3 * q])  # a mapped axis in front
    outs = jax.vmap(lambda q: mj.linear_attention(q, k, v))(qs)
    for i in range(3):
        assert np.array_equal(np.asarray(outs[i]), mesaopt.linear_attention_forward(qs[i], k, v))


BACKENDS = ["callback"] + (["ffi"] if mj.HAS_FFI else [])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ffi_and_callback_give_the_same_bits(rng, dtype):
    """The two ways into C++ (XLA FFI handlers and pure_callback) run the same
    op on the same buffers: forward and every gradient agree bit for bit, under
    jit and vmap, for every thread count."""
    if not mj.HAS_FFI:
        pytest.skip("mesaopt was built without jax (no XLA FFI handlers)")
    q, k, v = (x.astype(dtype) for x in make_inputs(rng, 2, 3, 7, 4, 5))
    w = rng.standard_normal((2, 3, 7, 5)).astype(dtype)
    lam = rng.uniform(0.5, 2.0, size=3).astype(dtype)
    forget = rng.uniform(0.85, 1.0, size=3).astype(dtype)
    fns = {
        "linear": lambda b, t: (lambda q, k, v: mj.linear_attention(q, k, v, backend=b, threads=t)),
        "softmax": lambda b, t: (lambda q, k, v: mj.softmax_attention(q, k, v, backend=b, threads=t)),
        "mesa": lambda b, t: (lambda q, k, v: mj.mesa(q, k, v, lam, forget, backend=b, threads=t)),
    }
    for name, make in fns.items():
        got = {}
        for b in BACKENDS:
            for t in (1, 2):
                f = make(b, t)
                out = jax.jit(f)(q, k, v)
                grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(w * f(q, k, v)), argnums=(0, 1, 2)))(q, k, v)
                got[(b, t)] = [np.asarray(out)] + [np.asarray(g) for g in grads]
        first = got[("callback", 1)]
        for key, arrays in got.items():
            for a, b in zip(first, arrays):
                assert a.dtype == np.dtype(dtype), (name, key)
                if name == "softmax":
                    # softmax's dq depends in the last bit on the alignment of the
                    # q buffer (docs/python.md, "Bit-identical results"), which
                    # differs between the two paths' buffers
                    assert ref.rel_err(a, b) < 8 * np.finfo(dtype).eps, (name, key)
                else:
                    assert np.array_equal(a, b), (name, key)
    # lam and forget gradients (summed over the batch in float64 by the NumPy API, in the
    # array dtype by the FFI path: equal in float64, within rounding in float32)
    g = {b: jax.grad(lambda lam, forget: jnp.sum(w * mj.mesa(q, k, v, lam, forget, backend=b)), argnums=(0, 1))(
        lam, forget) for b in BACKENDS}
    tol = 1e-14 if dtype == np.float64 else 1e-5
    for a, b in zip(g["callback"], g["ffi"]):
        assert ref.rel_err(np.asarray(a), np.asarray(b)) < tol
    # vmap over a leading axis runs the FFI handler once per element
    qs = np.stack([q, 2 * q])
    outs = jax.vmap(lambda q: mj.mesa(q, k, v, lam, forget, backend="ffi"))(qs)
    for i in range(2):
        assert np.array_equal(np.asarray(outs[i]), mesaopt.mesa_forward(qs[i], k, v, lam, forget=forget))


def test_jax_argument_errors(rng):
    q, k, v = make_inputs(rng, 1, 2, 4, 3, 2)
    with pytest.raises(ValueError, match="backend must be 'ffi', 'callback' or None"):
        mj.mesa(q, k, v, 1.0, backend="xla")
    with pytest.raises(ValueError, match=r"mesaopt.jax.mesa: k has shape \(1, 2, 4, 2\)"):
        mj.mesa(q, k[..., :2], v, 1.0)
    with pytest.raises(ValueError, match="v has shape"):
        mj.linear_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        mj.softmax_attention(q[0], k, v)
    with pytest.raises(TypeError, match="must share one dtype"):
        mj.linear_attention(q, k.astype(np.float32), v)
    with pytest.raises(TypeError, match="dtype float32 or float64"):
        mj.linear_attention(q.astype(np.int32), k, v)
    with pytest.raises(ValueError, match=r"lam must be a float or an array of shape \(H,\) = \(2,\)"):
        mj.mesa(q, k, v, np.ones(3))
    with pytest.raises(ValueError, match="threads must be >= 1"):
        mj.linear_attention(q, k, v, threads=0)
    if not mj.HAS_FFI:
        with pytest.raises(ValueError, match="backend='ffi' needs mesaopt built with jax installed"):
            mj.mesa(q, k, v, 1.0, backend="ffi")


@pytest.mark.parametrize("backend", BACKENDS)
def test_jax_bad_values_raise_with_the_ops_message(rng, backend):
    """A value the op rejects (lam <= 0) inside jit surfaces with the op's message."""
    q, k, v = make_inputs(rng, 1, 2, 4, 3, 2)
    f = jax.jit(lambda lam: mj.mesa(q, k, v, lam, backend=backend))
    with pytest.raises(Exception, match="lambda"):
        jax.block_until_ready(f(np.array([1.0, -1.0])))
