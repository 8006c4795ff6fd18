"""Hypothesis strategies shared by the unit and parity tests.

Shapes come from a small fixed set so that JAX compiles each operation a few
times, not once per example.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

BATCH_SHAPES = [(), (3,), (2, 3)]
#: The documented stability range (docs/mathematics.md): |logits| <= 1e4, 1e-3 <= temperature <= 1e3.
MAX_LOGIT = 1e4
TEMPERATURES = (1e-3, 1e3)


def temperatures(low: float = TEMPERATURES[0], high: float = TEMPERATURES[1]):
    """Temperatures across the range, with the documented sweet spot and the ends."""
    named = [t for t in (1e-3, 0.5, 1.0, 2.0, 1e3) if low <= t <= high]
    return st.one_of(st.sampled_from(named), st.floats(low, high))


def epsilons():
    return st.one_of(st.sampled_from([0.0, 0.1, 0.5]), st.floats(0.0, 0.999))


@st.composite
def logits(draw, *, max_abs: float = MAX_LOGIT, min_k: int = 1, max_k: int = 8, batch=True, ks=None):
    """float32 logits of shape ``batch + (K,)``, values in ``[-max_abs, max_abs]``.

    ``ks`` restricts K to a few sizes, for tests that compile per shape.
    Hypothesis likes repeated and round values, so ties (and exact support
    boundaries for the simplex) come up often.
    """
    k = draw(st.sampled_from(ks) if ks else st.integers(min_k, max_k))
    shape = draw(st.sampled_from(BATCH_SHAPES)) if batch else ()
    scale = draw(st.sampled_from([1.0, 10.0, max_abs]))
    scale = min(scale, max_abs)
    elements = st.floats(-scale, scale, width=32, allow_subnormal=False)
    return draw(hnp.arrays(np.float32, (*shape, k), elements=elements))


def cotangents(shape, seed: int) -> np.ndarray:
    """A fixed-seed cotangent in [-1, 1] for checking gradients."""
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)
