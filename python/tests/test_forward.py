"""Forward passes against the plain NumPy references (reference.py), float64 and float32."""

import numpy as np
import pytest

import mesaopt
import reference as ref
from conftest import make_inputs

# (B, H, T, d, dv): odd widths, T = 1, d = 1, dv != d
SIZES = [(1, 1, 1, 1, 1), (1, 1, 1, 4, 3), (2, 3, 7, 5, 3), (1, 2, 16, 4, 6), (2, 1, 33, 3, 2), (1, 2, 70, 9, 5)]


@pytest.mark.parametrize("size", SIZES)
def test_linear_forward(rng, size):
    q, k, v = make_inputs(rng, *size)
    out = mesaopt.linear_attention_forward(q, k, v)
    want, _ = ref.linear_forward(q, k, v)
    assert out.shape == want.shape and out.dtype == np.float64
    assert ref.rel_err(out, want) < 1e-12


@pytest.mark.parametrize("size", SIZES)
def test_softmax_forward(rng, size):
    q, k, v = make_inputs(rng, *size)
    out = mesaopt.softmax_attention_forward(q, k, v)
    want = ref.softmax_forward(q, k, v)
    assert ref.rel_err(out, want) < 1e-12


@pytest.mark.parametrize("size", SIZES)
def test_mesa_forward_scalar_lam(rng, size):
    q, k, v = make_inputs(rng, *size)
    out = mesaopt.mesa_forward(q, k, v, 0.7)
    want, _ = ref.mesa_forward(q, k, v, 0.7)
    assert out.shape == size[:3] + (size[4],)
    assert ref.rel_err(out, want) < 1e-10


@pytest.mark.parametrize("size", SIZES)
def test_mesa_forward_per_head(rng, size):
    B, H, T, d, dv = size
    q, k, v = make_inputs(rng, *size)
    lam = rng.uniform(0.3, 2.0, size=H)
    forget = rng.uniform(0.85, 1.0, size=H)
    out = mesaopt.mesa_forward(q, k, v, lam, forget=forget)
    want, _ = ref.mesa_forward(q, k, v, lam, forget)
    assert ref.rel_err(out, want) < 1e-10


@pytest.mark.parametrize("size", [(1, 1, 1, 3, 2), (2, 2, 20, 5, 3)])
def test_mesa_forward_constant_regularizer(rng, size):
    q, k, v = make_inputs(rng, *size)
    lam = np.array([0.5, 1.5])[: size[1]]
    out = mesaopt.mesa_forward(q, k, v, lam, forget=0.9, regularizer="constant")
    want, _ = ref.mesa_forward(q, k, v, lam, 0.9, regularizer="constant")
    assert ref.rel_err(out, want) < 1e-10


@pytest.mark.parametrize("size", SIZES)
def test_final_states(rng, size):
    B, H, T, d, dv = size
    q, k, v = make_inputs(rng, *size)
    _, S = mesaopt.linear_attention_forward(q, k, v, return_final=True)
    assert ref.rel_err(S, ref.linear_forward(q, k, v)[1]) < 1e-12
    _, (K, V) = mesaopt.softmax_attention_forward(q, k, v, return_final=True)
    assert np.array_equal(K, k) and np.array_equal(V, v)
    _, (R, S) = mesaopt.mesa_forward(q, k, v, 0.8, forget=0.95, return_final=True)
    _, (R_ref, S_ref) = ref.mesa_forward(q, k, v, 0.8, 0.95)
    assert ref.rel_err(R, R_ref) < 1e-10 and ref.rel_err(S, S_ref) < 1e-12


@pytest.mark.parametrize("size", SIZES)
def test_float32_agrees_with_float64(rng, size):
    q, k, v = make_inputs(rng, *size)
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    dout = rng.standard_normal(size[:3] + (size[4],))
    d32 = dout.astype(np.float32)
    cases = [
        (mesaopt.linear_attention_forward, mesaopt.linear_attention_backward, ()),
        (mesaopt.softmax_attention_forward, mesaopt.softmax_attention_backward, ()),
    ]
    for fwd, bwd, extra in cases:
        o64, o32 = fwd(q, k, v), fwd(q32, k32, v32)
        assert o32.dtype == np.float32
        assert ref.rel_err(o32, o64) < 1e-5
        for g32, g64 in zip(bwd(q32, k32, v32, d32), bwd(q, k, v, dout)):
            assert g32.dtype == np.float32
            assert ref.rel_err(g32, g64) < 1e-5
    o64 = mesaopt.mesa_forward(q, k, v, 1.0, forget=0.95)
    o32 = mesaopt.mesa_forward(q32, k32, v32, 1.0, forget=0.95)
    assert o32.dtype == np.float32 and ref.rel_err(o32, o64) < 1e-5
    g64 = mesaopt.mesa_backward(q, k, v, 1.0, dout, forget=0.95)
    g32 = mesaopt.mesa_backward(q32, k32, v32, 1.0, d32, forget=0.95)
    for a, b in zip(g32[:3], g64[:3]):
        assert a.dtype == np.float32 and ref.rel_err(a, b) < 1e-5
    assert isinstance(g32[3], float) and abs(g32[3] - g64[3]) <= 1e-5 * max(1.0, abs(g64[3]))
    assert abs(g32[4] - g64[4]) <= 1e-4 * max(1.0, abs(g64[4]))


def test_inputs_not_modified_and_read_only_ok(rng):
    q, k, v = make_inputs(rng, 2, 2, 9, 4, 3)
    copies = [x.copy() for x in (q, k, v)]
    for x in (q, k, v):
        x.setflags(write=False)
    mesaopt.mesa_forward(q, k, v, 1.0)
    mesaopt.mesa_backward(q, k, v, 1.0, np.ones((2, 2, 9, 3)))
    mesaopt.linear_attention_forward(q, k, v)
    mesaopt.softmax_attention_forward(q, k, v)
    for x, c in zip((q, k, v), copies):
        assert np.array_equal(x, c)


def test_aliased_inputs(rng):
    """q, k and v may be the same array (self-attention on one tensor)."""
    x, _, _ = make_inputs(rng, 1, 2, 11, 4, 4)
    x *= 0.5
    assert ref.rel_err(mesaopt.mesa_forward(x, x, x, 1.0), ref.mesa_forward(x, x, x, 1.0)[0]) < 1e-10
    assert ref.rel_err(mesaopt.softmax_attention_forward(x, x, x), ref.softmax_forward(x, x, x)) < 1e-12


def test_contiguous_views_are_accepted(rng):
    """C-contiguous views (an offset slice of a batch, size-1 dimensions with any stride) are read in place."""
    x = rng.standard_normal((3, 2, 6, 4))
    view = x[1:2]
    assert view.flags.c_contiguous and not view.flags.owndata
    assert np.array_equal(mesaopt.linear_attention_forward(view, view, view),
                          mesaopt.linear_attention_forward(view.copy(), view.copy(), view.copy()))
    one = x[:1, :1, :1]  # (1, 1, 1, 4) with the parent's strides
    assert one.flags.c_contiguous
    assert ref.rel_err(mesaopt.mesa_forward(one, one, one, 1.0), ref.mesa_forward(one, one, one, 1.0)[0]) < 1e-12
