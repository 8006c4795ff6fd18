r"""The manifold-constrained hyper-connection skip (PyTorch).

Notation: ``x`` the current layer's output ``f(x_{l})``, ``h_1 .. h_K`` the
window of earlier states (``h_K`` the latest), ``mu`` the ``H`` mixing logits,
``tau`` the temperature, ``eps`` the identity floor, ``g`` the gate.

.. math::
    \alpha = \mathrm{where}(w(\mu_{H-K:}) < p,\ 0,\ w(\mu_{H-K:})), \qquad
    \mathrm{out} = x + g \sum_k \alpha_k h_k

with ``w`` the projection chosen by ``mode``/``constraint`` and ``p`` the prune
threshold. With ``leak = l > 0`` (``mode="mhc"`` only) ``w`` is
``(1 - l) w_exact + l w_softmax``: every weight stays positive and every logit
keeps a gradient. The math lives in plain functions (:func:`window_weights`,
:func:`perturb_weights`, :func:`identity_init_logits`); :class:`MHCSkip` owns the
parameters and calls them. The twin is :mod:`mhc_jax.skip`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from numbers import Real

import numpy as np
import torch
from torch import nn

from .compat import mhc_compatible
from .history import HistoryBuffer, HistoryShapeError, HistoryTypeError, check_max_history
from .projections import (
    check_epsilon,
    check_temperature,
    project_identity_preserving,
    project_simplex,
    project_softmax,
)

__all__ = [
    "MHCSkip",
    "mix",
    "window_weights",
    "mixing_weights",
    "perturb_weights",
    "identity_init_logits",
    "MODES",
    "CONSTRAINTS",
    "INITS",
    "GATE_INIT_LOGIT",
    "INIT_HISTORY_WEIGHT",
]

MODES = ("residual", "hc", "mhc")
CONSTRAINTS = ("simplex", "identity")
INITS = ("identity", "uniform")

#: Total weight the ``"identity"`` init leaves on the earlier states of a full
#: window; the latest state gets the rest. Small enough that a fresh skip is
#: within 1e-3 of ``x + h_K`` for unit-scale inputs, large enough that every
#: slot is inside the support of the simplex projection (so it gets gradient).
INIT_HISTORY_WEIGHT = 1e-4

#: Initial ``gate_logit``: ``sigmoid(5) ~ 0.993``, so a gated skip starts close
#: to the ungated one. A gate near 0.5 would halve the residual stream at every
#: layer of a deep stack.
GATE_INIT_LOGIT = 5.0

_PROJECTION_KEY = re.compile(r"projection_from_(\d+)\.weight$")


def check_skip_options(
    mode, max_history, constraint, epsilon, temperature, init, prune_threshold, init_name="init", leak=0.0
) -> None:
    """Validate the skip's options at construction; ``ValueError`` names the bad one."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")
    if init not in INITS:
        raise ValueError(f"{init_name} must be one of {INITS}, got {init!r}")
    check_max_history(max_history)
    check_temperature(temperature)
    if not isinstance(temperature, Real):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    check_epsilon(epsilon)
    if not isinstance(epsilon, Real):
        raise ValueError(f"epsilon must be a number in [0, 1), got {epsilon!r}")
    if isinstance(prune_threshold, bool) or not (
        isinstance(prune_threshold, Real) and 0.0 <= prune_threshold < 1.0
    ):
        raise ValueError(f"prune_threshold must be a number in [0, 1), got {prune_threshold!r}")
    check_leak(leak, mode)


def check_leak(leak, mode: str) -> None:
    """``leak`` must be a number in ``[0, 1)``, and positive only with ``mode="mhc"``."""
    if isinstance(leak, bool) or not (isinstance(leak, Real) and 0.0 <= leak < 1.0):
        raise ValueError(f"leak must be a number in [0, 1), got {leak!r}")
    if leak > 0 and mode != "mhc":
        # Elsewhere it would do nothing (hc's softmax is never exactly 0): an
        # option that silently does nothing is a mistake to report.
        raise ValueError(
            f"leak applies to mode='mhc' (the simplex projection's exact zeros), got leak={leak!r} "
            f"with mode={mode!r}"
        )


