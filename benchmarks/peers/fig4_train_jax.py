"""Train the paper's constructed-token linear-attention models (Fig. 4) in plain
JAX + optax, written from docs/paper.md alone, to check mesaopt's training
against an independent implementation of the same settings.

Everything follows docs/paper.md §1-§3 (the paper's code's values): linear
dynamics with n = 10, W* Haar-orthogonal per sequence, s_1 ~ U[-1, 1]^n,
noise N(0, 0.01^2), values clipped to +-10, T = 50; tokens
e_t = [0, s_t, s_t, s_{t-1}] (1-layer models: [0, 0, s_t, s_{t-1}]); blocks
x <- clip(x + W_o LinAttn(W_q x, W_k x, W_v x), -4, 4), causal mask with the
diagonal, no biases, key = value size 20; read-out = the first n entries of
the stream; weights N(0, 0.0002^2); loss 1/2 sum over dims of the squared
error, mean over batch and positions; optax.clip(1) (element-wise) then
optax.adamw(lr, 0.9, 0.999, 1e-8, weight_decay=0.1); batch 256; a fresh
batch every step. Nothing is shared with mesaopt: its own data, its own
random numbers, its own model.

Run (the venv from scripts/setup-peers.sh):
  .venv-peers/bin/python benchmarks/peers/fig4_train_jax.py --model linear-4L \
      --steps 2000 --seed 1 --history h.csv --csv curve.csv
--history writes model,step,loss,seed rows (the training loss of every step,
the format of linear_dynamics --history); --csv writes the per-position test
loss on --eval held-out sequences as method,position,loss,stderr,seeds (the
format examples/compare_curves.py reads; stderr over sequences).
"""
import argparse
import sys
import time

from xla_threads import pin_threads


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="linear-4L", help="linear-1L, linear-2L, linear-4L or linear-6L")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--init-std", type=float, default=0.0002)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--eval", type=int, default=1280, help="held-out sequences for --csv")
    p.add_argument("--threads", type=int, default=1, help="XLA CPU threads (1 pins XLA to one thread)")
    p.add_argument("--history", help="write the training loss of every step here")
    p.add_argument("--csv", help="write the per-position test loss here")
    p.add_argument("--report-every", type=int, default=250, help="print the mean training loss of this many steps")
    a = p.parse_args()
    for name in ("steps", "batch", "eval", "report_every"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.model not in ("linear-1L", "linear-2L", "linear-4L", "linear-6L"):
        p.error(f"--model must be linear-1L, linear-2L, linear-4L or linear-6L, got {a.model}")
    return a


ARGS = parse()
pin_threads(ARGS.threads)  # before jax is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

N, T, KEY = 10, 50, 20
WIDTH = 4 * N
LAYERS = int(ARGS.model.split("-")[1][:-1])
HEADS = 2 if LAYERS == 1 else 4


def sample(key, batch):
    """Inputs s_1..s_T and targets s_2..s_{T+1}, each (batch, T, N)."""
    kw, ks, ke = jax.random.split(key, 3)
    g = jax.random.normal(kw, (batch, N, N))
    q, r = jnp.linalg.qr(g)
    w = q * jnp.sign(jnp.diagonal(r, axis1=1, axis2=2))[:, None, :]  # Haar: fix the signs of R's diagonal
    s1 = jax.random.uniform(ks, (batch, N), minval=-1.0, maxval=1.0)
    eps = 0.01 * jax.random.normal(ke, (T, batch, N))

    def step(s, e):
        nxt = jnp.clip(jnp.einsum("bij,bj->bi", w, s) + e, -10.0, 10.0)
        return nxt, nxt
    _, rest = jax.lax.scan(step, s1, eps)  # s_2..s_{T+1}
    states = jnp.concatenate([s1[None], rest], axis=0).transpose(1, 0, 2)  # (batch, T+1, N)
    return states[:, :T], states[:, 1:]


def tokens(s):
    prev = jnp.concatenate([jnp.zeros_like(s[:, :1]), s[:, :-1]], axis=1)
    zero = jnp.zeros_like(s)
    second = zero if LAYERS == 1 else s  # 1-layer models: the code masks slots 0-1
    return jnp.concatenate([zero, second, s, prev], axis=-1)


def init(key):
    params = []
    for _ in range(LAYERS):
        key, kq, kk, kv, ko = jax.random.split(key, 5)
        params.append({name: ARGS.init_std * jax.random.normal(k, shape, jnp.float32)
                       for name, k, shape in (("W_q", kq, (WIDTH, HEADS * KEY)), ("W_k", kk, (WIDTH, HEADS * KEY)),
                                              ("W_v", kv, (WIDTH, HEADS * KEY)), ("W_o", ko, (HEADS * KEY, WIDTH)))})
    return params


MASK = jnp.tril(jnp.ones((T, T), jnp.float32))


def forward(params, x):
    b = x.shape[0]
    h = x
    for blk in params:
        q = (h @ blk["W_q"]).reshape(b, T, HEADS, KEY)
        k = (h @ blk["W_k"]).reshape(b, T, HEADS, KEY)
        v = (h @ blk["W_v"]).reshape(b, T, HEADS, KEY)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) * MASK
        o = jnp.einsum("bhts,bshe->bthe", scores, v).reshape(b, T, HEADS * KEY)
        h = jnp.clip(h + o @ blk["W_o"], -4.0, 4.0)
    return h[:, :, :N]


