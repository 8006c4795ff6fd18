"""Properties of MHCSkip, checked in both packages (``backend`` fixture).

Many tests read the mixing weights off the skip's output: with ``x = 0`` and
the states the unit vectors ``h_k = e_k``, ``out = sum_k alpha_k e_k`` is the
vector of weights (window order). The expected weights come from the public
projection functions applied to the last ``K`` logits, so the skip's window
masking, pruning, noise and gating are checked against the plain math.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import epsilons, temperatures

MODES = ["residual", "hc", "mhc"]
CONSTRAINTS = ["simplex", "identity"]


def _unit_states(k: int):
    """x = 0 and h_j = e_j in R^k, so a skip's output is its weight vector."""
    return np.zeros(k, np.float32), list(np.eye(k, dtype=np.float32))


def _weights(backend, options, logits, k, **run):
    """The weights an MHCSkip gives a window of k states, read off its output."""
    x, states = _unit_states(k)
    params = {"mixing_logits": np.asarray(logits, np.float32)} if options.get("mode", "mhc") != "residual" else {}
    params.update(run.pop("extra_params", {}))
    out, _ = backend.run_skip(options, params, x, states, np.zeros_like(x), **run)
    return out


def _expected(backend, options, logits, k):
    """The documented weights (docs/mathematics.md) for the last k logits, from the public projections."""
    lib, mode = backend.lib, options.get("mode", "mhc")
    if mode == "residual":
        return np.eye(k, dtype=np.float32)[-1]
    mu = backend.array(np.asarray(logits[len(logits) - k :], np.float32))
    tau = options.get("temperature", 1.0)
    base = "softmax" if mode == "hc" else "simplex"
    if options.get("constraint", "simplex") == "identity":
        return backend.numpy(lib.project_identity_preserving(mu, options.get("epsilon", 0.1), tau, base))
    return backend.numpy(getattr(lib, f"project_{base}")(mu, tau))


@given(
    mode=st.sampled_from(MODES),
    constraint=st.sampled_from(CONSTRAINTS),
    h=st.integers(1, 6),
    k_extra=st.integers(0, 6),
    tau=temperatures(0.1, 10.0),
    eps=epsilons(),
    seed=st.integers(0, 2**16),
)
def test_weights_are_the_projection_of_the_last_k_logits(backend, mode, constraint, h, k_extra, tau, eps, seed):
    k = min(k_extra, h) or 1
    logits = np.random.default_rng(seed).normal(0, 2, h).astype(np.float32)
    options = dict(mode=mode, constraint=constraint, max_history=h, temperature=tau, epsilon=eps)
    got = _weights(backend, options, logits, k)
    np.testing.assert_allclose(got, _expected(backend, options, logits, k), atol=1e-6)
    if mode != "residual":
        np.testing.assert_allclose(got.sum(), 1.0, atol=1e-5)
    if constraint == "identity" and mode != "residual":
        assert got[-1] >= eps - 1e-6


def test_empty_window_returns_x_unchanged(backend):
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    g = np.ones_like(x)
    for options in (dict(), dict(mode="hc", use_gating=True), dict(mode="residual")):
        params = backend.fresh_skip_params(options, x, [])
        out, grads = backend.run_skip(options, params, x, [], g)
        np.testing.assert_array_equal(out, x)
        np.testing.assert_array_equal(grads["x"], g)


def test_only_the_last_max_history_states_are_mixed(backend):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3,)).astype(np.float32)
    states = list(rng.normal(size=(6, 3)).astype(np.float32))
    options = dict(max_history=3, init="uniform")
    params = backend.fresh_skip_params(options, x, states)
    long, grads = backend.run_skip(options, params, x, states, np.ones_like(x))
    short, _ = backend.run_skip(options, params, x, states[-3:], np.ones_like(x))
    np.testing.assert_allclose(long, short, atol=1e-7)
    np.testing.assert_allclose(long, x + np.mean(states[-3:], axis=0), atol=1e-6)
    assert all((g == 0).all() for g in grads["states"][:3])  # evicted states get no gradient


