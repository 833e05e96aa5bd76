"""The paper's task: linear dynamical systems (docs/paper.md §1), as NumPy arrays.

    batch = mesaopt.tasks.dynamics_batch(256, seed=1)
    batch.inputs    # (256, 50, 10): s_1 .. s_T of each sequence
    batch.targets   # (256, 50, 10): s_2 .. s_{T+1}
    batch.W         # (256, 10, 10): each sequence's true W*

    part = mesaopt.tasks.dynamics_batch(256, seed=1, state_dim=20, observed_dim=5)
    part.inputs         # (256, 50, 5): the observed coordinates of s_t (the paper's n_s = 5 of n = 20)
    part.hidden_inputs  # (256, 50, 15): the hidden ones, kept for the noise floor

The C++ generator (include/mesaopt/tasks/linear_dynamics.hpp) draws sequence b
from (seed, first_sequence + b) alone, so batches are reproducible, the same
for any thread count, and equal to what the C++ examples train and test on.
Arrays are float64.
"""

import collections
import numbers

import numpy as np

from . import _core
from .learners import _context_array, _check_positive_int

__all__ = ["DynamicsBatch", "dynamics_batch", "constructed_tokens", "true_dynamics_prediction"]

DynamicsBatch = collections.namedtuple("DynamicsBatch", ["inputs", "targets", "W", "transition", "hidden_inputs"],
                                       defaults=[None])
DynamicsBatch.__doc__ = """A batch of sequences: inputs and targets (B, T, n_s), W (B, n, n), transition "linear" or
"tanh", hidden_inputs (B, T, n - n_s): the unobserved coordinates of s_t (no columns when all n are observed;
None in a batch built by hand with four fields)."""


def _real(where, name, value, low=None, low_open=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{where}: {name} must be {'>' if low_open else '>='} {low}, got {value}")
    return float(value)


def dynamics_batch(batch, seed, *, first_sequence=0, state_dim=10, seq_len=50, noise_std=0.01,
                   matrix="orthogonal", spectral_radius=0.95, init="uniform", init_scale=1.0, clip=10.0,
                   transition="linear", observed_dim=None, threads=None):
    """Sequences first_sequence .. first_sequence + batch - 1 of the stream keyed by seed.

    s_{t+1} = W* s_t + eps (transition="tanh": tanh(W* s_t) + eps), eps ~ N(0, noise_std^2 I),
    W* Haar-orthogonal (matrix="orthogonal", the paper's) or Gaussian rescaled to spectral_radius
    (matrix="gaussian"); s_1 ~ U[-init_scale, init_scale]^n (init="uniform", the paper's code) or
    N(0, init_scale^2 I) (init="normal"); states clipped to [-clip, clip]. Defaults: the paper's
    n = 10, T = 50, noise 0.01. observed_dim = n_s (None: all n): the paper's partially observed
    variant; inputs and targets hold the first n_s coordinates and hidden_inputs the other n - n_s.
    Returns a DynamicsBatch of float64 arrays.
    """
    where = "dynamics_batch"
    from . import _check_threads  # late: the package imports this module

    batch = _check_positive_int(where, "batch", batch)
    state_dim = _check_positive_int(where, "state_dim", state_dim)
    seq_len = _check_positive_int(where, "seq_len", seq_len)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"{where}: seed must be an int in [0, 2**64), got {seed!r}")
    if isinstance(first_sequence, (bool, np.bool_)) or not isinstance(first_sequence, numbers.Integral) \
            or first_sequence < 0:
        raise ValueError(f"{where}: first_sequence must be an int >= 0, got {first_sequence!r}")
    if observed_dim is None:
        observed_dim = state_dim
    observed_dim = _check_positive_int(where, "observed_dim", observed_dim)
    if observed_dim > state_dim:
        raise ValueError(f"{where}: observed_dim must be <= state_dim = {state_dim}, got {observed_dim}")
    noise_std = _real(where, "noise_std", noise_std, 0.0)
    spectral_radius = _real(where, "spectral_radius", spectral_radius, 0.0, low_open=True)
    init_scale = _real(where, "init_scale", init_scale, 0.0)
    clip = _real(where, "clip", clip, 0.0, low_open=True)
    for name, value in (("matrix", matrix), ("init", init), ("transition", transition)):
        if not isinstance(value, str):
            raise ValueError(f"{where}: {name} must be a string, got {value!r}")
    inputs, targets, W, hidden = _core.dynamics_batch(batch, int(seed), int(first_sequence), state_dim, seq_len,
                                                      noise_std, matrix, spectral_radius, init, init_scale, clip,
                                                      transition, observed_dim, _check_threads(where, threads))
    return DynamicsBatch(inputs.reshape(batch, seq_len, observed_dim), targets.reshape(batch, seq_len, observed_dim),
                         W.reshape(batch, state_dim, state_dim), transition,
                         hidden.reshape(batch, seq_len, state_dim - observed_dim))


def constructed_tokens(inputs, slots="both"):
    """The paper's constructed tokens e_t = [0, s_t, s_t, s_{t-1}] (s_0 = 0) of inputs (B, T, n): (B, T, 4n).

    slots="last_only" gives [0, 0, s_t, s_{t-1}], what the paper's code lets a 1-layer model see.
    """
    x = _context_array("constructed_tokens", "inputs", inputs)
    B, T, n = x.shape
    if slots not in ("both", "last_only"):
        raise ValueError(f"constructed_tokens: slots must be 'both' or 'last_only', got {slots!r}")
    return _core.constructed_tokens(x.reshape(B * T, n), T, slots).reshape(B, T, 4 * n)


def true_dynamics_prediction(batch):
    """The best predictor (the "noise floor" row): W* s_t, or tanh(W* s_t) for transition="tanh"; (B, T, n_s).

    Partially observed: an oracle that knows the whole state [inputs, hidden_inputs] and returns the observed
    part of its prediction, as the C++ tasks::predict_with_true_dynamics does.
    """
    if not isinstance(batch, DynamicsBatch):
        raise TypeError(f"true_dynamics_prediction: batch must be a DynamicsBatch, got {type(batch).__name__}")
    state = batch.inputs
    if batch.hidden_inputs is not None and batch.hidden_inputs.shape[-1] > 0:
        state = np.concatenate([batch.inputs, batch.hidden_inputs], axis=-1)
    pred = np.einsum("bij,btj->bti", batch.W, state)[..., :batch.inputs.shape[-1]]
    return np.tanh(pred) if batch.transition == "tanh" else pred
