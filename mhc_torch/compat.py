"""``@mhc_compatible`` and ``clear_history``: the ecosystem's view of a model.

A module marked ``@mhc_compatible`` declares that it handles its own
hyper-connectivity. The ecosystem honours that:

* :func:`mhc_torch.inject_mhc` never wraps it, nor anything inside it;
* :class:`mhc_torch.MHCLightningCallback` finds it by recursive search and logs
  its mixing weights (undecorated custom layers are not inspected);
* it gets a ``clear_history()`` that clears every :class:`HistoryBuffer` it
  holds, however deeply nested, and moving it (``.to(device)``, ``.to(dtype)``,
  ``.cuda()``, ``.half()``) moves the states in those buffers, including
  buffers kept in plain attributes, lists or dicts.

``MHCSkip`` and ``MHCSequential`` are compatible themselves.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .history import HistoryBuffer

__all__ = ["mhc_compatible", "is_mhc_compatible", "clear_history", "history_buffers"]

_MARK = "__mhc_compatible__"


def is_mhc_compatible(module) -> bool:
    """Whether ``module`` (or its class) was marked with ``@mhc_compatible``."""
    return bool(getattr(module, _MARK, False))


def _held_buffers(module: nn.Module) -> Iterator[HistoryBuffer]:
    # Buffers a module keeps outside its registered submodules: in a plain
    # (public) attribute, or one level into a list, tuple or dict. Registered
    # submodules live in the private _modules and move by themselves.
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, HistoryBuffer):
                yield item


def history_buffers(model: nn.Module) -> list[HistoryBuffer]:
    """Every :class:`HistoryBuffer` in ``model`` (each once), registered or held."""
    found: dict[int, HistoryBuffer] = {}
    for module in model.modules():
        if isinstance(module, HistoryBuffer):
            found.setdefault(id(module), module)
        for buffer in _held_buffers(module):
            found.setdefault(id(buffer), buffer)
    return list(found.values())


def clear_history(model: nn.Module) -> int:
    """Clear every :class:`HistoryBuffer` in ``model``; returns how many there were.

    Call it at the start of every batch when a model keeps history across
    forward calls, or features of one batch leak into the next ("temporal
    bleeding"). :class:`MHCLightningCallback` does it for you.
    """
    buffers = history_buffers(model)
    for buffer in buffers:
        buffer.clear()
    return len(buffers)


def _clear_history_method(self) -> None:
    """Clear every HistoryBuffer this module holds, however deeply nested."""
    clear_history(self)


def mhc_compatible(cls: type[nn.Module]) -> type[nn.Module]:
    """Mark an ``nn.Module`` class as handling its own hyper-connectivity.

    The class itself is returned (its name, docstring and signature are kept;
    subclasses are compatible too). It gains ``clear_history()`` unless it
    defines its own, and moving an instance moves the states of every
    HistoryBuffer it holds, registered as a submodule or not.

    Example::

        @mhc_compatible
        class MySuperLayer(nn.Module):
            def __init__(self, dim):
                super().__init__()
                self.skip = MHCSkip(max_history=4)
                self.layer = nn.Linear(dim, dim)

            def forward(self, x, history=None):
                return self.skip(self.layer(x), history or [])
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"@mhc_compatible decorates nn.Module subclasses, got {cls!r}")
    setattr(cls, _MARK, True)
    if not hasattr(cls, "clear_history"):
        cls.clear_history = _clear_history_method
    original_apply = cls._apply

    def _apply(self, fn, recurse=True):
        result = original_apply(self, fn, recurse)
        # Registered buffers moved with the submodules; move held ones too.
        for buffer in _held_buffers(self):
            buffer._apply(fn)
        return result

    if not getattr(original_apply, "__mhc_moves_held_buffers__", False):
        _apply.__mhc_moves_held_buffers__ = True
        cls._apply = _apply
    return cls
