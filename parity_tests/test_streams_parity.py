"""mhc_jax and mhc_torch agree on the residual streams (SPEC.md "Residual streams").

Tolerances as SPEC.md: the Sinkhorn and the coefficients like projections
(absolute), one ``HyperConnection`` like one skip, a whole ``StreamSequential``
like a stack (relative to ``max(1, |value|)``). Gradients are taken of
``sum(out * g)`` for a random cotangent ``g``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, reject
from hypothesis import strategies as st

from parity_tests.parity import assert_parity
from tests.strategies import cotangents, temperatures


@st.composite
def square_logits(draw):
    # A few shapes (JAX compiles per shape), n up to 8 streams.
    n = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    batch = draw(st.sampled_from([(), (5,)]))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 1e3]))
    seed = draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).uniform(-scale, scale, (*batch, n, n)).astype(np.float32)


def _sinkhorn64(z: np.ndarray, iterations: int) -> np.ndarray:
    """Sinkhorn in float64 numpy, as SPEC.md writes it (columns, then rows)."""
    log_p = z.astype(np.float64)
    for _ in range(iterations):
        for axis in (-2, -1):
            top = log_p.max(axis=axis, keepdims=True)
            log_p = log_p - (top + np.log(np.exp(log_p - top).sum(axis=axis, keepdims=True)))
    return np.exp(log_p)


#: Largest change of the Sinkhorn output under a one-ulp (2^-24 relative)
#: perturbation of its float32 input at which the two packages are compared.
SINKHORN_ULP_SENSITIVITY = 1e-7


def reject_ill_conditioned_sinkhorn(z: np.ndarray, iterations: int) -> None:
    """Reject when float32 rounding of the input alone moves the result by a tenth of the tolerance.

    Near-tied, nearly permutation-like matrices converge slowly; each sweep
    then passes its rounding error on almost undamped, and two float32
    implementations (``exp`` and ``log`` a few ulp apart) drift apart by more
    than 1e-6 after 20 sweeps. There a comparison measures the problem's
    conditioning, not the packages. The perturbation test finds those inputs
    without reading either package.
    """
    rng = np.random.default_rng(0)
    base = _sinkhorn64(z, iterations)
    for _ in range(3):
        nudged = z.astype(np.float64) * (1 + 2.0**-24 * rng.choice([-1.0, 1.0], z.shape))
        if np.abs(_sinkhorn64(nudged, iterations) - base).max() > SINKHORN_ULP_SENSITIVITY:
            reject()


@given(m=square_logits(), tau=temperatures(0.1, 10.0), iterations=st.sampled_from([1, 7, 20]), seed=st.integers(0, 2**16))
def test_sinkhorn_and_its_gradient_agree(jx, pt, device, m, tau, iterations, seed):
    g = cotangents(m.shape, seed)

    def fn(lib):
        return lambda x: lib.project_doubly_stochastic(x, iterations, tau)

    a, (ga,) = jx.vjp(fn(jx.lib), [m], g)
    b, (gb,) = pt.vjp(fn(pt.lib), [m], g)
    z = m.astype(np.float32) / np.float32(tau)
    # Either package far from the float64 answer is a bug whatever the conditioning.
    truth = _sinkhorn64(z, iterations)
    for name, value in (("jax", a), ("torch", b)):
        assert np.abs(value - truth).max() < 1e-3, f"{name} Sinkhorn is far from the float64 answer"
    reject_ill_conditioned_sinkhorn(z, iterations)
    assert_parity(a, b, kind="projection", device=device, what="sinkhorn")
    # The chain rule's exact 1/tau factor is taken out (as in test_projections_parity).
    assert_parity(tau * ga, tau * gb, kind="projection", device=device, what="sinkhorn grad (x tau)")
