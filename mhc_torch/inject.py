"""``inject_mhc``: add hyper-connection skips to an existing model in place.

Each layer of a target type is wrapped so that its output is mixed with a
window of earlier states::

    out = skip(layer(x), window)      # the window then records out

The first wrapped layer to run in a forward pass starts the window with its
input (``x_0``), so a plain chain of wrapped layers computes what
``MHCSequential`` computes.

Everything ``inject_mhc`` adds to a model is a plain module attribute or a
module-level object (no closures), so an injected model can be deep-copied,
pickled and ``torch.save``-d whole, and a copy clears its own windows.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

from .compat import _clear_history_method, is_mhc_compatible, mhc_compatible
from .history import HistoryBuffer
from .skip import MHCSkip

__all__ = ["inject_mhc", "inject_mhc_default", "MHCInjected", "DEFAULT_TARGETS"]

SCOPES = ("module", "global")


@mhc_compatible
class MHCInjected(nn.Module):
    """A layer wrapped by :func:`inject_mhc`: ``out = skip(layer(x), window)``.

    Attributes:
        layer: the original layer (its parameters are now ``<name>.layer.*``).
        skip: the :class:`MHCSkip` mixing the window into its output.
        history: the :class:`HistoryBuffer` holding the window; one per wrapped
            layer (``history_scope="module"``) or one shared by all of them
            (``"global"``).
        clear_on_forward: whether the model's forward pre-hook empties this
            window at the start of every call of the model (the
            ``clear_on_forward`` given to :func:`inject_mhc`).
    """

    def __init__(
        self, layer: nn.Module, skip: MHCSkip, history: HistoryBuffer, clear_on_forward: bool = True
    ) -> None:
        super().__init__()
        self.layer = layer
        self.skip = skip
        self.history = history
        self.clear_on_forward = clear_on_forward

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if len(self.history) == 0:
            self.history.append(x)  # the first state of the window: this layer's input
        out = self.skip(self.layer(x, *args, **kwargs), self.history.get())
        self.history.append(out)
        return out


def inject_mhc(
    model: nn.Module,
    target_types: type | tuple[type, ...],
    max_history: int = 4,
    history_scope: str = "global",
    clear_on_forward: bool = True,
    example_input: torch.Tensor | tuple | None = None,
    **skip_options,
) -> nn.Module:
    """Wrap every layer of ``target_types`` inside ``model`` with an :class:`MHCSkip`.

    Args:
        model: the model, changed in place and returned. It gains a
            ``clear_history()`` method if it has none.
        target_types: the layer class(es) to wrap (``nn.Linear``, a block class, ...).
            Each must map a tensor to a tensor.
        max_history: ``H`` for every skip and window.
        history_scope: ``"global"`` (default): one window shared by all wrapped
            layers, in the order they run, like ``MHCSequential``;
            ``"module"``: each wrapped layer keeps its own window of its input
            and outputs (for layers applied several times per forward, such
            as a weight-tied refinement loop).
        clear_on_forward: clear the windows at the start of every call of
            ``model`` (default), so no batch sees another's states. With False
            you call ``model.clear_history()`` yourself.
        example_input: optional input for one forward pass under ``no_grad``
            right after wrapping, to create the ``auto_project`` maps before
            you build the optimizer.
        **skip_options: passed to every :class:`MHCSkip` (``mode``,
            ``temperature``, ...). ``auto_project`` defaults to True here:
            wherever a window state's feature size differs from a layer's
            output (a ``Linear(16, 32)``, say), it is mapped by a learned
            bias-free linear map, created on the first forward pass.

    Never enters or wraps an ``@mhc_compatible`` module or anything inside it
    (so ``MHCSkip``, ``MHCSequential`` and already wrapped layers are left
    alone: a second call wraps nothing twice). Parameter names change
    (``fc.weight`` becomes ``fc.layer.weight``): load older checkpoints first.
    """
    if isinstance(target_types, type):
        target_types = (target_types,)
    target_types = tuple(target_types)
    if not target_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in target_types):
        raise ValueError(f"target_types must be nn.Module classes, got {target_types!r}")
    if history_scope not in SCOPES:
        raise ValueError(f"history_scope must be one of {SCOPES}, got {history_scope!r}")
    skip_options = {"auto_project": True, **skip_options}
    MHCSkip(max_history=max_history, **skip_options)  # validate the options once, up front

    shared = HistoryBuffer(max_history) if history_scope == "global" else None
    created: list[HistoryBuffer] = []

    def wrap(layer: nn.Module) -> MHCInjected:
        history = shared if shared is not None else HistoryBuffer(max_history)
        if not any(history is b for b in created):
            created.append(history)
        skip = MHCSkip(max_history=max_history, **skip_options)
        return MHCInjected(layer, skip, history, clear_on_forward=clear_on_forward)

    for parent in _containers(model):
        for name, child in list(parent.named_children()):
            if isinstance(child, target_types) and not is_mhc_compatible(child):
                setattr(parent, name, wrap(child))

    if created:
        if not hasattr(model, "clear_history"):
            # A partial, not a bound method in the instance dict: it pickles.
            model.clear_history = functools.partial(_clear_history_method, model)
        if clear_on_forward and not any(isinstance(h, ClearWindows) for h in model._forward_pre_hooks.values()):
            model.register_forward_pre_hook(ClearWindows())
        if example_input is not None:
            with torch.no_grad():
                model(*example_input) if isinstance(example_input, tuple) else model(example_input)
            for buffer in created:
                buffer.clear()
    return model


#: The layer types :func:`inject_mhc_default` wraps (those of ``mhc.inject_mhc_default``).
DEFAULT_TARGETS = (nn.Linear, nn.Conv2d, nn.LayerNorm)


def inject_mhc_default(
    model: nn.Module, max_history: int = 4, clear_on_forward: bool = True, **options
) -> nn.Module:
    """:func:`inject_mhc` on the common layer types, :data:`DEFAULT_TARGETS`
    (``nn.Linear``, ``nn.Conv2d``, ``nn.LayerNorm``).

    ``options`` are :func:`inject_mhc`'s (``history_scope``, ``example_input``)
    and the skips' (``mode``, ``temperature``, ...). The window is shared by all
    wrapped layers unless ``history_scope="module"``, which was the ``mhc``
    package's default.
    """
    return inject_mhc(model, DEFAULT_TARGETS, max_history=max_history, clear_on_forward=clear_on_forward, **options)


class ClearWindows:
    """Forward pre-hook that empties the windows of a model's wrapped layers.

    At the start of every call of the module it is registered on, it clears
    the window of each :class:`MHCInjected` inside that module whose
    ``clear_on_forward`` is set. It finds them in the module it is called on,
    rather than remembering buffers: a deep copy or an unpickled copy of the
    model clears its own windows, never the original's. A module-level class
    (not a closure), so it pickles.
    """

    def __call__(self, module: nn.Module, args) -> None:
        for layer in module.modules():
            if isinstance(layer, MHCInjected) and layer.clear_on_forward:
                layer.history.clear()

    def __repr__(self) -> str:
        return "ClearWindows()"


def _containers(model: nn.Module) -> Iterable[nn.Module]:
    """``model`` and every module under it, except inside @mhc_compatible ones."""
    if is_mhc_compatible(model):
        return
    yield model
    for child in list(model.children()):
        yield from _containers(child)
