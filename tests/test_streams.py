"""Residual streams (SPEC.md "Residual streams"), checked in both packages (``backend`` fixture).

Every expected value here comes from an implementation written in the test
(numpy, or the framework's autodiff of the loop as the paper writes it), never
from the code under test.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import cotangents, temperatures

# --- expand and reduce ----------------------------------------------------------------


@given(
    shape=st.sampled_from([(5,), (2, 5), (2, 3, 4)]),
    n=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_expand_copies_and_reduce_sums(backend, shape, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    lib = backend.lib
    streams = backend.numpy(lib.expand_streams(backend.array(x), n))
    assert streams.shape == (*shape[:-1], n, shape[-1])
    for j in range(n):
        np.testing.assert_array_equal(streams[..., j, :], x)
    s = rng.normal(size=(*shape[:-1], n, shape[-1])).astype(np.float32)
    np.testing.assert_allclose(backend.numpy(lib.reduce_streams(backend.array(s))), s.sum(-2), rtol=1e-6, atol=1e-6)


@given(n=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_expand_gradient_sums_the_streams(backend, n, seed):
    # expand is a copy, so its pullback adds the cotangents of the n copies.
    x = np.random.default_rng(seed).normal(size=(3, 4)).astype(np.float32)
    g = cotangents((3, n, 4), seed)
    _, (gx,) = backend.vjp(lambda t: backend.lib.expand_streams(t, n), [x], g)
    np.testing.assert_allclose(gx, g.sum(-2), rtol=1e-6, atol=1e-6)


def test_reduce_of_expand_is_n_times_the_input(backend):
    x = np.random.default_rng(0).normal(size=(2, 7)).astype(np.float32)
    lib = backend.lib
    out = backend.numpy(lib.reduce_streams(lib.expand_streams(backend.array(x), 3)))
    np.testing.assert_allclose(out, 3 * x, rtol=1e-6)


@pytest.mark.parametrize("n, error", [(0, ValueError), (-2, ValueError), ("4", TypeError), (True, TypeError), (2.0, TypeError)])
def test_bad_num_streams_is_named(backend, n, error):
    with pytest.raises(error, match=r"num_streams must be an int >= 1, got " + repr(n).replace(".", r"\.")):
        backend.lib.expand_streams(backend.array(np.zeros((2, 3), np.float32)), n)


def test_reduce_needs_a_stream_axis(backend):
    with pytest.raises(ValueError, match=r"reduce_streams needs streams of shape \(\.\.\., n, C\), got shape \(3,\)"):
        backend.lib.reduce_streams(backend.array(np.zeros(3, np.float32)))


# --- Sinkhorn: the custom gradient -------------------------------------------------------


def _float64(backend):
    return jax.enable_x64(True) if backend.name == "jax" else contextlib.nullcontext()


def _unrolled_sinkhorn(backend, iterations, tau):
    """The loop as SPEC.md writes it, differentiated by the framework's autodiff."""
    if backend.name == "jax":
        fn = _jax_unrolled_sinkhorn(iterations)
        return lambda m: fn(m, jnp.asarray(tau, m.dtype))

    def norm(a, axis):
        return a - torch.logsumexp(a, dim=axis, keepdim=True)

    def sinkhorn(m):
        log_p = m / tau
        for _ in range(iterations):
            log_p = norm(log_p, -2)  # columns
            log_p = norm(log_p, -1)  # rows
        return torch.exp(log_p)

    return sinkhorn


@functools.cache
def _jax_unrolled_sinkhorn(iterations):
    def norm(a, axis):
        return a - jax.scipy.special.logsumexp(a, axis=axis, keepdims=True)

    @jax.jit  # one compilation per shape, not one per primitive per shape
    def sinkhorn(m, tau):
        log_p = m / tau
        for _ in range(iterations):
            log_p = norm(log_p, -2)  # columns
            log_p = norm(log_p, -1)  # rows
        return jnp.exp(log_p)

    return sinkhorn


@st.composite
def square_matrices(draw, max_n=8):
    # A few shapes, so that JAX compiles each projection a few times, not per example.
    n = draw(st.sampled_from([n for n in (1, 2, 3, 4, 8) if n <= max_n]))
    batch = draw(st.sampled_from([(3,)]))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    seed = draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).normal(0, scale, (*batch, n, n))


