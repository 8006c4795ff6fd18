r"""A sequential stack with one hyper-connection skip per layer (PyTorch, stateful).

.. math::
    x_{l+1} = f_l(x_l) + g_l \sum_k \alpha^{(l)}_k h_k, \qquad
    [h_1 .. h_K] = \text{the last } H \text{ of } [x_0, x_1, .., x_l]

The stack keeps its window in a :class:`HistoryBuffer` (``history_buffer``).
By default the buffer is cleared at the start of every forward, so one batch
never sees another's states. The twin is :class:`mhc_jax.MHCSequential`, where
history is explicit carried state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .compat import mhc_compatible
from .history import HistoryBuffer
from .skip import MHCSkip, check_bools, mixing_weights, sample_gumbel

__all__ = ["MHCSequential"]


@mhc_compatible
class MHCSequential(nn.Module):
    """Wrap ``modules`` so each layer's output is mixed with the window of earlier states.

    Every wrapped module gets its own :class:`MHCSkip`; the skip options given
    here are each skip's starting options. The skips own them from then on:
    change ``stack.skip_layers[3].temperature`` and layer 3 (alone) changes.
    Parameter names: ``wrapped_modules.{i}.*`` and
    ``skip_layers.{i}.mixing_logits`` (``.gate_logit`` with gating).

    Each forward projects all layers' logits in one batched call when the
    skips share their options (one call per layer otherwise), and never reads
    a tensor value on the host.

    A forward with ``clear_history_each_forward=True`` keeps its window in a
    local list and stores it in ``history_buffer`` only at the end (for
    inspection), so one model may serve several threads at once for
    inference: each call's window is its own.

    Args:
        modules: the layers ``f_1 .. f_L`` (at least one).
        max_history, mode, constraint, epsilon, temperature, init, use_gating,
            prune_threshold, stochastic, auto_project, leak: as for :class:`MHCSkip`.
        clear_history_each_forward: start every forward from an empty window
            (default). With False the window carries over from the previous
            call, which is what "temporal bleeding" means: only for models
            that really do want it (e.g. segment-by-segment processing of one
            sequence), and then call :meth:`clear_history` at every boundary.
        detach_history: store states detached. Cuts the memory that ``H``
            earlier layers' graphs hold in very deep models; gradient then
            reaches earlier layers only through the main path.
        use_checkpointing: recompute each layer (module and skip) in the
            backward pass instead of storing its activations.
    """

    def __init__(
        self,
        modules: Iterable[nn.Module],
        max_history: int = 4,
        mode: str = "mhc",
        constraint: str = "simplex",
        epsilon: float = 0.1,
        temperature: float = 1.0,
        init: str = "identity",
        clear_history_each_forward: bool = True,
        detach_history: bool = False,
        use_gating: bool = False,
        use_checkpointing: bool = False,
        prune_threshold: float = 0.0,
        stochastic: bool = False,
        auto_project: bool = False,
        leak: float = 0.0,
    ) -> None:
        super().__init__()
        check_bools(
            clear_history_each_forward=clear_history_each_forward,
            detach_history=detach_history,
            use_checkpointing=use_checkpointing,
        )
        modules = list(modules)
        if not modules:
            raise ValueError("MHCSequential needs at least one module (depth >= 1), got 0")
        self.wrapped_modules = nn.ModuleList(modules)
        self.skip_layers = nn.ModuleList(
            MHCSkip(
                mode=mode,
                max_history=max_history,
                constraint=constraint,
                epsilon=epsilon,
                temperature=temperature,
                init=init,
                auto_project=auto_project,
                use_gating=use_gating,
                prune_threshold=prune_threshold,
                stochastic=stochastic,
                leak=leak,
            )
            for _ in modules
        )
        self.history_buffer = HistoryBuffer(max_history, detach_history=detach_history)
        self.clear_history_each_forward = bool(clear_history_each_forward)
        self.use_checkpointing = bool(use_checkpointing)

    @property
    def max_history(self) -> int:
        return self.history_buffer.max_history

    def clear_history(self) -> None:
        """Forget every stored state (start of a new, unrelated input)."""
        self.history_buffer.clear()

    def layer_weights(
        self,
        num_states_first: int = 1,
        *,
        gumbel_noise: torch.Tensor | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Every layer's window weights, ``(L, H)``, from each skip's own options.

        Layer ``l`` (0-based) sees ``K = min(num_states_first + l, H)`` states.
        Skips that share their options (the usual case) are projected in one
        batched call; otherwise each skip projects its own row. Gumbel noise
        (training, ``stochastic=True``) is drawn here for all layers at once,
        or taken from ``gumbel_noise`` of shape ``(L, H)``.
        """
        skips = list(self.skip_layers)
        depth, h = len(skips), self.max_history
        if device is None:
            device = next((s.mixing_logits.device for s in skips if s.mode != "residual"), torch.device("cpu"))
        num_states = (num_states_first + torch.arange(depth, device=device)).clamp(max=h)
        noise = None
        if self.training and any(s.stochastic and s.mode != "residual" for s in skips):
            noise = gumbel_noise if gumbel_noise is not None else sample_gumbel((depth, h), device=device)
            if tuple(noise.shape) != (depth, h):
                raise ValueError(
                    f"gumbel_noise must have shape ({depth}, {h}) (layers, mixing "
                    f"logits), got {tuple(noise.shape)}"
                )
        first = skips[0]
        options = first.weight_options()
        shared = all(
            s.weight_options() == options and s.use_gating == first.use_gating and s.stochastic == first.stochastic
            for s in skips
        )
        if not shared:
            return torch.stack([
                s.mixing_weights(num_states[i], gumbel_noise=None if noise is None else noise[i]).to(device)
                for i, s in enumerate(skips)
            ])
        if first.mode == "residual":
            return mixing_weights(torch.zeros(depth, h, device=device), num_states, mode="residual")
        logits = torch.stack([s.mixing_logits for s in skips]).float()
        gates = torch.stack([s.gate_logit for s in skips]).float() if first.use_gating else None
        return mixing_weights(
            logits, num_states, gumbel_noise=noise if first.stochastic else None, gate_logit=gates, **options
        )

    def forward(self, x: torch.Tensor, *, gumbel_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Run the stack on ``x`` (``x_0``), recording the window in ``history_buffer``.

        Args:
            x: the input ``x_0``.
            gumbel_noise: optional ``(L, H)`` noise for stochastic training
                (one row per layer, aligned with the logits), for reproducibility.
        """
        buffer, h = self.history_buffer, self.max_history
        # The window is this call's own list: the buffer is read once (when
        # it carries over) and written once, at the end.
        window = [] if self.clear_history_each_forward else buffer.get()
        keep = torch.Tensor.detach if buffer.detach_history else _identity
        window.append(keep(x))
        del window[:-h]
        weights = self.layer_weights(len(window), gumbel_noise=gumbel_noise, device=x.device)
        # One split for all layers, not one select per layer.
        rows = weights.to(x.dtype).unbind(0)
        checkpointing = self.use_checkpointing and torch.is_grad_enabled()
        for module, skip, row in zip(self.wrapped_modules, self.skip_layers, rows, strict=True):
            if checkpointing:
                x = checkpoint(_layer, module, skip, x, row, *window, use_reentrant=False)
            else:
                x = skip._mix_window(module(x), window, row)
            window.append(keep(x))
            if len(window) > h:
                del window[0]
        buffer._states = deque(window, maxlen=h)
        return x

    def extra_repr(self) -> str:
        return (
            f"clear_history_each_forward={self.clear_history_each_forward}, "
            f"use_checkpointing={self.use_checkpointing}"
        )


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _layer(module: nn.Module, skip: MHCSkip, x: torch.Tensor, weights: torch.Tensor, *window: torch.Tensor):
    # One layer as a function of tensors, so torch.utils.checkpoint can replay it.
    return skip._mix_window(module(x), list(window), weights)
