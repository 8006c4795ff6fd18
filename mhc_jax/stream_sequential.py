r"""A stack of layers on ``n`` residual streams (JAX/Flax).

.. math::
    x^{(0)} = \mathrm{expand}(x), \qquad
    x^{(l+1)} = \mathrm{HC}_l(x^{(l)}), \qquad
    \mathrm{out} = \mathrm{reduce}(x^{(L)}) = \textstyle\sum_j x^{(L)}_j

with ``HC_l`` a :class:`~mhc_jax.streams.HyperConnection` around layer ``l``
(its ``layer_index`` set to ``l``). Input and output are ``(..., C)``.

Two ways to run the layers:

* unrolled (default): a Python loop; each layer may be different.
* ``scan=True`` (or :meth:`StreamSequential.scanned`): one block repeated,
  run under ``jax.lax.scan`` with the streams as the carry, so the stack is
  compiled once whatever its depth; ``remat=True`` adds ``jax.checkpoint``
  (each layer's activations are recomputed in the backward pass).

Both give the same outputs for the same weights. The twin is
:class:`mhc_torch.StreamSequential`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .streams import (
    HyperConnection,
    check_count,
    check_stream_options,
    expand_streams,
    initial_parameters,
    reduce_streams,
)

__all__ = ["StreamSequential"]


class _StackedConnection(HyperConnection):
    """A :class:`HyperConnection` that a :class:`StreamSequential` built around one of its layers.

    Flax re-runs ``__post_init__`` on every clone (binding is a clone), with the
    already wrapped layers: the marker lets the stack unwrap its own wrappers
    (and rebuild them with its current options) instead of wrapping them twice.
    """


def _owned(layer):
    """A layer built inline in a parent's compact method is bound to that parent:
    the stack takes a copy, so the layer's parameters live under the stack."""
    if isinstance(layer, nn.Module) and isinstance(layer.parent, nn.Module):
        return layer.copy(parent=None, name=None)
    return layer


