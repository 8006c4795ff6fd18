"""The sliding window of earlier layer states as a value (JAX).

``History`` is a fixed-shape pytree: a ring buffer of ``H`` slots plus a count
of the states pushed so far. Because its shape never changes it can be a
``jit`` argument, a ``lax.scan`` carry, a ``vmap``-ed input or live inside a
function under ``grad``; and because it is a value, not a container, one call
can never see another call's states unless it is handed them.

Layout: the ``i``-th state pushed (0-based) sits in slot ``i % H``. The window
holds the last ``K = min(count, H)`` of them; its latest state is in slot
``(count - 1) % H``. Slots outside the window hold stale or zero values and
always get weight 0.

The PyTorch twin is :class:`mhc_torch.HistoryBuffer`, a stateful container.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["History", "HistoryShapeError", "HistoryTypeError", "check_max_history", "ensure_list", "get_last_k"]


class HistoryShapeError(ValueError, RuntimeError):
    """A history state whose shape does not fit where it goes.

    A ``ValueError`` like every bad input here, and a ``RuntimeError`` as well,
    which is what the ``mhc`` package raised for the same mistake: an
    ``except`` clause written for either catches it.
    """


class HistoryTypeError(TypeError, RuntimeError):
    """History of the wrong kind, such as a bare array where a list belongs.

    A ``TypeError``, and a ``RuntimeError`` as well, like its twin
    :class:`mhc_torch.HistoryTypeError` (the ``mhc`` package failed on the same
    mistake with a ``RuntimeError``).
    """


def check_max_history(max_history) -> None:
    """Raise ``ValueError`` unless ``max_history`` is an int >= 1."""
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
        raise ValueError(f"max_history must be an int >= 1, got {max_history!r}")


class History(NamedTuple):
    """Ring buffer of the last ``H`` states, carried explicitly.

    Build one with :meth:`create` (holding ``x_0``) or :meth:`empty`, and add a
    state with :meth:`push`, which returns a new ``History``.
    """

    states: jax.Array  # shape=(H, *state_shape): slot i % H holds the i-th state pushed
    count: jax.Array  # shape=(), int32: states pushed so far (K = min(count, H) in the window)

    @classmethod
    def empty(cls, like, max_history: int) -> "History":
        """A window with no states (``K = 0``) for states shaped like ``like``.

        ``like`` is an array or anything with ``shape`` and ``dtype``
        (e.g. ``jax.ShapeDtypeStruct``).
        """
        check_max_history(max_history)
        return cls(
            states=jnp.zeros((max_history, *like.shape), like.dtype),
            count=jnp.zeros((), jnp.int32),
        )

    @classmethod
    def create(cls, x0: jax.Array, max_history: int) -> "History":
        """A window holding ``x_0`` as its only state (``K = 1``)."""
        return cls.empty(x0, max_history).push(x0)

    @property
    def max_history(self) -> int:
        """``H``, the number of slots (static)."""
        return self.states.shape[0]

    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(self.states.shape[1:])

    @property
    def num_states(self) -> jax.Array:
        """``K = min(count, H)``, the number of states in the window."""
        return jnp.minimum(self.count, self.max_history)

    def push(self, x: jax.Array) -> "History":
        """Return a new ``History`` with ``x`` as its latest state.

        Beyond ``H`` states the oldest is overwritten (evicted). The write is a
        single ``dynamic_update_slice``, done in place under ``jit``/``scan``.
        """
        if tuple(x.shape) != self.state_shape:
            raise HistoryShapeError(
                f"History holds states of shape {self.state_shape}, got a state of "
                f"shape {tuple(x.shape)}"
            )
        if x.dtype != self.states.dtype:
            raise ValueError(
                f"History holds {self.states.dtype} states, got a {x.dtype} state; "
                "cast it, or create the History from a state of that dtype"
            )
        slot = self.count % self.max_history
        return History(
            states=jax.lax.dynamic_update_index_in_dim(self.states, x, slot, axis=0),
            count=self.count + 1,
        )

    def latest(self) -> jax.Array:
        """The latest state ``h_K`` (zeros when the window is empty)."""
        slot = (self.count - 1) % self.max_history
        latest = jax.lax.dynamic_index_in_dim(self.states, slot, axis=0, keepdims=False)
        return jnp.where(self.count > 0, latest, jnp.zeros_like(latest))

    def slot_weights(self, window_weights: jax.Array) -> jax.Array:
        """Reorder window-ordered weights into ring-slot order.

        ``window_weights[j]`` belongs to the state ``H - 1 - j`` pushes before
        the latest (the last entry, like the last logit, is the latest state's).
        The result ``w[s]`` is the weight of the state in slot ``s``. Weights
        beyond the window must already be 0.
        """
        h = self.max_history
        age = (self.count - 1 - jnp.arange(h, dtype=jnp.int32)) % h
        return jnp.take(window_weights, h - 1 - age, axis=-1)

    def to_list(self) -> list[jax.Array]:
        """The window ``[h_1, ..., h_K]``, oldest first, for inspection outside ``jit``."""
        try:
            count = int(self.count)
        except jax.errors.ConcretizationTypeError as err:
            raise TypeError(
                "History.to_list() reads the count on the host; call it outside jit"
            ) from err
        h = self.max_history
        k = min(count, h)
        return [self.states[(count - k + i) % h] for i in range(k)]


def ensure_list(states) -> list[jax.Array]:
    """States as a list: an array becomes ``[array]``, a list is returned as it
    is, any other iterable (a tuple) is listed."""
    if isinstance(states, jax.Array):
        return [states]
    if isinstance(states, list):
        return states
    return list(states)


def get_last_k(history, k: int) -> list[jax.Array]:
    """The last ``k`` states of ``history`` (a list, oldest first, or a
    :class:`History`, read on the host), oldest first; all of them when there
    are fewer. ``k = 0`` gives ``[]``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    states = history.to_list() if isinstance(history, History) else list(history)
    return states[-k:] if k else []
