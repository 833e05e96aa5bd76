"""The thread setting shared by the peer scripts in this folder.

XLA reads XLA_FLAGS once, when jax is first imported, so a script calls
pin_threads(args.threads) before `import jax`. --threads 1 pins XLA's CPU
backend (its Eigen thread pool and intra-op parallelism) and OpenMP to one
thread, for one-core comparisons with mesaopt's --threads 1; any other value
leaves XLA at its default (all cores), it does not set a count.
"""
import os


def pin_threads(threads):
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
