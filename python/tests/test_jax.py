"""mesaopt.jax: custom VJPs through jax.pure_callback (skipped without jax)."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # float64 for the comparisons below
import jax.numpy as jnp  # noqa: E402

import mesaopt  # noqa: E402
import mesaopt.jax as mj  # noqa: E402
import reference as ref  # noqa: E402
from conftest import make_inputs  # noqa: E402


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
