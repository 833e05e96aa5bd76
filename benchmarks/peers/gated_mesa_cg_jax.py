"""The chunkwise conjugate-gradient gated mesa op (MesaNet's solver) in plain JAX:
the peer of the chunkwise cg form in benchmarks/bench_gated_mesa.cpp.

One head of one sequence (vmapped over B*H = --bh heads), float32, the same
math as mesaopt's gated_mesa op with MesaSolver::cg and opt.chunk = C
(docs/math.md M29, M32; the chunkwise matrix-free product of §10):

  H_t = gamma_t H_{t-1} + beta_t k_t k_t^T,   S_t = gamma_t S_{t-1} + beta_t v_t k_t^T
  o_t = S_t x_t,   x_t = (H_t + diag(lambda))^{-1} q_t by `steps` CG steps from x = 0,

with H_t x = g_t H_0 x + sum_{s<=t} (g_t / g_s) beta_s k_s (k_s^T x) inside a chunk
(g_t: cumulative product of the gates from the chunk start, in log space), the
chunk-start states by lax.scan over chunks, and all tokens' CG iterations run at
once, as flash-linear-attention's naive_mesa_net_CG does. The backward, by
--backward: `autodiff` (default), jax.grad through the CG iterations (what plain
JAX gives); `implicit`, the solve wrapped in jax.lax.custom_linear_solve
(symmetric), so that jax.grad differentiates it as an exact linear solve: one
more CG solve with the same operator and a vjp of one operator application, the
CG iterations themselves not taped. That is MesaNet's own backward (and
mesaopt's): its kernels keep the forward's solution and run one second solve.

Run (the venv of scripts/setup-peers.sh or scripts/python-env.sh --jax):
  .venv-peers/bin/python benchmarks/peers/gated_mesa_cg_jax.py --threads 1
prints one line per (d, T): forward and forward+backward (per --backward) head-tokens/s (median of
--repeats timings) by process CPU time (all of XLA's threads; the C++ benchmark
counts its thread's CPU time, so load on a shared machine inflates neither). --check compares the forward with a direct per-token solve.
"""
import argparse
import time

from xla_threads import pin_threads


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="XLA CPU threads (1 = single core)")
    p.add_argument("--dims", default="32,64,128", help="head sizes d (= dv)")
    p.add_argument("--lengths", default="256,1024,4096", help="sequence lengths T")
    p.add_argument("--bh", type=int, default=1, help="heads x sequences, vmapped")
    p.add_argument("--chunk", type=int, default=64, help="chunk size C (T must be a multiple)")
    p.add_argument("--steps", type=int, default=30, help="CG steps (MesaNet's default: 30)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backward", choices=("autodiff", "implicit", "both"), default="autodiff",
                   help="how jax.grad differentiates the CG solve (see above); both: one column each")
    p.add_argument("--check", action="store_true", help="check the forward against a direct solve and exit")
    return p.parse_args()


ARGS = parse()
pin_threads(ARGS.threads)  # before jax is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def gated_mesa_cg(q, k, v, beta, gamma, lam, chunk, steps, implicit=False):
    """One head: q, k (T, d); v (T, dv); beta, gamma (T,); lam (d,). Returns (T, dv)."""
    T, d = q.shape
    dv = v.shape[1]
    n, C = T // chunk, chunk
    qc, kc, vc = q.reshape(n, C, d), k.reshape(n, C, d), v.reshape(n, C, dv)
    bc = beta.reshape(n, C)
    cum = jnp.cumsum(jnp.log(gamma).reshape(n, C), axis=1)           # log g_t within each chunk
    tril = jnp.tril(jnp.ones((C, C), q.dtype))
    # W[t, s] = (g_t / g_s) beta_s for s <= t (exponent <= 0 there; masked before exp elsewhere)
    W = jnp.exp(jnp.where(tril > 0, cum[:, :, None] - cum[:, None, :], -jnp.inf)) * bc[:, None, :]
    decay_q = jnp.exp(cum)                                             # g_t
    decay_k = jnp.exp(cum[:, -1:] - cum) * bc                          # beta_s g_C / g_s
    g_end = jnp.exp(cum[:, -1])

    def advance(carry, inp):
        H, S = carry
        kk, vv, dk, ge = inp
        kp = kk * dk[:, None]
        return (ge * H + kp.T @ kk, ge * S + vv.T @ kp), (H, S)

    _, (Hs, Ss) = jax.lax.scan(advance, (jnp.zeros((d, d), q.dtype), jnp.zeros((dv, d), q.dtype)),
                               (kc, vc, decay_k, g_end))

    def matvec(X):  # (H_t + Lambda) x_t for every token at once
        return (X * decay_q[..., None]) @ Hs + ((X @ kc.transpose(0, 2, 1)) * W) @ kc + lam * X

    def cg(A, b):  # `steps` CG iterations on every token's system at once, from x = 0
        def cg_step(_, state):
            x, r, p, rr = state
            Ap = A(p)
            pAp = jnp.sum(p * Ap, -1)
            alpha = jnp.where(pAp > 0, rr / jnp.where(pAp > 0, pAp, 1), 0)
            x = x + alpha[..., None] * p
            r = r - alpha[..., None] * Ap
            rr_new = jnp.sum(r * r, -1)
            p = r + jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1), 0)[..., None] * p
            return x, r, p, rr_new
        x, *_ = jax.lax.fori_loop(0, steps, cg_step, (jnp.zeros_like(b), b, b, jnp.sum(b * b, -1)))
        return x

    if implicit:  # every A_t is symmetric, so the transposed solve is the same solve
        x = jax.lax.custom_linear_solve(matvec, qc, cg, symmetric=True)
    else:
        x = cg(matvec, qc)
    o = (x * decay_q[..., None]) @ Ss.transpose(0, 2, 1) + ((x @ kc.transpose(0, 2, 1)) * W) @ vc
    return o.reshape(T, dv)


