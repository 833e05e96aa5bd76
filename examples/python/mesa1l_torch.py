#!/usr/bin/env python3
"""mesa-1L in PyTorch: mesaopt.torch's mesa op against a plain PyTorch mesa layer.

The paper's constructed-token experiment (docs/paper.md §1-2, the mesa-1L row of
examples/linear_dynamics.cpp and docs/examples.md): linear dynamics with n = 10,
T = 50, s_{t+1} = W* s_t + eps (W* Haar orthogonal per sequence, s_1 ~ U[-1, 1]^n,
eps ~ N(0, 0.01^2 I), states clipped to [-10, 10]); tokens e_t = [0, s_t, s_t, s_{t-1}]
(--mask-1l: [0, 0, s_t, s_{t-1}]); one mesa self-attention layer with 4 heads of key
and value size 20, q/k/v/o projections without bias, a residual, activations clipped
to [-4, 4], the prediction of s_{t+1} read from the first n entries; lambda =
softplus(lambda_raw) per head, initialised to 1; weights N(0, 0.0002^2); AdamW (0.9,
0.999, 1e-8), lr 4e-3, weight decay 0.1 on the matrices, gradient clipping at global
norm 1 (the C++ example's default run). Loss: half the squared error summed over the
n dimensions, averaged over the batch and the positions.

The same model is trained twice from the same initialisation on the same batches:
  (a) mesaopt: the sequence mixing is mesaopt.torch.mesa (C++ forward and backward)
  (b) torch:   the mesa layer in plain PyTorch, differentiated by autograd: a direct
               solve per position (--reference solve, the default) or the token loop
               of the Sherman-Morrison recursion (--reference sherman-morrison)
and the two training-loss curves are printed side by side, with their largest
relative difference and the time per training step of each.

    .venv-py/bin/python examples/python/mesa1l_torch.py [--steps 300] [--batch 64]
        [--seed 1] [--threads 1] [--dtype float32|float64] [--every 25] [--csv FILE]
"""

import argparse
import sys
import time

import numpy as np
import torch
from torch import nn

import mesaopt
import mesaopt.torch as mt

N, T = 10, 50  # state dimension, sequence length
HEADS, HEAD = 4, 20  # mesa-1L: 4 heads of key size = value size 20
WIDTH = 4 * N  # constructed tokens [0, s_t, s_t, s_{t-1}]


# --- data ----------------------------------------------------------------------


def haar_orthogonal(rng, batch, n):
    """Haar-uniform orthogonal matrices: QR of a Gaussian matrix with the signs of R's diagonal fixed."""
    a = rng.standard_normal((batch, n, n))
    q, r = np.linalg.qr(a)
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


def dynamics_batch(rng, batch, mask_1l=False):
    """Tokens (batch, T, 4n) and targets s_2..s_{T+1} (batch, T, n) of the linear dynamics task."""
    W = haar_orthogonal(rng, batch, N)
    s = np.empty((batch, T + 1, N))
    s[:, 0] = rng.uniform(-1.0, 1.0, size=(batch, N))
    for t in range(T):
        s[:, t + 1] = np.clip(np.einsum("bij,bj->bi", W, s[:, t]) + 0.01 * rng.standard_normal((batch, N)), -10, 10)
    cur = s[:, :T]
    prev = np.concatenate([np.zeros((batch, 1, N)), s[:, : T - 1]], axis=1)
    first = np.zeros_like(cur) if mask_1l else cur
    tokens = np.concatenate([np.zeros_like(cur), first, cur, prev], axis=2)
    return tokens, s[:, 1:]


# --- the mesa layer in plain PyTorch ----------------------------------------------


def mesa_solve(q, k, v, lam):
    """o_t = sum_{i<=t} v_i (k_i . x_t) with x_t = (sum_{i<=t} k_i k_i^T + I/lam)^{-1} q_t: one solve per position."""
    B, H, T_, d = q.shape
    P = torch.cumsum(k[..., :, None] * k[..., None, :], dim=2) + torch.diag_embed(
        (1.0 / lam)[:, None, None].expand(H, T_, d))
    x = torch.linalg.solve(P, q[..., None])[..., 0]  # (B, H, T, d)
    A = (x @ k.transpose(-1, -2)).tril()  # A[t, i] = x_t . k_i for i <= t
    return A @ v