def check_bools(**options) -> None:
    """Raise ``TypeError`` naming the first option that is not a ``bool``.

    ``bool("False")`` is True: a string, number or array where a switch
    belongs is a mistake, never a truthy value to guess from.
    """
    for name, value in options.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool (True or False), got {value!r} of type {type(value).__name__}")


def identity_init_logits(max_history: int, mode: str = "mhc", temperature: float = 1.0) -> np.ndarray:
    r"""Logits for the ``"identity"`` init: the latest state dominates.

    Earlier logits are 0 and the latest is ``tau * d``, with ``d`` chosen so a
    full window (``K = H``) puts total weight ``m = INIT_HISTORY_WEIGHT`` on the
    earlier states (less for ``K < H``):

    * simplex base (``mode="mhc"``): ``d = 1 - H m / (H - 1)``.
      Since ``d < 1`` every slot stays inside the support, each earlier state
      getting ``(1 - d) / K > 0``: every logit receives gradient from step one.
    * softmax base (``mode="hc"``): ``d = log((H - 1)(1 - m) / m)``.

    With ``constraint="identity"`` the earlier weights shrink by ``1 - eps``.
    """
    check_max_history(max_history)
    logits = np.zeros(max_history, np.float32)
    if max_history > 1:
        h, m = max_history, INIT_HISTORY_WEIGHT
        d = math.log((h - 1) * (1 - m) / m) if mode == "hc" else 1 - h * m / (h - 1)
        logits[-1] = temperature * d
    return logits


