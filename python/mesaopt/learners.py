"""The paper's reference in-context learners (docs/learners.md), as NumPy functions.

Each takes the context of a batch of sequences, x (B, T, dx) and y (B, T, dy),
and returns the prediction of y_t at every position t from the pairs
(x_i, y_i), i < t (or i < t - lag) and the query x_t: (B, T, dy) float64.
On the paper's task, x = batch.inputs and y = batch.targets (mesaopt.tasks):

    b = mesaopt.tasks.dynamics_batch(2000, seed=12345)
    pred = mesaopt.learners.chebyshev(b.inputs, b.targets)      # the paper's chebyshev-6
    curve = mesaopt.learners.loss_curve(pred, b.targets)         # Fig. 4's y-axis, per position

They run the C++ learners (include/mesaopt/learners/) in double on ``threads``
threads (over sequences) with the GIL released; results do not depend on the
thread count.
"""

import numbers

import numpy as np

from . import _core

__all__ = ["ridge", "least_squares", "gradient_descent", "chebyshev", "chebyshev_paper_coefficients", "loss_curve"]


def _check_positive_int(where, name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{where}: {name} must be an int >= 1, got {value!r}")
    return int(value)


def _check_nonnegative_int(where, name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{where}: {name} must be an int >= 0, got {value!r}")
    return int(value)


def _check_number(where, name, value, positive=False, nonnegative=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{where}: {name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{where}: {name} must be >= 0, got {value}")
    return float(value)


def _context_array(where, name, a):
    """a as a C-contiguous float64 array of shape (B, T, d) with B, T, d >= 1 and finite entries."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{where}: {name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ValueError(f"{where}: {name} must have shape (B, T, d) with every size >= 1, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: {name} has non-finite entries")
    return arr


def _context(where, x, y):
    x = _context_array(where, "x", x)
    y = _context_array(where, "y", y)
    if x.shape[:2] != y.shape[:2]:
        raise ValueError(f"{where}: x has shape {x.shape} and y {y.shape}; they must agree in (B, T)")
    return x, y


def _run(where, fn, x, y, threads, *args):
    from . import _check_threads  # late: the package imports this module

    x, y = _context(where, x, y)
    B, T, dx = x.shape
    dy = y.shape[2]
    pred = fn(x.reshape(B * T, dx), y.reshape(B * T, dy), T, *args, _check_threads(where, threads))
    return pred.reshape(B, T, dy)


def ridge(x, y, regularizer=1e-3, *, lag=0, threads=None):
    """Ridge regression solved exactly at every position: y_hat_t = G_t (H_t + regularizer I)^{-1} x_t.

    H_t, G_t sum x_i x_i^T and y_i x_i^T over the pairs i < t - lag. The paper's
    "lsq-exact-lagged" row: regularizer 1e-3, lag 1.
    """
    where = "ridge"
    regularizer = _check_number(where, "regularizer", regularizer, positive=True)
    lag = _check_nonnegative_int(where, "lag", lag)
    return _run(where, _core.ridge_predict, x, y, threads, regularizer, lag)


def least_squares(x, y, *, threads=None):
    """Minimum-norm least squares on the pairs i < t (no regulariser; it interpolates the noise at t = dx + 1)."""
    return _run("least_squares", _core.least_squares_predict, x, y, threads)


def gradient_descent(x, y, eta=0.032, *, steps=1, regularizer=0.0, frobenius_scaled=False, threads=None):
    """steps steps of W <- W - eta grad L_t(W) from W = 0 on the pairs i < t; prediction W x_t.

    One step is one linear-attention layer: y_hat_t = eta sum_{i<t} y_i (x_i . x_t). The paper's
    "gd" row: eta = 0.032, one step. frobenius_scaled uses eta / ||A_t||_F as the step.
    """
    where = "gradient_descent"
    eta = _check_number(where, "eta", eta)
    steps = _check_positive_int(where, "steps", steps)
    regularizer = _check_number(where, "regularizer", regularizer, nonnegative=True)
    return _run(where, _core.gd_predict, x, y, threads, eta, steps, regularizer, bool(frobenius_scaled))


def chebyshev_paper_coefficients():
    """The paper's learned 6-step coefficients (alpha, beta), as lists (docs/paper.md §5)."""
    alpha, beta = _core.chebyshev_paper_coefficients()
    return list(alpha), list(beta)


def chebyshev(x, y, alpha=None, beta=None, *, regularizer=1e-3, lag=1, matrix_form=False, threads=None):
    """The paper's Chebyshev baseline: a matrix polynomial X_K(A / ||A||_F) applied to x_t (docs/learners.md).

    A = sum_i x_i x_i^T + regularizer I over the pairs i < t - lag, P_k = P_{k-1}(I - alpha_k Abar),
    X_k = X_{k-1} + P_k + beta_k (X_{k-1} - X_{k-2}) from X_{-1} = X_0 = P_0 = I; prediction
    G X_K x_t / ||A||_F. alpha = beta = None: the paper's learned 6 steps ("chebyshev-6").
    matrix_form=True builds X_K as the paper's code does (O(K dx^3)); the default applies it
    with vectors (O(K dx^2)); the two agree to rounding.
    """
    where = "chebyshev"
    if (alpha is None) != (beta is None):
        raise ValueError(f"{where}: give both alpha and beta, or neither (the paper's coefficients)")
    if alpha is None:
        alpha, beta = chebyshev_paper_coefficients()
    alpha = [_check_number(where, f"alpha[{i}]", a) for i, a in enumerate(np.atleast_1d(np.asarray(alpha, float)))]
    beta = [_check_number(where, f"beta[{i}]", b) for i, b in enumerate(np.atleast_1d(np.asarray(beta, float)))]
    if len(alpha) < 1 or len(alpha) != len(beta):
        raise ValueError(f"{where}: alpha and beta must have the same length >= 1, got {len(alpha)} and {len(beta)}")
    regularizer = _check_number(where, "regularizer", regularizer, nonnegative=True)
    lag = _check_nonnegative_int(where, "lag", lag)
    return _run(where, _core.chebyshev_predict, x, y, threads, alpha, beta, regularizer, lag, bool(matrix_form))


def loss_curve(pred, targets):
    """Per-position loss: sum over entries of (target - pred)^2 / 2, mean over sequences; shape (T,).

    The paper's Fig. 4 y-axis; its "avg" is the mean of this curve.
    """
    p = _context_array("loss_curve", "pred", pred)
    t = _context_array("loss_curve", "targets", targets)
    if p.shape != t.shape:
        raise ValueError(f"loss_curve: pred has shape {p.shape}, targets {t.shape}; they must be equal")
    B, T, d = t.shape
    return np.asarray(_core.loss_curve(p.reshape(B * T, d), t.reshape(B * T, d), T))
