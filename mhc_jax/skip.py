r"""The manifold-constrained hyper-connection skip (JAX/Flax).

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
parameters and calls them. The twin is :mod:`mhc_torch.skip`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .history import History, HistoryShapeError, HistoryTypeError, check_max_history
from .projections import (
    check_epsilon,
    check_temperature,
    project_identity_preserving,
    project_simplex,
    project_softmax,
)

__all__ = [
    "MHCSkip",
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


def check_module_options(module: nn.Module) -> None:
    """Validate a Flax module's skip fields (``MHCSkip`` and ``MHCSequential`` share them)."""
    check_bools(auto_project=module.auto_project, use_gating=module.use_gating, stochastic=module.stochastic)
    if module.deterministic is not None:
        check_bools(deterministic=module.deterministic)
    check_skip_options(
        module.mode,
        module.max_history,
        module.constraint,
        module.epsilon,
        module.temperature,
        module.mixing_init,
        module.prune_threshold,
        init_name="mixing_init",
        leak=module.leak,
    )


def weight_options(module: nn.Module) -> dict:
    """The options :func:`mixing_weights` takes from a module's skip fields."""
    return dict(
        mode=module.mode,
        constraint=module.constraint,
        temperature=module.temperature,
        epsilon=module.epsilon,
        prune_threshold=module.prune_threshold,
        leak=module.leak,
    )


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


def initial_logits(max_history: int, mode: str, temperature: float, init: str) -> np.ndarray:
    """The starting ``mixing_logits``: :func:`identity_init_logits`, or zeros for ``"uniform"``."""
    if init == "uniform":
        return np.zeros(max_history, np.float32)
    return identity_init_logits(max_history, mode, temperature)


def is_deterministic(module: nn.Module, deterministic: bool | None) -> bool:
    """The call's ``deterministic`` merged with the field; required except in ``init``
    (which only needs shapes, so it adds no noise unless told otherwise)."""
    if module.is_initializing() and deterministic is None and module.deterministic is None:
        return True
    return nn.merge_param("deterministic", module.deterministic, deterministic)


def sample_gumbel(module: nn.Module, shape: tuple[int, ...]) -> jax.Array | None:
    """Standard Gumbel noise from ``module``'s ``"gumbel"`` rng stream.

    None while initialising without that stream (no noise needed for shapes).
    """
    if module.is_initializing() and not module.has_rng("gumbel"):
        return None
    if not module.has_rng("gumbel"):
        raise ValueError(
            f"{type(module).__name__}(stochastic=True) in training needs Gumbel noise: pass "
            "rngs={'gumbel': key} to apply, or deterministic=True to evaluate"
        )
    return jax.random.gumbel(module.make_rng("gumbel"), shape, jnp.float32)


def _fill_invalid(z: jax.Array, valid: jax.Array) -> jax.Array:
    # Put slots outside the window at least 1e4 below every slot: softmax then
    # gives them exactly 0 and they fall outside the simplex support, with no
    # inf/NaN anywhere (so jax_debug_nans stays quiet), even for an empty window.
    fixed = jax.lax.stop_gradient(z)
    gap = 1e4 + 2 * jnp.max(jnp.abs(fixed), axis=-1, keepdims=True)
    return jnp.where(valid, z, fixed - gap)


