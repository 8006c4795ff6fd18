"""``leak`` (mode="mhc"): the blended weights, their gradients and whole stacks
agree across packages within the tolerances of docs/parity.md."""

from __future__ import annotations

import numpy as np
import pytest

from parity_tests.parity import assert_parity
from parity_tests.test_stack_parity import _compare, _fixed_case


@pytest.mark.parametrize("constraint, tau, eps, leak", [("simplex", 1.0, 0.1, 0.05), ("identity", 0.5, 0.3, 0.5)])
def test_leaky_window_weights_agree(jx, pt, device, constraint, tau, eps, leak):
    # 200 random rows (H = 6) at three scales, each with its own window size,
    # so the exact part has zeros, a full support and everything between.
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(200, 6)) * rng.choice([0.3, 3.0, 10.0], size=(200, 1))).astype(np.float32)
    counts = rng.integers(0, 7, size=200)
    cotangent = rng.uniform(-1, 1, logits.shape).astype(np.float32)
    options = dict(mode="mhc", constraint=constraint, temperature=tau, epsilon=eps, leak=leak)
    results = [
        b.vjp(lambda m, b=b: b.lib.window_weights(m, b.array(counts), **options), [logits], cotangent)
        for b in (jx, pt)
    ]
    (w_j, (g_j,)), (w_t, (g_t,)) = results
    check = dict(kind="projection", device=device)
    assert_parity(w_j, w_t, what="leaky window weights", **check)
    assert_parity(tau * g_j, tau * g_t, what="leaky window weights grad (x tau)", **check)


@pytest.mark.parametrize("torch_first", [True, False])
def test_leaky_stack_agrees(jx, pt, device, torch_first):
    # spread=3 puts many exact-projection weights at 0: the leak is what keeps them
    # positive. Unrolled only: the scanned stack projects its weights with the same call.
    case = _fixed_case("linear_softsign", 12, torch_first)
    case["options"].update(leak=0.05, use_gating=False)
    case["spread"] = 3.0
    _compare(jx, pt, device, case)
