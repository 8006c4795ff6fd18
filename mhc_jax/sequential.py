r"""A sequential stack with one hyper-connection skip per layer (JAX/Flax).

.. math::
    x_{l+1} = f_l(x_l) + g_l \sum_k \alpha^{(l)}_k h_k, \qquad
    [h_1 .. h_K] = \text{the last } H \text{ of } [x_0, x_1, .., x_l]

History is explicit carried state: ``model.apply(params, x)`` starts from a
fresh window ``[x]``, so no call ever sees another call's states (splitting a
batch gives the same outputs as one call). Passing ``history=`` (a
:class:`History`) is the opt-in for carrying a window across calls; the call
then returns ``(x, history)``.

Two ways to run the layers:

* unrolled (default): a Python loop over ``layers``; each layer may be
  different, and may even change the state's shape (with ``auto_project``).
* ``scan=True`` (or :meth:`MHCSequential.scanned`): identical layers run under
  ``nn.scan`` with the ``History`` ring buffer as the carry, so a deep stack is
  compiled once whatever its depth; ``remat=True`` adds ``nn.remat``.

The twin is :class:`mhc_torch.MHCSequential` (stateful).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .history import History, HistoryShapeError, HistoryTypeError
from .skip import (
    GATE_INIT_LOGIT,
    MHCSkip,
    check_bools,
    weighted_sum,
    check_module_options,
    initial_logits,
    is_deterministic,
    mixing_weights,
    sample_gumbel,
    weight_options,
)

__all__ = ["MHCSequential"]

#: Most layers one scan iteration unrolls. A chunk of ``C`` layers is ``C``
#: sums of ``H`` terms, so capping ``C`` keeps the compiled program (and the
#: compile time) linear in ``H``; the ``H - 1`` older states that cross into
#: the next iteration cost ``(H - 1) / C`` saved states per layer.
MAX_CHUNK = 8


def _keep(x: jax.Array, detach: bool) -> jax.Array:
    return jax.lax.stop_gradient(x) if detach else x


class _StackedSkipParams(nn.Module):
    """The skips' parameters of a scanned stack, stacked along a leading depth axis."""

    depth: int
    max_history: int
    mode: str
    temperature: float
    mixing_init: str
    use_gating: bool

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        init = initial_logits(self.max_history, self.mode, self.temperature, self.mixing_init)
        logits = self.param("mixing_logits", lambda _: jnp.tile(jnp.asarray(init), (self.depth, 1)))
        gates = None
        if self.use_gating:
            gates = self.param("gate_logit", nn.initializers.constant(GATE_INIT_LOGIT), (self.depth, 1), jnp.float32)
        return logits, gates


class _Chunk(nn.Module):
    """Consecutive layers, unrolled: ``x <- layer_j(x) + sum_k w_jk h_k`` for each.

    The scanned stack runs one chunk of ``C`` layers per scan iteration. Inside
    a chunk the window is a list of separate arrays, as in the unrolled stack:
    each state is saved once for the backward pass (it is also a layer's
    input), and only the ``H - 1`` older states cross into the next iteration.
    A scan over single layers would carry (and save, per layer) the whole
    ``H``-slot window instead: measured ~2x a scanned residual stack.
    """

    layers: tuple[nn.Module, ...]
    detach_history: bool

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, tuple[jax.Array, ...]], weights: jax.Array):
        x, older = carry
        window = [*older, _keep(x, self.detach_history)]
        for layer, w in zip(self.layers, weights, strict=True):
            y = layer(x)
            if y.shape != x.shape:
                raise HistoryShapeError(
                    f"a scanned stack needs layers that keep the state's shape: a layer maps "
                    f"{tuple(x.shape)} to {tuple(y.shape)} (use scan=False, with auto_project=True)"
                )
            x = y + weighted_sum(w.astype(y.dtype), window)
            window = [*window[1:], _keep(x, self.detach_history)]
        return (x, tuple(window[:-1])), None


