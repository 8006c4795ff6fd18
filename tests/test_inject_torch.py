"""inject_mhc: wrap layers of an existing model, never a compatible one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mhc_torch import MHCInjected, MHCSequential, inject_mhc, mhc_compatible


@mhc_compatible
class Decorated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.nested = nn.Sequential(nn.Linear(6, 6))

    def forward(self, x):
        return self.nested(self.fc(x))


def _count(model) -> int:
    return sum(isinstance(m, MHCInjected) for m in model.modules())


def test_a_decorated_layer_and_everything_inside_it_are_left_untouched():
    decorated = Decorated()
    before = {k: v.clone() for k, v in decorated.state_dict().items()}
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), decorated, nn.Linear(6, 6))
    inject_mhc(model, nn.Linear)
    assert _count(model) == 2 and isinstance(model[0], MHCInjected) and isinstance(model[3], MHCInjected)
    assert model[2] is decorated and type(decorated.fc) is nn.Linear and type(decorated.nested[0]) is nn.Linear
    assert decorated.state_dict().keys() == before.keys()
    inject_mhc(model, nn.Linear)  # a second call wraps nothing twice
    assert _count(model) == 2
    assert hasattr(model, "clear_history")


def test_global_scope_on_a_chain_computes_what_mhc_sequential_computes():
    torch.manual_seed(0)
    layers = [nn.Linear(5, 5) for _ in range(4)]
    stack = MHCSequential(layers, max_history=3, init="uniform")
    model = inject_mhc(nn.Sequential(*layers), nn.Linear, max_history=3, init="uniform", auto_project=False)
    with torch.no_grad():
        for skip, wrapped in zip(stack.skip_layers, model, strict=True):
            skip.mixing_logits.normal_()
            wrapped.skip.mixing_logits.copy_(skip.mixing_logits)
    x = torch.randn(2, 5)
    torch.testing.assert_close(model(x), stack(x))


def test_windows_are_cleared_at_every_forward_unless_told_otherwise():
    x = torch.randn(2, 5)
    model = inject_mhc(nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5)), nn.Linear, init="uniform")
    torch.testing.assert_close(model(x), model(x))
    keep = inject_mhc(nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5)), nn.Linear, init="uniform", clear_on_forward=False)
    first = keep(x)
    assert not torch.allclose(keep(x), first)  # temporal bleeding
    keep.clear_history()
    torch.testing.assert_close(keep(x), first)


def test_module_scope_gives_each_layer_its_own_window_across_repeated_calls():
    class Refiner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Linear(4, 4)

        def forward(self, x):
            for _ in range(5):
                x = self.block(x)
            return x

    model = inject_mhc(Refiner(), nn.Linear, history_scope="module", max_history=3)
    model(torch.randn(2, 4))
    assert len(model.block.history) == 3  # its input and outputs, capped at H


def test_shape_changes_are_mapped_and_example_input_builds_the_maps_up_front():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))
    inject_mhc(model, nn.Linear, example_input=torch.randn(1, 4))
    names = [n for n, _ in model.named_parameters()]
    assert "3.skip.projection_from_4.weight" in names and "3.skip.projection_from_8.weight" in names
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # every parameter exists already
    loss = model(torch.randn(5, 4)).square().mean()
    loss.backward()
    optimizer.step()
    assert model(torch.randn(5, 4)).shape == (5, 3)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="target_types must be nn.Module classes"):
        inject_mhc(nn.Linear(2, 2), [])
    with pytest.raises(ValueError, match=r"history_scope must be one of \('module', 'global'\), got 'layer'"):
        inject_mhc(nn.Linear(2, 2), nn.Linear, history_scope="layer")
    with pytest.raises(ValueError, match="mode must be one of"):
        inject_mhc(nn.Linear(2, 2), nn.Linear, mode="dense")


def test_each_call_clears_only_the_windows_it_was_told_to_clear():
    # The pre-hook clears the windows of layers wrapped with clear_on_forward=True,
    # wherever they are in the model; windows wrapped with False keep carrying over.
    chain = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5))
    carried = inject_mhc(chain, nn.Linear, max_history=8, clear_on_forward=False)
    model = nn.Sequential(carried, nn.Tanh(), nn.Linear(5, 5))
    inject_mhc(model, nn.Linear, max_history=8)
    inject_mhc(model, nn.Linear, max_history=8)  # wraps nothing, adds no second hook
    assert len(model._forward_pre_hooks) == 1
    x = torch.randn(2, 5)
    for calls in (1, 2, 3):
        model(x)
        assert len(carried[0].history) == 1 + 2 * calls  # x_0 once, then two outputs per call
        assert len(model[2].history) == 2  # its input and output, from this call only
