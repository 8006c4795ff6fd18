r"""A stack of layers on ``n`` residual streams (PyTorch).

.. math::
    x^{(0)} = \mathrm{expand}(x), \qquad
    x^{(l+1)} = \mathrm{HC}_l(x^{(l)}), \qquad
    \mathrm{out} = \mathrm{reduce}(x^{(L)}) = \textstyle\sum_j x^{(L)}_j

with ``HC_l`` a :class:`~mhc_torch.streams.HyperConnection` around layer ``l``
(its ``layer_index`` set to ``l``). Input and output are ``(..., C)``. The
twin is :class:`mhc_jax.StreamSequential`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .streams import HyperConnection, check_count, check_stream_options, expand_streams, reduce_streams

__all__ = ["StreamSequential"]


class StreamSequential(nn.Module):
    """Expand to ``num_streams`` streams, run every layer inside a hyper-connection, reduce.

    ``layers[i]`` is the :class:`HyperConnection` around the ``i``-th layer
    given (its ``branch``); its parameters are ``layers.{i}.{phi, a_*, b_*}``
    and the layer's own ``layers.{i}.branch.*`` (the Flax twin's
    ``layers_{i}/...``).

    Args:
        layers: the layers (modules mapping ``(..., C)`` to ``(..., C)``; at least one).
        num_streams, mode, dynamic, sinkhorn_iterations: as for
            :class:`HyperConnection` (one value for the whole stack).
        dim: the width ``C`` (keyword, required: ``phi`` is ``(n*C, n*n + 2n)``).
        use_checkpointing: recompute each layer in the backward pass
            (``torch.utils.checkpoint``) instead of storing its activations
            (the Flax twin's ``scan=True, remat=True``).
    """

    def __init__(
        self,
        layers: Iterable[nn.Module],
        num_streams: int = 4,
        mode: str = "mhc",
        dynamic: bool = True,
        sinkhorn_iterations: int = 20,
        *,
        dim: int,
        use_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_stream_options(num_streams, mode, dynamic, sinkhorn_iterations, None)
        check_count("dim", dim)
        if not isinstance(use_checkpointing, bool):
            raise TypeError(
                f"use_checkpointing must be a bool, got {use_checkpointing!r} ({type(use_checkpointing).__name__})"
            )
        if isinstance(layers, (nn.Module, str)) or not isinstance(layers, Iterable):
            raise TypeError(f"layers must be a sequence of layers, got {type(layers).__name__}")
        layers = list(layers)
        if not layers:
            raise ValueError("StreamSequential needs at least one layer (depth >= 1), got 0")
        self.num_streams, self.dim, self.use_checkpointing = num_streams, dim, use_checkpointing
        self.layers = nn.ModuleList(
            HyperConnection(dim, layer, num_streams, mode, dynamic, sinkhorn_iterations, layer_index=i)
            for i, layer in enumerate(layers)
        )

    @property
    def depth(self) -> int:
        return len(self.layers)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``(..., C)`` in, ``(..., C)`` out; ``args``/``kwargs`` go to every layer."""
        streams = expand_streams(x, self.num_streams)
        for layer in self.layers:
            if self.use_checkpointing and torch.is_grad_enabled():
                streams = checkpoint(layer, streams, *args, use_reentrant=False, **kwargs)
            else:
                streams = layer(streams, *args, **kwargs)
        return reduce_streams(streams)

    def coefficients(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every layer's ``(h_pre, h_post, h_res)`` on the way through the stack,
        stacked along a leading depth axis: ``(L, ..., n)``, ``(L, ..., n)``,
        ``(L, ..., n, n)``."""
        streams = expand_streams(x, self.num_streams)
        coefficients = []
        for layer in self.layers:
            coefficients.append(layer.coefficients(streams))
            streams = layer(streams, *args, **kwargs)
        return tuple(torch.stack(c) for c in zip(*coefficients, strict=True))
