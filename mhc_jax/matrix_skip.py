r"""Matrix mixing: a skip whose weights are a row of a learned mixing matrix (JAX/Flax).

Notation: ``x`` the current layer's output, ``h_1 .. h_K`` the window of
earlier states (``h_K`` the latest), ``M`` the ``H x H`` mixing logits, ``T``
the Sinkhorn iterations.

.. math::
    W = \mathrm{P}(M[H-K:,\ H-K:]), \qquad
    \mathrm{out} = x + \sum_{k=1}^{K} W_{K k}\, h_k

with ``P`` the Sinkhorn projection :func:`project_doubly_stochastic` (or a row
softmax) of the trailing ``K x K`` block: the skip adds the *latest* row of
the mixed window ``W [h_1; ...; h_K]`` (docs/mathematics.md, "Matrix mixing").
The math lives in :func:`matrix_weights` and :func:`matrix_mix`;
:class:`MatrixMHCSkip` owns the logits. The twin is :mod:`mhc_torch.matrix_skip`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from numbers import Integral

import flax.linen as nn
import jax
import jax.numpy as jnp

from .history import History, check_max_history
from .projections import project_doubly_stochastic, project_softmax
from .skip import check_bools, weighted_sum

__all__ = ["MatrixMHCSkip", "matrix_weights", "matrix_mix", "DEFAULT_ITERATIONS", "LOGIT_INIT_STD"]

#: Sinkhorn sweeps by default: the seed library's value. Its logits start near
#: 0, where a few sweeps already make the columns sum to 1 within float32.
DEFAULT_ITERATIONS = 10

#: Standard deviation of the initial logits (the seed library's init): ``W``
#: starts close to uniform, so a fresh skip adds about the mean of the window.
LOGIT_INIT_STD = 0.01


def check_iterations(iterations) -> None:
    """Raise ``ValueError`` unless ``iterations`` is an int >= 1 (as the projection does)."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")


def _fill_outside(logits: jax.Array, inside: jax.Array) -> jax.Array:
    """``logits`` on the window block; elsewhere an identity block far below every window logit.

    Outside the window the diagonal is 0 and every other entry lies at least
    ``1e4`` below the window's smallest finite logit, so every sweep (and the
    row softmax) gives the cross entries exactly 0 and leaves the window block
    as if it had been projected alone; the outside block stays the identity.
    No infinity or NaN enters unless the window holds one.
    """
    h = logits.shape[-1]
    both = jnp.broadcast_to(inside[:, None] & inside[None, :], logits.shape)
    fixed = jax.lax.stop_gradient(logits)
    magnitude = jnp.where(both & jnp.isfinite(fixed), jnp.abs(fixed), jnp.zeros_like(fixed))
    gap = 1e4 + 2 * jnp.max(magnitude, axis=(-2, -1), keepdims=True)
    outside_diagonal = jnp.broadcast_to(~inside[:, None] & jnp.eye(h, dtype=bool), logits.shape)
    filler = jnp.where(outside_diagonal, jnp.zeros_like(fixed), -gap)
    return jnp.where(both, logits, filler)


def matrix_weights(
    logits: jax.Array,
    num_states,
    *,
    doubly_stochastic: bool = True,
    iterations: int = DEFAULT_ITERATIONS,
) -> jax.Array:
    r"""The projected trailing ``K x K`` block of the mixing logits, in place in an ``H x H`` matrix.

    .. math::
        W[H-K:,\ H-K:] = \mathrm{P}(M[H-K:,\ H-K:]), \qquad W = 0 \text{ elsewhere}

    ``P`` is :func:`project_doubly_stochastic` with ``T = iterations`` sweeps
    (columns then rows: rows sum to 1 exactly, columns up to the truncation
    error), or a softmax along each row when ``doubly_stochastic=False``. The
    block is projected as if on its own, so its values do not depend on ``H``.
    Row ``H - 1`` (the block's last row) holds the weights the skip applies.

    Args:
      logits: ``M``, shape ``(..., H, H)``.
      num_states: ``K`` in ``[0, H]``: an int, or a scalar integer array that
        may be traced (a ``History``'s count under ``scan``; clipped to
        ``[0, H]``). ``K = 0`` gives all zeros.
      doubly_stochastic: Sinkhorn (True) or row softmax (False).
      iterations: ``T >= 1``, used when ``doubly_stochastic``.

    Returns:
      ``W``, shape and dtype of ``logits``.
    """
    check_bools(doubly_stochastic=doubly_stochastic)
    check_iterations(iterations)
    logits = jnp.asarray(logits)
    if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"mixing logits must be square (..., H, H), got shape {tuple(logits.shape)}")
    h = logits.shape[-1]
    if isinstance(num_states, Integral) and not isinstance(num_states, bool):
        if not 0 <= num_states <= h:
            raise ValueError(f"num_states must be an int in [0, {h}] (H = {h}), got {num_states!r}")
    elif jnp.ndim(num_states) != 0 or not jnp.issubdtype(jnp.result_type(num_states), jnp.integer):
        raise ValueError(f"num_states must be an int or a scalar integer array, got {num_states!r}")
    return _window_matrix(logits, jnp.asarray(num_states, jnp.int32), bool(doubly_stochastic), iterations)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _window_matrix(logits: jax.Array, num_states: jax.Array, doubly_stochastic: bool, iterations: int) -> jax.Array:
    # All H x H at once with the slots outside the window filled in, not
    # sliced off: a traced K (a History's count under jit or scan) then needs
    # no data-dependent shape, and every K shares one compiled program.
    h = logits.shape[-1]
    inside = jnp.arange(h, dtype=jnp.int32) >= h - jnp.clip(num_states, 0, h)
    z = _fill_outside(logits, inside)
    w = project_doubly_stochastic(z, iterations) if doubly_stochastic else project_softmax(z)
    return jnp.where(jnp.broadcast_to(inside[:, None] & inside[None, :], w.shape), w, jnp.zeros_like(w))


