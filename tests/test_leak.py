"""Dead slots and ``leak``, both packages.

In ``mode="mhc"`` a weight that reaches exactly 0 sits outside the simplex
projection's support, where its logit gets no gradient: the slot is dead and
stays dead. ``diagnose`` reports it; ``leak = l`` blends in the softmax of the
same logits, ``w = (1 - l) w_simplex + l w_softmax`` (docs/mathematics.md),
so every weight stays positive and every logit keeps a gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mhc_jax
import mhc_torch
from tests.test_projections import reference_projection

MONITORS = {"jax": mhc_jax.monitoring, "torch": mhc_torch.monitoring}


def _reference(mu: np.ndarray, k: int, constraint: str, tau: float, eps: float, leak: float):
    """(weights, Jacobian) of the window's last ``k`` logits, from the float64 reference projections."""
    name = "project_identity_preserving" if constraint == "identity" else None
    parts = []
    for base in ("simplex", "softmax"):
        kwargs = dict(temperature=tau, epsilon=eps, base=base)
        parts.append(reference_projection(name or f"project_{base}", kwargs, mu[..., -k:]))
    (a_s, j_s), (a_m, j_m) = parts
    return (1 - leak) * a_s + leak * a_m, (1 - leak) * j_s + leak * j_m


#: (constraint, temperature, epsilon, leak): each checked on a batch of random rows at once.
BLENDS = [
    ("simplex", 1.0, 0.1, 0.05),
    ("simplex", 0.5, 0.0, 0.5),
    ("identity", 2.0, 0.3, 0.05),
    ("identity", 1.0, 0.9, 0.99),
]


@pytest.mark.parametrize("constraint, tau, eps, leak", BLENDS)
def test_leak_is_the_blend_of_simplex_and_softmax(backend, constraint, tau, eps, leak):
    # One batched call covers many windows: 300 rows of H = 5 logits at three
    # scales, each row with its own window size K in 1..5.
    rng = np.random.default_rng(0)
    h = 5
    mu = (rng.normal(size=(300, h)) * rng.choice([0.3, 3.0, 10.0], size=(300, 1))).astype(np.float32)
    ks = rng.integers(1, h + 1, size=300)
    cotangent = rng.uniform(-1, 1, mu.shape).astype(np.float32)
    options = dict(mode="mhc", constraint=constraint, temperature=tau, epsilon=eps, leak=leak)
    w, (grad,) = backend.vjp(lambda m: backend.lib.window_weights(m, backend.array(ks), **options), [mu], cotangent)
    for row, k in enumerate(ks):
        expected, jac = _reference(mu[row], k, constraint, tau, eps, leak)
        np.testing.assert_allclose(w[row, h - k :], expected, atol=1e-5)
        assert (w[row, : h - k] == 0).all()  # slots outside the window stay exactly 0
        assert (w[row, h - k :] > 0).all()  # never exactly 0 inside it: no dead slot
        if constraint == "identity":
            assert w[row, -1] >= (1 - 1e-6) * eps
        # The gradient is the blend's: (1 - l) J_simplex + l J_softmax.
        np.testing.assert_allclose(grad[row, h - k :], cotangent[row, h - k :] @ jac, atol=1e-4)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)


def test_a_dead_slot_gets_a_gradient_only_with_leak(backend):
    lib = backend.lib
    mu = np.array([-3.0, 0.0, 3.0], np.float32)  # the first slot is far outside the support
    cotangent = np.array([1.0, 0.0, 0.0], np.float32)  # the loss wants more of the first slot
    for leak, alive in ((0.0, False), (0.05, True)):
        w, (grad,) = backend.vjp(lambda m: lib.window_weights(m, 3, leak=leak), [mu], cotangent)
        assert (w[0] > 0) == alive and (grad[0] > 0) == alive


