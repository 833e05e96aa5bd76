"""Carried state (docs/streaming.md): a split sequence with state equals the
whole sequence, one-token steps equal the forward, chained backward passes
give the whole sequence's gradients; and threads=1 vs threads=2 bit-identical."""

import numpy as np
import pytest

import mesaopt
import reference as ref
from conftest import make_inputs

SPLIT_SIZES = [(1, 1, 2, 1, 1), (2, 3, 13, 5, 3), (1, 2, 40, 7, 4)]


def split(x, t1):
    return np.ascontiguousarray(x[:, :, :t1]), np.ascontiguousarray(x[:, :, t1:])


@pytest.mark.parametrize("size", SPLIT_SIZES)
def test_linear_split_and_chain(rng, size):
    B, H, T, d, dv = size
    q, k, v = make_inputs(rng, *size)
    dout = rng.standard_normal((B, H, T, dv))
    t1 = T // 2 if T > 1 else 1
    (q1, q2), (k1, k2), (v1, v2), (g1, g2) = (split(x, t1) for x in (q, k, v, dout))
    whole = mesaopt.linear_attention_forward(q, k, v)
    o1, s1 = mesaopt.linear_attention_forward(q1, k1, v1, return_final=True)
    o2 = mesaopt.linear_attention_forward(q2, k2, v2, initial=s1)
    assert ref.rel_err(np.concatenate([o1, o2], axis=2), whole) < 1e-12
    dq, dk, dv_ = mesaopt.linear_attention_backward(q, k, v, dout)
    dq2, dk2, dv2, gs1 = mesaopt.linear_attention_backward(q2, k2, v2, g2, initial=s1)
    dq1, dk1, dv1 = mesaopt.linear_attention_backward(q1, k1, v1, g1, grad_final=gs1)
    for a, b, w in ((dq1, dq2, dq), (dk1, dk2, dk), (dv1, dv2, dv_)):
        assert ref.rel_err(np.concatenate([a, b], axis=2), w) < 1e-11


@pytest.mark.parametrize("size", SPLIT_SIZES)
def test_softmax_split_and_chain(rng, size):
    B, H, T, d, dv = size
    q, k, v = make_inputs(rng, *size)
    dout = rng.standard_normal((B, H, T, dv))
    t1 = T // 2 if T > 1 else 1
    (q1, q2), (k1, k2), (v1, v2), (g1, g2) = (split(x, t1) for x in (q, k, v, dout))
    whole = mesaopt.softmax_attention_forward(q, k, v)
    o1, s1 = mesaopt.softmax_attention_forward(q1, k1, v1, return_final=True)
    o2, s2, c2 = mesaopt.softmax_attention_forward(q2, k2, v2, initial=s1, return_final=True, return_cache=True)
    assert ref.rel_err(np.concatenate([o1, o2], axis=2), whole) < 1e-12
    assert np.array_equal(s2[0], k) and np.array_equal(s2[1], v)
    dq, dk, dv_ = mesaopt.softmax_attention_backward(q, k, v, dout)
    dq2, dk2, dv2, gs1 = mesaopt.softmax_attention_backward(q2, k2, v2, g2, cache=c2, initial=s1)
    dq1, dk1, dv1 = mesaopt.softmax_attention_backward(q1, k1, v1, g1, grad_final=gs1)
    for a, b, w in ((dq1, dq2, dq), (dk1, dk2, dk), (dv1, dv2, dv_)):
        assert ref.rel_err(np.concatenate([a, b], axis=2), w) < 1e-11


@pytest.mark.parametrize("size", SPLIT_SIZES)
@pytest.mark.parametrize("regularizer", ["decaying", "constant"])
def test_mesa_split_and_chain(rng, size, regularizer):
    B, H, T, d, dv = size
    q, k, v = make_inputs(rng, *size)
    dout = rng.standard_normal((B, H, T, dv))
    lam = rng.uniform(0.5, 2.0, size=H)
    forget = rng.uniform(0.85, 0.99, size=H)
    t1 = T // 2 if T > 1 else 1
    (q1, q2), (k1, k2), (v1, v2), (g1, g2) = (split(x, t1) for x in (q, k, v, dout))
    kw = dict(forget=forget, regularizer=regularizer)
    whole = mesaopt.mesa_forward(q, k, v, lam, **kw)
    o1, s1 = mesaopt.mesa_forward(q1, k1, v1, lam, return_final=True, **kw)
    o2, c2 = mesaopt.mesa_forward(q2, k2, v2, lam, initial=s1, return_cache=True, **kw)
    assert ref.rel_err(np.concatenate([o1, o2], axis=2), whole) < 1e-11
    dq, dk, dv_, dlam, dforget = mesaopt.mesa_backward(q, k, v, lam, dout, **kw)
    dq2, dk2, dv2, dlam2, df2, gs1 = mesaopt.mesa_backward(q2, k2, v2, lam, g2, cache=c2, initial=s1, **kw)
    dq1, dk1, dv1, dlam1, df1 = mesaopt.mesa_backward(q1, k1, v1, lam, g1, grad_final=gs1, **kw)
    for a, b, w in ((dq1, dq2, dq), (dk1, dk2, dk), (dv1, dv2, dv_)):
        assert ref.rel_err(np.concatenate([a, b], axis=2), w) < 1e-10
    assert ref.rel_err(dlam1 + dlam2, dlam) < 1e-10
    assert ref.rel_err(df1 + df2, dforget) < 1e-9


