"""Properties of the projections, checked in both packages (``backend`` fixture)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.backends import BACKENDS
from tests.strategies import cotangents, epsilons, logits, temperatures


def _project(backend, name, mu, *args, **kwargs):
    return backend.numpy(getattr(backend.lib, name)(backend.array(mu), *args, **kwargs))


# --- the simplex: every projection's output -----------------------------------------


@pytest.mark.parametrize("name", ["project_softmax", "project_simplex"])
@given(mu=logits(), tau=temperatures())
def test_weights_lie_on_the_simplex(backend, name, mu, tau):
    alpha = _project(backend, name, mu, tau)
    assert alpha.shape == mu.shape
    assert np.isfinite(alpha).all()
    assert (alpha >= 0).all()
    np.testing.assert_allclose(alpha.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("base", ["simplex", "softmax"])
@given(mu=logits(), tau=temperatures(), eps=epsilons())
def test_identity_preserving_floors_the_latest_weight(backend, base, mu, tau, eps):
    alpha = _project(backend, "project_identity_preserving", mu, eps, tau, base)
    assert np.isfinite(alpha).all() and (alpha >= 0).all()
    np.testing.assert_allclose(alpha.sum(-1), 1.0, atol=1e-5)
    assert (alpha[..., -1] >= eps - 1e-6).all()


@pytest.mark.parametrize("base", ["simplex", "softmax"])
@given(mu=logits(max_abs=10.0), tau=temperatures(0.1, 10.0))
def test_identity_preserving_with_zero_epsilon_is_the_base(backend, base, mu, tau):
    alpha = _project(backend, "project_identity_preserving", mu, 0.0, tau, base)
    np.testing.assert_allclose(alpha, _project(backend, f"project_{base}", mu, tau), atol=1e-7)


# --- the exact Euclidean projection ----------------------------------------------------


@given(mu=logits(max_abs=100.0), tau=temperatures(0.1, 10.0))
def test_simplex_satisfies_the_optimality_conditions(backend, mu, tau):
    # KKT conditions of argmin ||a - z||^2 on the simplex: a = max(z - theta, 0)
    # for one theta per row. So z - a is the same (theta) on the support and
    # every switched-off entry has z <= theta. Together with sum(a) = 1 this
    # characterises the projection; nothing here is read off the implementation.
    alpha = _project(backend, "project_simplex", mu, tau).astype(np.float64)
    z = mu.astype(np.float64) / tau
    support = alpha > 0
    theta = np.where(support, z - alpha, -np.inf).max(-1, keepdims=True)
    assert np.all(np.abs(np.where(support, z - alpha - theta, 0)) <= 1e-4 * np.maximum(1, np.abs(z)))
    assert np.all(np.where(support, True, z <= theta + 1e-4 * np.maximum(1, np.abs(z))))


@given(mu=logits(), tau=temperatures())
def test_simplex_zeros_every_slot_a_whole_unit_below_the_max(backend, mu, tau):
    # theta >= max(z) - 1, so a slot with z <= max(z) - 1 gets an exact zero.
    alpha = _project(backend, "project_simplex", mu, tau)
    z = mu.astype(np.float64) / tau
    far_below = z <= z.max(-1, keepdims=True) - 1 - 1e-6 * np.abs(z).max(-1, keepdims=True)
    assert np.all(alpha[far_below] == 0.0)


def test_simplex_gives_exact_zeros_where_softmax_cannot(backend):
    mu = np.array([0.0, 3.0, 2.5, -4.0], np.float32)
    simplex = _project(backend, "project_simplex", mu)
    softmax = _project(backend, "project_softmax", mu)
    assert simplex[0] == 0.0 and simplex[3] == 0.0
    np.testing.assert_allclose(simplex[1:3], [0.75, 0.25], atol=1e-7)
    assert (softmax > 0).all()


@given(mu=logits(max_abs=10.0, batch=False, min_k=2), tau=temperatures(0.1, 10.0), seed=st.integers(0, 2**16))
def test_simplex_jacobian_is_the_sparsemax_jacobian(backend, mu, tau, seed):
    alpha = _project(backend, "project_simplex", mu, tau)
    # Away from a support boundary the Jacobian is constant nearby; exactly on
    # one it is the one-sided value and both packages pick the same side.
    assume(not np.any((alpha > 0) & (alpha < 1e-5)))
    s = (alpha > 0).astype(np.float64)
    jacobian = (np.diag(s) - np.outer(s, s) / s.sum()) / tau
    g = cotangents(mu.shape, seed)
    _, (grad,) = backend.vjp(lambda m: backend.lib.project_simplex(m, tau), [mu], g)
    np.testing.assert_allclose(grad, jacobian.T @ g, atol=1e-5 * max(1, 1 / tau))


def test_one_hot_simplex_output_has_zero_gradient(backend):
    mu = np.array([0.0, 5.0, 0.0], np.float32)
    out, (grad,) = backend.vjp(backend.lib.project_simplex, [mu], np.array([1.0, -2.0, 3.0], np.float32))
    np.testing.assert_array_equal(out, [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(grad, np.zeros(3))


def test_simplex_gradient_follows_the_output_support_at_an_exact_edge(backend):
    # Regression found by the parity tests: z = mu / tau = [1, 0, 0] sits on the
    # support edge, where float rounding makes the threshold test count a slot
    # whose output is 0. The output is one-hot, so the Jacobian must be 0.
    mu = np.array([0.001, 0.0, 0.0], np.float32)
    g = np.array([1.0, -2.0, 3.0], np.float32)
    out, (grad,) = backend.vjp(lambda m: backend.lib.project_simplex(m, 0.001), [mu], g)
    np.testing.assert_array_equal(out, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(grad, np.zeros(3))


@given(mu=logits(max_abs=100.0), shift=st.floats(-1e3, 1e3))
def test_projections_ignore_a_common_shift(backend, mu, shift):
    for name in ("project_simplex", "project_softmax"):
        a = _project(backend, name, mu)
        b = _project(backend, name, (mu.astype(np.float64) + shift).astype(np.float32))
        # The shift itself rounds in float32 (|mu + shift| up to 1.1e3).
        np.testing.assert_allclose(a, b, atol=2e-4)


# --- stability at the ends of the spec's range -------------------------------------------


@pytest.mark.parametrize("tau", [1e-3, 1e3])
@pytest.mark.parametrize("name", ["project_softmax", "project_simplex", "project_identity_preserving"])
def test_extreme_logits_and_temperatures_stay_finite(backend, name, tau):
    mu = np.array([[1e4, -1e4, 0.0, 1e4], [-1e4, -1e4, -1e4, -1e4], [1e4, 1e4 - 1e-3, -3.0, 2.0]], np.float32)
    g = np.ones_like(mu)
    out, (grad,) = backend.vjp(lambda m: getattr(backend.lib, name)(m, temperature=tau), [mu], g)
    assert np.isfinite(out).all() and np.isfinite(grad).all()
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


@given(m=logits(max_abs=1e4, min_k=3, max_k=3), tau=temperatures())
def test_sinkhorn_is_finite_for_extreme_inputs(backend, m, tau):
    m = np.broadcast_to(m[..., None, :], (*m.shape[:-1], 3, 3)).copy()
    m[..., 1, :] = m[..., 1, ::-1]
    out = _project(backend, "project_doubly_stochastic", m, temperature=tau)
    assert np.isfinite(out).all() and (out >= 0).all()
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


# --- Sinkhorn ------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), tau=temperatures(1.0, 10.0))
def test_sinkhorn_rows_and_columns_sum_to_one(backend, seed, n, tau):
    # Sinkhorn contracts at rate ((sqrt(t) - 1) / (sqrt(t) + 1))^2, t the largest
    # cross-ratio of exp(M / tau). With |M / tau| <= 1, t <= e^4 and 20 sweeps
    # shrink the column error below ~2e-5. (At |M / tau| <= 2 the rate is ~0.93
    # and 20 sweeps are not enough: test_sinkhorn_converges_with_more_iterations.)
    m = np.random.default_rng(seed).uniform(-1, 1, (2, n, n)).astype(np.float32)
    p = _project(backend, "project_doubly_stochastic", m, temperature=tau)
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-4)


def test_sinkhorn_converges_with_more_iterations(backend):
    m = np.random.default_rng(0).normal(0, 3, (5, 5)).astype(np.float32)
    err = [
        np.abs(_project(backend, "project_doubly_stochastic", m, it).sum(-2) - 1).max()
        for it in (1, 5, 50)
    ]
    assert err[0] > err[1] > err[2] and err[2] < 1e-5


# --- gradients against finite differences (float64) -----------------------------------


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("project_softmax", dict(temperature=0.7)),
        ("project_simplex", dict(temperature=0.7)),
        ("project_identity_preserving", dict(epsilon=0.2, temperature=0.7, base="simplex")),
        ("project_identity_preserving", dict(epsilon=0.2, temperature=0.7, base="softmax")),
        ("project_doubly_stochastic", dict(iterations=5, temperature=0.7)),
    ],
)
def test_gradients_match_finite_differences(backend, name, kwargs):
    # Values spread by more than the finite-difference step, so no support
    # boundary is crossed while differencing.
    x = np.array([[0.3, -0.2, 0.1, 0.05], [0.0, 0.9, -1.0, 0.4], [1.0, 0.2, 0.45, -0.1], [0.2, 0.1, 0.0, 0.6]])
    backend.check_grads(lambda m: getattr(backend.lib, name)(m, **kwargs), x)


# --- under jit ---------------------------------------------------------------------------


def _all_projections(lib, mu, tau, eps):
    return (
        lib.project_simplex(mu, tau),
        lib.project_softmax(mu, tau),
        lib.project_identity_preserving(mu, eps, tau),
    )


# Built once, so the jit cache (keyed on the function object) hits across examples.
_ALL_PROJECTIONS = {name: functools.partial(_all_projections, b.lib) for name, b in BACKENDS.items()}


@given(mu=logits(max_abs=100.0, ks=(1, 3, 6), batch=False), tau=temperatures(0.1, 10.0), eps=epsilons())
def test_jit_gives_the_eager_result(backend, mu, tau, eps):
    # tau and eps are traced arguments, so one compilation per shape serves all examples.
    lib = backend.lib
    jitted = backend.jit(_ALL_PROJECTIONS[backend.name])
    args = (backend.array(mu), backend.array(np.float32(tau)), backend.array(np.float32(eps)))
    for a, b in zip(jitted(*args), _all_projections(lib, *args), strict=True):
        np.testing.assert_allclose(backend.numpy(a), backend.numpy(b), atol=1e-6)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, -1.0, math.inf, math.nan, True])
@pytest.mark.parametrize("name", ["project_softmax", "project_simplex", "project_identity_preserving", "project_doubly_stochastic"])
def test_bad_temperature_is_named(backend, name, tau):
    mu = backend.array(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got " + repr(tau).replace("(", r"\(")):
        getattr(backend.lib, name)(mu, temperature=tau)


@pytest.mark.parametrize("eps", [-0.1, 1.0, 2.0, math.nan])
def test_bad_epsilon_is_named(backend, eps):
    with pytest.raises(ValueError, match=r"epsilon must be a number in \[0, 1\), got"):
        backend.lib.project_identity_preserving(backend.array(np.zeros(3, np.float32)), epsilon=eps)


def test_bad_base_is_named(backend):
    with pytest.raises(ValueError, match=r"base must be one of \('simplex', 'softmax'\), got 'sparsemax'"):
        backend.lib.project_identity_preserving(backend.array(np.zeros(3, np.float32)), base="sparsemax")


@pytest.mark.parametrize("iterations", [0, -3, 2.5])
def test_bad_iterations_is_named(backend, iterations):
    with pytest.raises(ValueError, match="iterations must be an int >= 1, got"):
        backend.lib.project_doubly_stochastic(backend.array(np.zeros((2, 2), np.float32)), iterations)


def test_sinkhorn_needs_square_matrices(backend):
    with pytest.raises(ValueError, match=r"square matrices .* got shape \(2, 3\)"):
        backend.lib.project_doubly_stochastic(backend.array(np.zeros((2, 3), np.float32)))


# --- dtypes: the result keeps the input's dtype, and so does the gradient ------------------
#
# Checked against the mathematics in numpy float64 (a reference independent of
# both packages), within what the dtype can hold: the weights and gradients
# are rounded once, so the error is about one unit in the last place.

#: (public name, keyword arguments) of every projection of a logit vector.
VECTOR_PROJECTIONS = [
    ("project_softmax", dict(temperature=0.75)),
    ("project_simplex", dict(temperature=0.75)),
    ("project_identity_preserving", dict(epsilon=0.2, temperature=0.75, base="simplex")),
    ("project_identity_preserving", dict(epsilon=0.2, temperature=0.75, base="softmax")),
]
VECTOR_PROJECTION_IDS = ["softmax", "simplex", "identity[simplex]", "identity[softmax]"]

#: Logits and a cotangent that every dtype holds exactly (multiples of 1/8),
#: spread so that no simplex support edge lies near them.
DTYPE_LOGITS = np.array([[0.5, -0.25, 0.125, 0.0], [0.0, 1.0, -1.0, 0.375], [1.0, 0.25, 0.5, -0.125]])
DTYPE_COTANGENT = np.array([[0.25, -1.0, 0.5, 0.125], [-0.5, 0.75, 0.0, 1.0], [1.0, 0.5, -0.25, -0.75]])

#: Tolerance (absolute, relative to max(1, |value|)) for a result rounded once to each dtype.
DTYPE_TOLERANCE = {"bfloat16": 2**-7, "float16": 2**-10, "float32": 1e-5, "float64": 1e-10}


def reference_projection(name: str, kwargs: dict, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The weights and the Jacobians ``d alpha_i / d mu_j`` (shape ``(..., K, K)``), in float64."""
    z = np.asarray(mu, np.float64) / kwargs.get("temperature", 1.0)
    base = kwargs.get("base", name.removeprefix("project_"))
    if base == "softmax":
        e = np.exp(z - z.max(-1, keepdims=True))
        alpha = e / e.sum(-1, keepdims=True)
        jac = alpha[..., :, None] * (np.eye(z.shape[-1]) - alpha[..., None, :])
    else:
        # Sparsemax: theta from the sorted values, alpha = max(z - theta, 0).
        u = -np.sort(-z, axis=-1)
        j = np.arange(1, z.shape[-1] + 1)
        rho = (1 + j * u > np.cumsum(u, -1)).sum(-1, keepdims=True)
        theta = (np.take_along_axis(np.cumsum(u, -1), rho - 1, -1) - 1) / rho
        alpha = np.maximum(z - theta, 0)
        s = (alpha > 0).astype(np.float64)
        jac = s[..., :, None] * (np.eye(z.shape[-1]) - s[..., None, :] / s.sum(-1)[..., None, None])
    if name == "project_identity_preserving":
        eps = kwargs["epsilon"]
        alpha = (1 - eps) * alpha + eps * (np.arange(z.shape[-1]) == z.shape[-1] - 1)
        jac = (1 - eps) * jac
    return alpha, jac / kwargs.get("temperature", 1.0)


