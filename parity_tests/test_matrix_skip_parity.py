"""One MatrixMHCSkip gives the same output and gradients in mhc_jax and mhc_torch.

Hypothesis draws H (1 or 4), the window size K in 0..H+2 (longer lists are
cut to the last H), Sinkhorn (5 sweeps) or row softmax, logits from the
init's scale (0.01) to far from it, and a cotangent. Both packages get the
same ``mixing_logits``; the JAX skip is fed either a list of
states or a ``History`` ring buffer holding them. Compared: the output and the
gradients with respect to ``x``, every state and ``mixing_logits``, within the
skip tolerance of docs/parity.md.

As in test_skip_parity.py, states are small (8 elements), so the tolerance
measures the two implementations rather than float32 summation order.
"""

from __future__ import annotations

import jax
import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

import mhc_jax
import mhc_torch
from parity_tests.parity import assert_parity

#: One state shape: the mix is elementwise, so the shape adds nothing to
#: compare, and each new one would cost JAX a compile of every eager op.
SHAPE = (2, 4)
#: The degenerate 1 x 1 matrix and a larger one: JAX compiles a skip once per
#: (H, option), so more sizes would cost a compile each.
MAX_HISTORIES = [1, 4]
#: One sweep count, so JAX compiles the projection once per (H, option), not
#: per example; the projection alone is compared at 1, 5 and 20 sweeps in
#: test_projections_parity.py.
ITERATIONS = 5


@st.composite
def matrix_cases(draw):
    h = draw(st.sampled_from(MAX_HISTORIES))
    return dict(
        max_history=h,
        doubly_stochastic=draw(st.booleans()),
        iterations=ITERATIONS,
        num_states=draw(st.integers(0, h + 2)),
        ring=draw(st.booleans()),
        scale=draw(st.sampled_from([0.01, 1.0, 3.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _options(case) -> dict:
    return {name: case[name] for name in ("max_history", "doubly_stochastic", "iterations")}


def _run_jax(jx, case, logits, x, states, cotangent):
    skip = mhc_jax.MatrixMHCSkip(**_options(case))

    def run(logits, x, *states):
        if case["ring"]:
            history = mhc_jax.History.empty(x, skip.max_history)
            for state in states:
                history = history.push(state)
        else:
            history = list(states)
        return skip.apply({"params": {"mixing_logits": logits}}, x, history)

    out, pullback = jax.vjp(run, *[jx.array(a) for a in (logits, x, *states)])
    return jx.numpy(out), [jx.numpy(g) for g in pullback(jx.array(cotangent))]


def _run_torch(pt, case, logits, x, states, cotangent):
    skip = mhc_torch.MatrixMHCSkip(**_options(case)).to(pt.array(x).device)
    skip.load_state_dict({"mixing_logits": torch.as_tensor(logits)})
    inputs = [pt.array(a).requires_grad_(True) for a in (x, *states)]
    out = skip(inputs[0], inputs[1:])
    (out * pt.array(cotangent)).sum().backward()
    tensors = [skip.mixing_logits, *inputs]
    # No gradient reached it (an empty window, or an evicted state): zero.
    grads = [pt.numpy(t.grad) if t.grad is not None else np.zeros(t.shape, np.float32) for t in tensors]
    return pt.numpy(out), grads


@given(case=matrix_cases())
def test_matrix_skip_output_and_gradients_agree(jx, pt, device, case):
    rng = np.random.default_rng(case["seed"])
    h, shape = case["max_history"], SHAPE
    logits = (case["scale"] * rng.normal(size=(h, h))).astype(np.float32)
    x = rng.normal(size=shape).astype(np.float32)
    states = [rng.normal(size=shape).astype(np.float32) for _ in range(case["num_states"])]
    cotangent = rng.uniform(-1, 1, shape).astype(np.float32)

    out_j, grads_j = _run_jax(jx, case, logits, x, states, cotangent)
    out_t, grads_t = _run_torch(pt, case, logits, x, states, cotangent)

    check = dict(kind="skip", device=device)
    where = "History" if case["ring"] else "list"
    assert_parity(out_j, out_t, what=f"matrix skip output ({where})", **check)
    names = ["mixing_logits", "x"] + [f"history ({where})"] * len(states)
    for name, gj, gt in zip(names, grads_j, grads_t, strict=True):
        assert_parity(gj, gt, what=f"matrix skip grad {name}", **check)