class StreamSequential(nn.Module):
    """Expand to ``num_streams`` streams, run every layer inside a hyper-connection, reduce.

    ``layers[i]`` of the built module is the :class:`HyperConnection` around
    the ``i``-th layer given (its ``branch``), as in torch.

    Parameter names: unrolled, ``layers_{i}/{phi, a_*, b_*}`` and
    ``layers_{i}/branch/...``; scanned, the same stacked along a leading depth
    axis under ``layers/...``
    (:func:`mhc_jax.convert.stack_stream_params` and
    :func:`~mhc_jax.convert.unstack_stream_params` move between them).

    ``model.apply(variables, x, method="coefficients")`` runs the stack and
    returns every layer's ``(h_pre, h_post, h_res)`` stacked along a leading
    depth axis: ``(L, ..., n)``, ``(L, ..., n)``, ``(L, ..., n, n)``.

    Attributes:
      layers: the layers (Flax modules or functions mapping ``(..., C)`` to
        ``(..., C)``; at least one).
      num_streams, mode, dynamic, sinkhorn_iterations: as for
        :class:`HyperConnection` (one value for the whole stack).
      scan: run one repeated block with ``jax.lax.scan`` (compiled once for
        any depth); the layers must be one block listed ``depth`` times (or
        equal blocks).
      remat: with ``scan``, recompute each layer in the backward pass
        (``jax.checkpoint``) instead of storing its activations.
    """

    layers: Sequence[nn.Module | Callable]
    num_streams: int = 4
    mode: str = "mhc"
    dynamic: bool = True
    sinkhorn_iterations: int = 20
    scan: bool = False
    remat: bool = False

    def __post_init__(self):
        check_stream_options(self.num_streams, self.mode, self.dynamic, self.sinkhorn_iterations, None)
        for name in ("scan", "remat"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
        if isinstance(self.layers, (nn.Module, str)) or not isinstance(self.layers, Sequence):
            raise TypeError(f"layers must be a sequence of layers, got {type(self.layers).__name__}")
        if len(self.layers) < 1:
            raise ValueError("StreamSequential needs at least one layer (depth >= 1), got 0")
        branches = [layer.branch if isinstance(layer, _StackedConnection) else layer for layer in self.layers]
        if self.scan:
            first = branches[0]
            if not isinstance(first, nn.Module):
                raise ValueError("scan=True needs the layers to be Flax modules")
            for i, layer in enumerate(branches):
                if layer is not first and layer != first:
                    raise ValueError(
                        f"scan=True needs identical layers (one block repeated), but layer {i} "
                        f"differs from layer 0: {layer!r} vs {first!r}"
                    )
        elif self.remat:
            raise ValueError("remat=True applies to the scanned stack: pass scan=True as well")
        copies: dict[int, nn.Module | Callable] = {}
        wrapped = tuple(
            _StackedConnection(
                copies.setdefault(id(branch), _owned(branch)),
                **self._options(),
                layer_index=i,
                parent=None,  # adopted by this stack as layers_{i}, not by the module under construction
            )
            for i, branch in enumerate(branches)
        )
        object.__setattr__(self, "layers", wrapped)
        super().__post_init__()

    @classmethod
    def scanned(cls, block: nn.Module, depth: int, **options) -> "StreamSequential":
        """``depth`` copies of ``block`` under ``jax.lax.scan``: compiled once for any depth."""
        check_count("depth", depth)
        return cls([block] * depth, scan=True, **options)

    @property
    def depth(self) -> int:
        return len(self.layers)

    def _options(self) -> dict:
        return dict(
            num_streams=self.num_streams,
            mode=self.mode,
            dynamic=self.dynamic,
            sinkhorn_iterations=self.sinkhorn_iterations,
        )

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        """``(..., C)`` in, ``(..., C)`` out; ``args``/``kwargs`` go to every layer."""
        return self._run(x, False, args, kwargs)

    def coefficients(self, x: jax.Array, *args, **kwargs) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Every layer's ``(h_pre, h_post, h_res)`` on the way through the stack,
        stacked along a leading depth axis."""
        return self._run(x, True, args, kwargs)

    @nn.compact
    def _run(self, x, collect: bool, args, kwargs):
        streams = expand_streams(x, self.num_streams)
        if self.scan:
            streams, coefficients = self._run_scanned(streams, collect, args, kwargs)
        else:
            coefficients = []
            for layer in self.layers:
                if collect:
                    coefficients.append(layer.coefficients(streams))
                streams = layer(streams, *args, **kwargs)
            if collect:
                coefficients = tuple(jnp.stack(c) for c in zip(*coefficients, strict=True))
        return coefficients if collect else reduce_streams(streams)

    def _run_scanned(self, streams, collect: bool, args, kwargs):
        depth = self.depth
        block = HyperConnection(self.layers[0].branch.copy(parent=None, name=None), **self._options(), parent=None)

        def init(rng):
            params = jax.vmap(lambda key: block.init(key, streams, *args, **kwargs)["params"])(
                jax.random.split(rng, depth)
            )
            # Each layer's biases from its own layer_index (mode="hc" puts
            # h_pre on stream layer_index mod n).
            for name in ("b_pre", "b_post", "b_res"):
                params[name] = jnp.asarray(
                    np.stack([initial_parameters(self.num_streams, self.mode, i)[name] for i in range(depth)])
                )
            return params

        params = self.param("layers", init)
        rngs = jax.random.split(self.make_rng("dropout"), depth) if self.has_rng("dropout") else None

        def body(streams, layer):
            p, rng = layer
            variables = {"params": p}
            h = block.apply(variables, streams, method="coefficients") if collect else None
            out = block.apply(variables, streams, *args, rngs=None if rng is None else {"dropout": rng}, **kwargs)
            return out, h

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        streams, coefficients = jax.lax.scan(body, streams, (params, rngs))
        return streams, coefficients