def direct(q, k, v, beta, gamma, lam):
    """Per-token direct solve in float64 NumPy (the check)."""
    T, d = q.shape
    H, S = np.zeros((d, d)), np.zeros((v.shape[1], d))
    out = np.zeros((T, v.shape[1]))
    for t in range(T):
        H = gamma[t] * H + beta[t] * np.outer(k[t], k[t])
        S = gamma[t] * S + beta[t] * np.outer(v[t], k[t])
        out[t] = S @ np.linalg.solve(H + np.diag(lam), q[t])
    return out


def inputs(bh, T, d, seed=0):
    rng = np.random.default_rng(seed)
    def unit(x):  # MesaNet L2-normalises q and k
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(rng.standard_normal((bh, T, d)))
    k = unit(rng.standard_normal((bh, T, d)))
    v = rng.standard_normal((bh, T, d))
    beta = rng.uniform(0.3, 1.0, (bh, T))
    gamma = rng.uniform(0.9, 1.0, (bh, T))
    lam = rng.uniform(0.25, 1.0, (bh, d))
    return q, k, v, beta, gamma, lam


def median_time(f, args, repeats):
    jax.block_until_ready(f(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        jax.block_until_ready(f(*args))
        times.append(time.process_time() - t0)
    return float(np.median(times))


def main():
    modes = ("autodiff", "implicit") if ARGS.backward == "both" else (ARGS.backward,)
    if ARGS.check:
        q, k, v, beta, gamma, lam = inputs(1, 2 * ARGS.chunk, 8)
        ref = direct(q[0], k[0], v[0], beta[0], gamma[0], lam[0])
        jax.config.update("jax_enable_x64", True)
        one = [jnp.asarray(a[0]) for a in (q, k, v, beta, gamma, lam)]
        got = np.asarray(gated_mesa_cg(*one, ARGS.chunk, 8 * 3))
        err = np.abs(got - ref).max() / np.abs(ref).max()
        print(f"check: max relative error vs direct solve (float64, d = 8, 24 CG steps) = {err:.2e}")
        # Converged solves: the two backwards differentiate the same function.
        dout = jnp.asarray(np.random.default_rng(1).standard_normal(got.shape))
        grads = [jax.grad(lambda *a, imp=imp: jnp.sum(gated_mesa_cg(*a, ARGS.chunk, 8 * 3, imp) * dout),
                          argnums=(0, 1, 2, 3, 4, 5))(*one) for imp in (False, True)]
        gerr = max(float(jnp.abs(a - b).max() / jnp.abs(a).max()) for a, b in zip(*grads))
        print(f"check: implicit vs autodiff gradients, max relative difference = {gerr:.2e}")
        raise SystemExit(0 if err < 1e-8 and gerr < 1e-6 else 1)
    print(f"# jax {jax.__version__}, threads {ARGS.threads}, bh {ARGS.bh}, chunk {ARGS.chunk}, cg steps {ARGS.steps}, float32")
    print(f"{'d':>4} {'T':>6} {'fwd head-tok/s':>16}" + "".join(f" {'fwd+bwd ' + m:>20}" for m in modes))
    for d in (int(x) for x in ARGS.dims.split(",")):
        for T in (int(x) for x in ARGS.lengths.split(",")):
            args = [jnp.asarray(a, jnp.float32) for a in inputs(ARGS.bh, T, d)]
            dout = jnp.asarray(np.random.default_rng(1).standard_normal((ARGS.bh, T, d)), jnp.float32)
            fwd_one = lambda q, k, v, b, g, l: gated_mesa_cg(q, k, v, b, g, l, ARGS.chunk, ARGS.steps)  # noqa: E731
            tf = median_time(jax.jit(jax.vmap(fwd_one)), args, ARGS.repeats)
            rates = []
            for mode in modes:
                def loss(q, k, v, b, g, l, dout, imp=(mode == "implicit")):
                    one = lambda *a: gated_mesa_cg(*a, ARGS.chunk, ARGS.steps, imp)  # noqa: E731
                    return jnp.sum(jax.vmap(one)(q, k, v, b, g, l) * dout)
                fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
                rates.append(ARGS.bh * T / median_time(fwd_bwd, args + [dout], ARGS.repeats))
            print(f"{d:>4} {T:>6} {ARGS.bh * T / tf:>16.4g}" + "".join(f" {r:>20.4g}" for r in rates), flush=True)


if __name__ == "__main__":
    main()
