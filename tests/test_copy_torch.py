"""Whole-model copies: ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load``.

After a training forward the history buffers hold non-leaf states (tensors with
an autograd graph), and ``inject_mhc`` adds a forward pre-hook and a
``clear_history`` to the model. A copy made then must

* compute what the original computes (it carries the states' values, detached);
* be independent: running the copy leaves the original's windows (and
  gradients) alone, and running the original leaves the copy's alone;
* for injected models, clear its own windows at every call, never the original's.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from mhc_torch import HistoryBuffer, MHCInjected, MHCSequential, MHCSkip, inject_mhc, mhc_compatible
from mhc_torch.compat import history_buffers

DIM = 6


@mhc_compatible
class Recurrent(nn.Module):
    """A custom compatible layer keeping its own window in a plain (unregistered) attribute.

    The window carries over from call to call (segment-by-segment processing).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)
        self.skip = MHCSkip(max_history=3, init="uniform")
        self.windows = {"main": HistoryBuffer(3)}  # held, not a registered submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = self.windows["main"]
        if len(window) == 0:
            window.append(x)
        out = self.skip(torch.tanh(self.fc(x)), window)
        window.append(out)
        return out


class Refiner(nn.Module):
    """One block applied three times per call (``history_scope="module"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = torch.tanh(self.block(x))
        return x


def _randomise_logits(model: nn.Module) -> nn.Module:
    # Away from the near-residual init, so the window's values change the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mixing_logits"):
                p.normal_()
    return model


def _chain() -> nn.Sequential:
    return nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM))


MODELS = {
    "sequential-clear": lambda: MHCSequential(
        [nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh()) for _ in range(3)], max_history=3
    ),
    "sequential-carry": lambda: MHCSequential(
        [nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh()) for _ in range(3)],
        max_history=3,
        clear_history_each_forward=False,
    ),
    "inject-global": lambda: inject_mhc(_chain(), nn.Linear, max_history=3, history_scope="global"),
    "inject-module": lambda: inject_mhc(Refiner(), nn.Linear, max_history=3, history_scope="module"),
    "custom-compatible": Recurrent,
}


def _deepcopy(model):
    return copy.deepcopy(model)


def _pickle(model):
    return pickle.loads(pickle.dumps(model))


def _torch_save(model):
    file = io.BytesIO()
    torch.save(model, file)
    file.seek(0)
    return torch.load(file, weights_only=False)


COPIES = {"deepcopy": _deepcopy, "pickle": _pickle, "torch.save": _torch_save}


def _windows(model: nn.Module) -> list[list[torch.Tensor]]:
    return [b.get() for b in history_buffers(model)]


def _assert_same_objects(before: list[list[torch.Tensor]], after: list[list[torch.Tensor]], what: str) -> None:
    # The very same tensors, in the same order: nothing appended, evicted or cleared.
    assert [len(w) for w in after] == [len(w) for w in before], f"{what}: window sizes changed"
    assert all(a is b for wa, wb in zip(after, before, strict=True) for a, b in zip(wa, wb, strict=True)), (
        f"{what}: window states were replaced"
    )


def _trained(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _randomise_logits(MODELS[name]()).train()
    x = torch.randn(4, DIM, requires_grad=True)
    model(x).square().mean().backward()
    return model, torch.randn(4, DIM)


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("name", MODELS)
def test_a_copy_after_a_training_forward_computes_what_the_original_computes(name, how):
    model, x = _trained(name)
    windows = _windows(model)
    assert any(w and w[-1].grad_fn is not None for w in windows), "the forward left no graph in the windows"

    twin = COPIES[how](model)

    # The copy carries every window's values, detached (no graph, no gradient).
    copied = _windows(twin)
    assert [len(w) for w in copied] == [len(w) for w in windows]
    for w_copy, w_orig in zip(copied, windows, strict=True):
        for c, o in zip(w_copy, w_orig, strict=True):
            assert c.grad_fn is None and not c.requires_grad
            torch.testing.assert_close(c, o.detach(), rtol=0, atol=0)
    # Same outputs: equal parameters, and the carried windows (where they carry) are equal.
    out_copy = twin(x)
    _assert_same_objects(windows, _windows(model), "running the copy touched the original's windows")
    copy_windows = _windows(twin)
    with torch.no_grad():
        out_orig = model(x)
    torch.testing.assert_close(out_copy, out_orig, rtol=1e-6, atol=1e-6)
    _assert_same_objects(copy_windows, _windows(twin), "running the original touched the copy's windows")


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("name", MODELS)
def test_a_copy_trains_on_its_own(name, how):
    model, x = _trained(name)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    windows = _windows(model)
    twin = COPIES[how](model)
    twin.zero_grad()
    twin(x).square().mean().backward()  # its carried states have no graph to reach back into
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in twin.parameters())
    # The original's gradients and windows are untouched.
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)
    _assert_same_objects(windows, _windows(model), "training the copy touched the original's windows")


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("scope", ["global", "module"])
def test_an_injected_copy_clears_its_own_windows_and_keeps_their_sharing(scope, how):
    name = f"inject-{scope}"
    model, x = _trained(name)
    twin = COPIES[how](model)
    originals = {id(b) for b in history_buffers(model)}
    assert originals.isdisjoint(id(b) for b in history_buffers(twin))
    wrapped = [m for m in twin.modules() if isinstance(m, MHCInjected)]
    if scope == "global":  # still one window shared by every wrapped layer
        assert len({id(m.history) for m in wrapped}) == 1 and len(wrapped) == 3
    # clear_on_forward: each call of the copy starts from empty windows of its own.
    first = twin(x)
    torch.testing.assert_close(twin(x), first, rtol=0, atol=0)
    twin.clear_history()
    assert all(len(b) == 0 for b in history_buffers(twin))
    assert all(len(b) > 0 for b in history_buffers(model)), "clearing the copy cleared the original"


def test_a_copied_buffer_keeps_its_values_and_options_but_not_the_graph():
    buffer = HistoryBuffer(3, detach_history=False)
    x = torch.randn(2, 3, requires_grad=True)
    for i in range(4):
        buffer.append(x * i)
    twin = copy.deepcopy(buffer)
    assert (twin.max_history, twin.detach_history, len(twin)) == (3, False, 3)
    for c, o in zip(twin.get(), buffer.get(), strict=True):
        torch.testing.assert_close(c, o.detach(), rtol=0, atol=0)
        assert c.grad_fn is None and c.data_ptr() != o.data_ptr()  # values copied, not shared
    # Independent from then on.
    twin.append(torch.zeros(2, 3))
    assert buffer.get()[-1].grad_fn is not None and torch.equal(buffer.get()[-1], (x * 3).detach())
    # The original still holds its graph: a backward through it reaches x.
    buffer.get()[-1].sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2, 3), 3.0))
