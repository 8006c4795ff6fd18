"""mhc_jax and mhc_torch agree on the residual streams (SPEC.md "Residual streams").

Tolerances as SPEC.md: the Sinkhorn and the coefficients like projections
(absolute), one ``HyperConnection`` like one skip, a whole ``StreamSequential``
like a stack (relative to ``max(1, |value|)``). Gradients are taken of
``sum(out * g)`` for a random cotangent ``g``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
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


@given(m=square_logits(), tau=temperatures(0.1, 10.0), iterations=st.sampled_from([1, 7, 20]), seed=st.integers(0, 2**16))
def test_sinkhorn_and_its_gradient_agree(jx, pt, device, m, tau, iterations, seed):
    g = cotangents(m.shape, seed)

    def fn(lib):
        return lambda x: lib.project_doubly_stochastic(x, iterations, tau)

    a, (ga,) = jx.vjp(fn(jx.lib), [m], g)
    b, (gb,) = pt.vjp(fn(pt.lib), [m], g)
    assert_parity(a, b, kind="projection", device=device, what="sinkhorn")
    # The chain rule's exact 1/tau factor is taken out (as in test_projections_parity).
    assert_parity(tau * ga, tau * gb, kind="projection", device=device, what="sinkhorn grad (x tau)")