@pytest.fixture
def one_thread():
    # Tensors of 32 x 8: a second intra-op thread only adds contention (200
    # steps took over a minute instead of about a second on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(stack: nn.Module, steps: int = 200, lr: float = 1e-2) -> None:
    """Adam on a random regression; leaves the gradients of one more step's loss."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=generator), torch.randn(32, 8, generator=generator)
    optimizer = torch.optim.Adam(stack.parameters(), lr=lr)
    for step in range(steps + 1):
        optimizer.zero_grad()
        (stack(x) - y).pow(2).mean().backward()
        if step < steps:
            optimizer.step()


def _stack(leak: float) -> mhc_torch.MHCSequential:
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(7)]
    return mhc_torch.MHCSequential(layers, max_history=4, leak=leak)


def test_dead_slots_reproduce_and_diagnose_names_them_and_the_cure(one_thread):
    # A new user's run: default init, 200 Adam steps at lr 1e-2.
    stack = _stack(0.0)
    _train(stack)
    weights = mhc_torch.extract_mixing_weights(stack)
    dead = [name for name, w in weights.items() if len(w) > 1 and (w == 0).any()]
    assert len(dead) >= 4
    warning = next(w for w in mhc_torch.diagnose(weights) if w.kind == "dead")
    assert set(warning.layers) == set(dead) and "leak=" in warning.message


def test_leak_keeps_every_slot_learning_through_the_same_run(one_thread):
    stack = _stack(0.05)
    _train(stack)
    weights = mhc_torch.extract_mixing_weights(stack)
    assert all((w > 0).all() for w in weights.values())
    assert "dead" not in {w.kind for w in mhc_torch.diagnose(weights)}
    for i, skip in enumerate(stack.skip_layers[1:], start=1):  # layer 0's one-state window has no choice
        k = min(i + 1, 4)  # the window layer i mixes
        assert (skip.mixing_logits.grad[4 - k :] != 0).all(), f"layer {i}: a logit without gradient"


def test_leak_lets_a_dead_slot_come_back(one_thread):
    # Phase 1 wants only the latest state, so the older slot dies; phase 2 wants
    # both halves. The exact projection cannot revive the slot; the leak can.
    generator = torch.Generator().manual_seed(0)
    x, h0, h1 = torch.randn(3, 32, 8, generator=generator)
    final = {}
    for leak in (0.0, 0.05):
        skip = mhc_torch.MHCSkip(max_history=2, leak=leak)
        optimizer = torch.optim.Adam(skip.parameters(), lr=3e-2)
        for target in (x + h1, x + 0.5 * h0 + 0.5 * h1):
            for _ in range(150):
                loss = (skip(x, [h0, h1]) - target).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        final[leak] = mhc_torch.extract_mixing_weights(skip)[""]
    assert final[0.0][0] == 0.0  # dead, and stayed dead
    assert abs(final[0.05][0] - 0.5) < 0.05  # came back to what phase 2 asks


@pytest.mark.parametrize("monitor", sorted(MONITORS))
def test_diagnose_reports_dead_slots_only(monitor):
    diagnose = MONITORS[monitor].diagnose
    weights = {
        "dead": np.array([0.0, 0.3, 0.7]),
        "alive": np.array([0.01, 0.29, 0.7]),
        "one_slot": np.array([1.0]),
        "empty": np.zeros(3),
    }
    found = {w.kind: w.layers for w in diagnose(weights)}
    assert found["dead"] == ("dead",)
    assert found["empty"] == ("empty",)  # an empty window is reported as empty, not dead


@pytest.mark.parametrize("lib", [mhc_torch, mhc_jax], ids=["torch", "jax"])
def test_bad_leak_is_named(lib):
    layers = [nn.Linear(2, 2)] if lib is mhc_torch else [lambda x: x]
    for bad in (1.0, -0.1, True, "0.1", float("nan")):
        with pytest.raises(ValueError, match=f"leak must be a number in \\[0, 1\\), got {bad!r}"):
            lib.MHCSkip(leak=bad)
        with pytest.raises(ValueError, match="leak must be"):
            lib.MHCSequential(layers, leak=bad)
    for mode in ("hc", "residual"):
        with pytest.raises(ValueError, match=f"leak applies to mode='mhc'.*mode='{mode}'"):
            lib.MHCSkip(mode=mode, leak=0.1)
    assert lib.MHCSkip(mode="hc", leak=0.0).leak == 0.0  # 0 is the default everywhere
