"""PyTorch specifics of mhc_torch.MHCSkip: lazy projections, modes, dtypes, no host sync."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mhc_torch import MHCSkip

# Every test here runs with the C++ mixing kernel and with the Python one.


def _inputs(k=3, shape=(2, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), [torch.randn(shape, generator=g) for _ in range(k)]


def test_parameters_use_the_shared_names():
    assert [n for n, _ in MHCSkip(use_gating=True, max_history=5).named_parameters()] == ["mixing_logits", "gate_logit"]
    assert list(MHCSkip(mode="residual", use_gating=True).parameters()) == []


def test_auto_projections_are_built_on_first_use_and_by_loading():
    x, _ = _inputs()
    _, other = _inputs(shape=(2, 6), seed=1)
    skip = MHCSkip(auto_project=True)
    assert "projection_from_6.weight" not in skip.state_dict()
    out = skip(x, other)
    state = skip.state_dict()
    assert state["projection_from_6.weight"].shape == (4, 6)

    fresh = MHCSkip(auto_project=True)
    fresh.load_state_dict(state)  # strict: the projection is created to receive its weight
    torch.testing.assert_close(fresh(x, other), out)


def test_eval_never_adds_noise_and_training_does():
    x, states = _inputs()
    skip = MHCSkip(stochastic=True, init="uniform")
    skip.eval()
    torch.testing.assert_close(skip(x, states), x + sum(states) / 3)
    skip.train()
    torch.manual_seed(0)
    a = skip(x, states)
    b = skip(x, states)
    torch.manual_seed(0)
    again = skip(x, states)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, again)


def test_gumbel_noise_must_align_with_the_logits():
    x, states = _inputs()
    with pytest.raises(ValueError, match=r"gumbel_noise must have shape \(4,\)"):
        MHCSkip(stochastic=True)(x, states, gumbel_noise=torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_moved_skip_keeps_the_input_dtype(dtype):
    x, states = _inputs()
    skip = MHCSkip(use_gating=True, auto_project=True).to(dtype)
    x, states = x.to(dtype), [s.to(dtype) for s in states]
    out = skip(x, states + [torch.randn(2, 6, dtype=dtype)])
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@contextlib.contextmanager
def _forbid_host_sync():
    """Fail on any Python read of a tensor value (.item(), bool(), float(), ...)."""

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation in the forward or backward pass")

    names = ["item", "tolist", "__bool__", "__float__", "__int__", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(mode="hc", use_gating=True, prune_threshold=0.2), dict(constraint="identity", stochastic=True)],
)
def test_forward_and_backward_never_read_values_on_the_host(options):
    x, states = _inputs()
    x.requires_grad_(True)
    skip = MHCSkip(**options)
    with _forbid_host_sync():
        skip(x, states).sum().backward()
    assert x.grad is not None and skip.mixing_logits.grad is not None
