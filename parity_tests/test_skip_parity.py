"""One MHCSkip gives the same output and gradients in mhc_jax and mhc_torch.

Hypothesis draws every option (mode, constraint, H, K in 0..H+2 so windows
longer than H are cut, temperature, epsilon, init, gating, pruning,
stochastic, auto_project), logits around the init, inputs and a cotangent;
both packages get the same parameters (torch naming, converted for Flax) and,
in stochastic training, the same Gumbel noise. The JAX skip is fed either a
list of states or a ``History`` ring buffer holding the same states.

Arrays are kept small (at most 16 elements) so a gradient's reductions are
short enough for the 1e-6 skip tolerance of docs/parity.md to measure the two
implementations rather than float32 summation order. Logit gradients are
compared after multiplying by ``tau`` (see test_projections_parity.py).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import mhc_torch
from parity_tests.discontinuities import reject_ill_conditioned, same_side_or_reject
from parity_tests.parity import assert_parity
from tests.strategies import epsilons, temperatures

#: Torch layout; the last is an NCHW image batch with 4 channels.
SHAPES = [(4,), (2, 4), (2, 2, 4), (1, 4, 2, 2)]
#: The feature size a state has when auto_project is exercised.
OTHER_FEATURES = 3


@st.composite
def skip_cases(draw):
    h = draw(st.integers(1, 6))
    options = dict(
        mode=draw(st.sampled_from(mhc_torch.skip.MODES)),
        max_history=h,
        constraint=draw(st.sampled_from(mhc_torch.skip.CONSTRAINTS)),
        epsilon=draw(epsilons()),
        temperature=draw(temperatures()),
        init=draw(st.sampled_from(mhc_torch.skip.INITS)),
        auto_project=draw(st.booleans()),
        use_gating=draw(st.booleans()),
        prune_threshold=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.6))),
        stochastic=draw(st.booleans()),
    )
    return dict(
        options=options,
        num_states=draw(st.integers(0, h + 2)),
        shape=draw(st.sampled_from(SHAPES)),
        ring=draw(st.booleans()),
        training=draw(st.booleans()),
        # How far the logits stray from their init: 0 is a freshly built skip.
        spread=draw(st.sampled_from([0.0, 0.1, 1.0, 10.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _inputs(case):
    """Parameters, x, states, cotangent and noise for a case, in torch layout."""
    o, rng = case["options"], np.random.default_rng(case["seed"])
    shape = case["shape"]
    axis = 1 if len(shape) >= 4 else len(shape) - 1

    def state_shape(other: bool):
        s = list(shape)
        s[axis] = OTHER_FEATURES if other else s[axis]
        return tuple(s)

    n = case["num_states"]
    if not o["auto_project"]:
        others = [False] * n
    elif case["ring"]:  # a History holds states of one shape
        others = [bool(rng.integers(2))] * n
    else:
        others = [bool(b) for b in rng.integers(0, 2, n)]
    states = [rng.normal(size=state_shape(other)).astype(np.float32) for other in others]
    x = rng.normal(size=shape).astype(np.float32)
    cotangent = rng.uniform(-1, 1, shape).astype(np.float32)

    params = {}
    if o["mode"] != "residual":
        h, tau = o["max_history"], o["temperature"]
        init = mhc_torch.identity_init_logits(h, o["mode"], tau) if o["init"] == "identity" else np.zeros(h, np.float32)
        params["mixing_logits"] = (init + case["spread"] * tau * rng.normal(size=h)).astype(np.float32)
        if o["use_gating"]:
            params["gate_logit"] = np.full((1,), rng.normal() * 2, np.float32)
    window = states[-o["max_history"] :]
    if any(s.shape != shape for s in window):
        weight = rng.uniform(-0.6, 0.6, (shape[axis], OTHER_FEATURES)).astype(np.float32)
        params[f"projection_from_{OTHER_FEATURES}.weight"] = weight
    training = case["training"]
    noise = rng.gumbel(size=o["max_history"]).astype(np.float32) if o["stochastic"] and training else None
    return params, x, states, cotangent, noise


def _reject_on_edges(jx, pt, case, params):
    """Reject examples whose weights sit on the support edge or the prune threshold."""
    o = case["options"]
    if o["mode"] == "residual":
        return
    k = min(case["num_states"], o["max_history"])
    kwargs = dict(mode=o["mode"], constraint=o["constraint"], temperature=o["temperature"], epsilon=o["epsilon"])
    logits = params["mixing_logits"]
    a = jx.numpy(jx.lib.window_weights(jx.array(logits), k, **kwargs))
    b = pt.numpy(pt.lib.window_weights(pt.array(logits), k, **kwargs))
    if o["mode"] == "mhc":
        floor = o["epsilon"] * (np.arange(len(a)) == len(a) - 1) * (o["constraint"] == "identity") * (k > 0)
        same_side_or_reject(a - floor, b - floor, 0.0, what="simplex support")
    if o["prune_threshold"] > 0:
        same_side_or_reject(a, b, o["prune_threshold"], what="prune threshold", inclusive=True)
        a = np.where(a < o["prune_threshold"], 0, a)
    if o["stochastic"] and case["training"]:
        reject_ill_conditioned(a)


@given(case=skip_cases())
def test_skip_output_and_gradients_agree(jx, pt, device, case):
    params, x, states, cotangent, noise = _inputs(case)
    _reject_on_edges(jx, pt, case, params)
    o = case["options"]
    run = dict(training=case["training"], gumbel_noise=noise)
    out_j, grads_j = jx.run_skip(o, params, x, states, cotangent, ring=case["ring"], **run)
    out_t, grads_t = pt.run_skip(o, params, x, states, cotangent, **run)

    check = dict(kind="skip", device=device)
    where = "History" if case["ring"] else "list"
    assert_parity(out_j, out_t, what=f"skip output ({where})", **check)
    assert_parity(grads_j["x"], grads_t["x"], what="skip grad x", **check)
    assert len(grads_j["states"]) == len(grads_t["states"])
    for gj, gt in zip(grads_j["states"], grads_t["states"], strict=True):
        assert_parity(gj, gt, what=f"skip grad history ({where})", **check)
    assert set(params) <= set(grads_j) and set(params) <= set(grads_t)
    for name in params:
        scale = o["temperature"] if name == "mixing_logits" else 1.0
        label = f"skip grad {name}" + (" (x tau)" if name == "mixing_logits" else "")
        what = label if not name.startswith("projection_from") else "skip grad projection weight"
        assert_parity(scale * grads_j[name], scale * grads_t[name], what=what, **check)