class MHCSequential(nn.Module):
    """Wrap ``layers`` so each layer's output is mixed with the window of earlier states.

    Every layer gets its own :class:`MHCSkip` (the skip options pass through).
    Every forward projects all layers' logits in one batched call.

    Parameter names: unrolled, ``layers_{i}/...`` and
    ``skip_layers_{i}/mixing_logits``; scanned (chunks of ``C = min(H, L,
    MAX_CHUNK)`` layers), ``blocks/layers_{j}/...`` for layer ``c*C + j`` at
    index ``c`` of a leading chunk axis, ``tail/layers_{j}/...`` for the last
    ``L mod C`` layers, and ``skip_layers/mixing_logits`` with a leading depth
    axis (:func:`mhc_jax.convert.stack_layer_params` converts between them).
    The chunked layout is for speed: each scan iteration reads its layers'
    weights as contiguous slices, where one ``(L, ...)`` array would need a
    strided gather forward and a scatter of the gradients backward (measured:
    1.7x a scanned residual stack instead of 1.0x).
    The same layer instance listed twice is one shared layer (as in torch).

    Attributes:
      layers: the layers ``f_1 .. f_L`` (Flax modules or functions; at least one).
      max_history, mode, constraint, epsilon, temperature, mixing_init,
        use_gating, prune_threshold, stochastic, auto_project, leak: as for
        :class:`MHCSkip`.
      detach_history: store states with ``stop_gradient``: gradient reaches
        earlier layers only through the main path.
      scan: run identical layers with ``nn.scan`` (compiled once for any depth).
        The state keeps one shape through the stack.
      remat: with ``scan``, recompute each layer in the backward pass
        (``nn.remat``) instead of storing its activations (torch's
        ``use_checkpointing``).
      deterministic: default for the call argument (stochastic skips only).
    """

    layers: Sequence[nn.Module | Callable]
    max_history: int = 4
    mode: str = "mhc"
    constraint: str = "simplex"
    epsilon: float = 0.1
    temperature: float = 1.0
    mixing_init: str = "identity"
    detach_history: bool = False
    use_gating: bool = False
    prune_threshold: float = 0.0
    stochastic: bool = False
    auto_project: bool = False
    scan: bool = False
    remat: bool = False
    deterministic: bool | None = None
    leak: float = 0.0

    def __post_init__(self):
        if len(self.layers) < 1:
            raise ValueError("MHCSequential needs at least one layer (depth >= 1), got 0")
        check_module_options(self)
        check_bools(detach_history=self.detach_history, scan=self.scan, remat=self.remat)
        # Layers built inline in a parent's @compact method are bound to that
        # parent at construction (flax.linen.Sequential shares this trait), so
        # their parameters would live on the parent rather than under this
        # stack's layers_{i}. The stack owns its layers: such layers are
        # deep-copied in, one copy per distinct instance (a repeated instance
        # stays one shared layer, as in torch).
        if any(isinstance(layer, nn.Module) and isinstance(layer.parent, nn.Module) for layer in self.layers):
            copies: dict[int, nn.Module] = {}
            owned = [
                copies.setdefault(id(layer), layer.copy(parent=None, name=None))
                if isinstance(layer, nn.Module) and isinstance(layer.parent, nn.Module)
                else layer
                for layer in self.layers
            ]
            object.__setattr__(self, "layers", owned)
        if self.scan:
            first = self.layers[0]
            if not isinstance(first, nn.Module):
                raise ValueError("scan=True needs the layers to be Flax modules")
            for i, layer in enumerate(self.layers):
                if layer is not first and layer != first:
                    raise ValueError(
                        f"scan=True needs identical layers (one block repeated), but layer {i} "
                        f"differs from layer 0: {layer!r} vs {first!r}"
                    )
        elif self.remat:
            raise ValueError("remat=True applies to the scanned stack: pass scan=True as well")
        super().__post_init__()

    @classmethod
    def scanned(cls, block: nn.Module, depth: int, **options) -> "MHCSequential":
        """``depth`` copies of ``block`` under ``nn.scan``: compiled once for any depth."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        return cls([block] * depth, scan=True, **options)

    @property
    def depth(self) -> int:
        return len(self.layers)

    def _skip(self, **kwargs) -> MHCSkip:
        return MHCSkip(
            mode=self.mode,
            max_history=self.max_history,
            constraint=self.constraint,
            epsilon=self.epsilon,
            temperature=self.temperature,
            mixing_init=self.mixing_init,
            auto_project=self.auto_project,
            use_gating=self.use_gating,
            prune_threshold=self.prune_threshold,
            stochastic=self.stochastic,
            leak=self.leak,
            **kwargs,
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        history: History | None = None,
        *,
        deterministic: bool | None = None,
        gumbel_noise: jax.Array | None = None,
    ):
        """Run the stack on ``x`` (``x_0``).

        Args:
          x: the input ``x_0``.
          history: optional :class:`History` carried from an earlier call; ``x``
            is pushed onto it first. Without it the window starts as ``[x]``.
          deterministic: True evaluates (no Gumbel noise in stochastic skips).
          gumbel_noise: optional ``(L, H)`` noise, one row per layer aligned with
            the logits, used instead of the ``"gumbel"`` rng stream.
        Returns:
          The output, or ``(output, history)`` when ``history`` was given.
        """
        carried = history is not None
        if carried and not isinstance(history, History):
            raise HistoryTypeError(f"history must be a History (or None), got {type(history).__name__}")
        if carried and history.max_history != self.max_history:
            raise ValueError(
                f"History has {history.max_history} slots but this stack has max_history="
                f"{self.max_history}; create the History with max_history={self.max_history}"
            )
        if carried:
            history = history.push(_keep(x, self.detach_history))
        elif self.scan:
            history = History.create(_keep(x, self.detach_history), self.max_history)
        # Layer l mixes a window of min(count_l, H) states, count_l states pushed so far.
        count = (history.count if carried or self.scan else 1) + jnp.arange(self.depth, dtype=jnp.int32)
        noise = self._noise(deterministic, gumbel_noise)

        if self.scan:
            logits, gates = jnp.zeros((self.depth, self.max_history), jnp.float32), None
            if self.mode != "residual":
                logits, gates = _StackedSkipParams(
                    self.depth, self.max_history, self.mode, self.temperature, self.mixing_init,
                    self.use_gating, name="skip_layers",
                )()
            weights = self._weights(logits, gates, count, noise)
            x, window = self._run_scanned(x, history, weights)
            if not carried:
                return x
            return x, _as_history(window, history.count + self.depth)

        skips = [self._skip(name=f"skip_layers_{i}") for i in range(self.depth)]
        weights = None
        if self.mode != "residual":
            logits = jnp.stack([skip.mixing_logits for skip in skips])
            gates = jnp.stack([skip.gate_logit for skip in skips]) if self.use_gating else None
            weights = self._weights(logits, gates, count, noise)
        # The window is a list while it can be (every window size static: the
        # cheapest mix) and a History only when one is carried across calls.
        window = history if carried else [_keep(x, self.detach_history)]
        for i, (layer, skip) in enumerate(zip(self.layers, skips, strict=True)):
            x = skip._mix_window(layer(x), window, None if weights is None else weights[i])
            kept = _keep(x, self.detach_history)
            window = window.push(kept) if carried else (window + [kept])[-self.max_history :]
        return (x, window) if carried else x

    def _noise(self, deterministic, gumbel_noise) -> jax.Array | None:
        """``(L, H)`` Gumbel noise for stochastic training, else None."""
        if not self.stochastic or self.mode == "residual" or is_deterministic(self, deterministic):
            return None
        if gumbel_noise is not None:
            if tuple(gumbel_noise.shape) != (self.depth, self.max_history):
                raise ValueError(
                    f"gumbel_noise must have shape ({self.depth}, {self.max_history}) (layers, "
                    f"mixing logits), got {tuple(gumbel_noise.shape)}"
                )
            return gumbel_noise
        return sample_gumbel(self, (self.depth, self.max_history))

    def _weights(self, logits, gates, count, noise) -> jax.Array:
        """Every layer's window weights, ``(L, H)``, in one batched projection."""
        return mixing_weights(
            logits,
            jnp.minimum(count, self.max_history),
            gumbel_noise=noise,
            gate_logit=gates,
            **weight_options(self),
        )

    def _run_scanned(self, x, history: History, weights: jax.Array):
        """Scan chunks of ``C`` layers; the last ``L mod C`` layers form an unscanned tail."""
        h = self.max_history
        size = min(h, self.depth, MAX_CHUNK)
        chunks, tail = divmod(self.depth, size)
        # The H - 1 states before x, oldest first (zeros, weighted 0, before x_0).
        ordered = history.states[(history.count - h + jnp.arange(h, dtype=jnp.int32)) % h]
        carry = (x, tuple(ordered[j] for j in range(h - 1)))
        chunk = nn.remat(_Chunk, prevent_cse=False) if self.remat else _Chunk
        scanned = nn.scan(
            chunk,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=0,
            length=chunks,
        )
        carry, _ = scanned(self._copies(size), self.detach_history, name="blocks")(
            carry, weights[: chunks * size].reshape(chunks, size, h)
        )
        if tail:
            carry, _ = chunk(self._copies(tail), self.detach_history, name="tail")(
                carry, weights[chunks * size :]
            )
        x, older = carry
        return x, [*older, _keep(x, self.detach_history)]

    def _copies(self, n: int) -> tuple[nn.Module, ...]:
        # Deep copies, so their parameters live under the chunk's scope (with a
        # leading chunk axis when scanned), not on this module.
        return tuple(self.layers[0].copy(parent=None, name=None) for _ in range(n))


def _as_history(window: list[jax.Array], count: jax.Array) -> History:
    """The ``H`` latest states, oldest first, placed in their ring slots."""
    h = len(window)
    ages = (count - 1 - jnp.arange(h, dtype=jnp.int32)) % h  # slot s holds the state this old
    return History(states=jnp.stack(window)[h - 1 - ages], count=count)
