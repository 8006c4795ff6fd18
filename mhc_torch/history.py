"""The sliding window of earlier layer states (PyTorch, stateful).

``HistoryBuffer`` keeps the most recent ``max_history`` states, oldest first.
It is an ``nn.Module`` without parameters so that moving the model that owns it
(``.to(device)``, ``.to(dtype)``, ``.cuda()``, ``.half()``) moves the states it
holds as well; nothing in it is saved in a ``state_dict``. Copying it
(``copy.deepcopy``, ``pickle``, ``torch.save`` of the whole model) keeps the
states' values but not their autograd graphs.

The JAX twin is :class:`mhc_jax.History`, a value rather than a container.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "HistoryBuffer",
    "HistoryShapeError",
    "HistoryTypeError",
    "check_bool",
    "check_max_history",
    "ensure_list",
    "get_last_k",
]


class HistoryShapeError(ValueError, RuntimeError):
    """A history state whose shape does not fit where it goes.

    A ``ValueError`` like every bad input here, and a ``RuntimeError`` as well,
    which is what the ``mhc`` package raised for the same mistake: an
    ``except`` clause written for either catches it.
    """


class HistoryTypeError(TypeError, RuntimeError):
    """History of the wrong kind, such as a bare tensor where a list belongs.

    A ``TypeError``, and a ``RuntimeError`` as well: the ``mhc`` package failed
    on the same mistake with one (``bool`` of a tensor).
    """


def check_bool(name: str, value) -> None:
    """Raise ``TypeError`` unless ``value`` is a ``bool``.

    ``bool("False")`` is True: a string or number where a switch belongs is a
    mistake, never a truthy value to guess from.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r} of type {type(value).__name__}")


def check_max_history(max_history) -> None:
    """Raise ``ValueError`` unless ``max_history`` is an int >= 1."""
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
        raise ValueError(f"max_history must be an int >= 1, got {max_history!r}")


class HistoryBuffer(nn.Module):
    """A window of the last ``max_history`` states, oldest first.

    ``append`` adds the latest state and evicts the oldest beyond
    ``max_history``; ``get`` returns the window ``[h_1, ..., h_K]`` (``h_K`` the
    latest) as a new list; ``clear`` empties it; ``len(buffer)`` is ``K``.

    The buffer persists across forward calls. When you manage one yourself,
    clear it between batches, or features of one batch leak into the next
    ("temporal bleeding").

    A copy (``copy.deepcopy``, or ``pickle``/``torch.save`` of a model that
    holds the buffer) carries the states *detached*: their values are kept,
    their autograd graphs are not (a graph belongs to the forward pass that
    built it, and non-leaf tensors can be neither deep-copied nor pickled).
    The copy and the original then fill and clear independently; a backward
    pass through the copy's old states reaches nothing.

    Args:
        max_history: ``H >= 1``, the number of states kept (4, as for the skip, by default).
        detach_history: store states detached from the autograd graph. Saves
            the memory of ``H`` earlier layers' graphs in very deep models, at
            the price of no gradient flowing through the history path.
    """

    def __init__(self, max_history: int = 4, detach_history: bool = False) -> None:
        super().__init__()
        check_max_history(max_history)
        check_bool("detach_history", detach_history)
        self.max_history = max_history
        self.detach_history = detach_history
        self._states: deque[torch.Tensor] = deque(maxlen=max_history)

    def append(self, state: torch.Tensor) -> None:
        """Add ``state`` as the latest entry, evicting the oldest beyond ``H``."""
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"HistoryBuffer.append expects a tensor, got {type(state).__name__}")
        self._states.append(state.detach() if self.detach_history else state)

    def get(self) -> list[torch.Tensor]:
        """The window, oldest first, as a new list (changing it leaves the buffer alone)."""
        return list(self._states)

    def clear(self) -> None:
        """Forget every state."""
        self._states.clear()

    def __len__(self) -> int:
        return len(self._states)

    def __getstate__(self) -> dict:
        # deepcopy and pickle both go through here: hand them the states
        # detached (values, no graph), as the class docstring says.
        state = dict(super().__getstate__())  # a copy: never edit the live __dict__
        state["_states"] = deque((s.detach() for s in self._states), maxlen=self.max_history)
        return state

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        # nn.Module.to/cuda/half/double all funnel through _apply; mapping the
        # stored states with the same fn keeps them beside the parameters.
        super()._apply(fn, recurse)
        self._states = deque((fn(s) for s in self._states), maxlen=self.max_history)
        return self

    def extra_repr(self) -> str:
        return (
            f"max_history={self.max_history}, detach_history={self.detach_history}, "
            f"len={len(self)}"
        )


def ensure_list(states) -> list[torch.Tensor]:
    """States as a list: a tensor becomes ``[tensor]``, a list is returned as it
    is, any other iterable (a tuple, a :class:`HistoryBuffer`'s ``get()``) is listed."""
    if isinstance(states, torch.Tensor):
        return [states]
    if isinstance(states, list):
        return states
    return list(states)


def get_last_k(history, k: int) -> list[torch.Tensor]:
    """The last ``k`` states of ``history`` (a list, oldest first, or a
    :class:`HistoryBuffer`), oldest first; all of them when there are fewer.

    ``k = 0`` gives ``[]`` (``mhc``'s version returned the whole list).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    states = history.get() if isinstance(history, HistoryBuffer) else list(history)
    return states[-k:] if k else []
