"""Bad inputs raise ValueError / TypeError naming the argument (never a crash)."""

import numpy as np
import pytest

import mesaopt
from conftest import make_inputs

B, H, T, d, dv = 2, 3, 5, 4, 2


@pytest.fixture
def qkv(rng):
    return make_inputs(rng, B, H, T, d, dv)


def forwards(q, k, v):
    """Every sequence function, called on (q, k, v)."""
    dout = np.ones(q.shape[:3] + (v.shape[3] if v.ndim == 4 else 1,), dtype=q.dtype if q.dtype.kind == "f" else None)
    return [
        lambda: mesaopt.linear_attention_forward(q, k, v),
        lambda: mesaopt.softmax_attention_forward(q, k, v),
        lambda: mesaopt.mesa_forward(q, k, v, 1.0),
        lambda: mesaopt.linear_attention_backward(q, k, v, dout),
        lambda: mesaopt.softmax_attention_backward(q, k, v, dout),
        lambda: mesaopt.mesa_backward(q, k, v, 1.0, dout),
    ]


def test_wrong_ndim(qkv):
    q, k, v = qkv
    for f in forwards(q[0], k[0], v[0]):
        with pytest.raises(ValueError, match=r"q must have 4 dimensions, got ndim 3"):
            f()


@pytest.mark.parametrize("which,shape,msg", [
    ("k", (B, H, T, d + 1), r"k has shape \(2, 3, 5, 5\), expected \(B=2, H=3, T=5, d=4\)"),
    ("k", (B + 1, H, T, d), r"k has shape \(3, 3, 5, 4\)"),
    ("v", (B, H, T + 1, dv), r"v has shape \(2, 3, 6, 2\), expected \(B=2, H=3, T=5, dv\)"),
    ("v", (B, H - 1, T, dv), r"v has shape \(2, 2, 5, 2\)"),
])
def test_mismatched_shapes(rng, which, shape, msg):
    q, k, v = make_inputs(rng, B, H, T, d, dv)
    if which == "k":
        k = rng.standard_normal(shape)
    else:
        v = rng.standard_normal(shape)
    for f in forwards(q, k, v)[:3]:
        with pytest.raises(ValueError, match=msg):
            f()


def test_zero_sizes(rng):
    q, k, v = make_inputs(rng, B, H, 0, d, dv)
    for f in forwards(q, k, v):
        with pytest.raises(ValueError, match=r"T must be at least 1, got T = 0"):
            f()
    q, k, v = make_inputs(rng, B, H, T, d, 0)
    with pytest.raises(ValueError, match=r"dv must be at least 1"):
        mesaopt.mesa_forward(q, k, v, 1.0)


def test_non_contiguous(qkv):
    q, k, v = qkv
    qt = np.ascontiguousarray(np.swapaxes(q, 2, 3)).swapaxes(2, 3)  # (B, H, T, d), transposed strides
    assert qt.shape == q.shape and not qt.flags.c_contiguous
    with pytest.raises(ValueError, match=r"q must be C-contiguous, got shape \(2, 3, 5, 4\) with strides"):
        mesaopt.mesa_forward(qt, k, v, 1.0)
    big = np.zeros((B, H, T, 2 * d))
    with pytest.raises(ValueError, match=r"k must be C-contiguous"):
        mesaopt.linear_attention_forward(q, big[..., ::2], v)
    with pytest.raises(ValueError, match=r"v must be C-contiguous"):
        mesaopt.softmax_attention_forward(q, k, np.asfortranarray(v))


def test_wrong_dtype(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"k has dtype float32 but q has float64"):
        mesaopt.mesa_forward(q, k.astype(np.float32), v, 1.0)
    with pytest.raises(TypeError, match=r"q must have dtype float32 or float64.*int64"):
        mesaopt.linear_attention_forward(q.astype(np.int64), k, v)
    with pytest.raises(TypeError, match=r"v must have dtype float32 or float64.*float16"):
        mesaopt.softmax_attention_forward(q, k, v.astype(np.float16))
    with pytest.raises(TypeError, match=r"q must have dtype.*>f8"):
        mesaopt.mesa_forward(q.astype(">f8"), k, v, 1.0)
    with pytest.raises(TypeError, match=r"q must be a numpy.ndarray, got builtins.list"):
        mesaopt.mesa_forward(q.tolist(), k, v, 1.0)
    with pytest.raises(TypeError, match=r"dout has dtype float32 but q has float64"):
        mesaopt.mesa_backward(q, k, v, 1.0, np.ones((B, H, T, dv), np.float32))


