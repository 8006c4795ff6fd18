"""mhc_jax and mhc_torch give the same projections and the same gradients.

Gradients are taken of ``sum(P(mu) * g)`` for a random cotangent ``g``.
Gradients with respect to the logits are compared after multiplying by the
temperature: the chain rule puts an exact factor ``1/tau`` in front of them
(up to 1e3 at ``tau = 1e-3``), and the tolerance is meant for the computation,
not for that amplification.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parity_tests.discontinuities import GUMBEL_MIN_WEIGHT, same_side_or_reject
from parity_tests.parity import assert_parity
from tests.strategies import cotangents, epsilons, logits, temperatures


def _both(jx, pt, fn, args, g):
    """Run ``fn(lib)(*args)`` in both packages; outputs and gradients."""
    return jx.vjp(fn(jx.lib), args, g), pt.vjp(fn(pt.lib), args, g)


@pytest.mark.parametrize("name", ["project_softmax", "project_simplex"])
@given(mu=logits(), tau=temperatures(), seed=st.integers(0, 2**16))
def test_base_projections_agree(jx, pt, device, name, mu, tau, seed):
    g = cotangents(mu.shape, seed)
    (a, (ga,)), (b, (gb,)) = _both(jx, pt, lambda lib: lambda m: getattr(lib, name)(m, tau), [mu], g)
    assert_parity(a, b, kind="projection", device=device, what=name)
    if name == "project_simplex":
        same_side_or_reject(a, b, 0.0, what="simplex support")
    assert_parity(tau * ga, tau * gb, kind="projection", device=device, what=f"{name} grad (x tau)")


@pytest.mark.parametrize("base", ["simplex", "softmax"])
@given(mu=logits(), tau=temperatures(), eps=epsilons(), seed=st.integers(0, 2**16))
def test_identity_preserving_agrees(jx, pt, device, base, mu, tau, eps, seed):
    g = cotangents(mu.shape, seed)

    def fn(lib):
        return lambda m: lib.project_identity_preserving(m, eps, tau, base)

    (a, (ga,)), (b, (gb,)) = _both(jx, pt, fn, [mu], g)
    what = f"identity_preserving[{base}]"
    assert_parity(a, b, kind="projection", device=device, what=what)
    if base == "simplex":
        # The base weights are (1 - eps) * base + 0 except the floored last one.
        floor = eps * (np.arange(a.shape[-1]) == a.shape[-1] - 1)
        same_side_or_reject(a - floor, b - floor, 0.0, what="simplex support")
    assert_parity(tau * ga, tau * gb, kind="projection", device=device, what=f"{what} grad (x tau)")


@st.composite
def square_logits(draw):
    n = draw(st.integers(1, 6))
    batch = draw(st.sampled_from([(), (2,)]))
    scale = draw(st.sampled_from([1.0, 10.0, 1e4]))
    seed = draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).uniform(-scale, scale, (*batch, n, n)).astype(np.float32)


@given(m=square_logits(), tau=temperatures(), iterations=st.sampled_from([1, 5, 20]), seed=st.integers(0, 2**16))
def test_doubly_stochastic_agrees(jx, pt, device, m, tau, iterations, seed):
    g = cotangents(m.shape, seed)

    def fn(lib):
        return lambda x: lib.project_doubly_stochastic(x, iterations, tau)

    (a, (ga,)), (b, (gb,)) = _both(jx, pt, fn, [m], g)
    assert_parity(a, b, kind="projection", device=device, what="doubly_stochastic")
    assert_parity(tau * ga, tau * gb, kind="projection", device=device, what="doubly_stochastic grad (x tau)")


@st.composite
def window_weights_arrays(draw):
    """Weights on the simplex with some exact zeros (pruned or outside the window)."""
    h = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    alpha = rng.dirichlet(np.ones(h)) * (rng.uniform(size=h) < 0.7)
    alpha = np.where(alpha < GUMBEL_MIN_WEIGHT, 0.0, alpha)  # no ill-conditioned weights
    return alpha.astype(np.float32), rng.gumbel(size=h).astype(np.float32)


@given(weights=window_weights_arrays(), tau=temperatures(0.1, 10.0), seed=st.integers(0, 2**16))
def test_gumbel_perturbation_agrees(jx, pt, device, weights, tau, seed):
    alpha, noise = weights
    g = cotangents(alpha.shape, seed)

    def fn(lib):
        return lambda a: lib.perturb_weights(a, noise if lib is jx.lib else pt.array(noise), tau)

    (a, (ga,)), (b, (gb,)) = _both(jx, pt, fn, [alpha], g)
    assert_parity(a, b, kind="projection", device=device, what="perturb_weights")
    np.testing.assert_array_equal(a == 0, alpha == 0)  # zeros stay zeros
    # d/dalpha carries 1/(tau alpha); compare relative to that scale.
    scale = tau * np.where(alpha > 0, alpha, 1.0)
    assert_parity(scale * ga, scale * gb, kind="projection", device=device, what="perturb_weights grad (x tau alpha)")


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("project_softmax", {}),
        ("project_simplex", {}),
        ("project_identity_preserving", dict(base="simplex")),
        ("project_identity_preserving", dict(base="softmax")),
    ],
    ids=["softmax", "simplex", "identity[simplex]", "identity[softmax]"],
)
@given(mu=logits(), tau=temperatures(), eps=epsilons(), seed=st.integers(0, 2**16))
def test_non_finite_logits_agree(jx, pt, device, name, kwargs, mu, tau, eps, seed):
    # NaN and +-inf logits scattered over some rows: both packages give NaN
    # across exactly those rows, the same weights elsewhere, and the same
    # (finite) gradients everywhere.
    rng = np.random.default_rng(seed)
    where_bad = rng.uniform(size=mu.shape) < 0.2
    mu = np.where(where_bad, rng.choice([np.nan, np.inf, -np.inf], size=mu.shape), mu).astype(np.float32)
    if name == "project_identity_preserving":
        kwargs = dict(kwargs, epsilon=eps)
    g = cotangents(mu.shape, seed)
    (a, (ga,)), (b, (gb,)) = _both(jx, pt, lambda lib: lambda m: getattr(lib, name)(m, temperature=tau, **kwargs), [mu], g)
    bad_rows = np.broadcast_to(where_bad.any(-1)[..., None], mu.shape)
    np.testing.assert_array_equal(np.isnan(a), bad_rows, err_msg=f"{name}: jax NaN pattern")
    np.testing.assert_array_equal(np.isnan(b), bad_rows, err_msg=f"{name}: torch NaN pattern")
    assert_parity(a[~bad_rows], b[~bad_rows], kind="projection", device=device, what=f"{name} beside non-finite rows")
    assert_parity(tau * ga, tau * gb, kind="projection", device=device, what=f"{name} grad beside non-finite rows (x tau)")
