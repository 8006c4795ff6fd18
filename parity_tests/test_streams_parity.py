"""mhc_jax and mhc_torch agree on the residual streams (docs/streams.md).

Tolerances as docs/parity.md: the Sinkhorn and the coefficients like projections
(absolute), one ``HyperConnection`` like one skip, a whole ``StreamSequential``
like a stack (relative to ``max(1, |value|)``). Gradients are taken of
``sum(out * g)`` for a random cotangent ``g``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, reject
from hypothesis import strategies as st

from parity_tests.parity import TOLERANCES, assert_parity
from tests.stream_helpers import random_params, run_flax, run_torch, torch_hyper_connection, torch_stack
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
    """Sinkhorn in float64 numpy, as docs/streams.md writes it (columns, then rows)."""
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


# --- coefficients ------------------------------------------------------------------------


def _coefficient_params(n: int, width: int, dynamic: bool, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {"b_pre": rng.normal(0, 1, n), "b_post": rng.normal(0, 1, n), "b_res": rng.normal(0, 1, (n, n))}
    if dynamic:
        params["phi"] = rng.normal(0, 1 / np.sqrt(n * width), (n * width, n * n + 2 * n))
        for name in ("a_pre", "a_post", "a_res"):
            params[name] = rng.uniform(0.0, 1.0, 1)
    return {k: v.astype(np.float32) for k, v in params.items()}


def _flat_coefficients(lib, mode: str, names: list[str]):
    """``(streams, *params) -> [h_pre | h_post | h_res]`` flattened on the last axis."""

    def fn(streams, *values):
        params = dict(zip(names, values, strict=True))
        if mode == "mhc":
            h = lib.mhc_coefficients(streams, **params)
        else:
            h = lib.hc_coefficients(streams, **params)
        lead = tuple(h[0].shape[:-1])
        return _concat(lib, [c.reshape(*lead, -1) for c in h])

    return fn


def _concat(lib, parts):
    if lib.__name__ == "mhc_jax":
        import jax.numpy as jnp

        return jnp.concatenate(parts, axis=-1)
    import torch

    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@given(
    n=st.integers(1, 8),
    dynamic=st.booleans(),
    scale=st.sampled_from([1e-2, 1.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_coefficients_and_their_gradients_agree(jx, pt, device, mode, n, dynamic, scale, seed):
    width = 5
    streams = (scale * np.random.default_rng(seed).normal(size=(3, n, width))).astype(np.float32)
    params = _coefficient_params(n, width, dynamic, seed)
    names = list(params)
    out_shape = (3, n * n + 2 * n) if dynamic else (n * n + 2 * n,)
    g = cotangents(out_shape, seed)
    args = [streams, *params.values()]
    a, ga = jx.vjp(_flat_coefficients(jx.lib, mode, names), args, g)
    b, gb = pt.vjp(_flat_coefficients(pt.lib, mode, names), args, g)
    c, gc = pt.vjp(_flat_coefficients(pt.lib, mode, names), [v.astype(np.float64) for v in args], g.astype(np.float64))
    labels = ["out", "streams", *names]
    scales = [1.0, scale, *[1.0] * len(names)]  # see the comment on the streams' gradient below
    reject_unresolvable_in_float32(
        *({k: s * v for k, s, v in zip(labels, scales, [o, *gs], strict=True)} for o, gs in ((a, ga), (b, gb), (c, gc))),
        kind="projection", device=device,
    )
    what = f"{mode} coefficients{'' if dynamic else ' (static)'}"
    assert_parity(a, b, kind="projection", device=device, what=what)
    # The coefficients see the streams through v / rms(v): their gradient
    # carries an exact 1/scale factor, taken out as for the temperature.
    ga[0], gb[0] = scale * ga[0], scale * gb[0]
    for name, x, y in zip(["streams (x scale)", *names], ga, gb, strict=True):
        assert_parity(x, y, kind="projection", device=device, what=f"{what} grad {name}")


# --- one HyperConnection, and whole stacks ---------------------------------------------------


def _compare(out_j, grads_j, out_t, grads_t, *, kind, device, what):
    assert_parity(out_j, out_t, kind=kind, device=device, what=what)
    assert set(grads_j) == set(grads_t), f"{what}: gradients of {sorted(grads_j)} vs {sorted(grads_t)}"
    for name in sorted(grads_t):
        # Gradients are grouped by the parameter's own name (phi, b_res, branch kernel, ...).
        leaf = name if name == "x" else ".".join(p for p in name.split(".") if not p.isdigit() and p != "layers")
        assert_parity(grads_j[name], grads_t[name], kind=kind, device=device, what=f"{what} grad {leaf}")


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@given(n=st.integers(1, 8), dynamic=st.booleans(), seed=st.integers(0, 2**16))
def test_one_hyper_connection_agrees(jx, pt, device, mode, n, dynamic, seed):
    # Small, like the skip's parity cases: a parameter's gradient sums over
    # every token and stream, and each framework's float32 sum of a few
    # hundred terms is a few 1e-7 from the exact one (measured against float64).
    width = 4
    options = dict(num_streams=n, mode=mode, dynamic=dynamic)
    params = random_params(torch_hyper_connection(width, options), seed)
    streams = np.random.default_rng(seed).normal(size=(2, n, width)).astype(np.float32)
    g = cotangents(streams.shape, seed)
    out_j, grads_j = run_flax("hyper_connection", width, options, params, streams, g, device=device)
    out_t, grads_t = run_torch(torch_hyper_connection(width, options), params, streams, g, device=device)
    out64, grads64 = run_torch(
        torch_hyper_connection(width, options).double(), _float64(params), streams.astype(np.float64), g.astype(np.float64)
    )
    reject_unresolvable_in_float32(
        {"out": out_j, **grads_j}, {"out": out_t, **grads_t}, {"out": out64, **grads64}, kind="skip", device=device
    )
    _compare(out_j, grads_j, out_t, grads_t, kind="skip", device=device, what=f"HyperConnection[{mode}]")


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@given(
    n=st.sampled_from([1, 3, 8]),
    depth=st.sampled_from([1, 4, 12]),
    dynamic=st.booleans(),
    scan=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_whole_stacks_agree_after_weight_conversion(jx, pt, device, mode, n, depth, dynamic, scan, seed):
    # Branch weights and the biases' and gating factors' spread scaled by
    # 1/sqrt(depth): a residual stack whose values stay O(n), not one that
    # grows geometrically (where both frameworks drift from the float64
    # result by more than the tolerance, together).
    width = 4
    options = dict(num_streams=n, mode=mode, dynamic=dynamic)
    params = random_params(
        torch_stack(width, depth, options), seed, spread=0.3 * depth**-0.5, branch_gain=depth**-0.5, alpha_max=depth**-0.5
    )
    x = np.random.default_rng(seed).normal(size=(2, width)).astype(np.float32)
    g = cotangents(x.shape, seed)
    out_j, grads_j = run_flax("stack", width, options, params, x, g, device=device, depth=depth, scan=scan)
    out_t, grads_t = run_torch(torch_stack(width, depth, options), params, x, g, device=device)
    out64, grads64 = run_torch(
        torch_stack(width, depth, options).double(), _float64(params), x.astype(np.float64), g.astype(np.float64)
    )
    reject_unresolvable_in_float32(
        {"out": out_j, **grads_j}, {"out": out_t, **grads_t}, {"out": out64, **grads64}, kind="stack", device=device
    )
    _compare(out_j, grads_j, out_t, grads_t, kind="stack", device=device, what=f"StreamSequential[{mode}]")


def _float64(params: dict) -> dict:
    return {k: v.astype(np.float64) for k, v in params.items()}



@pytest.mark.parametrize("mode, dynamic", [("mhc", True), ("mhc", False), ("hc", False)])
@pytest.mark.parametrize("scan", [False, True])
def test_fresh_depth_48_stack_agrees(jx, pt, device, mode, dynamic, scan):
    # A freshly built deep stack (the documented init; branch weights scaled
    # by 1/sqrt(depth) as a residual network's would be), torch -> Flax.
    # Dynamic HC is left to the random stacks above (depth <= 12): over 48
    # layers its unconstrained h_res makes the a_res gradient a sum whose
    # float32 value is ~1e-5 from the exact one in torch alone.
    depth, width, n = 48, 8, 4
    options = dict(num_streams=n, mode=mode, dynamic=dynamic)
    torch.manual_seed(0)
    model = torch_stack(width, depth, options)
    params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    params = {k: (v * depth**-0.5 if "branch." in k and k.endswith("weight") else v) for k, v in params.items()}
    x = np.random.default_rng(0).normal(size=(3, width)).astype(np.float32)
    g = cotangents(x.shape, 0)
    out_j, grads_j = run_flax("stack", width, options, params, x, g, device=device, depth=depth, scan=scan)
    out_t, grads_t = run_torch(model, params, x, g, device=device)
    _compare(out_j, grads_j, out_t, grads_t, kind="stack", device=device, what=f"StreamSequential[{mode}] depth 48")


#: The largest jax-torch difference (relative to max(1, |value|)) that float32
#: rounding can explain here; beyond it a disagreement fails whatever the conditioning.
ROUNDING = 1e-3


def reject_unresolvable_in_float32(jax_values: dict, torch_values: dict, exact: dict, *, kind: str, device: str) -> None:
    """Reject an example whose float32 result float32 cannot resolve to the tolerance.

    A parameter's gradient sums over every token, stream and matrix entry; when
    those terms cancel (HC's unconstrained coefficients, mostly), each
    framework's float32 sum is further from the exact (float64) one than the
    tolerance allows between the two, and torch's float32 result is then as far
    from the exact one as from the other framework's. Such an example
    measures float32, not the packages: it is rejected when either package's
    float32 result is more than half the tolerance from the exact one, once
    the packages are checked to agree to rounding size (a real disagreement
    still fails). ``exact`` is torch's result in float64; distances are
    measured as :func:`assert_parity` measures them (absolute for
    projections, relative to ``max(1, |value|)`` otherwise).
    """
    tolerance = TOLERANCES[kind, device]
    worst = 0.0
    for name, b in torch_values.items():
        a = np.asarray(jax_values[name], np.float64)
        b, c = np.asarray(b, np.float64), np.asarray(exact[name], np.float64)
        assert np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b)), initial=0.0) <= ROUNDING, (
            f"{name}: jax and torch differ beyond rounding"
        )
        scale = 1.0 if kind == "projection" else np.maximum(1.0, np.abs(c))
        worst = max(worst, float(np.max(np.maximum(np.abs(a - c), np.abs(b - c)) / scale, initial=0.0)))
    if worst > tolerance / 2:
        reject()