def _fill_invalid(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # Put slots outside the window at least 1e4 below every slot: softmax then
    # gives them exactly 0 and they fall outside the simplex support, with no
    # inf/NaN anywhere, even for an empty window.
    gap = 1e4 + 2 * z.detach().abs().amax(dim=-1, keepdim=True)
    return torch.where(valid, z, z.detach() - gap)


def window_weights(
    logits: torch.Tensor,
    num_states: int | torch.Tensor,
    *,
    mode: str = "mhc",
    constraint: str = "simplex",
    temperature: float = 1.0,
    epsilon: float = 0.1,
    leak: float = 0.0,
) -> torch.Tensor:
    r"""Mixing weights for a window of ``K = num_states`` states.

    Slot ``j`` of the result is aligned with ``logits[..., j]``: the window uses
    the last ``K`` logits (the last one belongs to the latest state) and the
    first ``H - K`` weights are exactly 0. The ``K`` weights are those of
    projecting ``mu[H-K:]`` alone:

    * ``mode="hc"``: :func:`project_softmax`; ``"mhc"``: :func:`project_simplex`;
    * ``constraint="identity"`` wraps that base in
      :func:`project_identity_preserving` (latest weight ``>= eps``);
    * ``mode="residual"``: 1 on the latest state.

    ``leak = l > 0`` (``mode="mhc"``) blends in the softmax of the same logits,

    .. math:: w = (1 - l)\, w_{\mathrm{simplex}} + l\, w_{\mathrm{softmax}},

    a point of the simplex (the same constraint applied to both, so the
    latest weight stays ``>= eps``) whose weights are all positive, so no
    slot's logit loses its gradient; ``l = 0`` is the exact projection.

    Batched: ``logits`` of shape ``(L, H)`` with ``num_states`` of shape ``(L,)``
    projects ``L`` skips' logits in one call.

    Args:
        logits: ``mu``, shape ``(..., H)``.
        num_states: ``K``, an int or integer tensor broadcastable to ``logits.shape[:-1]``.
    Returns:
        Weights of shape ``(..., H)``; they sum to 1 when ``K >= 1`` and are all 0
        when ``K = 0``.
    """
    h = logits.shape[-1]
    slots = torch.arange(h, device=logits.device)
    num_states = torch.as_tensor(num_states, device=logits.device).unsqueeze(-1)
    valid = slots >= h - num_states
    if mode == "residual":
        return ((slots == h - 1) & valid).to(logits.dtype)
    z = _fill_invalid(logits / temperature, valid)

    def project(base: str) -> torch.Tensor:
        if constraint == "identity":
            return project_identity_preserving(z, epsilon, 1.0, base)
        return project_softmax(z) if base == "softmax" else project_simplex(z)

    alpha = project("softmax" if mode == "hc" else "simplex")
    if leak > 0 and mode == "mhc":
        alpha = (1 - leak) * alpha + leak * project("softmax")
    return torch.where(valid, alpha, 0)


def perturb_weights(
    alpha: torch.Tensor, gumbel_noise: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    r"""Gumbel-softmax perturbation of mixing weights (stochastic mode).

    .. math:: \tilde\alpha = \mathrm{softmax}((\log \alpha + G) / \tau)

    over the entries with ``alpha > 0``; zero entries (pruned, or outside the
    window) stay exactly 0 since ``log 0 = -inf``, and an all-zero ``alpha``
    stays all zero.

    Args:
        alpha: weights, shape ``(..., H)``.
        gumbel_noise: ``G ~ Gumbel(0, 1)``, broadcastable to ``alpha``.
        temperature: ``tau > 0``.
    """
    positive = ~(alpha <= 0)  # NaN counts as positive: it stays NaN, never becomes a 0
    log_alpha = torch.log(torch.where(positive, alpha, 1))
    z = _fill_invalid((log_alpha + gumbel_noise) / temperature, positive)
    return torch.where(positive, torch.softmax(z, dim=-1), 0)


def mixing_weights(
    logits: torch.Tensor,
    num_states,
    *,
    mode: str = "mhc",
    constraint: str = "simplex",
    temperature: float = 1.0,
    epsilon: float = 0.1,
    prune_threshold: float = 0.0,
    gumbel_noise: torch.Tensor | None = None,
    gate_logit: torch.Tensor | None = None,
    leak: float = 0.0,
) -> torch.Tensor:
    r"""Everything between the logits and the mix: ``g * perturb(prune(w(mu)))``.

    :func:`window_weights`, then weights below ``prune_threshold`` set to 0,
    then (when ``gumbel_noise`` is given) :func:`perturb_weights`, then the gate
    ``sigmoid(gate_logit)`` (when given; shape ``(..., 1)``, one gate per row). Batched over leading axes, so a stack
    can compute every layer's weights in one call.
    """
    alpha = window_weights(
        logits, num_states, mode=mode, constraint=constraint, temperature=temperature, epsilon=epsilon, leak=leak
    )
    if mode == "residual":
        return alpha
    if prune_threshold > 0:
        alpha = torch.where(alpha < prune_threshold, 0, alpha)
    if gumbel_noise is not None:
        alpha = perturb_weights(alpha, gumbel_noise, temperature)
    if gate_logit is not None:
        alpha = torch.sigmoid(gate_logit) * alpha
    return alpha


def sample_gumbel(shape, *, device=None, dtype=torch.float32, generator=None) -> torch.Tensor:
    """``G = -log(E)``, ``E ~ Exponential(1)``: standard Gumbel noise."""
    noise = torch.empty(shape, device=device, dtype=dtype)
    return -noise.exponential_(generator=generator).log()


class _Mix(torch.autograd.Function):
    """``y + sum_k w_k h_k`` in one node, with the least memory traffic eager torch allows.

    Forward reads each state once (one ``addcmul`` chain into a fresh
    output) and saves the states by reference, not as a stacked copy.
    Backward hands ``dL/dy = g`` through uncopied and computes
    ``dL/dw_k = <h_k, g>`` and ``dL/dh_k = w_k g``. Written with plain ops this
    sum would be ``2K`` autograd nodes, each weight gradient a full-size
    temporary ``g * h_k`` before its sum.

    ``w`` is the skip's whole ``(H,)`` weight row (window-aligned: the last
    ``K`` entries belong to the ``K`` states); its gradient is ``(H,)`` too,
    zero outside the window. The classic ``forward(ctx, ...)`` form: with
    ``setup_context`` every call re-binds its arguments through
    ``inspect.signature``, a few percent of a training step. The price is
    that ``torch.func`` transforms refuse it (with torch's own clear error);
    ``torch.compile`` and ``torch.utils.checkpoint`` work.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, w: torch.Tensor, *states: torch.Tensor) -> torch.Tensor:
        weights = w.unbind(-1)[w.shape[-1] - len(states) :]
        out = torch.addcmul(y, states[0], weights[0])
        for h, w_k in zip(states[1:], weights[1:], strict=True):
            out.addcmul_(h, w_k)
        ctx.save_for_backward(w, *states)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, *states = ctx.saved_tensors
        k, h = len(states), w.shape[-1]
        need_w, need_states = ctx.needs_input_grad[1], ctx.needs_input_grad[2:]
        grad_w = None
        if need_w:
            flat = g.reshape(-1)
            dots = [torch.dot(s.reshape(-1), flat) for s in states]
            grad_w = torch.stack(dots if k == h else [flat.new_zeros(())] * (h - k) + dots)
        weights = w.unbind(-1)[h - k :]
        grad_states = [g * w_k if need else None for w_k, need in zip(weights, need_states, strict=True)]
        return (g, grad_w, *grad_states)


def mix(y: torch.Tensor, weights: torch.Tensor, states: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""The skip's sum ``y + sum_k w_k h_k`` over a window of ``K`` states.

    .. math:: \mathrm{out} = y + \sum_{k=1}^{K} w_{H-K+k}\, h_k

    Args:
        y: the layer's output, any shape.
        weights: the ``(H,)`` window-aligned weights (:func:`mixing_weights`),
            in ``y``'s dtype; only the last ``K`` are read.
        states: ``K >= 1`` tensors shaped like ``y``, oldest first.
    """
    return _Mix.apply(y, weights, *states)


def history_list(history: Sequence[torch.Tensor] | HistoryBuffer | None) -> list[torch.Tensor]:
    """The states a skip was handed, as a new list (oldest first); a bare tensor is a :class:`HistoryTypeError`."""
    if history is None:
        return []
    if isinstance(history, HistoryBuffer):
        return history.get()
    if isinstance(history, torch.Tensor):
        raise HistoryTypeError(
            "history must be a list of tensors (oldest first), a HistoryBuffer or None, "
            f"got a tensor of shape {tuple(history.shape)}; wrap a single state as [state]"
        )
    return list(history)


def _drop(shape: torch.Size, axis: int) -> tuple[int, ...]:
    return tuple(shape[:axis]) + tuple(shape[axis + 1 :])


def feature_axis(x: torch.Tensor) -> int:
    """The axis ``auto_project`` maps: channels (1) for NCHW-style tensors of
    4+ dimensions, otherwise the last axis (``(batch, features)``,
    ``(batch, tokens, features)``)."""
    return 1 if x.dim() >= 4 else x.dim() - 1


@mhc_compatible
class MHCSkip(nn.Module):
    r"""Manifold-constrained hyper-connection: ``out = x + g * sum_k alpha_k h_k``.

    Replaces the residual ``x + h_K`` by a learned mix of the window
    ``h_1 .. h_K`` of earlier states, its weights ``alpha`` projected onto the
    simplex (softmax in ``"hc"`` mode, the exact Euclidean projection in
    ``"mhc"`` mode, which can switch noisy history off with exact zeros).

    Call it as ``skip(x, history)`` with ``history`` a list of tensors (oldest
    first; beyond ``H`` only the last ``H`` are used), a :class:`HistoryBuffer`
    or None. An empty window returns ``x``.

    Args:
        mode: ``"residual"`` (``x + h_K``, no parameters), ``"hc"`` or ``"mhc"``.
        max_history: ``H >= 1``, the number of logits / window slots.
        constraint: ``"simplex"`` (base projection alone) or ``"identity"``
            (latest weight ``>= epsilon``).
        epsilon: identity floor in ``[0, 1)``.
        temperature: ``tau > 0``; 0.5-2.0 is the useful range.
        init: ``"identity"`` (start as a near-plain residual, every slot still
            learning; see :func:`identity_init_logits`) or ``"uniform"`` (``mu = 0``).
        auto_project: map a history state whose feature size differs from
            ``x``'s through a learned bias-free linear map, one per input size
            (``projection_from_{n}``), created on first use (run one forward
            before building the optimizer, as with ``nn.LazyLinear``; loading a
            ``state_dict`` creates them too). The feature axis is the channel
            axis (1) for 4+-dimensional NCHW tensors, else the last axis.
            Otherwise a shape mismatch is an error.
        use_gating: scale the mix by ``g = sigmoid(gate_logit)``.
        prune_threshold: weights below it are set to 0 (no renormalisation).
        stochastic: in training mode perturb the weights with Gumbel noise;
            ``eval()`` never adds noise.
        leak: ``l`` in ``[0, 1)``, ``mode="mhc"`` only: the share of the weights
            taken from the softmax of the same logits (:func:`window_weights`).
            The simplex projection's exact zeros get no gradient, so a slot
            that reaches 0 never comes back (a "dead slot", which
            :func:`diagnose` reports); any ``l > 0`` keeps every slot
            learning, at the price of no exact zeros. 0 (default): the exact
            projection.
    """

    def __init__(
        self,
        mode: str = "mhc",
        max_history: int = 4,
        constraint: str = "simplex",
        epsilon: float = 0.1,
        temperature: float = 1.0,
        init: str = "identity",
        auto_project: bool = False,
        use_gating: bool = False,
        prune_threshold: float = 0.0,
        stochastic: bool = False,
        leak: float = 0.0,
    ) -> None:
        super().__init__()
        check_skip_options(mode, max_history, constraint, epsilon, temperature, init, prune_threshold, leak=leak)
        check_bools(auto_project=auto_project, use_gating=use_gating, stochastic=stochastic)
        self.mode = mode
        self.max_history = max_history
        self.constraint = constraint
        self.epsilon = float(epsilon)
        self.temperature = float(temperature)
        self.auto_project = bool(auto_project)
        self.use_gating = bool(use_gating)
        self.prune_threshold = float(prune_threshold)
        self.stochastic = bool(stochastic)
        self.leak = float(leak)
        #: The window size K of the last forward (0 before the first one); what
        #: monitoring projects the logits for.
        self.last_num_states = 0
        # Residual mode has nothing to learn; unused parameters would also
        # trip DistributedDataParallel's unused-parameter check.
        if mode != "residual":
            self.mixing_logits = nn.Parameter(torch.zeros(max_history))
            if use_gating:
                # Shape (1,), not (): FSDP2 shards parameters along dim 0.
                self.gate_logit = nn.Parameter(torch.zeros(1))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "identity") -> None:
        """Set the logits by ``init`` (``"identity"`` or ``"uniform"``) and the gate to its start."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if self.mode == "residual":
            return
        if init == "identity":
            logits = identity_init_logits(self.max_history, self.mode, self.temperature)
            self.mixing_logits.copy_(torch.from_numpy(logits))
        else:
            self.mixing_logits.zero_()
        if self.use_gating:
            self.gate_logit.fill_(GATE_INIT_LOGIT)

    def mixing_weights(
        self, num_states: int | torch.Tensor, *, gumbel_noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ``H`` window-ordered weights ``g * alpha`` for ``K = num_states``.

        Includes pruning, the Gumbel perturbation when it applies (training
        mode, ``stochastic=True``) and the gate. The skip's output is
        ``x + sum_j w[j] * h_j`` over the window (:func:`mix`).
        """
        if self.mode == "residual":
            return window_weights(torch.zeros(self.max_history), num_states, mode="residual")
        noise = None
        if self.stochastic and self.training:
            noise = gumbel_noise if gumbel_noise is not None else sample_gumbel(
                self.max_history, device=self.mixing_logits.device
            )
            if tuple(noise.shape) != (self.max_history,):
                raise ValueError(
                    f"gumbel_noise must have shape ({self.max_history},) (one value per "
                    f"mixing logit), got {tuple(noise.shape)}"
                )
        # Project in float32 even after .half(): the sort/threshold is cheap,
        # and a fp16 simplex projection loses its small weights.
        return mixing_weights(
            self.mixing_logits.float(),
            num_states,
            gumbel_noise=noise,
            gate_logit=self.gate_logit.float() if self.use_gating else None,
            **self.weight_options(),
        )

    def weight_options(self) -> dict:
        """The options :func:`mixing_weights` takes from this skip."""
        return dict(
            mode=self.mode,
            constraint=self.constraint,
            temperature=self.temperature,
            epsilon=self.epsilon,
            prune_threshold=self.prune_threshold,
            leak=self.leak,
        )

    def forward(
        self,
        x: torch.Tensor,
        history: Sequence[torch.Tensor] | HistoryBuffer | None = None,
        *,
        gumbel_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mix the window into ``x``.

        Args:
            x: the current layer's output.
            history: a list of tensors (oldest first), a :class:`HistoryBuffer`, or None.
            gumbel_noise: optional ``(H,)`` noise aligned with ``mixing_logits``,
                used instead of sampling (for reproducible tests).
        Returns:
            ``x + g * sum_k alpha_k h_k``, the shape and dtype of ``x``.
        """
        window = history_list(history)[-self.max_history :]
        weights = None
        if window and self.mode != "residual":
            weights = self.mixing_weights(len(window), gumbel_noise=gumbel_noise)
        return self._mix_window(x, window, weights)

    def _mix_window(self, x: torch.Tensor, window: list[torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
        """``x + sum_k w_k h_k`` for a window of at most ``H`` states and its
        ``(H,)`` weights from :meth:`mixing_weights` (None in residual mode or
        for an empty window). What :class:`MHCSequential` calls per layer,
        having projected every layer's weights at once."""
        states = self._match_shape(x, window)
        k = len(states)
        if self.last_num_states != k:  # nn.Module.__setattr__ is slow on the hot path
            self.last_num_states = k
        if not states:
            return x
        if self.mode == "residual":
            return x + states[-1]
        return mix(x, weights.to(x.dtype), states)

    def _match_shape(self, x: torch.Tensor, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """Check each state's shape against ``x``; auto-project the feature axis if allowed."""
        if all(h.shape == x.shape and h.dtype == x.dtype for h in states):
            return states
        out = []
        axis = feature_axis(x)
        for i, h in enumerate(states):
            if h.shape != x.shape:
                if not self.auto_project:
                    raise HistoryShapeError(
                        f"history state {i} has shape {tuple(h.shape)} but x has shape "
                        f"{tuple(x.shape)}; MHCSkip mixes states shaped like x (pass "
                        "auto_project=True to map the feature axis with a learned linear map)"
                    )
                if h.dim() != x.dim() or _drop(h.shape, axis) != _drop(x.shape, axis):
                    raise HistoryShapeError(
                        f"auto_project maps only the feature axis ({axis}), but history "
                        f"state {i} has shape {tuple(h.shape)} and x has shape {tuple(x.shape)}"
                    )
                h = self._projection(h.shape[axis], x).forward(h.movedim(axis, -1)).movedim(-1, axis)
            out.append(h.to(x.dtype))
        return out

    def _projection(self, in_features: int, x: torch.Tensor) -> nn.Linear:
        name = f"projection_from_{in_features}"
        if not hasattr(self, name):
            out_features = x.shape[feature_axis(x)]
            self.add_module(
                name, nn.Linear(in_features, out_features, bias=False, device=x.device, dtype=x.dtype)
            )
        return getattr(self, name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Create the lazily built projections a checkpoint holds, so a fresh
        # skip loads it without a warm-up forward.
        device = self.mixing_logits.device if self.mode != "residual" else None
        gate = state_dict.get(prefix + "gate_logit")
        if gate is not None and gate.dim() == 0:  # saved before the gate became (1,)
            state_dict[prefix + "gate_logit"] = gate.reshape(1)
        for key, value in state_dict.items():
            match = _PROJECTION_KEY.fullmatch(key[len(prefix) :]) if key.startswith(prefix) else None
            if match and not hasattr(self, f"projection_from_{match.group(1)}"):
                out_features, in_features = value.shape
                self.add_module(
                    f"projection_from_{in_features}",
                    nn.Linear(in_features, out_features, bias=False, device=device, dtype=value.dtype),
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, max_history={self.max_history}, constraint={self.constraint!r}, "
            f"epsilon={self.epsilon}, temperature={self.temperature}, use_gating={self.use_gating}, "
            f"prune_threshold={self.prune_threshold}, stochastic={self.stochastic}, "
            f"auto_project={self.auto_project}" + (f", leak={self.leak}" if self.leak else "")
        )
