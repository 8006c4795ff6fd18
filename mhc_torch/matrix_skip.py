r"""Matrix mixing: a skip whose weights are a row of a learned mixing matrix (PyTorch).

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
:class:`MatrixMHCSkip` owns the logits. The twin is :mod:`mhc_jax.matrix_skip`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .compat import mhc_compatible
from .history import HistoryBuffer, check_max_history
from .projections import project_doubly_stochastic, project_softmax
from .skip import check_bools, history_list, mix

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


def matrix_weights(
    logits: torch.Tensor,
    num_states: int,
    *,
    doubly_stochastic: bool = True,
    iterations: int = DEFAULT_ITERATIONS,
) -> torch.Tensor:
    r"""The projected trailing ``K x K`` block of the mixing logits, in place in an ``H x H`` matrix.

    .. math::
        W[H-K:,\ H-K:] = \mathrm{P}(M[H-K:,\ H-K:]), \qquad W = 0 \text{ elsewhere}

    ``P`` is :func:`project_doubly_stochastic` with ``T = iterations`` sweeps
    (columns then rows: rows sum to 1 exactly, columns up to the truncation
    error), or a softmax along each row when ``doubly_stochastic=False``. The
    block is projected on its own, so its values do not depend on ``H``. Row
    ``H - 1`` (the block's last row) holds the weights the skip applies.

    Args:
        logits: ``M``, shape ``(..., H, H)``.
        num_states: ``K``, an int in ``[0, H]``; ``K = 0`` gives all zeros.
        doubly_stochastic: Sinkhorn (True) or row softmax (False).
        iterations: ``T >= 1``, used when ``doubly_stochastic``.

    Returns:
        ``W``, shape and dtype of ``logits``.
    """
    check_bools(doubly_stochastic=doubly_stochastic)
    check_iterations(iterations)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"mixing logits must be square (..., H, H), got shape {tuple(logits.shape)}")
    h = logits.shape[-1]
    if isinstance(num_states, bool) or not isinstance(num_states, int) or not 0 <= num_states <= h:
        raise ValueError(f"num_states must be an int in [0, {h}] (H = {h}), got {num_states!r}")
    if num_states == 0:
        return torch.zeros_like(logits)
    block = logits[..., h - num_states :, h - num_states :]
    if doubly_stochastic:
        block = project_doubly_stochastic(block, iterations)
    else:
        block = project_softmax(block)
    return F.pad(block, (h - num_states, 0, h - num_states, 0))


def matrix_mix(
    x: torch.Tensor,
    logits: torch.Tensor,
    states: Sequence[torch.Tensor],
    *,
    doubly_stochastic: bool = True,
    iterations: int = DEFAULT_ITERATIONS,
) -> torch.Tensor:
    r"""``x`` plus the latest row of the matrix-mixed window.

    .. math:: \mathrm{out} = x + \sum_{k=1}^{K} W_{K k}\, h_k

    with ``W`` the projected ``K x K`` block of :func:`matrix_weights`, indexed
    from 1 inside the block: row ``K`` is the row of the latest state (row
    ``H - 1`` of the padded ``H x H`` matrix, counting from 0). Only the last
    ``H`` states are used; ``K = 0`` gives ``x``.

    Args:
        x: the layer's output, any shape.
        logits: ``M``, shape ``(H, H)``; projected in at least float32, the
            weights cast to ``x``'s dtype.
        states: the window ``h_1 .. h_K``, oldest first, each shaped like ``x``.
        doubly_stochastic: Sinkhorn (True) or row softmax (False).
        iterations: Sinkhorn sweeps ``T >= 1``.
    """
    if logits.dim() != 2:
        raise ValueError(f"mixing logits must have shape (H, H), got {tuple(logits.shape)}")
    window = list(states)[-logits.shape[-1] :]
    for i, h in enumerate(window):
        if h.shape != x.shape:
            raise ValueError(
                f"history state {i} has shape {tuple(h.shape)} but x has shape {tuple(x.shape)}; "
                "MatrixMHCSkip mixes states shaped like x"
            )
    # At least float32: a half-precision Sinkhorn loses the small entries.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    weights = matrix_weights(logits, len(window), doubly_stochastic=doubly_stochastic, iterations=iterations)
    if not window:
        return x
    # The padded last row is window-aligned (zeros before the window), the
    # layout mix() takes; its one autograd node saves the states by reference.
    return mix(x, weights[-1].to(x.dtype), [h.to(x.dtype) for h in window])


@mhc_compatible
class MatrixMHCSkip(nn.Module):
    r"""Hyper-connection through a learned mixing matrix: ``out = x + sum_k W[K, k] h_k``.

    The seed library's matrix variant of :class:`MHCSkip`. It owns ``H x H``
    logits ``mixing_logits``; for a window of ``K`` states their trailing
    ``K x K`` block is projected to a doubly stochastic matrix (or row
    softmax) ``W``, and the skip adds the latest row of the mixed window
    ``W [h_1; ...; h_K]`` to ``x`` (:func:`matrix_mix`). An empty window
    returns ``x``.

    Call it as ``skip(x, history)`` with ``history`` a list of tensors (oldest
    first; beyond ``H`` only the last ``H`` are used), a :class:`HistoryBuffer`
    or None.

    Args:
        max_history: ``H >= 1``, the size of the logit matrix and of the window.
        doubly_stochastic: project with Sinkhorn (True) or a row softmax (False).
        iterations: Sinkhorn sweeps ``T >= 1``.
    """

    def __init__(
        self, max_history: int = 4, doubly_stochastic: bool = True, iterations: int = DEFAULT_ITERATIONS
    ) -> None:
        super().__init__()
        check_max_history(max_history)
        check_bools(doubly_stochastic=doubly_stochastic)
        check_iterations(iterations)
        self.max_history = max_history
        self.doubly_stochastic = bool(doubly_stochastic)
        self.iterations = iterations
        self.mixing_logits = nn.Parameter(torch.empty(max_history, max_history))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the logits from ``N(0, LOGIT_INIT_STD^2)``."""
        self.mixing_logits.normal_(0.0, LOGIT_INIT_STD)

    def mixing_matrix(self, num_states: int) -> torch.Tensor:
        """``W`` for ``K = num_states`` (:func:`matrix_weights`), projected in at least float32."""
        return matrix_weights(
            self.mixing_logits.to(torch.promote_types(self.mixing_logits.dtype, torch.float32)),
            num_states,
            doubly_stochastic=self.doubly_stochastic,
            iterations=self.iterations,
        )

    def forward(
        self, x: torch.Tensor, history: Sequence[torch.Tensor] | HistoryBuffer | None = None
    ) -> torch.Tensor:
        """``x + sum_k W[K, k] h_k`` over the last ``min(len(history), H)`` states."""
        return matrix_mix(
            x,
            self.mixing_logits,
            history_list(history), doubly_stochastic=self.doubly_stochastic,
            iterations=self.iterations,
        )

    def extra_repr(self) -> str:
        return (
            f"max_history={self.max_history}, doubly_stochastic={self.doubly_stochastic}, "
            f"iterations={self.iterations}"
        )