def assert_close_in_dtype(actual, expected, dtype: str, what: str) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    err = np.abs(actual - expected) / np.maximum(1.0, np.abs(expected))
    assert err.max() <= DTYPE_TOLERANCE[dtype], f"{what} in {dtype}: off by {err.max():.3g}\n{actual}\n{expected}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
@pytest.mark.parametrize("name, kwargs", VECTOR_PROJECTIONS, ids=VECTOR_PROJECTION_IDS)
def test_torch_projections_keep_the_dtype_and_are_differentiable(name, kwargs, dtype):
    import torch

    import mhc_torch

    dt = getattr(torch, dtype)
    mu = torch.tensor(DTYPE_LOGITS, dtype=dt, requires_grad=True)
    out = getattr(mhc_torch, name)(mu, **kwargs)
    (out * torch.tensor(DTYPE_COTANGENT, dtype=dt)).sum().backward()
    assert out.dtype == dt and mu.grad.dtype == dt
    alpha, jac = reference_projection(name, kwargs, DTYPE_LOGITS)
    assert_close_in_dtype(out.detach().double().numpy(), alpha, dtype, f"{name} weights")
    grad = np.einsum("...i,...ij->...j", DTYPE_COTANGENT, jac)
    assert_close_in_dtype(mu.grad.double().numpy(), grad, dtype, f"{name} gradient")


@pytest.mark.parametrize("name", ["project_softmax", "project_simplex", "project_identity_preserving"])
def test_torch_compile_traces_the_projections_with_a_symbolic_temperature(name):
    # dynamic=True turns the Python-float temperature into a symbolic float:
    # the argument check must trace (fullgraph: no graph break), and the
    # compiled weights, NaN row included, and gradients equal eager's.
    import torch

    import mhc_torch

    fn = getattr(mhc_torch, name)
    mu = torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.3, math.nan, 0.2, 0.1], [0.25, 0.0, 1.0, -0.5]], requires_grad=True)
    g = torch.tensor(DTYPE_COTANGENT, dtype=torch.float32)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    results = []
    for f in (compiled, fn):
        out = f(mu, temperature=0.7)
        (grad,) = torch.autograd.grad((out.nan_to_num(0.0) * g).sum(), mu)
        results.append((out.detach().numpy(), grad.numpy()))
    (a, ga), (b, gb) = results
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    assert np.isnan(a[1]).all()
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(ga, gb, atol=1e-6)