@pytest.mark.parametrize("lam,msg", [
    (0.0, r"lam must be finite and > 0, got lam = 0.0"),
    (-1.0, r"lam must be finite and > 0, got lam = -1.0"),
    (float("nan"), r"lam must be finite and > 0, got lam = nan"),
    (float("inf"), r"lam must be finite and > 0, got lam = inf"),
    (np.array([1.0, 0.0, 1.0]), r"lam must be finite and > 0, got lam\[1\] = 0.0"),
    (1e-320, r"lam = 1e-320 is not a finite normal number in float64"),
])
def test_bad_lambda(qkv, lam, msg):
    q, k, v = qkv
    dout = np.ones((B, H, T, dv))
    for f in (lambda: mesaopt.mesa_forward(q, k, v, lam), lambda: mesaopt.mesa_backward(q, k, v, lam, dout),
              lambda: mesaopt.mesa_initial_state(B, H, d, dv, lam)):
        with pytest.raises(ValueError, match=msg):
            f()


def test_lambda_out_of_float32_range(qkv):
    q, k, v = (x.astype(np.float32) for x in qkv)
    with pytest.raises(ValueError, match=r"lam = 1e\+40 is not a finite normal number in float32"):
        mesaopt.mesa_forward(q, k, v, 1e40)


def test_bad_lambda_shape_and_type(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"lam must be a float or an array of shape \(H,\) = \(3,\), got shape \(2,\)"):
        mesaopt.mesa_forward(q, k, v, np.ones(2))
    with pytest.raises(TypeError, match=r"lam must be a float"):
        mesaopt.mesa_forward(q, k, v, "1.0")
    with pytest.raises(TypeError, match=r"lam must be a float"):
        mesaopt.mesa_forward(q, k, v, True)


@pytest.mark.parametrize("forget,msg", [
    (0.0, r"forget must lie in \(0, 1\], got forget = 0.0"),
    (1.5, r"forget must lie in \(0, 1\], got forget = 1.5"),
    (-0.5, r"forget must lie in \(0, 1\], got forget = -0.5"),
    (float("nan"), r"forget must lie in \(0, 1\], got forget = nan"),
    (np.array([0.9, 1.01, 0.9]), r"forget must lie in \(0, 1\], got forget\[1\] = 1.01"),
])
def test_bad_forget(qkv, forget, msg):
    q, k, v = qkv
    with pytest.raises(ValueError, match=msg):
        mesaopt.mesa_forward(q, k, v, 1.0, forget=forget)
    with pytest.raises(ValueError, match=msg):
        mesaopt.mesa_backward(q, k, v, 1.0, np.ones((B, H, T, dv)), forget=forget)


def test_bad_options(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"regularizer must be 'decaying' or 'constant', got 'ridge'"):
        mesaopt.mesa_forward(q, k, v, 1.0, regularizer="ridge")
    with pytest.raises(ValueError, match=r"chunk must be >= 0 \(0 = automatic\), got -1"):
        mesaopt.mesa_forward(q, k, v, 1.0, chunk=-1)
    for th, exc, msg in ((0, ValueError, r"threads must be >= 1, got 0"), (-2, ValueError, r"threads must be >= 1"),
                         (1.5, TypeError, r"threads must be an int"), (True, TypeError, r"threads must be an int")):
        for f in (mesaopt.linear_attention_forward, mesaopt.softmax_attention_forward):
            with pytest.raises(exc, match=msg):
                f(q, k, v, threads=th)
        with pytest.raises(exc, match=msg):
            mesaopt.mesa_forward(q, k, v, 1.0, threads=th)


def test_bad_dout(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"dout has shape \(2, 3, 5, 3\), expected \(B=2, H=3, T=5, dv=2\)"):
        mesaopt.mesa_backward(q, k, v, 1.0, np.ones((B, H, T, dv + 1)))
    with pytest.raises(ValueError, match=r"dout must be C-contiguous"):
        mesaopt.linear_attention_backward(q, k, v, np.ones((B, H, dv, T)).swapaxes(2, 3))


