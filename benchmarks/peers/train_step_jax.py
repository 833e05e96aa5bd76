"""One training step of the paper's small models in plain JAX (jit + optax), the
peer of benchmarks/bench_train.cpp: the same models, shapes, loss, clipping
and optimiser, timed the same way (a fixed batch, steps back to back).

Models (docs/paper.md §2, constructed tokens): width 40 = 4n with n = 10, key and
value size 20, no embedding, the prediction read from the first n columns of
the residual stream, the stream clipped to +-4 after each block, T = 50, batch
64 (--batch). linear-1L (2 heads), linear-2L, -4L and -6L (4 heads), softmax-1L (4 heads)
and mesa-1L (4 heads; the Sherman-Morrison recursion of docs/math.md M7-M9 as a
lax.scan over tokens, lambda = softplus(lambda_raw), gamma = 1). Loss: 1/(B T)
sum 1/2 ||pred - target||^2; optax.clip_by_global_norm(1.0) then
optax.adamw(1e-4, weight_decay=1e-4) (bench_train's settings).

Run (the venv from scripts/setup-peers.sh):
  .venv-peers/bin/python benchmarks/peers/train_step_jax.py --threads 1
prints one line per model: name, tokens/s, ms per step (median of --repeats
timings of --steps steps each). --threads 1 pins XLA's CPU backend to one
thread (set before jax is imported).
"""
import argparse
import json
import sys
import time

from xla_threads import pin_threads


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="XLA CPU threads (1 or the machine's cores)")
    p.add_argument("--steps", type=int, default=20, help="steps per timing")
    p.add_argument("--repeats", type=int, default=5, help="timings per model (the median is printed)")
    p.add_argument("--models", default="linear-1L,linear-2L,linear-4L,linear-6L,softmax-1L,mesa-1L")
    p.add_argument("--batch", type=int, default=64, help="sequences per step (bench_train: 64 and 256)")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    return p.parse_args()


ARGS = parse()
pin_threads(ARGS.threads)  # before jax is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

N_STATE, T, BATCH, KEY = 10, 50, ARGS.batch, 20
WIDTH = 4 * N_STATE
SPECS = {"linear-1L": ("linear", 1, 2), "linear-2L": ("linear", 2, 4), "linear-4L": ("linear", 4, 4), "linear-6L": ("linear", 6, 4),
         "softmax-1L": ("softmax", 1, 4), "mesa-1L": ("mesa", 1, 4)}


def init(kind, layers, heads, key):
    params = []
    for _ in range(layers):
        key, k1, k2 = jax.random.split(key, 3)
        block = {"W_qkv": 0.05 * jax.random.normal(k1, (heads * 3 * KEY, WIDTH), jnp.float32),
                 "W_o": 0.05 * jax.random.normal(k2, (WIDTH, heads * KEY), jnp.float32)}
        if kind == "mesa":
            block["lambda_raw"] = jnp.full((heads,), np.log(np.expm1(1.0)), jnp.float32)
        params.append(block)
    return params


def heads_of(x, w, heads):
    b, t, _ = x.shape
    qkv = (x @ w.T).reshape(b, t, 3, heads, KEY)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, d) each


def linear_attention(q, k, v):
    scores = jnp.einsum("bthd,bshd->bhts", q, k) * jnp.tril(jnp.ones((T, T), jnp.float32))
    return jnp.einsum("bhts,bshe->bthe", scores, v)


def softmax_attention(q, k, v):
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(KEY)
    scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)
    return jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(scores, axis=-1), v)


def mesa_attention(q, k, v, lam):
    # R_t = R_{t-1} - u u^T / (1 + k.u), u = R_{t-1} k; S_t = S_{t-1} + v k^T; o_t = S_t R_t q_t.
    def one_head(qh, kh, vh, l):  # (T, d) each, scalar lambda
        def step(carry, x):
            r, s = carry
            qt, kt, vt = x
            u = r @ kt
            r = r - jnp.outer(u, u) / (1.0 + kt @ u)
            s = s + jnp.outer(vt, kt)
            return (r, s), s @ (r @ qt)
        init = (l * jnp.eye(KEY, dtype=jnp.float32), jnp.zeros((KEY, KEY), jnp.float32))
        return jax.lax.scan(step, init, (qh, kh, vh))[1]
    per_seq = jax.vmap(one_head, in_axes=(1, 1, 1, 0), out_axes=1)  # over heads
    return jax.vmap(per_seq, in_axes=(0, 0, 0, None))(q, k, v, lam)  # over sequences


def forward(params, x, kind, heads):
    h = x
    for block in params:
        q, k, v = heads_of(h, block["W_qkv"], heads)
        if kind == "linear":
            o = linear_attention(q, k, v)
        elif kind == "softmax":
            o = softmax_attention(q, k, v)
        else:
            o = mesa_attention(q, k, v, jax.nn.softplus(block["lambda_raw"]))
        h = jnp.clip(h + o.reshape(h.shape[0], T, heads * KEY) @ block["W_o"].T, -4.0, 4.0)
    return h[:, :, :N_STATE]


def main():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((BATCH, T, WIDTH)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((BATCH, T, N_STATE)), jnp.float32)
    for name in ARGS.models.split(","):
        kind, layers, heads = SPECS[name]
        params = init(kind, layers, heads, jax.random.PRNGKey(0))
        opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=1e-4))
        state = opt.init(params)

        def loss_fn(p):
            e = forward(p, x, kind, heads) - y
            return 0.5 * jnp.sum(e * e) / (BATCH * T)

        @jax.jit
        def step(p, s):
            loss, g = jax.value_and_grad(loss_fn)(p)
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss

        params, state, loss = step(params, state)  # compile
        loss.block_until_ready()
        times = []
        for _ in range(ARGS.repeats):
            t0 = time.perf_counter()
            for _ in range(ARGS.steps):
                params, state, loss = step(params, state)
            loss.block_until_ready()
            times.append((time.perf_counter() - t0) / ARGS.steps)
        ms = 1e3 * float(np.median(times))
        tok = BATCH * T / (ms * 1e-3)
        if ARGS.json:
            print(json.dumps({"model": name, "threads": ARGS.threads, "tokens_per_s": tok, "ms_per_step": ms,
                              "jax": jax.__version__}))
        else:
            print(f"{name:11s} threads {ARGS.threads}  {tok / 1e3:8.1f}k tokens/s  {ms:8.2f} ms/step")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
