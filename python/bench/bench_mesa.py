"""Throughput of mesaopt.mesa_forward and forward + backward from Python, in the
units of the C++ benchmark benchmarks/bench_mesa.cpp (docs/mesa.md,
"Performance"): float32, B*H = 8 sequences per call, unit-norm q and k,
lambda = 1, gamma = 1, threads = 1, head-tokens per second (8 T per call) and
GFLOP/s by the same flop counts (forward 6d^2 + 4d dv, forward + backward
20d^2 + 16d dv per token).

    python python/bench/bench_mesa.py [--threads N] [--min-time S] [--repeats R]
    python python/bench/bench_mesa.py --frontends numpy,torch,jax-ffi,jax-callback

The second form times the op through each front end (NumPy, mesaopt.torch,
mesaopt.jax with the XLA FFI handlers or pure_callback) on the same problem.

"fwd+bwd (cache)" is mesa_forward(..., return_cache=True) then
mesa_backward(..., cache=cache), the C++ benchmark's BM_mesa_fwdbwd;
"fwd+bwd (recompute)" passes no cache, so the backward recomputes the forward
(its GFLOP/s credits only the 20d^2 + 16d dv of one forward + backward).
Each number is the median over `repeats` timings of at least `min-time`
seconds each. With --threads 1 (the default) all work runs on the calling
thread and the timings are that thread's CPU time (time.thread_time), like the
C++ benchmark's rates (per CPU-second: other load on the machine inflates wall
time, not these); with more threads they are wall time.
"""

import argparse
import time

import numpy as np

import mesaopt


def unit_rows(rng, shape, dtype):
    x = rng.standard_normal(shape)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x.astype(dtype)


def timeit(fn, min_time, repeats, clock):
    fn()  # warm-up (allocations, caches)
    times = []
    for _ in range(repeats):
        n = 0
        t0 = clock()
        while True:
            fn()
            n += 1
            el = clock() - t0
            if el >= min_time:
                break
        times.append(el / n)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--T", type=int, nargs="*", default=[256, 1024])
    ap.add_argument("--d", type=int, nargs="*", default=[32, 64])
    args = ap.parse_args()
    B, H = 1, 8
    rng = np.random.default_rng(0)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    print(f"mesaopt {mesaopt.__version__}, simd {mesaopt.simd}, float32, B*H = {B * H}, threads = {args.threads}, "
          f"{'thread CPU time' if args.threads == 1 else 'wall time'}, median of {args.repeats}")
    print(f"{'T':>6} {'d=dv':>5} | {'fwd head-tok/s':>15} {'GFLOP/s':>8} | {'fwd+bwd (cache)':>16} {'GFLOP/s':>8} |"
          f" {'fwd+bwd (recompute)':>20} {'GFLOP/s':>8}")
    for T in args.T:
        for d in args.d:
            dv = d
            q = unit_rows(rng, (B, H, T, d), np.float32)
            k = unit_rows(rng, (B, H, T, d), np.float32)
            v = rng.standard_normal((B, H, T, dv)).astype(np.float32)
            dout = rng.standard_normal((B, H, T, dv)).astype(np.float32)
            th = args.threads

            def fwd():
                mesaopt.mesa_forward(q, k, v, 1.0, threads=th)

            def fwdbwd_cache():
                _, c = mesaopt.mesa_forward(q, k, v, 1.0, return_cache=True, threads=th)
                mesaopt.mesa_backward(q, k, v, 1.0, dout, cache=c, threads=th)

            def fwdbwd_recompute():
                mesaopt.mesa_forward(q, k, v, 1.0, threads=th)
                mesaopt.mesa_backward(q, k, v, 1.0, dout, threads=th)

            tokens = B * H * T
            f_fwd = 6 * d * d + 4 * d * dv
            f_all = 20 * d * d + 16 * d * dv
            t1 = timeit(fwd, args.min_time, args.repeats, clock)
            t2 = timeit(fwdbwd_cache, args.min_time, args.repeats, clock)
            t3 = timeit(fwdbwd_recompute, args.min_time, args.repeats, clock)
            print(f"{T:>6} {d:>5} | {tokens / t1 / 1e6:>13.3f} M {tokens * f_fwd / t1 / 1e9:>8.1f} |"
                  f" {tokens / t2 / 1e6:>14.3f} M {tokens * f_all / t2 / 1e9:>8.1f} |"
                  f" {tokens / t3 / 1e6:>18.3f} M {tokens * f_all / t3 / 1e9:>8.1f}", flush=True)