def mesa_sherman_morrison(q, k, v, lam):
    """R_t = R_{t-1} - R_{t-1} k_t k_t^T R_{t-1} / (1 + k_t^T R_{t-1} k_t), R_0 = lam I; o_t = S_t R_t q_t."""
    B, H, T_, d = q.shape
    R = lam[:, None, None] * torch.eye(d, dtype=q.dtype).expand(B, H, d, d)
    S = q.new_zeros(B, H, v.shape[3], d)
    outs = []
    for t in range(T_):
        kt = k[:, :, t]
        Rk = (R @ kt[..., None])[..., 0]
        R = R - Rk[..., :, None] * Rk[..., None, :] / (1.0 + (kt * Rk).sum(-1))[..., None, None]
        S = S + v[:, :, t, :, None] * kt[..., None, :]
        outs.append((S @ (R @ q[:, :, t, :, None]))[..., 0])
    return torch.stack(outs, dim=2)


class TorchMesaAttention(nn.Module):
    """The same layer as mesaopt.torch.MesaAttention with the mixing written in PyTorch."""

    def __init__(self, mixing):
        super().__init__()
        self.q_proj = nn.Linear(WIDTH, HEADS * HEAD, bias=False)
        self.k_proj = nn.Linear(WIDTH, HEADS * HEAD, bias=False)
        self.v_proj = nn.Linear(WIDTH, HEADS * HEAD, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD, WIDTH, bias=False)
        self.lambda_raw = nn.Parameter(torch.zeros(HEADS))
        self.mixing = mixing

    def forward(self, x):
        B, T_, _ = x.shape
        q, k, v = (p(x).view(B, T_, HEADS, HEAD).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = self.mixing(q, k, v, nn.functional.softplus(self.lambda_raw))
        return self.o_proj(o.transpose(1, 2).reshape(B, T_, HEADS * HEAD))


class Mesa1L(nn.Module):
    """x -> clip(x + attention(x), -4, 4) -> first n entries."""

    def __init__(self, attention):
        super().__init__()
        self.attn = attention

    def forward(self, x):
        return torch.clamp(x + self.attn(x), -4.0, 4.0)[..., :N]


def make_models(args, dtype):
    a = Mesa1L(mt.MesaAttention(WIDTH, HEADS, HEAD, lambda_init=1.0, threads=args.threads))
    mixing = mesa_solve if args.reference == "solve" else mesa_sherman_morrison
    b = Mesa1L(TorchMesaAttention(mixing))
    a.to(dtype)
    b.to(dtype)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in a.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.0002)
        b.load_state_dict(a.state_dict())  # same names: attn.{q,k,v,o}_proj.weight, attn.lambda_raw
    for m in (a, b):
        assert torch.allclose(nn.functional.softplus(m.attn.lambda_raw), torch.ones(HEADS, dtype=dtype))
    return a, b


def optimizer(model, lr):
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() != 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.999), eps=1e-8)


def loss_fn(pred, target):
    return 0.5 * (pred - target).square().sum(-1).mean()


def per_position_loss(model, x, y):
    with torch.no_grad():
        return (0.5 * (model(x) - y).square().sum(-1)).mean(0).double().numpy()