@pytest.mark.parametrize("mode", ["hc", "mhc"])
@pytest.mark.parametrize("constraint", CONSTRAINTS)
@given(h=st.integers(1, 8), k=st.integers(1, 10), tau=temperatures(), eps=epsilons(), seed=st.integers(0, 2**16))
def test_fresh_identity_init_is_within_1e_3_of_a_plain_residual(backend, mode, constraint, h, k, tau, eps, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, 8)).astype(np.float32)
    states = list(rng.normal(size=(k, 4, 8)).astype(np.float32))  # unit scale
    options = dict(mode=mode, constraint=constraint, max_history=h, temperature=tau, epsilon=eps)
    params = backend.fresh_skip_params(options, x, states)
    out, _ = backend.run_skip(options, params, x, states, np.zeros_like(x))
    assert np.abs(out - (x + states[-1])).max() <= 1e-3


@pytest.mark.parametrize("mode", ["hc", "mhc"])
@pytest.mark.parametrize("constraint", CONSTRAINTS)
@pytest.mark.parametrize("h", [2, 4, 6])
def test_identity_init_gives_every_logit_a_gradient(backend, mode, constraint, h):
    # The simplex support keeps every slot, so no logit is dead at step one.
    rng = np.random.default_rng(h)
    x = rng.normal(size=(5,)).astype(np.float32)
    states = list(rng.normal(size=(h, 5)).astype(np.float32))
    options = dict(mode=mode, constraint=constraint, max_history=h)
    params = backend.fresh_skip_params(options, x, states)
    weights = _weights(backend, options, params["mixing_logits"], h)
    assert (weights > 0).all()
    _, grads = backend.run_skip(options, params, x, states, rng.uniform(-1, 1, 5).astype(np.float32))
    assert (np.abs(grads["mixing_logits"]) > 0).all()


def test_both_packages_build_the_same_initial_parameters():
    from tests.backends import BACKENDS

    x = np.zeros((2, 4), np.float32)
    states = [np.ones((2, 4), np.float32)] * 3
    for options in (dict(), dict(mode="hc", temperature=0.5, use_gating=True), dict(init="uniform", max_history=6)):
        jax_params, torch_params = (BACKENDS[n]("cpu").fresh_skip_params(options, x, states) for n in ("jax", "torch"))
        assert jax_params.keys() == torch_params.keys()
        for name in jax_params:
            np.testing.assert_array_equal(jax_params[name], torch_params[name])


def test_uniform_init_weights_the_window_equally(backend):
    for k in (1, 3, 4):
        options = dict(init="uniform", max_history=4)
        params = backend.fresh_skip_params(options, *_unit_states(k))
        np.testing.assert_allclose(_weights(backend, options, params["mixing_logits"], k), np.full(k, 1 / k), atol=1e-7)


@given(thr=st.floats(0.01, 0.9), seed=st.integers(0, 2**16), mode=st.sampled_from(["hc", "mhc"]))
def test_pruning_zeroes_small_weights_without_renormalising(backend, thr, seed, mode):
    logits = np.random.default_rng(seed).normal(0, 1, 5).astype(np.float32)
    options = dict(mode=mode, max_history=5, prune_threshold=thr)
    full = _expected(backend, options, logits, 5)
    got = _weights(backend, options, logits, 5)
    np.testing.assert_allclose(got, np.where(full < thr, 0.0, full), atol=1e-6)


def test_gate_scales_the_mix(backend):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3,)).astype(np.float32)
    states = list(rng.normal(size=(2, 3)).astype(np.float32))
    logits = np.array([0.3, -0.2], np.float32)
    ungated, _ = backend.run_skip(dict(max_history=2), {"mixing_logits": logits}, x, states, np.zeros(3, np.float32))
    params = {"mixing_logits": logits, "gate_logit": np.full((1,), -0.7, np.float32)}
    gated, _ = backend.run_skip(dict(max_history=2, use_gating=True), params, x, states, np.zeros(3, np.float32))
    gate = 1 / (1 + math.exp(0.7))
    np.testing.assert_allclose(gated - x, gate * (ungated - x), atol=1e-6)