def frontends(args):
    """The mesa op from each Python front end (--frontends): forward and forward +
    backward of the same problem, head-tokens per second by process CPU time
    (all threads of the process: XLA runs its work on threads of its own)."""
    import os
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    B, H = 1, 8
    rng = np.random.default_rng(0)
    names = args.frontends.split(",")
    print(f"mesaopt {mesaopt.__version__}, simd {mesaopt.simd}, float32, B*H = {B * H}, threads = {args.threads}, "
          f"process CPU time, median of {args.repeats}; fwd+bwd: forward with the cache, then the backward "
          "(numpy, torch); the JAX backward recomputes the forward")
    print(f"{'T':>6} {'d=dv':>5} {'front end':>14} | {'fwd head-tok/s':>15} | {'fwd+bwd head-tok/s':>19}")
    for T in args.T:
        for d in args.d:
            q = unit_rows(rng, (B, H, T, d), np.float32)
            k = unit_rows(rng, (B, H, T, d), np.float32)
            v = rng.standard_normal((B, H, T, d)).astype(np.float32)
            dout = rng.standard_normal((B, H, T, d)).astype(np.float32)
            th = args.threads
            for name in names:
                if name == "numpy":
                    def fwd():
                        mesaopt.mesa_forward(q, k, v, 1.0, threads=th)

                    def both():
                        _, c = mesaopt.mesa_forward(q, k, v, 1.0, return_cache=True, threads=th)
                        mesaopt.mesa_backward(q, k, v, 1.0, dout, cache=c, threads=th)
                elif name == "torch":
                    import torch
                    import mesaopt.torch as mt
                    torch.set_num_threads(1)
                    tq, tk, tv, tg = (torch.from_numpy(x) for x in (q, k, v, dout))
                    tq.requires_grad_(), tk.requires_grad_(), tv.requires_grad_()

                    def fwd():
                        with torch.no_grad():
                            mt.mesa(tq, tk, tv, 1.0, threads=th)

                    def both():
                        out = mt.mesa(tq, tk, tv, 1.0, threads=th)
                        torch.autograd.grad(out, (tq, tk, tv), tg)
                elif name.startswith("jax-"):
                    import jax
                    import jax.numpy as jnp
                    import mesaopt.jax as mj
                    backend = name[4:]
                    if backend == "ffi" and not mj.HAS_FFI:
                        print(f"{T:>6} {d:>5} {name:>14} | (mesaopt built without jax: no FFI handlers)")
                        continue
                    jq, jk, jv, jg = (jnp.asarray(x) for x in (q, k, v, dout))
                    f = jax.jit(lambda q, k, v: mj.mesa(q, k, v, 1.0, threads=th, backend=backend))
                    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jg * mj.mesa(q, k, v, 1.0, threads=th,
                                                                               backend=backend)), argnums=(0, 1, 2)))

                    def fwd():
                        jax.block_until_ready(f(jq, jk, jv))

                    def both():
                        jax.block_until_ready(g(jq, jk, jv))
                else:
                    raise SystemExit(f"bench_mesa.py: unknown front end {name!r} (numpy, torch, jax-ffi, jax-callback)")
                t1 = timeit(fwd, args.min_time, args.repeats, time.process_time)
                t2 = timeit(both, args.min_time, args.repeats, time.process_time)
                tokens = B * H * T
                print(f"{T:>6} {d:>5} {name:>14} | {tokens / t1 / 1e6:>13.3f} M | {tokens / t2 / 1e6:>17.3f} M",
                      flush=True)


if __name__ == "__main__":
    import sys
    if any(a.startswith("--frontends") for a in sys.argv):
        ap = argparse.ArgumentParser()
        ap.add_argument("--frontends", default="numpy,torch,jax-ffi,jax-callback")
        ap.add_argument("--threads", type=int, default=1)
        ap.add_argument("--min-time", type=float, default=0.3)
        ap.add_argument("--repeats", type=int, default=3)
        ap.add_argument("--T", type=int, nargs="*", default=[256, 1024])
        ap.add_argument("--d", type=int, nargs="*", default=[32, 64])
        frontends(ap.parse_args())
    else:
        main()