def window_weights(
    logits: jax.Array,
    num_states,
    *,
    mode: str = "mhc",
    constraint: str = "simplex",
    temperature: float = 1.0,
    epsilon: float = 0.1,
    leak: float = 0.0,
) -> jax.Array:
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

    Args:
      logits: ``mu``, shape ``(..., H)``.
      num_states: ``K``, an int or integer array broadcastable to ``logits.shape[:-1]``
        (may be traced, e.g. a ``History``'s count under ``scan``).
    Returns:
      Weights of shape ``(..., H)``; they sum to 1 when ``K >= 1`` and are all 0
      when ``K = 0``.
    """
    h = logits.shape[-1]
    num_states = jnp.asarray(num_states, jnp.int32)[..., None]
    slots = jnp.arange(h, dtype=jnp.int32).reshape((1,) * (num_states.ndim - 1) + (h,))
    valid = jnp.broadcast_to(slots >= h - num_states, logits.shape)
    if mode == "residual":
        return (valid & (slots == h - 1)).astype(logits.dtype)
    z = _fill_invalid(logits / temperature, valid)

    def project(base: str) -> jax.Array:
        if constraint == "identity":
            return project_identity_preserving(z, epsilon, 1.0, base)
        return project_softmax(z) if base == "softmax" else project_simplex(z)

    alpha = project("softmax" if mode == "hc" else "simplex")
    if leak > 0 and mode == "mhc":
        alpha = (1 - leak) * alpha + leak * project("softmax")
    return jnp.where(valid, alpha, jnp.zeros_like(alpha))


def perturb_weights(alpha: jax.Array, gumbel_noise: jax.Array, temperature: float = 1.0) -> jax.Array:
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
    log_alpha = jnp.log(jnp.where(positive, alpha, jnp.ones_like(alpha)))
    z = _fill_invalid((log_alpha + gumbel_noise) / temperature, positive)
    return jnp.where(positive, jax.nn.softmax(z, axis=-1), jnp.zeros_like(alpha))


def mixing_weights(
    logits: jax.Array,
    num_states,
    *,
    mode: str = "mhc",
    constraint: str = "simplex",
    temperature: float = 1.0,
    epsilon: float = 0.1,
    prune_threshold: float = 0.0,
    gumbel_noise: jax.Array | None = None,
    gate_logit: jax.Array | None = None,
    leak: float = 0.0,
) -> jax.Array:
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
        alpha = jnp.where(alpha < prune_threshold, jnp.zeros_like(alpha), alpha)
    if gumbel_noise is not None:
        alpha = perturb_weights(alpha, gumbel_noise, temperature)
    if gate_logit is not None:
        alpha = jax.nn.sigmoid(gate_logit) * alpha
    return alpha


def weighted_sum(weights: jax.Array, states) -> jax.Array:
    r"""``sum_k weights[k] * states[k]`` over a window: a list of arrays, or a
    stacked array with the window on its leading axis (a ``History``'s slots).

    .. math:: m = \sum_k w_k h_k

    An unrolled multiply-add over the few states: XLA fuses it into one loop
    over the elements (an einsum over a stacked window ran 10-30x slower on
    XLA:CPU, and a list would first have to be stacked, a copy).
    """
    total = weights[0] * states[0]
    for k in range(1, len(states)):
        total = total + weights[k] * states[k]
    return total


class MHCSkip(nn.Module):
    r"""Manifold-constrained hyper-connection: ``out = x + g * sum_k alpha_k h_k``.

    Replaces the residual ``x + h_K`` by a learned mix of the window
    ``h_1 .. h_K`` of earlier states, its weights ``alpha`` projected onto the
    simplex (softmax in ``"hc"`` mode, the exact Euclidean projection in
    ``"mhc"`` mode, which can switch noisy history off with exact zeros).

    Call it as ``skip.apply(params, x, history)`` with ``history`` a
    :class:`History` or a list of arrays (oldest first; beyond ``H`` only the
    last ``H`` are used). An empty window returns ``x``.

    Attributes:
      mode: ``"residual"`` (``x + h_K``, no parameters), ``"hc"`` or ``"mhc"``.
      max_history: ``H >= 1``, the number of logits / window slots.
      constraint: ``"simplex"`` (base projection alone) or ``"identity"``
        (latest weight ``>= epsilon``).
      epsilon: identity floor in ``[0, 1)``.
      temperature: ``tau > 0``; 0.5-2.0 is the useful range.
      mixing_init: ``"identity"`` (start as a near-plain residual, every slot
        still learning; see :func:`identity_init_logits`) or ``"uniform"``
        (``mu = 0``). Named ``init`` in torch; Linen reserves ``Module.init``.
      auto_project: map a history state whose feature (last) axis differs from
        ``x``'s through a learned bias-free linear map, one per input size
        (``projection_from_{n}``). Otherwise a shape mismatch is an error.
      use_gating: scale the mix by ``g = sigmoid(gate_logit)``.
      prune_threshold: weights below it are set to 0 (no renormalisation).
      stochastic: in training (``deterministic=False``) perturb the weights
        with Gumbel noise from the ``"gumbel"`` rng stream.
      deterministic: default for the call argument of the same name.
      leak: ``l`` in ``[0, 1)``, ``mode="mhc"`` only: the share of the weights
        taken from the softmax of the same logits (:func:`window_weights`).
        The simplex projection's exact zeros get no gradient, so a slot that
        reaches 0 never comes back (a "dead slot", which :func:`diagnose`
        reports); any ``l > 0`` keeps every slot learning, at the price of no
        exact zeros. 0 (default): the exact projection.
    """

    mode: str = "mhc"
    max_history: int = 4
    constraint: str = "simplex"
    epsilon: float = 0.1
    temperature: float = 1.0
    mixing_init: str = "identity"
    auto_project: bool = False
    use_gating: bool = False
    prune_threshold: float = 0.0
    stochastic: bool = False
    deterministic: bool | None = None
    leak: float = 0.0

    def __post_init__(self):
        check_module_options(self)
        super().__post_init__()

    def setup(self):
        # The logits live in setup so a parent (MHCSequential) can read every
        # skip's logits and project them all in one call; the auto_project maps
        # stay in the compact __call__, since their names depend on the input.
        if self.mode == "residual":
            return
        self.mixing_logits = self.param(
            "mixing_logits",
            lambda _: jnp.asarray(
                initial_logits(self.max_history, self.mode, self.temperature, self.mixing_init)
            ),
        )
        if self.use_gating:
            # Shape (1,) like torch's (FSDP2 there shards parameters along dim 0).
            self.gate_logit = self.param("gate_logit", nn.initializers.constant(GATE_INIT_LOGIT), (1,), jnp.float32)

    def mixing_weights(
        self,
        num_states,
        *,
        deterministic: bool | None = None,
        gumbel_noise: jax.Array | None = None,
    ) -> jax.Array:
        """The ``H`` window-ordered weights ``g * alpha`` for ``K = num_states``.

        Includes pruning, the Gumbel perturbation when it applies and the gate.
        The skip's output is ``x + sum_j w[j] * h_j`` over the window.
        """
        if self.mode == "residual":
            return window_weights(jnp.zeros(self.max_history, jnp.float32), num_states, mode="residual")
        return mixing_weights(
            self.mixing_logits,
            num_states,
            gumbel_noise=self._gumbel_noise(deterministic, gumbel_noise),
            gate_logit=self.gate_logit if self.use_gating else None,
            **weight_options(self),
        )

    def _gumbel_noise(self, deterministic, gumbel_noise):
        if not self.stochastic or is_deterministic(self, deterministic):
            return None
        if gumbel_noise is not None:
            if tuple(gumbel_noise.shape) != (self.max_history,):
                raise ValueError(
                    f"gumbel_noise must have shape ({self.max_history},) (one value per "
                    f"mixing logit), got {tuple(gumbel_noise.shape)}"
                )
            return gumbel_noise
        return sample_gumbel(self, (self.max_history,))

    def __call__(
        self,
        x: jax.Array,
        history: History | Sequence[jax.Array] | None,
        *,
        deterministic: bool | None = None,
        gumbel_noise: jax.Array | None = None,
    ) -> jax.Array:
        """Mix the window into ``x``.

        Args:
          x: the current layer's output.
          history: a :class:`History` (with ``max_history`` slots), a list of
            arrays (oldest first), or None.
          deterministic: True evaluates (no Gumbel noise); overrides the field.
          gumbel_noise: optional ``(H,)`` noise aligned with ``mixing_logits``,
            used instead of the ``"gumbel"`` rng (for reproducible tests).
        Returns:
          ``x + g * sum_k alpha_k h_k``, the shape and dtype of ``x``.
        """
        if history is None:
            history = []
        if isinstance(history, History):
            if history.max_history != self.max_history:
                raise ValueError(
                    f"History has {history.max_history} slots but this skip has max_history="
                    f"{self.max_history}; create the History with max_history={self.max_history}"
                )
            num_states = history.num_states
        elif isinstance(history, (list, tuple)):
            history = list(history)[-self.max_history :]
            num_states = len(history)
        else:
            raise HistoryTypeError(
                "history must be a History, a list of arrays (oldest first) or None, got "
                f"{type(history).__name__}; wrap a single state as [state]"
            )
        weights = None
        if self.mode != "residual" and not (isinstance(num_states, int) and num_states == 0):
            weights = self.mixing_weights(num_states, deterministic=deterministic, gumbel_noise=gumbel_noise)
        return self._mix_window(x, history, weights)

    @nn.compact
    def _mix_window(self, x: jax.Array, history: History | list[jax.Array], weights: jax.Array | None) -> jax.Array:
        """``x + sum_k w_k h_k`` for a window (a :class:`History`, or a list of at
        most ``H`` arrays) and its ``(H,)`` weights from :meth:`mixing_weights`
        (None in residual mode or for an empty list). What :class:`MHCSequential`
        calls per layer, having projected every layer's weights at once."""
        ring = isinstance(history, History)
        if ring:
            states = self._match_shape(x, [history.states], stacked=True)[0]
        else:
            states = self._match_shape(x, history, stacked=False)
        if self.mode == "residual":
            if ring:
                return x + History(states, history.count).latest()
            return x + states[-1] if states else x
        if not ring and not states:
            return x
        weights = weights.astype(x.dtype)
        if ring:
            return x + weighted_sum(history.slot_weights(weights), states)
        return x + weighted_sum(weights[self.max_history - len(states) :], states)

    def _match_shape(self, x: jax.Array, states: list[jax.Array], *, stacked: bool) -> list[jax.Array]:
        """Check each state's shape against ``x``; auto-project the feature axis if allowed.

        ``stacked`` states carry a leading slot axis (a ``History``'s buffer).
        """
        out, projections = [], {}
        for i, h in enumerate(states):
            shape = tuple(h.shape[1:] if stacked else h.shape)
            if shape != tuple(x.shape):
                what = "History states have" if stacked else f"history state {i} has"
                if not self.auto_project:
                    raise HistoryShapeError(
                        f"{what} shape {shape} but x has shape {tuple(x.shape)}; "
                        "MHCSkip mixes states shaped like x (pass auto_project=True to map "
                        "the feature axis with a learned linear map)"
                    )
                if shape[:-1] != tuple(x.shape[:-1]):
                    raise HistoryShapeError(
                        f"auto_project maps only the feature (last) axis, but {what} "
                        f"shape {shape} and x has shape {tuple(x.shape)}"
                    )
                n = shape[-1]
                if n not in projections:
                    projections[n] = nn.Dense(
                        x.shape[-1],
                        use_bias=False,
                        # Same distribution as torch.nn.Linear: U(-1/sqrt(n), 1/sqrt(n)).
                        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                        name=f"projection_from_{n}",
                    )
                h = projections[n](h)
            out.append(h.astype(x.dtype))
        return out
