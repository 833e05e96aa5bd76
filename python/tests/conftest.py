import importlib
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # reference.py


def required(frontend):
    """Whether MESAOPT_REQUIRE_FRONTENDS (comma-separated, e.g. "torch,jax") names
    this optional front end: CI sets it, so that a missing torch or jax fails the
    run instead of skipping its tests."""
    return frontend in os.environ.get("MESAOPT_REQUIRE_FRONTENDS", "").split(",")


def import_or_skip(module):
    """pytest.importorskip, except for a required front end, whose ImportError fails."""
    if required(module):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def make_inputs(rng, B, H, T, d, dv, dtype=np.float64, key_scale=1.0):
    """Random q, k, v; keys scaled to norm about key_scale (keeps the mesa ridge well conditioned)."""
    q = rng.standard_normal((B, H, T, d))
    k = rng.standard_normal((B, H, T, d))
    k *= key_scale / np.sqrt(d)
    v = rng.standard_normal((B, H, T, dv))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)