# --- main -----------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps (default 300; the C++ default run has 600)")
    ap.add_argument("--batch", type=int, default=64, help="sequences per step (default 64)")
    ap.add_argument("--seed", type=int, default=1, help="seed of initialisation and data (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="threads of mesaopt and of torch (default 1)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="default float32")
    ap.add_argument("--lr", type=float, default=4e-3, help="constant learning rate (default 4e-3)")
    ap.add_argument("--every", type=int, default=25, help="print the curves every N steps (default 25)")
    ap.add_argument("--eval", type=int, default=1000, help="held-out sequences for the final evaluation (0: none)")
    ap.add_argument("--reference", choices=["solve", "sherman-morrison"], default="solve",
                    help="the plain PyTorch mesa layer: a solve per position (default) or the token loop")
    ap.add_argument("--mask-1l", action="store_true", help="tokens [0, 0, s_t, s_{t-1}] (the paper's code)")
    ap.add_argument("--csv", metavar="FILE", help="write step,loss_mesaopt,loss_torch,rel_diff rows")
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "threads", "every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.eval < 0:
        ap.error("--eval must be >= 0")

    torch.set_num_threads(args.threads)
    mesaopt.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    model_a, model_b = make_models(args, dtype)
    opt_a, opt_b = optimizer(model_a, args.lr), optimizer(model_b, args.lr)

    print(f"mesa-1L on linear dynamics (n = {N}, T = {T}), {HEADS} heads of size {HEAD}, batch {args.batch}, "
          f"{args.steps} steps, lr {args.lr:g}, {args.dtype}, {args.threads} thread(s), seed {args.seed}")
    print(f"(a) mesaopt.torch.mesa (simd {mesaopt.simd})   (b) plain PyTorch {torch.__version__}, "
          f"mesa by {args.reference}")
    print(f"{'step':>6} {'loss (a) mesaopt':>18} {'loss (b) torch':>18} {'rel diff':>10}")

    rng = np.random.default_rng(args.seed)
    rows = []
    wall = {"a": 0.0, "b": 0.0}
    cpu = {"a": 0.0, "b": 0.0}  # CPU time of this process: unaffected by other jobs on a shared machine
    for step in range(1, args.steps + 1):
        tokens, targets = dynamics_batch(rng, args.batch, args.mask_1l)
        x = torch.from_numpy(tokens).to(dtype)
        y = torch.from_numpy(targets).to(dtype)
        losses = []
        for model, opt, which in ((model_a, opt_a, "a"), (model_b, opt_b, "b")):
            t0, c0 = time.perf_counter(), time.process_time()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            wall[which] += time.perf_counter() - t0
            cpu[which] += time.process_time() - c0
            losses.append(loss.item())
        r = abs(losses[0] - losses[1]) / abs(losses[1])
        rows.append((step, losses[0], losses[1], r))
        if step % args.every == 0 or step == 1 or step == args.steps:
            print(f"{step:6d} {losses[0]:18.8f} {losses[1]:18.8f} {r:10.2e}")
            sys.stdout.flush()

    worst = max(rows, key=lambda r: r[3])
    print(f"max relative difference of the two loss curves: {worst[3]:.2e} (step {worst[0]}; {args.dtype})")
    print("time per training step (forward + backward + AdamW):")
    for label, t in (("wall", wall), ("CPU", cpu)):
        ms_a, ms_b = 1e3 * t["a"] / args.steps, 1e3 * t["b"] / args.steps
        print(f"  {label:>4}: (a) mesaopt {ms_a:8.2f} ms   (b) torch {ms_b:8.2f} ms   speed-up {ms_b / max(ms_a, 1e-9):.2f}x")
    lam_a = nn.functional.softplus(model_a.attn.lambda_raw).detach().double().numpy()
    lam_b = nn.functional.softplus(model_b.attn.lambda_raw).detach().double().numpy()
    print("learned lambda per head: (a) " + " ".join(f"{x:.4g}" for x in lam_a)
          + "   (b) " + " ".join(f"{x:.4g}" for x in lam_b))

    if args.eval:
        eval_rng = np.random.default_rng(args.seed + 1_000_003)  # held out: another stream than training's
        tokens, targets = dynamics_batch(eval_rng, args.eval, args.mask_1l)
        x = torch.from_numpy(tokens).to(dtype)
        y = torch.from_numpy(targets).to(dtype)
        cols = [1, 2, 5, 10, 20, 30, 40, 50]
        print(f"held-out loss per position ({args.eval} sequences):")
        print(f"{'model':>12} " + " ".join(f"{'t=' + str(c):>8}" for c in cols) + f" {'avg':>8}")
        for name, model in (("(a) mesaopt", model_a), ("(b) torch", model_b)):
            curve = per_position_loss(model, x, y)
            print(f"{name:>12} " + " ".join(f"{curve[c - 1]:8.4f}" for c in cols) + f" {curve.mean():8.4f}")

    if args.csv:
        with open(args.csv, "w") as f:
            f.write("step,loss_mesaopt,loss_torch,rel_diff\n")
            for r in rows:
                f.write(f"{r[0]},{r[1]!r},{r[2]!r},{r[3]!r}\n")
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