@given(seed=st.integers(0, 2**16), tau=temperatures(0.5, 2.0))
def test_gumbel_noise_only_in_training_and_zeros_stay_zero(backend, seed, tau):
    rng = np.random.default_rng(seed)
    logits = np.array([5.0, 0.2, 0.0, 0.4], np.float32) * tau  # slot 0 beyond the window
    noise = rng.gumbel(size=4).astype(np.float32)
    options = dict(max_history=4, temperature=tau, stochastic=True, prune_threshold=0.2)
    plain = _weights(backend, dict(options, stochastic=False), logits, 3)
    evaluated = _weights(backend, options, logits, 3, training=False, gumbel_noise=noise)
    np.testing.assert_array_equal(evaluated, plain)
    noisy = _weights(backend, options, logits, 3, training=True, gumbel_noise=noise)
    # softmax((log alpha + G) / tau) over the surviving weights; the rest stay 0.
    keep = plain > 0
    z = np.where(keep, (np.log(np.where(keep, plain, 1)) + noise[1:]) / tau, -np.inf)
    expected = np.where(keep, np.exp(z - z.max()) / np.exp(z - z.max()).sum(), 0)
    np.testing.assert_allclose(noisy, expected, atol=1e-5)
    assert (noisy[~keep] == 0).all()


def test_shape_mismatch_names_both_shapes(backend):
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"history state 0 has shape \(2, 3\) but x has shape \(2, 4\)"):
        backend.run_skip(dict(), {"mixing_logits": np.zeros(4, np.float32)}, x, [np.zeros((2, 3), np.float32)], x)


def test_auto_project_maps_only_the_feature_axis(backend):
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"auto_project maps only the feature.*\(3, 5\).*\(2, 4\)"):
        backend.fresh_skip_params(dict(auto_project=True), x, [np.zeros((3, 5), np.float32)])


def test_auto_project_mixes_a_learned_linear_map_of_other_sizes(backend):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 4)).astype(np.float32)
    states = [rng.normal(size=(2, 6)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32)]
    options = dict(auto_project=True, max_history=2, init="uniform")
    params = backend.fresh_skip_params(options, x, states)
    weight = params["projection_from_6.weight"]
    assert weight.shape == (4, 6)
    assert np.abs(weight).max() <= 1 / math.sqrt(6)  # torch.nn.Linear's init range
    out, _ = backend.run_skip(options, params, x, states, np.zeros_like(x))
    np.testing.assert_allclose(out, x + 0.5 * (states[0] @ weight.T) + 0.5 * states[1], atol=1e-6)


def test_auto_project_uses_the_channel_axis_of_images(backend):
    # torch layout NCHW (the JAX adapter hands Flax NHWC): channels 3 -> 5.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 5, 4, 4)).astype(np.float32)
    states = [rng.normal(size=(2, 3, 4, 4)).astype(np.float32)]
    options = dict(auto_project=True, max_history=1)
    params = backend.fresh_skip_params(options, x, states)
    out, _ = backend.run_skip(options, params, x, states, np.zeros_like(x))
    mapped = np.einsum("oc,nchw->nohw", params["projection_from_3.weight"], states[0])
    np.testing.assert_allclose(out, x + mapped, atol=1e-5)


BAD_OPTIONS = [
    ("mode", "dense", "mode must be one of ('residual', 'hc', 'mhc'), got 'dense'"),
    ("constraint", "box", "constraint must be one of ('simplex', 'identity'), got 'box'"),
    ("init", "normal", "init must be one of ('identity', 'uniform'), got 'normal'"),
    ("max_history", 0, "max_history must be an int >= 1, got 0"),
    ("max_history", 2.0, "max_history must be an int >= 1, got 2.0"),
    ("temperature", 0.0, "temperature must be a finite number > 0, got 0.0"),
    ("temperature", -1, "temperature must be a finite number > 0, got -1"),
    ("temperature", math.inf, "temperature must be a finite number > 0, got inf"),
    ("temperature", math.nan, "temperature must be a finite number > 0, got nan"),
    ("epsilon", 1.0, "epsilon must be a number in [0, 1), got 1.0"),
    ("epsilon", -0.1, "epsilon must be a number in [0, 1), got -0.1"),
    ("prune_threshold", 1.0, "prune_threshold must be a number in [0, 1), got 1.0"),
    ("prune_threshold", -0.5, "prune_threshold must be a number in [0, 1), got -0.5"),
]


@pytest.mark.parametrize("name, value, message", BAD_OPTIONS)
def test_bad_options_raise_at_construction(backend, name, value, message):
    if backend.name == "jax" and name == "init":  # Linen reserves Module.init
        name, message = "mixing_init", "mixing_" + message
    with pytest.raises(ValueError, match=re.escape(message)):
        backend.lib.MHCSkip(**{name: value})
