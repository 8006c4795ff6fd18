"""Non-finite logits are never hidden, in both packages (``backend`` fixture).

A row (the last axis) holding a NaN or an infinite logit gives NaN for every
weight of that row: never zeros (a skip that silently disappears), never an
exception from deep inside. Rows without one are projected as if alone, and
keep their gradients; no NaN leaks into the gradient.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import cotangents, logits

BAD_VALUES = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}

#: (public name, keyword arguments) of every projection of a logit vector.
PROJECTIONS = [
    ("project_softmax", dict(temperature=0.7)),
    ("project_simplex", dict(temperature=0.7)),
    ("project_identity_preserving", dict(epsilon=0.2, temperature=0.7, base="simplex")),
    ("project_identity_preserving", dict(epsilon=0.2, temperature=0.7, base="softmax")),
]
PROJECTION_IDS = ["softmax", "simplex", "identity[simplex]", "identity[softmax]"]


def _projection(backend, name, kwargs):
    return lambda m: getattr(backend.lib, name)(m, **kwargs)


def _rows() -> np.ndarray:
    # Rows 0 and 1 get a bad value (row 1 in the latest slot, the one the
    # identity floor lifts); row 2 stays finite.
    return np.array([[0.5, -1.0, 2.0, 0.0], [0.5, -1.0, 2.0, 0.0], [0.3, 0.1, -0.2, 0.7]], np.float32)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bad", BAD_VALUES.values(), ids=BAD_VALUES.keys())
@pytest.mark.parametrize("name, kwargs", PROJECTIONS, ids=PROJECTION_IDS)
def test_a_non_finite_logit_gives_nan_across_its_row(backend, name, kwargs, bad, jit):
    mu = _rows()
    mu[0, 1] = bad
    mu[1, 3] = bad
    fn = _projection(backend, name, kwargs)
    fn = backend.jit(fn) if jit else fn  # XLA must not fold the NaN away
    out = backend.numpy(fn(backend.array(mu)))
    assert out.shape == mu.shape
    assert np.isnan(out[:2]).all(), f"a row with {bad} gave {out[:2]}"
    # The finite row is what it would be alone.
    np.testing.assert_allclose(out[2], backend.numpy(fn(backend.array(mu[2]))), atol=1e-7)
    assert np.isfinite(out[2]).all()


@pytest.mark.parametrize("name, kwargs", PROJECTIONS, ids=PROJECTION_IDS)
@given(mu=logits(max_abs=100.0), seed=st.integers(0, 2**16))
def test_nan_rows_are_exactly_the_rows_holding_a_non_finite_logit(backend, name, kwargs, mu, seed):
    rng = np.random.default_rng(seed)
    where_bad = rng.uniform(size=mu.shape) < 0.2
    mu = np.where(where_bad, rng.choice(list(BAD_VALUES.values()), size=mu.shape), mu).astype(np.float32)
    bad_rows = where_bad.any(-1)
    fn = _projection(backend, name, kwargs)
    out = backend.numpy(fn(backend.array(mu)))
    np.testing.assert_array_equal(np.isnan(out), np.broadcast_to(bad_rows[..., None], out.shape))
    # Every other row is its own projection: the bad rows change nothing else.
    clean = np.where(bad_rows[..., None], np.float32(0), mu)
    expected = backend.numpy(fn(backend.array(clean)))
    np.testing.assert_allclose(out[~bad_rows], expected[~bad_rows], atol=1e-7)


@pytest.mark.parametrize("bad", BAD_VALUES.values(), ids=BAD_VALUES.keys())
@pytest.mark.parametrize("name, kwargs", PROJECTIONS, ids=PROJECTION_IDS)
def test_finite_rows_keep_their_gradient_beside_a_non_finite_row(backend, name, kwargs, bad):
    mu = _rows()
    mu[0, 1] = bad
    g = cotangents(mu.shape, 0)
    fn = _projection(backend, name, kwargs)
    out, (grad,) = backend.vjp(fn, [mu], g)
    _, (alone,) = backend.vjp(fn, [mu[1:]], g[1:])
    assert np.isnan(out[0]).all()
    # No NaN leaks from the non-finite row into any gradient, its own included
    # (it gets 0: the NaN reaches the loss through the weights).
    assert np.isfinite(grad).all(), f"NaN leaked into the gradient: {grad}"
    np.testing.assert_array_equal(grad[0], np.zeros(4))
    np.testing.assert_allclose(grad[1:], alone, atol=1e-6)


@pytest.mark.parametrize("name, kwargs", PROJECTIONS, ids=PROJECTION_IDS)
def test_an_infinite_scaled_logit_counts_as_non_finite(backend, name, kwargs):
    # Finite float32 logits whose scaled value overflows float32 (3e38 / 0.7).
    mu = np.array([[3e38, 0.0, 1.0], [0.0, 0.5, 1.0]], np.float32)
    out = backend.numpy(_projection(backend, name, kwargs)(backend.array(mu)))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


@pytest.mark.parametrize("name, kwargs", PROJECTIONS, ids=PROJECTION_IDS)
def test_finite_logits_make_no_nan_anywhere_in_jax(name, kwargs):
    # The NaN of a non-finite row comes from its input, never from a NaN
    # constant, so jax_debug_nans (which checks every eager operation) stays
    # quiet for finite logits, in the forward and the backward pass.
    import jax
    import jax.numpy as jnp

    import mhc_jax

    fn = getattr(mhc_jax, name)
    mu = jnp.asarray(_rows())
    g = jnp.asarray(cotangents(mu.shape, 0))
    with jax.debug_nans(True):
        fn(mu, **kwargs)
        jax.grad(lambda m: jnp.sum(fn(m, **kwargs) * g))(mu)