def per_position_loss(params, s, y):
    e = forward(params, tokens(s)) - y
    return 0.5 * jnp.sum(e * e, axis=-1)  # (batch, T)


def main():
    key = jax.random.PRNGKey(ARGS.seed)
    key, kinit, ktest = jax.random.split(key, 3)
    params = init(kinit)
    opt = optax.chain(optax.clip(1.0), optax.adamw(ARGS.lr, b1=0.9, b2=0.999, eps=1e-8,
                                                   weight_decay=ARGS.weight_decay))
    state = opt.init(params)

    @jax.jit
    def step(p, st, k):
        s, y = sample(k, ARGS.batch)
        loss, g = jax.value_and_grad(lambda p: jnp.mean(per_position_loss(p, s, y)))(p)
        upd, st = opt.update(g, st, p)
        return optax.apply_updates(p, upd), st, loss

    losses = []
    t0 = time.perf_counter()
    for i in range(ARGS.steps):
        key, k = jax.random.split(key)
        params, state, loss = step(params, state, k)
        losses.append(loss)
        if (i + 1) % ARGS.report_every == 0:
            recent = np.asarray(jax.device_get(losses[-ARGS.report_every:]))
            print(f"step {i + 1:6d}  mean loss of the last {ARGS.report_every} steps {recent.mean():.4f}  "
                  f"{time.perf_counter() - t0:7.1f} s", flush=True)
    losses = np.asarray(jax.device_get(losses), dtype=np.float64)
    if ARGS.history:
        with open(ARGS.history, "w") as f:
            f.write("model,step,loss,seed\n")
            for i, v in enumerate(losses):
                f.write(f"{ARGS.model}-jax,{i + 1},{v:.8g},{ARGS.seed}\n")

    # Held-out curve, in chunks of 256 sequences.
    evalf = jax.jit(per_position_loss)
    rows = []
    left = ARGS.eval
    while left > 0:
        ktest, k = jax.random.split(ktest)
        s, y = sample(k, min(256, left))
        rows.append(np.asarray(evalf(params, s, y), dtype=np.float64))
        left -= rows[-1].shape[0]
    per_seq = np.concatenate(rows, axis=0)
    mean = per_seq.mean(axis=0)
    se = per_seq.std(axis=0, ddof=1) / np.sqrt(per_seq.shape[0])
    print(f"{ARGS.model} (jax) after {ARGS.steps} steps, {per_seq.shape[0]} held-out sequences: avg {mean.mean():.4f}; "
          + ", ".join(f"t={t} {mean[t - 1]:.4f}" for t in (1, 2, 5, 10, 20, 30, 40, 50)))
    if ARGS.csv:
        with open(ARGS.csv, "w") as f:
            f.write("method,position,loss,stderr,seeds\n")
            for t in range(T):
                f.write(f"{ARGS.model},{t + 1},{mean[t]:.8g},{se[t]:.8g},1\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