def test_bad_states(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"initial has shape \(2, 3, 4, 2\), expected \(B=2, H=3, dv=2, d=4\)"):
        mesaopt.linear_attention_forward(q, k, v, initial=np.zeros((B, H, d, dv)))
    with pytest.raises(TypeError, match=r"initial must be a tuple \(R, S\)"):
        mesaopt.mesa_forward(q, k, v, 1.0, initial=np.zeros((B, H, d, d)))
    R0, S0 = mesaopt.mesa_initial_state(B, H, d, dv, 1.0)
    with pytest.raises(ValueError, match=r"initial S has shape"):
        mesaopt.mesa_forward(q, k, v, 1.0, initial=(R0, np.zeros((B, H, d, dv))))
    bad = R0.copy()
    bad[1, 2, 0, 1] = 5.0  # not symmetric: checked by the C++ op, message names the slice
    with pytest.raises(ValueError, match=r"batch b = 1, head h = 2.*initial.R must be symmetric"):
        mesaopt.mesa_forward(q, k, v, 1.0, initial=(bad, S0))
    with pytest.raises(ValueError, match=r"grad_final keys has shape \(2, 3, 4, 4\), expected \(B=2, H=3, P=5"):
        mesaopt.softmax_attention_backward(q, k, v, np.ones((B, H, T, dv)),
                                           grad_final=(np.zeros((B, H, 4, d)), np.zeros((B, H, 4, dv))))
    with pytest.raises(ValueError, match=r"state has shape"):
        mesaopt.linear_attention_step(q[:, :, 0].copy(), k[:, :, 0].copy(), v[:, :, 0].copy(),
                                      np.zeros((B, H, d, dv)))
    with pytest.raises(ValueError, match=r"q must have 3 dimensions"):
        mesaopt.mesa_step(q, k, v, 1.0, (R0, S0))


def test_bad_cache(qkv, rng):
    q, k, v = qkv
    dout = np.ones((B, H, T, dv))
    _, cache = mesaopt.mesa_forward(q, k, v, 1.0, return_cache=True)
    with pytest.raises(ValueError, match=r"cache was made with lambda = 1, forget = 1 but opt has lambda = 2"):
        mesaopt.mesa_backward(q, k, v, 2.0, dout, cache=cache)
    q2, k2, v2 = make_inputs(rng, B, H, T + 1, d, dv)
    with pytest.raises(ValueError, match=r"cache was made for \(B, H, T, d, dv\) = \(2, 3, 5, 4, 2\)"):
        mesaopt.mesa_backward(q2, k2, v2, 1.0, np.ones((B, H, T + 1, dv)), cache=cache)
    with pytest.raises(TypeError, match=r"cache must be a MesaCacheFloat32"):
        mesaopt.mesa_backward(*(x.astype(np.float32) for x in (q, k, v)), 1.0, dout.astype(np.float32), cache=cache)
    with pytest.raises(TypeError, match=r"cache must be a SoftmaxCacheFloat64"):
        mesaopt.softmax_attention_backward(q, k, v, dout, cache=cache)
    with pytest.raises(ValueError, match=r"cache was made without an initial state"):
        mesaopt.mesa_backward(q, k, v, 1.0, dout, cache=cache, initial=mesaopt.mesa_initial_state(B, H, d, dv, 1.0))


def test_core_rejects_bad_arrays_without_crashing(qkv):
    """The compiled functions re-check what they index with, even when called directly."""
    from mesaopt import _core
    q, k, v = qkv
    out = np.empty((B, H, T, dv))
    with pytest.raises(ValueError, match=r"k has shape"):
        _core.linear_attention_forward_float64(q, k[:, :, :2].copy(), v, out, None, None, 1)
    with pytest.raises(TypeError, match=r"out must be a writable C-contiguous float64"):
        ro = out.copy()
        ro.setflags(write=False)
        _core.linear_attention_forward_float64(q, k, v, ro, None, None, 1)
    with pytest.raises(TypeError, match=r"k must be a C-contiguous float64"):
        _core.mesa_forward_float64(q, k.astype(np.float32), v, np.ones(H), np.ones(H), 0, 0, out, None, None,
                                   None, None, None, 1)
    with pytest.raises(ValueError, match=r"threads must be >= 1"):
        _core.linear_attention_forward_float64(q, k, v, out, None, None, 0)


def test_breakdown_is_reported(rng):
    """lam |k|^2 beyond 1/epsilon: MesaBreakdownError (a RuntimeError) naming the slice, not NaN."""
    q, k, v = make_inputs(rng, 1, 2, 4, 3, 2, np.float32)
    k[0, 1] *= 1e4
    with pytest.raises(mesaopt.MesaBreakdownError, match=r"batch b = 0, head h = 1.*numerical breakdown"):
        mesaopt.mesa_forward(q, k, v, 1e3)
    assert issubclass(mesaopt.MesaBreakdownError, RuntimeError)
