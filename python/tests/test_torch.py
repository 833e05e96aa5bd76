"""mesaopt.torch: autograd Functions and nn.Modules (skipped without torch, unless
MESAOPT_REQUIRE_FRONTENDS names it: conftest.py).

gradcheck in float64 for every Function and every differentiable input, the
forward against the NumPy API and against plain PyTorch recurrences written
here, the modules' gradients against pure-PyTorch modules with the same
weights, and the argument errors.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import import_or_skip  # noqa: E402

torch = import_or_skip("torch")
import mesaopt  # noqa: E402
import mesaopt.torch as mt  # noqa: E402
from torch.autograd import gradcheck  # noqa: E402

F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def inputs(B, H, T, d, dv, dtype=F64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g, dtype=F64)
    k = torch.randn(B, H, T, d, generator=g, dtype=F64) / d ** 0.5  # keys of norm ~1: a well-conditioned ridge
    v = torch.randn(B, H, T, dv, generator=g, dtype=F64)
    return tuple(x.to(dtype).requires_grad_(grad) for x in (q, k, v))


def per_head(vals, grad=True):
    return torch.tensor(vals, dtype=F64, requires_grad=grad)


def rel(a, b):
    a, b = (torch.as_tensor(x).detach().to(F64) for x in (a, b))
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


# --- plain PyTorch references (loops of the recurrences) ---------------------


def ref_linear(q, k, v):
    B, H, T, d = q.shape
    S = q.new_zeros(B, H, v.shape[3], d)
    outs = []
    for t in range(T):
        S = S + v[:, :, t, :, None] * k[:, :, t, None, :]
        outs.append((S @ q[:, :, t, :, None])[..., 0])
    return torch.stack(outs, dim=2)


def ref_softmax(q, k, v):
    T, d = q.shape[2], q.shape[3]
    s = q @ k.transpose(-1, -2) / d ** 0.5
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    return torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1) @ v


def ref_mesa(q, k, v, lam, forget=None, regularizer="decaying"):
    """o_t = S_t P_t^{-1} q_t, P_t = g P_{t-1} + k_t k_t^T (+ (1 - g)/lam I constant), P_0 = I/lam."""
    B, H, T, d = q.shape
    lam = torch.as_tensor(lam, dtype=q.dtype).expand(H)
    g = torch.ones(H, dtype=q.dtype) if forget is None else torch.as_tensor(forget, dtype=q.dtype).expand(H)
    eye = torch.eye(d, dtype=q.dtype)
    P = (eye / lam[:, None, None]).expand(B, H, d, d)
    S = q.new_zeros(B, H, v.shape[3], d)
    gg = g[:, None, None]
    outs = []
    for t in range(T):
        P = gg * P + k[:, :, t, :, None] * k[:, :, t, None, :]
        if regularizer == "constant":
            P = P + ((1 - g) / lam)[:, None, None] * eye
        S = gg * S + v[:, :, t, :, None] * k[:, :, t, None, :]
        outs.append((S @ torch.linalg.solve(P, q[:, :, t, :, None]))[..., 0])
    return torch.stack(outs, dim=2)


SIZES = [(1, 1, 1, 1, 1), (2, 2, 5, 3, 4), (1, 3, 7, 4, 2)]


# --- gradcheck (float64) --------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_gradcheck_linear_and_softmax(size):
    q, k, v = inputs(*size)
    assert gradcheck(lambda q, k, v: mt.LinearAttentionFunction.apply(q, k, v, None), (q, k, v))
    assert gradcheck(lambda q, k, v: mt.SoftmaxAttentionFunction.apply(q, k, v, None), (q, k, v))
    assert gradcheck(mt.linear_attention, (q, k, v))
    assert gradcheck(mt.softmax_attention, (q, k, v))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("regularizer", ["decaying", "constant"])
def test_gradcheck_mesa_all_inputs(size, regularizer):
    q, k, v = inputs(*size)
    H = size[1]
    lam = per_head(np.linspace(0.7, 1.4, H))
    forget = per_head(np.linspace(0.85, 0.95, H))
    assert gradcheck(lambda *a: mt.MesaFunction.apply(*a, regularizer, 0, None), (q, k, v, lam, forget))
    assert gradcheck(lambda *a: mt.mesa(*a, regularizer=regularizer), (q, k, v, lam, forget))


def test_gradcheck_mesa_without_forget_scalar_lam_and_chunk():
    q, k, v = inputs(2, 2, 9, 3, 2)
    lam = torch.tensor(0.8, dtype=F64, requires_grad=True)  # 0-dim: one lambda for all heads
    assert gradcheck(lambda q, k, v, lam: mt.mesa(q, k, v, lam), (q, k, v, lam))
    assert gradcheck(lambda q, k, v, lam: mt.mesa(q, k, v, lam, chunk=2), (q, k, v, lam))
    # a float lam is a constant; only q, k, v get gradients
    assert gradcheck(lambda q, k, v: mt.mesa(q, k, v, 1.3, 0.9), (q, k, v))


# --- forward and backward against NumPy and plain PyTorch ----------------------


@pytest.mark.parametrize("size", SIZES)
def test_forward_matches_numpy_and_reference(size):
    q, k, v = inputs(*size)
    H = size[1]
    lam = per_head(np.linspace(0.6, 1.5, H))
    forget = per_head(np.linspace(0.9, 1.0, H))
    qn, kn, vn = (x.detach().numpy() for x in (q, k, v))
    with torch.no_grad():
        cases = [
            (mt.linear_attention(q, k, v), mesaopt.linear_attention_forward(qn, kn, vn), ref_linear(q, k, v)),
            (mt.softmax_attention(q, k, v), mesaopt.softmax_attention_forward(qn, kn, vn), ref_softmax(q, k, v)),
            (mt.mesa(q, k, v, lam, forget), mesaopt.mesa_forward(qn, kn, vn, lam.numpy(), forget=forget.numpy()),
             ref_mesa(q, k, v, lam, forget)),
            (mt.mesa(q, k, v, lam, forget, regularizer="constant"),
             mesaopt.mesa_forward(qn, kn, vn, lam.numpy(), forget=forget.numpy(), regularizer="constant"),
             ref_mesa(q, k, v, lam, forget, "constant")),
            (mt.mesa(q, k, v, 0.7), mesaopt.mesa_forward(qn, kn, vn, 0.7), ref_mesa(q, k, v, 0.7)),
        ]
    for out, want_np, want_ref in cases:
        assert out.dtype == F64 and out.shape == want_np.shape
        assert np.array_equal(out.numpy(), want_np)
        assert rel(out, want_ref) < 1e-10


@pytest.mark.parametrize("size", [(2, 2, 6, 3, 4), (2, 3, 40, 5, 5)])
def test_backward_matches_numpy_and_autograd_reference(size):
    q, k, v = inputs(*size)
    H = size[1]
    w = torch.randn(size[:3] + (size[4],), dtype=F64, generator=torch.Generator().manual_seed(1))
    lam = per_head(np.linspace(0.6, 1.5, H))
    forget = per_head(np.linspace(0.9, 0.99, H))
    qn, kn, vn, wn = (x.detach().numpy() for x in (q, k, v, w))
    for fn, ref, np_bwd in [
        (mt.linear_attention, ref_linear, lambda: mesaopt.linear_attention_backward(qn, kn, vn, wn)),
        (mt.softmax_attention, ref_softmax, lambda: mesaopt.softmax_attention_backward(qn, kn, vn, wn)),
    ]:
        g = torch.autograd.grad((w * fn(q, k, v)).sum(), (q, k, v))
        g_ref = torch.autograd.grad((w * ref(q, k, v)).sum(), (q, k, v))
        for a, b, c in zip(g, np_bwd(), g_ref):
            assert np.array_equal(a.numpy(), b)  # the cached backward is bit-identical to a recomputing one
            assert rel(a, c) < 1e-9
    args = (q, k, v, lam, forget)
    g = torch.autograd.grad((w * mt.mesa(*args)).sum(), args)
    g_ref = torch.autograd.grad((w * ref_mesa(*args)).sum(), args)
    want = mesaopt.mesa_backward(qn, kn, vn, lam.detach().numpy(), wn, forget=forget.detach().numpy())
    for a, b, c in zip(g, want, g_ref):
        assert np.array_equal(a.numpy(), b)
        assert rel(a, c) < 1e-9


def test_float32_dtype_and_noncontiguous_inputs():
    q, k, v = inputs(2, 3, 8, 4, 5)
    # non-contiguous views: the same values laid out (B, T, H, d) and transposed
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (q, k, v))
    assert not qt.is_contiguous()
    for fn in (mt.linear_attention, mt.softmax_attention, lambda q, k, v: mt.mesa(q, k, v, 0.9, 0.95)):
        out = fn(q, k, v)
        out_t = fn(qt, kt, vt)
        assert torch.equal(out, out_t)
        g = torch.autograd.grad(out.square().sum(), (q, k, v))
        g_t = torch.autograd.grad(out_t.square().sum(), (qt, kt, vt))
        for a, b in zip(g, g_t):
            assert torch.equal(a, b)
        q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
        out32 = fn(q32, k32, v32)
        assert out32.dtype == torch.float32
        assert rel(out32, out) < 1e-5
        g32 = torch.autograd.grad(out32.square().sum(), (q32, k32, v32))
        for a, b in zip(g32, g):
            assert a.dtype == torch.float32 and rel(a, b) < 1e-4


def test_mesa_lam_gradient_float32_and_threads():
    q, k, v = inputs(2, 2, 10, 3, 3, dtype=torch.float32)
    lam = torch.tensor([0.8, 1.2], requires_grad=True)  # float32 parameters
    out = mt.mesa(q, k, v, lam, threads=1)
    out.sum().backward()
    assert lam.grad.dtype == torch.float32 and lam.grad.shape == (2,)
    g1 = lam.grad.clone()
    lam.grad = None
    mt.mesa(q, k, v, lam, threads=2).sum().backward()
    assert torch.equal(lam.grad, g1)  # bit-identical for any thread count


def test_retain_graph_second_backward_recomputes_the_same():
    q, k, v = inputs(2, 2, 12, 3, 2)
    lam = per_head([0.9, 1.1])
    for out in (mt.mesa(q, k, v, lam, 0.95), mt.softmax_attention(q, k, v)):
        loss = out.square().sum()
        g1 = torch.autograd.grad(loss, (q, k, v), retain_graph=True)  # uses the forward's cache
        g2 = torch.autograd.grad(loss, (q, k, v))  # the cache was released: recomputes the forward
        for a, b in zip(g1, g2):
            assert torch.equal(a, b)


def test_no_grad_and_integration_with_torch_ops():
    q, k, v = inputs(1, 2, 4, 3, 3)
    with torch.no_grad():
        out = mt.mesa(q, k, v, 1.0)
    assert not out.requires_grad
    # without grad the op runs alone (no autograd node, no cache): the same bits
    assert torch.equal(out, mt.mesa(q, k, v, 1.0).detach())
    assert torch.equal(mt.mesa(q.detach(), k.detach(), v.detach(), 1.0, 0.9), mt.mesa(q, k, v, 1.0, 0.9).detach())
    # gradients of lam through softplus and of inputs through a preceding op
    raw = torch.zeros(2, dtype=F64, requires_grad=True)
    x = torch.randn(1, 2, 4, 3, dtype=F64, requires_grad=True)
    assert gradcheck(lambda x, raw: mt.mesa(2 * x, k.detach(), v.detach(), torch.nn.functional.softplus(raw)),
                     (x, raw))


# --- nn.Modules against pure-PyTorch modules with the same weights ---------------


def ref_module_forward(m, x, mix):
    B, T, _ = x.shape
    H, d, dv = m.heads, m.head_dim, m.value_dim
    q = (x @ m.q_proj.weight.T).view(B, T, H, d).transpose(1, 2)
    k = (x @ m.k_proj.weight.T).view(B, T, H, d).transpose(1, 2)
    v = (x @ m.v_proj.weight.T).view(B, T, H, dv).transpose(1, 2)
    o = mix(q, k, v).transpose(1, 2).reshape(B, T, H * dv)
    return o @ m.o_proj.weight.T


MODULES = [
    ("linear", lambda: mt.LinearAttention(6, 2, 3, 4, dtype=F64), lambda m: ref_linear),
    ("softmax", lambda: mt.SoftmaxAttention(6, 3, 2, dtype=F64), lambda m: ref_softmax),
    ("mesa-softplus", lambda: mt.MesaAttention(6, 2, 3, 4, lambda_init=0.8, dtype=F64),
     lambda m: lambda q, k, v: ref_mesa(q, k, v, torch.nn.functional.softplus(m.lambda_raw))),
    ("mesa-raw-forget", lambda: mt.MesaAttention(6, 2, 3, lambda_parametrization="raw", learn_forget=True,
                                                 forget_init=0.9, dtype=F64),
     lambda m: lambda q, k, v: ref_mesa(q, k, v, m.lambda_raw, torch.sigmoid(m.forget_raw))),
    ("mesa-constant", lambda: mt.MesaAttention(6, 2, 3, learn_forget=True, forget_init=0.8, regularizer="constant",
                                               dtype=F64),
     lambda m: lambda q, k, v: ref_mesa(q, k, v, torch.nn.functional.softplus(m.lambda_raw),
                                        torch.sigmoid(m.forget_raw), "constant")),
]


@pytest.mark.parametrize("name,make,mix", MODULES, ids=[m[0] for m in MODULES])
def test_module_matches_pure_torch_reference(name, make, mix):
    torch.manual_seed(3)
    m = make()
    with torch.no_grad():  # small projections: keys of norm ~1
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(0.7)
    x = torch.randn(2, 9, 6, dtype=F64)
    w = torch.randn(2, 9, 6, dtype=F64)
    out = m(x)
    assert out.shape == x.shape and out.dtype == F64
    params = [p for p in m.parameters()]
    g = torch.autograd.grad((w * out).sum(), params)
    out_ref = ref_module_forward(m, x, mix(m))
    g_ref = torch.autograd.grad((w * out_ref).sum(), params)
    assert rel(out, out_ref) < 1e-10
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-9


def test_mesa_module_parameters_and_lambda():
    m = mt.MesaAttention(40, 4, 20)
    names = dict(m.named_parameters())
    assert set(names) == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "lambda_raw"}
    assert torch.allclose(m.lam, torch.ones(4))
    assert m.forget is None
    m2 = mt.MesaAttention(8, 2, 4, lambda_init=30.0, learn_forget=True, forget_init=0.95)
    assert torch.allclose(m2.lam, torch.full((2,), 30.0)) and torch.allclose(m2.forget, torch.full((2,), 0.95))
    assert "forget_raw" in dict(m2.named_parameters())
    x = torch.randn(3, 5, 8)
    out = m2(x)
    out.sum().backward()
    assert m2.lambda_raw.grad is not None and m2.forget_raw.grad is not None
    with pytest.raises(ValueError, match="lambda_init"):
        mt.MesaAttention(8, 2, 4, lambda_init=0.0)
    with pytest.raises(ValueError, match="forget_init"):
        mt.MesaAttention(8, 2, 4, learn_forget=True, forget_init=1.0)
    with pytest.raises(ValueError, match="lambda_parametrization"):
        mt.MesaAttention(8, 2, 4, lambda_parametrization="exp")
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, dim=8\)"):
        m2(torch.randn(3, 5, 7))


# --- errors ----------------------------------------------------------------


def test_errors_name_the_argument():
    q, k, v = inputs(2, 2, 5, 3, 4, grad=False)
    fns = [mt.linear_attention, mt.softmax_attention, lambda q, k, v: mt.mesa(q, k, v, 1.0)]
    for fn in fns:
        with pytest.raises(ValueError, match=r"k has shape \(2, 2, 5, 2\)"):
            fn(q, k[..., :2], v)
        with pytest.raises(ValueError, match=r"v has shape \(2, 2, 4, 4\)"):
            fn(q, k, v[:, :, :4])
        with pytest.raises(ValueError, match="q must have 4 dimensions"):
            fn(q[0], k, v)
        with pytest.raises(TypeError, match="v must have dtype torch.float32 or torch.float64"):
            fn(q, k, v.half())
        with pytest.raises(TypeError, match="q must have dtype"):
            fn(q.long(), k, v)
        with pytest.raises(TypeError, match="k has dtype torch.float32 but q has torch.float64"):
            fn(q, k.float(), v)
        with pytest.raises(TypeError, match="q must be a torch.Tensor"):
            fn(q.numpy(), k, v)
        # another device (meta stands in for CUDA, which needs a GPU): ValueError naming the argument
        with pytest.raises(ValueError, match="k is on device meta"):
            fn(q, k.to("meta"), v)
        with pytest.raises(ValueError, match="B must be at least 1"):
            fn(q[:0], k[:0], v[:0])
    with pytest.raises(ValueError, match=r"lam must be a float or a tensor of shape \(H,\) = \(2,\)"):
        mt.mesa(q, k, v, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=r"mesaopt.torch.mesa: lam must be finite and > 0, got lam\[1\] = -1.0"):
        mt.mesa(q, k, v, torch.tensor([1.0, -1.0], dtype=F64))
    with pytest.raises(ValueError, match="lam must be finite and > 0, got lam = nan"):
        mt.mesa(q, k, v, float("nan"))
    with pytest.raises(ValueError, match=r"forget must lie in \(0, 1\], got forget = 1.5"):
        mt.mesa(q, k, v, 1.0, 1.5)
    with pytest.raises(ValueError, match=r"lam = 1e-50 is not a normal number in torch.float32"):
        mt.mesa(q.float(), k.float(), v.float(), 1e-50)
    with pytest.raises(TypeError, match="lam must be a float or a torch.Tensor"):
        mt.mesa(q, k, v, "1.0")
    with pytest.raises(ValueError, match="regularizer"):
        mt.mesa(q, k, v, 1.0, regularizer="ridge")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        mt.linear_attention(q, k, v, threads=0)
    if torch.cuda.is_available():  # pragma: no cover - no GPU here
        with pytest.raises(ValueError, match="q is on device cuda"):
            mt.mesa(q.cuda(), k, v, 1.0)


def test_import_error_without_torch():
    code = "import sys; sys.modules['torch'] = None\ntry:\n import mesaopt.torch\nexcept ImportError as e:\n print(e)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "mesaopt.torch needs PyTorch" in r.stdout, r.stdout + r.stderr


# --- the example ---------------------------------------------------------------


def test_mesa1l_example_curves_agree(tmp_path):
    """examples/python/mesa1l_torch.py in float64: mesaopt's op and plain PyTorch give the same loss curve."""
    script = os.path.join(ROOT, "examples", "python", "mesa1l_torch.py")
    if not os.path.exists(script):
        pytest.skip("examples/ not in this checkout")
    csv = tmp_path / "curves.csv"
    r = subprocess.run([sys.executable, script, "--steps", "6", "--batch", "8", "--every", "1", "--dtype", "float64",
                        "--threads", "1", "--csv", str(csv)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = np.loadtxt(csv, delimiter=",", skiprows=1, ndmin=2)
    assert rows.shape[0] == 6
    a, b = rows[:, 1], rows[:, 2]
    assert np.all(np.isfinite(a)) and np.max(np.abs(a - b) / np.abs(b)) < 1e-4
    assert "max relative difference" in r.stdout
