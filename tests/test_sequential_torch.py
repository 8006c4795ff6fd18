"""mhc_torch.MHCSequential: the documented stateful API."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mhc_torch import HistoryBuffer, MHCSequential
from tests.test_skip_torch import _forbid_host_sync

WIDTH = 6


def _stack(depth=5, **options) -> MHCSequential:
    torch.manual_seed(0)
    model = MHCSequential([nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(depth)], **options)
    with torch.no_grad():
        for skip in model.skip_layers:
            for p in skip.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model


def _manual(model: MHCSequential, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The documented loop (docs/mathematics.md), with each skip called on its own."""
    h = model.max_history
    window = [x]
    for layer, skip in zip(model.wrapped_modules, model.skip_layers, strict=True):
        x = skip(layer(x), window[-h:])
        window.append(x)
    return x, window[-h:]


@pytest.mark.parametrize("mode", ["residual", "hc", "mhc"])
def test_stack_is_the_spec_loop_and_records_the_window(mode):
    model = _stack(mode=mode, max_history=3, use_gating=True, constraint="identity")
    x = torch.randn(4, WIDTH)
    out = model(x)
    expected, window = _manual(model, x)
    torch.testing.assert_close(out, expected)
    assert len(model.history_buffer) == 3
    for got, want in zip(model.history_buffer.get(), window, strict=True):
        torch.testing.assert_close(got, want)


def test_each_forward_starts_fresh_by_default():
    model = _stack()
    a, b = torch.randn(3, WIDTH), torch.randn(3, WIDTH)
    first = model(a)
    model(b)
    torch.testing.assert_close(model(a), first)
    torch.testing.assert_close(torch.cat([model(a[:1]), model(a[1:])]), first)


def test_keeping_history_across_calls_bleeds_until_cleared():
    # Seed document: buffers that persist across batches leak features of one
    # batch into the next ("temporal bleeding"); clear_history() stops it.
    model = _stack(clear_history_each_forward=False)
    a, b = torch.randn(3, WIDTH), torch.randn(3, WIDTH)
    fresh = _stack()(a)
    model(b)
    assert not torch.allclose(model(a), fresh)
    model.clear_history()
    torch.testing.assert_close(model(a), fresh)


def test_detach_history_cuts_gradient_through_the_window_only():
    model, detached = _stack(), _stack(detach_history=True)
    x = torch.randn(3, WIDTH)
    torch.testing.assert_close(model(x), detached(x))
    assert all(not s.requires_grad for s in detached.history_buffer.get())
    grads = []
    for m in (model, detached):
        xi = x.clone().requires_grad_(True)
        m(xi).sum().backward()
        grads.append(xi.grad)
        assert all(s.mixing_logits.grad is not None for s in m.skip_layers[1:])  # weights still learn
    assert not torch.allclose(*grads)