def _at_least_float32(logits: jax.Array) -> jax.Array:
    # A half-precision Sinkhorn loses the small entries that the sums are made of.
    wide = jnp.issubdtype(logits.dtype, jnp.floating) and logits.dtype.itemsize >= 4
    return logits if wide else logits.astype(jnp.float32)


def matrix_mix(
    x: jax.Array,
    logits: jax.Array,
    history: History | Sequence[jax.Array],
    *,
    doubly_stochastic: bool = True,
    iterations: int = DEFAULT_ITERATIONS,
) -> jax.Array:
    r"""``x`` plus the latest row of the matrix-mixed window.

    .. math:: \mathrm{out} = x + \sum_{k=1}^{K} W_{K k}\, h_k

    with ``W`` the projected ``K x K`` block of :func:`matrix_weights`, indexed
    from 1 inside the block: row ``K`` is the row of the latest state (row
    ``H - 1`` of the padded ``H x H`` matrix, counting from 0). ``K = 0``
    gives ``x``.

    Args:
      x: the layer's output, any shape.
      logits: ``M``, shape ``(H, H)``; projected in at least float32, the
        weights cast to ``x``'s dtype.
      history: a :class:`History` with ``H`` slots, or a list of arrays shaped
        like ``x`` (oldest first; only the last ``H`` are used).
      doubly_stochastic: Sinkhorn (True) or row softmax (False).
      iterations: Sinkhorn sweeps ``T >= 1``.
    """
    logits = _at_least_float32(jnp.asarray(logits))
    if logits.ndim != 2:
        raise ValueError(f"mixing logits must have shape (H, H), got {tuple(logits.shape)}")
    h = logits.shape[-1]
    options = dict(doubly_stochastic=doubly_stochastic, iterations=iterations)
    if isinstance(history, History):
        if history.max_history != h:
            raise ValueError(
                f"History has {history.max_history} slots but this skip has max_history={h}; "
                f"create the History with max_history={h}"
            )
        _check_shapes(x, [history.state_shape], "History states have")
        # The padded last row is window-aligned (zeros before the window):
        # reorder it to the ring's slots.
        row = matrix_weights(logits, history.num_states, **options)[-1].astype(x.dtype)
        return x + weighted_sum(history.slot_weights(row), history.states.astype(x.dtype))
    if not isinstance(history, (list, tuple)):
        raise TypeError(
            "history must be a History, a list of arrays (oldest first) or None, got "
            f"{type(history).__name__}; wrap a single state as [state]"
        )
    window = list(history)[-h:]
    _check_shapes(x, [tuple(s.shape) for s in window], "history state {i} has")
    row = matrix_weights(logits, len(window), **options)[-1].astype(x.dtype)
    if not window:
        return x
    return x + weighted_sum(row[h - len(window) :], [s.astype(x.dtype) for s in window])


def _check_shapes(x: jax.Array, shapes: list[tuple[int, ...]], what: str) -> None:
    for i, shape in enumerate(shapes):
        if tuple(shape) != tuple(x.shape):
            raise ValueError(
                f"{what.format(i=i)} shape {tuple(shape)} but x has shape {tuple(x.shape)}; "
                "MatrixMHCSkip mixes states shaped like x"
            )


class MatrixMHCSkip(nn.Module):
    r"""Hyper-connection through a learned mixing matrix: ``out = x + sum_k W[K, k] h_k``.

    The seed library's matrix variant of :class:`MHCSkip`. It owns ``H x H``
    logits ``mixing_logits``; for a window of ``K`` states their trailing
    ``K x K`` block is projected to a doubly stochastic matrix (or row
    softmax) ``W``, and the skip adds the latest row of the mixed window
    ``W [h_1; ...; h_K]`` to ``x`` (:func:`matrix_mix`). An empty window
    returns ``x``.

    Call it as ``skip.apply(params, x, history)`` with ``history`` a
    :class:`History` (with ``max_history`` slots), a list of arrays (oldest
    first; beyond ``H`` only the last ``H`` are used) or None.

    Attributes:
      max_history: ``H >= 1``, the size of the logit matrix and of the window.
      doubly_stochastic: project with Sinkhorn (True) or a row softmax (False).
      iterations: Sinkhorn sweeps ``T >= 1``.
    """

    max_history: int = 4
    doubly_stochastic: bool = True
    iterations: int = DEFAULT_ITERATIONS

    def __post_init__(self):
        check_max_history(self.max_history)
        check_bools(doubly_stochastic=self.doubly_stochastic)
        check_iterations(self.iterations)
        super().__post_init__()

    def setup(self):
        self.mixing_logits = self.param(
            "mixing_logits", nn.initializers.normal(LOGIT_INIT_STD), (self.max_history, self.max_history), jnp.float32
        )

    def mixing_matrix(self, num_states) -> jax.Array:
        """``W`` for ``K = num_states`` (:func:`matrix_weights`), projected in at least float32."""
        return matrix_weights(
            _at_least_float32(self.mixing_logits),
            num_states, doubly_stochastic=self.doubly_stochastic, iterations=self.iterations
        )

    def __call__(self, x: jax.Array, history: History | Sequence[jax.Array] | None) -> jax.Array:
        """``x + sum_k W[K, k] h_k`` over the window of ``history``."""
        return matrix_mix(
            x,
            self.mixing_logits,
            [] if history is None else history,
            doubly_stochastic=self.doubly_stochastic,
            iterations=self.iterations,
        )
