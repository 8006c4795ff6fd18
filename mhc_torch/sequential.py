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

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .compat import mhc_compatible
from .history import HistoryBuffer
from .skip import MHCSkip, StackGradients, mix_kernel, mixing_weights, sample_gumbel

__all__ = ["MHCSequential"]


@mhc_compatible
class MHCSequential(nn.Module):
    """Wrap ``modules`` so each layer's output is mixed with the window of earlier states.

    Every wrapped module gets its own :class:`MHCSkip`; the skip options pass
    through to all of them. Parameter names: ``wrapped_modules.{i}.*`` and
    ``skip_layers.{i}.mixing_logits`` (``.gate_logit`` with gating).

    Each forward projects all layers' logits in one batched call (rather than
    one small sort per layer) and never reads a tensor value on the host. Its
    backward sums each state's history gradient once, in the layer that read
    it last, instead of handing autograd ``H`` copies (:class:`StackGradients`);
    gradients, hooks and ``torch.autograd.grad`` on states are unchanged.
    With the C++ kernel the layers read their weights from one ``(L, H)``
    table whose gradient the kernel sums itself (:meth:`_weight_table`).

    Args:
        modules: the layers ``f_1 .. f_L`` (at least one).
        max_history, mode, constraint, epsilon, temperature, init, use_gating,
            prune_threshold, stochastic, auto_project: as for :class:`MHCSkip`.
        clear_history_each_forward: clear ``history_buffer`` at the start of
            every forward (default). With False the window carries over from
            the previous call, which is what "temporal bleeding" means: only
            for models that really do want it (e.g. segment-by-segment
            processing of one sequence), and then call :meth:`clear_history`
            at every boundary.
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
    ) -> None:
        super().__init__()
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
        """Every layer's window weights, ``(L, H)``, in one batched projection.

        Layer ``l`` (0-based) sees ``K = min(num_states_first + l, H)`` states.
        Gumbel noise (training, ``stochastic=True``) is drawn here for all
        layers at once, or taken from ``gumbel_noise`` of shape ``(L, H)``.
        """
        skips = list(self.skip_layers)
        first, h = skips[0], self.max_history
        if device is None:
            device = first.mixing_logits.device if first.mode != "residual" else torch.device("cpu")
        num_states = (num_states_first + torch.arange(len(skips), device=device)).clamp(max=h)
        if first.mode == "residual":
            return mixing_weights(torch.zeros(len(skips), h, device=device), num_states, mode="residual")
        noise = None
        if first.stochastic and self.training:
            noise = gumbel_noise if gumbel_noise is not None else sample_gumbel((len(skips), h), device=device)
            if tuple(noise.shape) != (len(skips), h):
                raise ValueError(
                    f"gumbel_noise must have shape ({len(skips)}, {h}) (layers, mixing "
                    f"logits), got {tuple(noise.shape)}"
                )
        logits = torch.stack([s.mixing_logits for s in skips]).float()
        gates = torch.stack([s.gate_logit for s in skips]).float() if first.use_gating else None
        return mixing_weights(logits, num_states, gumbel_noise=noise, gate_logit=gates, **first.weight_options())

    def forward(self, x: torch.Tensor, *, gumbel_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Run the stack on ``x`` (``x_0``), recording every state in ``history_buffer``.

        Args:
            x: the input ``x_0``.
            gumbel_noise: optional ``(L, H)`` noise for stochastic training
                (one row per layer, aligned with the logits), for reproducibility.
        """
        if self.clear_history_each_forward:
            self.history_buffer.clear()
        self.history_buffer.append(x)
        num_states, depth = len(self.history_buffer), len(self.skip_layers)
        residual = self.skip_layers[0].mode == "residual"
        if self.use_checkpointing and torch.is_grad_enabled():
            weights = [None] * depth if residual else self.layer_weights(num_states, gumbel_noise=gumbel_noise, device=x.device)
            for module, skip, w in zip(self.wrapped_modules, self.skip_layers, weights, strict=True):
                x = checkpoint(_layer, module, skip, x, w, *self.history_buffer.get(), use_reentrant=False)
                self.history_buffer.append(x)
            return x
        # Layer l's window ends at x_l (x_0 the input); states carried over
        # from an earlier call get negative indices (see StackGradients).
        # torch.compile traces its own backward, so it gets the plain one;
        # without grad mode there is no backward to prepare for.
        # Residual mode never mixes, so it has nothing to sum either.
        plain = residual or torch.compiler.is_compiling() or not torch.is_grad_enabled()
        stack = None if plain else StackGradients()
        kernel = None if stack is None or stack.native is None else mix_kernel()
        if residual:  # x + h_K: no weights to compute
            weights = [None] * depth
        elif kernel is not None:  # one (L, H) table; each layer's C++ node reads its row
            weights = [self._weight_table(kernel, stack, x, num_states, gumbel_noise)] * depth
        else:  # one split into 0-d tensors, not one per layer
            h = self.max_history
            flat = self.layer_weights(num_states, gumbel_noise=gumbel_noise, device=x.device).to(x.dtype)
            flat = flat.reshape(-1).unbind()
            weights = [flat[i : i + h] for i in range(0, len(flat), h)]
        for layer, (module, skip, w) in enumerate(zip(self.wrapped_modules, self.skip_layers, weights, strict=True)):
            x = skip(module(x), self.history_buffer.get(), weights=w, _stack=None if stack is None else (stack, layer))
            self.history_buffer.append(x)
        return x

    def _weight_table(self, kernel, stack: StackGradients, x: torch.Tensor, num_states: int, gumbel_noise):
        """:meth:`layer_weights` as the C++ kernel's ``(L, H)`` table in ``x``'s dtype.

        For float32 on the CPU without pruning, gate or noise (the common
        case) the kernel projects the logits itself, in one pass over ``L*H``
        floats each way instead of ~35 small ATen ops; otherwise
        :meth:`layer_weights` projects them and the kernel only collects the
        table's gradient. Either way the result equals :meth:`layer_weights`.
        """
        first = self.skip_layers[0]
        logits = [s.mixing_logits for s in self.skip_layers]
        if (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and first.prune_threshold == 0
            and not first.use_gating
            and not (first.stochastic and self.training)
            and torch._C._len_torch_dispatch_stack() == 0  # e.g. FakeTensorMode: no memory to read
            and all(type(t) is nn.Parameter and t.dtype == torch.float32 and t.device.type == "cpu" for t in logits)
        ):
            return kernel.project(
                logits, num_states, first.mode == "mhc", first.constraint == "identity", first.epsilon,
                first.temperature, stack.native,
            )
        weights = self.layer_weights(num_states, gumbel_noise=gumbel_noise, device=x.device)
        return kernel.collect(weights.to(x.dtype).contiguous(), stack.native)

    def extra_repr(self) -> str:
        return (
            f"clear_history_each_forward={self.clear_history_each_forward}, "
            f"use_checkpointing={self.use_checkpointing}"
        )


def _layer(module: nn.Module, skip: MHCSkip, x: torch.Tensor, weights: torch.Tensor | None, *window: torch.Tensor):
    # One layer as a function of tensors, so torch.utils.checkpoint can replay it.
    return skip(module(x), list(window), weights=weights)