@given(m=square_matrices(), iterations=st.sampled_from([1, 3, 20]), tau=temperatures(0.3, 3.0), seed=st.integers(0, 2**16))
def test_sinkhorn_gradient_is_autodiff_of_the_unrolled_loop(backend, m, iterations, tau, seed):
    # In float64, so the comparison sees the algorithm (the recomputing
    # backward pass) and not float32 rounding.
    g = cotangents(m.shape, seed).astype(np.float64)
    with _float64(backend):
        p, (gp,) = backend.vjp(lambda a: backend.lib.project_doubly_stochastic(a, iterations, tau), [m], g)
        q, (gq,) = backend.vjp(_unrolled_sinkhorn(backend, iterations, tau), [m], g)
    assert p.dtype == np.float64
    np.testing.assert_allclose(p, q, rtol=0, atol=1e-12)
    np.testing.assert_allclose(gp, gq, rtol=0, atol=1e-10 * max(1.0, np.abs(gq).max()))


@given(m=square_matrices(), iterations=st.sampled_from([1, 5, 20]), seed=st.integers(0, 2**16))
def test_sinkhorn_gradient_in_float32(backend, m, iterations, seed):
    m = m.astype(np.float32)
    g = cotangents(m.shape, seed)
    p, (gp,) = backend.vjp(lambda a: backend.lib.project_doubly_stochastic(a, iterations), [m], g)
    q, (gq,) = backend.vjp(_unrolled_sinkhorn(backend, iterations, 1.0), [m], g)
    np.testing.assert_allclose(p, q, rtol=0, atol=2e-6)
    np.testing.assert_allclose(gp, gq, rtol=0, atol=2e-5)


def _saved_bytes(backend, fn, x: np.ndarray) -> int:
    """Bytes the forward pass of ``fn`` keeps for the backward pass."""
    if backend.name == "jax":
        _, pullback = jax.vjp(fn, backend.array(x))
        return sum(leaf.nbytes for leaf in jax.tree.leaves(pullback))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        fn(backend.array(x).requires_grad_(True))
    return sum(saved)


def test_sinkhorn_keeps_no_iterates_for_the_backward_pass(backend):
    # Unrolled autodiff would keep 2 iterates per sweep: 40 matrices at 20
    # sweeps. The custom gradient keeps the input (and a mask), whatever the count.
    x = np.random.default_rng(0).normal(size=(64, 4, 4)).astype(np.float32)
    one, many = (
        _saved_bytes(backend, lambda m: backend.lib.project_doubly_stochastic(m, t), x) for t in (1, 50)
    )
    assert one == many
    assert many <= 3 * x.nbytes
    unrolled = _saved_bytes(backend, _unrolled_sinkhorn(backend, 5, 1.0), x)
    assert unrolled >= 10 * x.nbytes  # the measure sees the iterates when they are kept


# --- Sinkhorn: dtype and non-finite input --------------------------------------------------


def _as(backend, x: np.ndarray, dtype: str):
    if backend.name == "jax":
        return jnp.asarray(x).astype(dtype)
    return torch.as_tensor(x).to(getattr(torch, dtype))


def _to_numpy32(backend, a) -> np.ndarray:
    if backend.name == "jax":
        return np.asarray(a.astype(jnp.float32))
    return a.detach().float().numpy()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sinkhorn_projects_half_precision_in_float32(backend, dtype):
    # The result is the float32 projection of the (rounded) logits, rounded once.
    m = np.random.default_rng(1).normal(0, 2, (5, 4, 4)).astype(np.float32)
    half = _as(backend, m, dtype)
    out = backend.lib.project_doubly_stochastic(half, 20)
    assert str(out.dtype).endswith(dtype)
    exact = backend.lib.project_doubly_stochastic(backend.array(_to_numpy32(backend, half)), 20)
    np.testing.assert_array_equal(_to_numpy32(backend, out), _to_numpy32(backend, _as(backend, backend.numpy(exact), dtype)))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_sinkhorn_non_finite_matrix_is_nan_and_alone(backend, bad):
    m = np.random.default_rng(2).normal(size=(3, 4, 4)).astype(np.float32)
    m[1, 2, 0] = bad
    g = np.ones_like(m)
    p, (grad,) = backend.vjp(lambda a: backend.lib.project_doubly_stochastic(a, 10), [m], g)
    assert np.isnan(p[1]).all()
    alone, (grad_alone,) = backend.vjp(lambda a: backend.lib.project_doubly_stochastic(a, 10), [m[[0, 2]]], g[[0, 2]])
    np.testing.assert_array_equal(p[[0, 2]], alone)
    np.testing.assert_array_equal(grad[[0, 2]], grad_alone)
    assert (grad[1] == 0).all()