@pytest.mark.parametrize("size", [(1, 1, 1, 1, 1), (2, 3, 9, 5, 3)])
def test_steps_equal_forward(rng, size):
    B, H, T, d, dv = size
    q, k, v = make_inputs(rng, *size)
    lam = rng.uniform(0.5, 2.0, size=H)
    forget = 0.93
    want = {
        "linear": mesaopt.linear_attention_forward(q, k, v),
        "softmax": mesaopt.softmax_attention_forward(q, k, v),
        "mesa": mesaopt.mesa_forward(q, k, v, lam, forget=forget),
        "mesa_constant": mesaopt.mesa_forward(q, k, v, lam, forget=forget, regularizer="constant"),
    }
    states = {
        "linear": mesaopt.linear_attention_initial_state(B, H, d, dv),
        "softmax": mesaopt.softmax_attention_initial_state(B, H, d, dv),
        "mesa": mesaopt.mesa_initial_state(B, H, d, dv, lam),
        "mesa_constant": mesaopt.mesa_initial_state(B, H, d, dv, lam),
    }
    got = {name: np.empty_like(w) for name, w in want.items()}
    for t in range(T):
        qt, kt, vt = (np.ascontiguousarray(x[:, :, t]) for x in (q, k, v))
        got["linear"][:, :, t], states["linear"] = mesaopt.linear_attention_step(qt, kt, vt, states["linear"])
        got["softmax"][:, :, t], states["softmax"] = mesaopt.softmax_attention_step(qt, kt, vt, states["softmax"])
        got["mesa"][:, :, t], states["mesa"] = mesaopt.mesa_step(qt, kt, vt, lam, states["mesa"], forget=forget)
        got["mesa_constant"][:, :, t], states["mesa_constant"] = mesaopt.mesa_step(
            qt, kt, vt, lam, states["mesa_constant"], forget=forget, regularizer="constant")
    for name in want:
        assert ref.rel_err(got[name], want[name]) < 1e-10, name
    # the state after the steps is the forward's final state
    _, (R, S) = mesaopt.mesa_forward(q, k, v, lam, forget=forget, return_final=True)
    assert ref.rel_err(states["mesa"][0], R) < 1e-10 and ref.rel_err(states["mesa"][1], S) < 1e-12


def test_step_does_not_modify_state(rng):
    q, k, v = make_inputs(rng, 1, 2, 1, 3, 2)
    st = mesaopt.mesa_initial_state(1, 2, 3, 2, 1.0)
    keep = (st[0].copy(), st[1].copy())
    mesaopt.mesa_step(q[:, :, 0].copy(), k[:, :, 0].copy(), v[:, :, 0].copy(), 1.0, st)
    assert np.array_equal(st[0], keep[0]) and np.array_equal(st[1], keep[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threads_bit_identical(rng, dtype):
    B, H, T, d, dv = 3, 4, 70, 8, 6  # 12 slices, uneven over 2 threads
    q, k, v = make_inputs(rng, B, H, T, d, dv, dtype)
    dout = rng.standard_normal((B, H, T, dv)).astype(dtype)
    lam = rng.uniform(0.5, 2.0, size=H)
    forget = rng.uniform(0.9, 1.0, size=H)
    S0 = rng.standard_normal((B, H, dv, d)).astype(dtype)

    def run(th):
        res = []
        res += [mesaopt.linear_attention_forward(q, k, v, initial=S0, threads=th)]
        res += list(mesaopt.linear_attention_backward(q, k, v, dout, initial=S0, threads=th))
        res += [mesaopt.softmax_attention_forward(q, k, v, threads=th)]
        res += list(mesaopt.softmax_attention_backward(q, k, v, dout, threads=th))
        out, fin, cache = mesaopt.mesa_forward(q, k, v, lam, forget=forget, return_final=True, return_cache=True,
                                               threads=th)
        res += [out, fin[0], fin[1]]
        res += [np.atleast_1d(x) for x in mesaopt.mesa_backward(q, k, v, lam, dout, forget=forget, threads=th)]
        res += [np.atleast_1d(x) for x in mesaopt.mesa_backward(q, k, v, lam, dout, forget=forget, cache=cache,
                                                                 threads=th)]
        out, st = mesaopt.mesa_step(q[:, :, 0].copy(), k[:, :, 0].copy(), v[:, :, 0].copy(), lam, fin,
                                    forget=forget, threads=th)
        res += [out, st[0], st[1]]
        return res

    one, two, many = run(1), run(2), run(7)
    for a, b, c in zip(one, two, many):
        assert a.dtype == b.dtype and np.array_equal(a, b) and np.array_equal(a, c)


def test_default_threads():
    n = mesaopt.get_num_threads()
    assert n >= 1
    mesaopt.set_num_threads(1)
    assert mesaopt.get_num_threads() == 1
    mesaopt.set_num_threads(n)


def test_python_threads_run_concurrently(rng):
    """The GIL is released: calls from several Python threads run at once and agree."""
    import threading

    q, k, v = make_inputs(rng, 2, 2, 300, 16, 16)
    want = mesaopt.mesa_forward(q, k, v, 1.0, threads=1)
    results = [None] * 4

    def work(i):
        results[i] = mesaopt.mesa_forward(q, k, v, 1.0, threads=1)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for r in results:
        assert np.array_equal(r, want)