def test_checkpointing_gives_the_same_gradients():
    plain, checkpointed = _stack(stochastic=True), _stack(stochastic=True, use_checkpointing=True)
    x = torch.randn(3, WIDTH)
    noise = torch.distributions.Gumbel(0.0, 1.0).sample((5, 4))
    for m in (plain, checkpointed):
        m(x, gumbel_noise=noise).square().sum().backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def _all_states_by_skip(model: MHCSequential, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """``x_0 .. x_L`` per input from the documented loop, each skip called on its
    own (plain autograd: every state gets ``H`` separate history gradients).
    Several inputs run one after another, carrying the window over."""
    h, window, states = model.max_history, [], []
    for x in inputs:
        window.append(x)
        states.append(x)
        for layer, skip in zip(model.wrapped_modules, model.skip_layers, strict=True):
            window.append(skip(layer(window[-1]), window[-h:]))
            states.append(window[-1])
    return states


def _all_states_by_stack(model: MHCSequential, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """The same states from ``model(x)`` calls: each layer's input, then the output."""
    states = []
    hooks = [m.register_forward_pre_hook(lambda m, args: states.append(args[0])) for m in model.wrapped_modules]
    for x in inputs:
        out = model(x)
        assert states[-len(model.wrapped_modules)] is x
        states.append(out)
    for hook in hooks:
        hook.remove()
    return states


def _gradients(model: MHCSequential, run, backward, calls=1) -> list[torch.Tensor]:
    """Gradients of every parameter and every state (``retain_grad``) after
    ``backward(loss, states)``; plus whatever ``backward`` returns."""
    torch.manual_seed(1)
    width = model.wrapped_modules[0].in_features if isinstance(model.wrapped_modules[0], nn.Linear) else WIDTH
    inputs = [torch.randn(3, width, requires_grad=True) for _ in range(calls)]
    states = run(model, *inputs)
    for s in states:
        s.retain_grad()
    depth = len(model.wrapped_modules)
    loss = sum((out**2).sum() for out in states[depth :: depth + 1])
    extra = backward(loss, states)
    return [p.grad for p in model.parameters()] + [s.grad for s in states] + list(extra or [])


def _same_gradients(backward, calls=1, make=lambda **options: _stack(6, **options), **options):
    got = _gradients(make(**options), _all_states_by_stack, backward, calls)
    want = _gradients(make(**options), _all_states_by_skip, backward, calls)
    assert len(got) == len(want)
    # Equal up to float32 rounding: the stack projects all layers' logits in
    # one batched call and adds each state's history gradients in its own
    # order. The rounding of a backward pass scales with what flows through
    # it, so atol follows the largest gradient: plain autograd's softmax
    # backward, near the one-hot weights of the identity init, is off by
    # ~1e-7 x |dL/dw| (its logit gradients do not even sum to 0), which the C++
    # kernel's shifted one is not. A misrouted gradient is off by a whole one.
    scale = max(b.abs().max().item() for b in want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=max(1e-5, 2e-6 * scale))


@pytest.mark.parametrize("h", [1, 2, 3, 7])
@pytest.mark.parametrize("mode", ["hc", "mhc"])
def test_state_gradients_summed_by_the_stack_equal_plain_autograd(mode, h):
    # Every state's .grad (a hook), the input's and every parameter's.
    _same_gradients(lambda loss, states: loss.backward(), mode=mode, max_history=h)


def test_state_gradients_with_a_carried_window():
    # States carried over from the previous call are finished by plain autograd.
    _same_gradients(
        lambda loss, states: loss.backward(), calls=2, max_history=3, mode="hc", clear_history_each_forward=False
    )


def test_state_gradients_when_skips_project_the_states():
    # auto_project: a skip mixes its own projection of a state, whose
    # gradient must reach the state through that projection.
    def make(**options):
        torch.manual_seed(0)
        layers = [nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 5), nn.Linear(5, 5), nn.Linear(5, 5)]
        return MHCSequential(layers, auto_project=True, **options)

    _same_gradients(lambda loss, states: loss.backward(), make=make, max_history=3, mode="hc")


def test_state_gradients_over_a_retained_graph_and_a_partial_pass():
    # A pass cut short by inputs= leaves sums pending; the next pass over the
    # retained graph must not pick them up, and a second full pass adds up.
    # (hc: every weight > 0, so a stale sum could not hide behind a zero weight.)
    def backward(loss, states):
        partial = torch.autograd.grad(loss, [states[3]], retain_graph=True)
        loss.backward(retain_graph=True)
        loss.backward()
        return partial

    _same_gradients(backward, max_history=3, mode="hc")


def test_state_gradients_support_double_backward():
    def backward(loss, states):
        (grad,) = torch.autograd.grad(loss, [states[0]], create_graph=True)
        grad.square().sum().backward()

    _same_gradients(backward, max_history=3, mode="hc")


def test_stochastic_noise_only_in_training():
    model = _stack(stochastic=True)
    x = torch.randn(3, WIDTH)
    model.eval()
    evaluated = model(x)
    reference = _stack()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(evaluated, reference(x))
    model.train()
    assert not torch.allclose(model(x), model(x))
    with pytest.raises(ValueError, match=r"gumbel_noise must have shape \(5, 4\)"):
        model(x, gumbel_noise=torch.zeros(4))


def test_moving_the_model_moves_the_stored_states():
    # Seed FAQ 3: the stack is device aware; here with dtypes (CUDA in the GPU test).
    model = _stack(clear_history_each_forward=False)
    model(torch.randn(2, WIDTH))
    model.double()
    assert all(s.dtype == torch.float64 for s in model.history_buffer.get())
    model(torch.randn(2, WIDTH, dtype=torch.float64))  # old and new states mix without error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moving_to_cuda_moves_the_stored_states():
    model = _stack(clear_history_each_forward=False)
    model(torch.randn(2, WIDTH))
    model.cuda()
    assert all(s.is_cuda for s in model.history_buffer.get())
    model(torch.randn(2, WIDTH, device="cuda"))


def test_auto_project_lets_layers_change_the_width():
    model = MHCSequential([nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)], auto_project=True)
    assert model(torch.randn(4, 6)).shape == (4, 3)
    assert model.skip_layers[2].projection_from_8.weight.shape == (3, 8)
    with pytest.raises(ValueError, match=r"history state 0 has shape \(4, 6\) but x has shape \(4, 8\)"):
        MHCSequential([nn.Linear(6, 8), nn.Linear(8, 8)])(torch.randn(4, 6))


def test_forward_and_backward_never_read_values_on_the_host():
    model = _stack(stochastic=True, use_gating=True, prune_threshold=0.1)
    x = torch.randn(3, WIDTH, requires_grad=True)
    with _forbid_host_sync():
        model(x).sum().backward()
    assert x.grad is not None


def test_documented_attributes_and_errors():
    model = _stack(max_history=3)
    assert isinstance(model.history_buffer, HistoryBuffer) and model.history_buffer.max_history == 3
    names = [n for n, _ in model.named_parameters()]
    assert "wrapped_modules.0.0.weight" in names and "skip_layers.4.mixing_logits" in names
    with pytest.raises(ValueError, match=r"at least one module \(depth >= 1\), got 0"):
        MHCSequential([])
    with pytest.raises(ValueError, match="mode must be one of"):
        MHCSequential([nn.Linear(2, 2)], mode="dense")
