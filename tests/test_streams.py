"""Residual streams (docs/streams.md), checked in both packages (``backend`` fixture).

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

import mhc_torch
from mhc_jax.convert import torch_to_flax
from tests.stream_helpers import (
    FlaxBlock,
    TorchBlock,
    coefficients64,
    flax_hyper_connection,
    flax_stack,
    hyper_connection64,
    random_params,
    run_flax,
    run_torch,
    stack64,
    torch_hyper_connection,
    torch_stack,
)
from tests.backends import BACKENDS
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
    """The loop as docs/streams.md writes it, differentiated by the framework's autodiff."""
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


@pytest.mark.parametrize(
    "n, iterations",
    [(4, 20), (8, 20), (3, 50), (16, 20), (2, 200)],  # probability-space sweeps for the first two, log space for the rest
)
@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])
def test_sinkhorn_equals_the_log_space_loop_on_both_paths(n, iterations, scale):
    # torch sweeps probabilities after the first sweep when it is safe
    # (docs/streams.md); both paths must equal the log-space loop, also for
    # logits far apart (entries that exp() rounds to zero).
    m = np.random.default_rng(n + iterations).normal(0, scale, (16, n, n))
    g = cotangents(m.shape, 7).astype(np.float64)
    x = torch.tensor(m, requires_grad=True)
    p = mhc_torch.project_doubly_stochastic(x, iterations)
    (gp,) = torch.autograd.grad(p, x, torch.as_tensor(g))
    y = torch.tensor(m, requires_grad=True)
    q = _unrolled_sinkhorn(BACKENDS["torch"], iterations, 1.0)(y)
    (gq,) = torch.autograd.grad(q, y, torch.as_tensor(g))
    np.testing.assert_allclose(p.detach(), q.detach(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(gp, gq, rtol=0, atol=1e-10 * max(1.0, gq.abs().max().item()))
    p32 = mhc_torch.project_doubly_stochastic(torch.tensor(m, dtype=torch.float32), iterations)
    np.testing.assert_allclose(p32, q.detach(), rtol=0, atol=2e-5)


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


# --- coefficients: the paper's equations -------------------------------------------------


MODES = ("mhc", "hc")


def _coefficient_params(n: int, width: int, dynamic: bool, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {
        "b_pre": rng.normal(0, 1, n),
        "b_post": rng.normal(0, 1, n),
        "b_res": rng.normal(0, 1, (n, n)),
    }
    if dynamic:
        params["phi"] = rng.normal(0, 1 / math.sqrt(n * width), (n * width, n * n + 2 * n))
        for name in ("a_pre", "a_post", "a_res"):
            params[name] = rng.uniform(0.0, 1.0, 1)
    return {k: v.astype(np.float32) for k, v in params.items()}


def _coefficients(backend, mode, streams, params, iterations=20):
    lib = backend.lib
    arrays = {k: backend.array(v) for k, v in params.items()}
    if mode == "mhc":
        h = lib.mhc_coefficients(backend.array(streams), **arrays, sinkhorn_iterations=iterations)
    else:
        h = lib.hc_coefficients(backend.array(streams), **arrays)
    return [backend.numpy(c) for c in h]


@pytest.mark.parametrize("mode", MODES)
@given(
    n=st.sampled_from([1, 2, 3, 4, 8]),
    dynamic=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_coefficients_are_the_papers_equations(backend, mode, n, dynamic, scale, seed):
    width = 5
    streams = (scale * np.random.default_rng(seed).normal(size=(3, n, width))).astype(np.float32)
    params = _coefficient_params(n, width, dynamic, seed)
    got = _coefficients(backend, mode, streams, params)
    want = coefficients64(streams, params, mode)
    lead = () if not dynamic else (3,)
    for g, w, shape in zip(got, want, [(*lead, n), (*lead, n), (*lead, n, n)], strict=True):
        assert g.shape == shape and g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5)


@given(n=st.sampled_from([1, 2, 3, 4, 8]), seed=st.integers(0, 2**16))
def test_mhc_coefficients_lie_on_their_manifolds(backend, n, seed):
    # h_pre in (0, 1), h_post in (0, 2), h_res doubly stochastic: rows exact
    # (the last sweep normalises them); columns off by no more than 20 sweeps
    # of Sinkhorn leave them in float64 (its truncation, not rounding).
    streams = np.random.default_rng(seed).normal(size=(4, n, 6)).astype(np.float32)
    params = _coefficient_params(n, 6, True, seed)
    h_pre, h_post, h_res = _coefficients(backend, "mhc", streams, params)
    assert ((h_pre > 0) & (h_pre < 1)).all() and ((h_post > 0) & (h_post < 2)).all()
    assert (h_res >= 0).all()
    np.testing.assert_allclose(h_res.sum(-1), 1, atol=1e-6)
    truncation = np.abs(coefficients64(streams, params, "mhc")[2].sum(-2) - 1)
    assert (np.abs(h_res.sum(-2) - 1) <= truncation + 1e-5).all()


def test_coefficients_of_half_precision_streams_are_float32(backend):
    streams = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    params = {k: backend.array(v) for k, v in _coefficient_params(3, 4, True, 0).items()}
    half = _as(backend, streams, "bfloat16")
    for h in backend.lib.mhc_coefficients(half, **params):
        assert str(h.dtype).endswith("float32")


# --- one HyperConnection: the layer equation ------------------------------------------------


def _run_hyper_connection(backend, options, params, streams, cotangent):
    width = streams.shape[-1]
    if backend.name == "jax":
        return run_flax("hyper_connection", width, options, params, streams, cotangent)
    return run_torch(torch_hyper_connection(width, options), params, streams, cotangent)


@pytest.mark.parametrize("mode", MODES)
@given(n=st.sampled_from([1, 2, 3, 4, 8]), dynamic=st.booleans(), seed=st.integers(0, 2**16))
def test_hyper_connection_is_the_layer_equation(backend, mode, n, dynamic, seed):
    width = 6
    options = dict(num_streams=n, mode=mode, dynamic=dynamic)
    params = random_params(torch_hyper_connection(width, options), seed)
    streams = np.random.default_rng(seed).normal(size=(2, 3, n, width)).astype(np.float32)
    out, _ = _run_hyper_connection(backend, options, params, streams, np.zeros_like(streams))
    assert out.shape == streams.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, hyper_connection64(streams, params, mode), rtol=1e-5, atol=1e-5)


def test_hyper_connection_passes_extra_arguments_to_the_branch(backend):
    # The linear test block multiplies its output by `scale`: the layer's
    # output moves by (scale - 1) h_post y.
    n, width = 3, 4
    streams = np.random.default_rng(0).normal(size=(2, n, width)).astype(np.float32)
    if backend.name == "jax":
        hc = flax_hyper_connection(width, dict(num_streams=n))
        variables = hc.init(jax.random.key(0), streams)
        once, twice = (np.asarray(hc.apply(variables, streams, scale=s)) for s in (1.0, 2.0))
        y_weighted = twice - once
        h_post = np.asarray(hc.apply(variables, streams, method="coefficients")[1])
        u_branch = once - np.asarray(hc.apply(variables, streams, scale=0.0))
    else:
        hc = torch_hyper_connection(width, dict(num_streams=n))
        with torch.no_grad():
            t = torch.as_tensor(streams)
            once, twice, zero = (hc(t, scale=s).numpy() for s in (1.0, 2.0, 0.0))
            h_post = hc.coefficients(t)[1].numpy()
        y_weighted, u_branch = twice - once, once - zero
    # scale=2 adds h_post * y once more; scale=0 removes it: the same difference.
    np.testing.assert_allclose(y_weighted, u_branch, rtol=1e-5, atol=1e-6)
    assert np.abs(y_weighted).max() > 0 and h_post.shape == (2, n)


# --- the documented init ----------------------------------------------------------------------


def _fresh_coefficients(backend, options, width, streams, layer_index=None):
    options = dict(options, layer_index=layer_index)
    if backend.name == "jax":
        hc = flax_hyper_connection(width, options)
        variables = hc.init(jax.random.key(3), streams)
        return [np.asarray(c) for c in hc.apply(variables, streams, method="coefficients")]
    torch.manual_seed(3)
    hc = torch_hyper_connection(width, options)
    with torch.no_grad():
        return [c.numpy() for c in hc.coefficients(torch.as_tensor(streams))]


def _documented_init(n: int, mode: str, layer_index: int | None):
    """docs/streams.md: what a fresh layer's coefficients are (dynamic terms aside)."""
    if mode == "hc":
        return np.eye(n)[(layer_index or 0) % n], np.ones(n), np.eye(n)
    d = 0.9
    res = np.full((n, n), (1 - d) / max(n - 1, 1)) + (d - (1 - d) / max(n - 1, 1)) * np.eye(n)
    return np.full(n, min(1 / n, 0.9)), np.ones(n), (res if n > 1 else np.ones((1, 1)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_fresh_coefficients_are_the_documented_init(backend, mode, dynamic, n):
    width = 16
    streams = np.random.default_rng(0).normal(size=(5, n, width)).astype(np.float32)
    got = _fresh_coefficients(backend, dict(num_streams=n, mode=mode, dynamic=dynamic), width, streams, layer_index=5)
    # Static: exactly the documented values. Dynamic: a_* = 0.01 times unit-variance
    # logits moves them by about 1% (at most ~5% over these tokens).
    tol = 5e-2 if dynamic else 1e-6
    for g, w in zip(got, _documented_init(n, mode, 5), strict=True):
        np.testing.assert_allclose(g, np.broadcast_to(w, g.shape), rtol=0, atol=tol)
    if mode == "mhc":
        np.testing.assert_allclose(got[2].sum(-1), 1, atol=1e-6)


def _plain_residual(backend, x, branches):
    """x_{l+1} = x_l + F_l(x_l): the pre-norm residual network of the same blocks."""
    r = x
    for branch in branches:
        r = r + branch(r)
    return r


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_fresh_depth_48_stack_is_a_well_scaled_residual_network(backend, mode, dynamic, n):
    # docs/streams.md: at init every stream carries the residual of the plain
    # pre-norm network of the same blocks, so the (summed) output is n times
    # its output; exactly so without the dynamic terms (n = 1 starts with
    # h_pre = 0.9, which the block's LayerNorm does not see). The dynamic
    # terms move each coefficient by ~1%: mHC stays within ~1.5% of the plain
    # network (h_res doubly stochastic, so the residual's gain stays 1), HC's
    # unconstrained h_res lets the gain drift over 48 layers (~5%).
    depth, width = 48, 32
    x = np.random.default_rng(1).normal(size=(4, 8, width)).astype(np.float32)
    options = dict(num_streams=n, mode=mode, dynamic=dynamic)
    if backend.name == "jax":
        model = flax_stack(width, depth, options, "prenorm")
        variables = model.init(jax.random.key(0), x)
        out = np.asarray(model.apply(variables, x))
        block = FlaxBlock(width, "prenorm")
        branches = [
            functools.partial(block.apply, {"params": variables["params"][f"layers_{i}"]["branch"]})
            for i in range(depth)
        ]
        plain = np.asarray(_plain_residual(backend, jnp.asarray(x), branches))
        h_res = np.asarray(model.apply(variables, x, method="coefficients")[2])
    else:
        torch.manual_seed(0)
        model = torch_stack(width, depth, options, "prenorm")
        with torch.no_grad():
            out = model(torch.as_tensor(x)).numpy()
            plain = _plain_residual(backend, torch.as_tensor(x), [hc.branch for hc in model.layers]).numpy()
            h_res = model.coefficients(torch.as_tensor(x))[2].numpy()
    assert np.isfinite(out).all()
    rms = lambda a: float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))  # noqa: E731
    assert 0.95 < rms(out) / (n * rms(plain)) < 1.05
    tol = (3e-2 if mode == "mhc" else 1e-1) if dynamic else 1e-4
    np.testing.assert_allclose(out / n, plain, rtol=0, atol=tol * max(1.0, np.abs(plain).max()))
    want_res = _documented_init(n, mode, None)[2]
    np.testing.assert_allclose(h_res, np.broadcast_to(want_res, h_res.shape), atol=5e-2 if dynamic else 1e-6)


# --- the stack -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@given(n=st.sampled_from([1, 2, 4]), depth=st.integers(1, 4), dynamic=st.booleans(), seed=st.integers(0, 2**16))
def test_stack_expands_runs_every_layer_and_reduces(backend, mode, n, depth, dynamic, seed):
    width = 6
    options = dict(num_streams=n, mode=mode, dynamic=dynamic)
    params = random_params(torch_stack(width, depth, options), seed, spread=0.3)
    x = np.random.default_rng(seed).normal(size=(2, 3, width)).astype(np.float32)
    if backend.name == "jax":
        out, _ = run_flax("stack", width, options, params, x, np.zeros_like(x), depth=depth)
    else:
        out, _ = run_torch(torch_stack(width, depth, options), params, x, np.zeros_like(x))
    assert out.shape == x.shape
    want = stack64(x, params, depth, n, mode)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("mode", MODES)
def test_stack_sets_each_layers_index(backend, mode):
    n, depth, width = 3, 5, 4
    x = np.zeros((1, width), np.float32)
    if backend.name == "jax":
        model = flax_stack(width, depth, dict(num_streams=n, mode=mode))
        params = model.init(jax.random.key(0), x)["params"]
        b_pre = [np.asarray(params[f"layers_{i}"]["b_pre"]) for i in range(depth)]
        indices = [layer.layer_index for layer in model.layers]
    else:
        model = torch_stack(width, depth, dict(num_streams=n, mode=mode))
        b_pre = [layer.b_pre.detach().numpy() for layer in model.layers]
        indices = [layer.layer_index for layer in model.layers]
    assert indices == list(range(depth))
    for i, b in enumerate(b_pre):
        want = np.eye(n)[i % n] if mode == "hc" else np.full(n, math.log((1 / n) / (1 - 1 / n)))
        np.testing.assert_allclose(b, want, atol=1e-6)


def test_stack_coefficients_are_each_layers(backend):
    # The stack's coefficients(x) are layer l's coefficients of the streams entering layer l.
    n, depth, width = 2, 3, 4
    options = dict(num_streams=n)
    params = random_params(torch_stack(width, depth, options), 0)
    x = np.random.default_rng(0).normal(size=(5, width)).astype(np.float32)
    if backend.name == "jax":
        model = flax_stack(width, depth, options)
        template = jax.eval_shape(model.init, jax.random.key(0), x)
        got = [np.asarray(c) for c in model.apply(torch_to_flax(params, template), x, method="coefficients")]
    else:
        model = torch_stack(width, depth, options)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
        with torch.no_grad():
            got = [c.numpy() for c in model.coefficients(torch.as_tensor(x))]
    streams = np.repeat(x[:, None, :].astype(np.float64), n, axis=1)
    for i in range(depth):
        want = coefficients64(streams, params, "mhc", prefix=f"layers.{i}.")
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g[i], w, atol=2e-5)
        streams = hyper_connection64(streams, params, "mhc", prefix=f"layers.{i}.")


# --- bad input -----------------------------------------------------------------------------


def _build_hyper_connection(backend, width=4, **options):
    """Construct (and for Flax, initialise on width-``width`` streams) a HyperConnection."""
    n = options.get("num_streams", 4)
    if backend.name == "jax":
        hc = flax_hyper_connection(width, options)
        streams = np.zeros((2, n if isinstance(n, int) and n > 0 else 1, width), np.float32)
        return hc, lambda s: hc.init(jax.random.key(0), s)
    hc = torch_hyper_connection(width, options)
    return hc, lambda s: hc(torch.as_tensor(s))


def _build_stack(backend, layers, **options):
    if backend.name == "jax":
        model = backend.lib.StreamSequential(layers, **options)
        return lambda x: model.init(jax.random.key(0), x)
    return backend.lib.StreamSequential(layers, **options, dim=4)


BAD_OPTIONS = [
    (dict(num_streams=0), ValueError, r"num_streams must be an int >= 1, got 0"),
    (dict(num_streams=-1), ValueError, r"num_streams must be an int >= 1, got -1"),
    (dict(num_streams="4"), TypeError, r"num_streams must be an int >= 1, got '4' \(str\)"),
    (dict(num_streams=2.0), TypeError, r"num_streams must be an int >= 1, got 2\.0 \(float\)"),
    (dict(sinkhorn_iterations=0), ValueError, r"sinkhorn_iterations must be an int >= 1, got 0"),
    (dict(sinkhorn_iterations=True), TypeError, r"sinkhorn_iterations must be an int >= 1, got True \(bool\)"),
    (dict(mode="mHC"), ValueError, r"mode must be one of \('mhc', 'hc'\), got 'mHC'"),
    (dict(mode="residual"), ValueError, r"mode must be one of \('mhc', 'hc'\), got 'residual'"),
    (dict(dynamic="yes"), TypeError, r"dynamic must be a bool, got 'yes' \(str\)"),
    (dict(dynamic=1), TypeError, r"dynamic must be a bool, got 1 \(int\)"),
    (dict(layer_index=-1), ValueError, r"layer_index must be an int >= 0, got -1"),
    (dict(layer_index="0"), TypeError, r"layer_index must be an int >= 0, got '0' \(str\)"),
]


@pytest.mark.parametrize("options, error, message", BAD_OPTIONS)
def test_bad_options_are_named_at_construction(backend, options, error, message):
    with pytest.raises(error, match=message):
        _build_hyper_connection(backend, **options)


@pytest.mark.parametrize("options, error, message", [o for o in BAD_OPTIONS if "layer_index" not in o[0]])
def test_bad_stack_options_are_named_at_construction(backend, options, error, message):
    layers = [TorchBlock(4)] if backend.name == "torch" else [FlaxBlock(4)]
    with pytest.raises(error, match=message):
        _build_stack(backend, layers, **options)


def test_empty_stack_is_an_error(backend):
    with pytest.raises(ValueError, match=r"at least one layer \(depth >= 1\), got 0"):
        _build_stack(backend, [])


@pytest.mark.parametrize(
    "shape, message",
    [
        ((4,), r"streams must have shape \(\.\.\., 3, (C|4)\) \(num_streams=3\), got shape \(4,\)"),
        ((2, 4), r"streams must have shape \(\.\.\., 3, (C|4)\) \(num_streams=3\), got shape \(2, 4\)"),
        ((2, 2, 4), r"streams must have shape \(\.\.\., 3, (C|4)\) \(num_streams=3\), got shape \(2, 2, 4\)"),
    ],
)
def test_streams_of_the_wrong_shape_are_named(backend, shape, message):
    hc, call = _build_hyper_connection(backend, num_streams=3)
    with pytest.raises(ValueError, match=message):
        call(np.zeros(shape, np.float32))


def test_torch_streams_of_the_wrong_width_are_named():
    hc = torch_hyper_connection(4, dict(num_streams=3))
    with pytest.raises(ValueError, match=r"streams must have shape \(\.\.\., 3, 4\) \(num_streams=3\), got shape \(2, 3, 5\)"):
        hc(torch.zeros(2, 3, 5))


def test_a_branch_that_changes_the_width_is_named(backend):
    n = 2
    streams = np.zeros((5, n, 4), np.float32)
    message = r"the branch must keep the width: it maps the branch input of shape \(5, 4\) to shape \(5, 3\)"
    if backend.name == "jax":
        import flax.linen as fnn

        hc = backend.lib.HyperConnection(fnn.Dense(3), num_streams=n)
        with pytest.raises(ValueError, match=message):
            hc.init(jax.random.key(0), streams)
    else:
        hc = backend.lib.HyperConnection(4, torch.nn.Linear(4, 3), num_streams=n)
        with pytest.raises(ValueError, match=message):
            hc(torch.as_tensor(streams))


def test_torch_bad_dim_is_named():
    with pytest.raises(ValueError, match=r"dim must be an int >= 1, got 0"):
        mhc_torch.HyperConnection(0, torch.nn.Identity())
    with pytest.raises(TypeError, match=r"dim must be an int >= 1, got '4' \(str\)"):
        mhc_torch.HyperConnection("4", torch.nn.Identity())


# --- diagnostics ---------------------------------------------------------------------------


def _gains_by_hand(h_res: np.ndarray) -> dict[str, np.ndarray]:
    """The paper's gains with numpy's matrix norms: inf-norm = max abs row sum, 1-norm = max abs column sum."""
    depth = h_res.shape[0]
    tokens = h_res.reshape(depth, -1, *h_res.shape[-2:])
    out = {k: np.zeros(depth) for k in ("layer_forward", "layer_backward", "composite_forward", "composite_backward")}
    for t in range(tokens.shape[1]):
        for layer in range(depth):
            m = tokens[layer, t]
            p = np.linalg.multi_dot([tokens[k, t] for k in range(layer, -1, -1)]) if layer else m
            for key, value in (
                ("layer_forward", np.linalg.norm(m, np.inf)),
                ("layer_backward", np.linalg.norm(m, 1)),
                ("composite_forward", np.linalg.norm(p, np.inf)),
                ("composite_backward", np.linalg.norm(p, 1)),
            ):
                out[key][layer] = max(out[key][layer], value)
    return out


@given(depth=st.integers(1, 6), n=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_gains_are_the_papers_row_and_column_sums(backend, depth, n, seed):
    h_res = np.random.default_rng(seed).normal(0.3, 0.5, (depth, 2, 3, n, n)).astype(np.float32)
    got = backend.lib.h_res_gains(backend.array(h_res))
    want = _gains_by_hand(h_res.astype(np.float64))
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10)


@given(depth=st.integers(1, 6), n=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_sinkhorn_residual_is_the_largest_row_or_column_error(backend, depth, n, seed):
    h_res = np.random.default_rng(seed).uniform(0, 1, (depth, 4, n, n)).astype(np.float32)
    want = np.array([
        max(np.abs(h_res[layer].astype(np.float64).sum(-1) - 1).max(), np.abs(h_res[layer].astype(np.float64).sum(-2) - 1).max())
        for layer in range(depth)
    ])
    np.testing.assert_allclose(backend.lib.sinkhorn_residual(backend.array(h_res)), want, rtol=1e-10)


def test_doubly_stochastic_stacks_have_unit_gain_and_no_warnings(backend):
    # Products of doubly stochastic (non-negative) matrices are doubly
    # stochastic: every gain is 1, up to the Sinkhorn residual.
    rng = np.random.default_rng(0)
    logits = backend.array(rng.normal(0, 1, (24, 5, 4, 4)).astype(np.float32))
    h_res = backend.numpy(backend.lib.project_doubly_stochastic(logits, 30))
    gains = backend.lib.h_res_gains(h_res)
    for key, value in gains.items():
        np.testing.assert_allclose(value, 1.0, atol=1e-4, err_msg=key)
    assert backend.lib.diagnose_streams(h_res) == []
    metrics = backend.lib.stream_metrics(h_res)
    assert set(metrics) == {
        "streams/composite_forward_gain", "streams/composite_backward_gain", "streams/max_layer_forward_gain",
        "streams/max_layer_backward_gain", "streams/max_sinkhorn_residual",
    }
    assert abs(metrics["streams/composite_forward_gain"] - 1) < 1e-4


def test_growing_composite_gain_is_diagnosed(backend):
    # HC-like h_res = 1.2 I for 10 layers: composite gain 1.2^l leaves the band
    # [0.5, 2] at l = 4 (layer index 3); the row sums are 1.2, not 1.
    h_res = np.broadcast_to(1.2 * np.eye(3), (10, 2, 3, 3)).copy()
    warnings = backend.lib.diagnose_streams(h_res)
    kinds = [w.kind for w in warnings]
    assert kinds.count("gain") == 2 and "sinkhorn" in kinds
    gain = next(w for w in warnings if w.kind == "gain")
    assert gain.layers == tuple(range(3, 10))
    assert "after layer 3" in gain.message and "outside [0.5, 2]" in gain.message
    shrinking = np.broadcast_to(0.8 * np.eye(3), (10, 1, 3, 3))
    assert any(w.kind == "gain" and w.layers[0] == 3 for w in backend.lib.diagnose_streams(shrinking))


def test_non_finite_h_res_is_diagnosed(backend):
    h_res = np.broadcast_to(np.eye(2), (4, 3, 2, 2)).copy()
    h_res[2, 1, 0, 0] = np.nan
    warnings = backend.lib.diagnose_streams(h_res)
    assert [w.kind for w in warnings][0] == "non_finite" and warnings[0].layers == (2,)


def test_h_res_heatmap_is_drawn_and_saved(backend, tmp_path):
    h_res = backend.numpy(backend.lib.project_doubly_stochastic(
        backend.array(np.random.default_rng(0).normal(size=(10, 3, 4, 4)).astype(np.float32))
    ))
    fig = backend.lib.plot_h_res_heatmap(h_res, path=tmp_path / "h_res.png")
    assert (tmp_path / "h_res.png").stat().st_size > 0
    assert sum(bool(ax.images) for ax in fig.axes) == 10  # one heatmap per layer


def test_fresh_stack_coefficients_feed_the_diagnostics(backend):
    # The stack's coefficients(x) are the diagnostics' input; a fresh mHC stack is healthy.
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    options = dict(num_streams=4)
    if backend.name == "jax":
        model = flax_stack(8, 12, options, "prenorm")
        h_res = model.apply(model.init(jax.random.key(0), x), x, method="coefficients")[2]
    else:
        with torch.no_grad():
            h_res = torch_stack(8, 12, options, "prenorm").coefficients(torch.as_tensor(x))[2]
    assert tuple(h_res.shape) == (12, 2, 3, 4, 4)
    assert backend.lib.diagnose_streams(h_res) == []
