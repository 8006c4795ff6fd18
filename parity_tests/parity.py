"""Tolerances (docs/parity.md) and the comparison every parity test uses."""

from __future__ import annotations

import numpy as np

#: float32 tolerances by what is compared and where.
TOLERANCES = {
    ("projection", "cpu"): 1e-6,  # absolute
    ("projection", "gpu"): 1e-5,
    ("skip", "cpu"): 1e-6,  # relative to max(1, |value|)
    ("skip", "gpu"): 1e-5,
    ("stack", "cpu"): 1e-5,  # relative to max(1, |value|)
    ("stack", "gpu"): 1e-4,
    # Stacks of layers each framework computes with its own kernels (tanh, erf
    # GELU, LayerNorm), a few ulp apart even alone: not this library's arithmetic.
    ("kernel", "cpu"): 1e-4,
    ("kernel", "gpu"): 1e-3,
}

#: The worst normalised difference seen per (kind, device, what), for the run's summary.
WORST: dict[tuple[str, str, str], float] = {}


def assert_parity(jax_value, torch_value, *, kind: str, device: str, what: str) -> None:
    """Assert the two packages agree within the tolerance of docs/parity.md for ``kind``.

    Projections are compared absolutely (their values lie in [0, 1] or are
    gradients of order 1); skips and stacks relative to ``max(1, |value|)``.
    """
    a = np.asarray(jax_value, np.float64)
    b = np.asarray(torch_value, np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} (jax) != {b.shape} (torch)"
    assert np.isfinite(a).all() and np.isfinite(b).all(), f"{what}: non-finite values"
    tol = TOLERANCES[kind, device]
    scale = 1.0 if kind == "projection" else np.maximum(1.0, np.maximum(np.abs(a), np.abs(b)))
    err = np.abs(a - b) / scale
    worst = float(err.max()) if err.size else 0.0
    key = (kind, device, what)
    WORST[key] = max(WORST.get(key, 0.0), worst)
    if worst > tol:
        i = np.unravel_index(np.argmax(err), err.shape)
        raise AssertionError(
            f"{what}: jax and torch differ by {worst:.3g} > {tol:g} ({kind} tolerance on "
            f"{device}) at index {i}: jax {a[i]!r}, torch {b[i]!r}"
        )
