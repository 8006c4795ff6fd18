"""@mhc_compatible and clear_history(model)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from mhc_torch import HistoryBuffer, MHCSequential, MHCSkip, clear_history, is_mhc_compatible, mhc_compatible


class _Layer(nn.Module):
    """A layer with buffers in every place a user might keep one."""

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(dim, dim), nn.Module())
        self.inner[1].buffer = HistoryBuffer(3)  # registered, nested two levels down
        self.pool = [HistoryBuffer(2), HistoryBuffer(2)]  # held in a plain list
        self.by_name = {"a": HistoryBuffer(2)}  # held in a dict
        self.scale = scale

    def forward(self, x):
        return self.inner(x) * self.scale


Decorated = mhc_compatible(type("Decorated", (_Layer,), {"__doc__": _Layer.__doc__}))


def _fill(layer) -> None:
    for buffer in (layer.inner[1].buffer, *layer.pool, layer.by_name["a"]):
        buffer.append(torch.ones(2))


def test_the_class_itself_is_returned_with_its_name_doc_and_signature():
    class MySuperLayer(nn.Module):
        """Docs kept."""

        def __init__(self, dim: int, depth: int = 2) -> None:
            super().__init__()
            self.skip = MHCSkip(max_history=4)

    signature = inspect.signature(MySuperLayer)
    decorated = mhc_compatible(MySuperLayer)
    assert decorated is MySuperLayer
    assert decorated.__name__ == "MySuperLayer" and decorated.__doc__ == "Docs kept."
    assert inspect.signature(decorated) == signature and list(signature.parameters) == ["dim", "depth"]
    assert is_mhc_compatible(decorated) and is_mhc_compatible(decorated(3))
    assert is_mhc_compatible(type("Sub", (decorated,), {}))  # subclasses too
    assert not is_mhc_compatible(nn.Linear(2, 2))
    assert is_mhc_compatible(MHCSkip) and is_mhc_compatible(MHCSequential)


def test_clear_history_reaches_every_buffer_however_held():
    layer = Decorated(2)
    _fill(layer)
    layer.clear_history()
    assert all(len(b) == 0 for b in (layer.inner[1].buffer, *layer.pool, layer.by_name["a"]))
    model = nn.Sequential(nn.Linear(2, 2), Decorated(2), MHCSequential([nn.Linear(2, 2)], clear_history_each_forward=False))
    _fill(model[1])
    model[2](torch.ones(1, 2))
    assert clear_history(model) == 5
    assert len(model[2].history_buffer) == 0 and len(model[1].pool[0]) == 0


def test_moving_a_decorated_module_moves_every_held_state():
    layer = Decorated(2)
    _fill(layer)
    layer.double()
    held = (layer.inner[1].buffer, *layer.pool, layer.by_name["a"])
    assert all(b.get()[0].dtype == torch.float64 for b in held)
    layer.half()
    assert all(b.get()[0].dtype == torch.float16 for b in held)
    plain = _Layer(2)  # undecorated: buffers outside registered submodules stay put
    _fill(plain)
    plain.double()
    assert plain.pool[0].get()[0].dtype == torch.float32
    assert plain.inner[1].buffer.get()[0].dtype == torch.float64  # registered ones always move


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_moves_every_held_state():
    layer = Decorated(2)
    _fill(layer)
    layer.cuda()
    assert all(b.get()[0].is_cuda for b in (layer.inner[1].buffer, *layer.pool, layer.by_name["a"]))


def test_a_class_keeps_its_own_clear_history():
    calls = []

    @mhc_compatible
    class Own(nn.Module):
        def clear_history(self):
            calls.append(True)

    Own().clear_history()
    assert calls == [True]


def test_only_module_classes_can_be_decorated():
    with pytest.raises(TypeError, match="decorates nn.Module subclasses"):
        mhc_compatible(lambda x: x)
