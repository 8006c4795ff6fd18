r"""Stability diagnostics of the residual streams' mixing matrices ``h_res``.

Input: every layer's ``h_res`` as one array ``(L, ..., n, n)`` (layer first,
any token axes), e.g. the third result of
``model.apply(variables, x, method="coefficients")`` for a
:class:`~mhc_jax.StreamSequential`. With ``P_l = h_res^(l) ... h_res^(1)``
the composite mapping of the first ``l`` layers (per token):

* **forward gain** of a matrix ``M``: ``max_i sum_j |M[i, j]|`` (largest
  absolute row sum; how much the streams can grow through it);
* **backward gain**: ``max_j sum_i |M[i, j]|`` (largest absolute column sum;
  how much gradients can grow flowing back);
* **Sinkhorn residual**: ``max |row sum - 1|, |column sum - 1|`` of ``h_res``
  (how far from doubly stochastic; the columns carry Sinkhorn's truncation).

A doubly stochastic ``h_res`` (``mode="mhc"``) has both gains exactly 1, and so
has any product of such matrices: the composite gain drifts from 1 only by the
Sinkhorn residual compounding over depth. The paper reports mHC's composite
gain staying near 1.6 at 27B scale while unconstrained HC's peaks near 3000.
:func:`diagnose_streams` warns when a composite gain leaves ``GAIN_BAND``.

From a whole model: :func:`extract_h_res` runs one forward pass and returns
every stack's ``h_res``; :func:`stream_monitor` turns that into the logged
metrics inside ``jit`` (the training-loop twin of torch's Lightning callback);
:func:`mhc_jax.diagnose` takes ``model=``, ``variables=`` and ``inputs=`` to
add these warnings to the history-window ones.

The gains are computed in float64 numpy (:func:`stream_monitor`: with
``jax.numpy``, inside ``jit``); the twin is
:mod:`mhc_torch.stream_monitoring` (the same code, the same numbers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .stream_sequential import StreamSequential, _StackedConnection
from .streams import HyperConnection

__all__ = [
    "StreamWarning",
    "h_res_gains",
    "sinkhorn_residual",
    "stream_metrics",
    "extract_h_res",
    "stream_monitor",
    "diagnose_streams",
    "plot_h_res_heatmap",
    "GAIN_BAND",
    "SINKHORN_RESIDUAL_LIMIT",
]

#: A composite forward or backward gain outside ``[low, high]`` is a warning:
#: above 2 the stack amplifies its streams (or gradients) the way unconstrained
#: HC does on its way to the paper's ~3000; below 1/2 it loses them. mHC's
#: reported 1.6 sits inside.
GAIN_BAND = (0.5, 2.0)
#: A Sinkhorn residual above this means ``sinkhorn_iterations`` is too small
#: for the logits the layer produces (nearly permutation-like ``h_res``).
SINKHORN_RESIDUAL_LIMIT = 1e-3


def _layers(h_res) -> np.ndarray:
    """``h_res`` as float64 ``(L, T, n, n)``: layers, tokens, rows, columns."""
    h = np.asarray(h_res, np.float64)
    if h.ndim < 3 or h.shape[-1] != h.shape[-2]:
        raise ValueError(f"h_res must have shape (L, ..., n, n) (layers first), got shape {tuple(h.shape)}")
    return _tokens(h)


def _tokens(h):
    """``(L, ..., n, n)`` as ``(L, T, n, n)``, numpy or jax alike."""
    return h.reshape(h.shape[0], -1, h.shape[-2], h.shape[-1])


def _forward_gain(m):
    return abs(m).sum(axis=-1).max(axis=-1)


def _backward_gain(m):
    return abs(m).sum(axis=-2).max(axis=-1)


def _gains(h, xp) -> dict:
    """:func:`h_res_gains` of ``h`` ``(L, T, n, n)``, in the array namespace
    ``xp``: numpy (float64, on the host) or ``jax.numpy`` (inside ``jit``)."""
    product = xp.broadcast_to(xp.eye(h.shape[-1], dtype=h.dtype), h.shape[1:])
    composite = []
    for layer in range(h.shape[0]):
        product = h[layer] @ product
        composite.append(product)
    composite = xp.stack(composite)
    return {
        "layer_forward": _forward_gain(h).max(axis=-1),
        "layer_backward": _backward_gain(h).max(axis=-1),
        "composite_forward": _forward_gain(composite).max(axis=-1),
        "composite_backward": _backward_gain(composite).max(axis=-1),
    }


def _residual(h, xp):
    """:func:`sinkhorn_residual` of ``h`` ``(L, T, n, n)``, in the array namespace ``xp``."""
    rows = abs(h.sum(axis=-1) - 1).max(axis=(-2, -1))
    columns = abs(h.sum(axis=-2) - 1).max(axis=(-2, -1))
    return xp.maximum(rows, columns)


def h_res_gains(h_res) -> dict[str, np.ndarray]:
    """Per-layer and composite gains, each the largest over the tokens.

    Args:
      h_res: ``(L, ..., n, n)``, layer ``l`` first.

    Returns:
      ``{"layer_forward", "layer_backward", "composite_forward",
      "composite_backward"}``, each of shape ``(L,)``: entry ``l`` is the gain
      of ``h_res^(l)`` alone, or of the composite ``P_l = h_res^(l) ... h_res^(1)``.
    """
    return _gains(_layers(h_res), np)


def sinkhorn_residual(h_res) -> np.ndarray:
    """``max(|row sum - 1|, |column sum - 1|)`` per layer, the largest over the tokens: ``(L,)``."""
    return _residual(_layers(h_res), np)


def _metrics(h, prefix: str, per_layer: bool, xp) -> dict:
    """The logged scalars of one stack's ``h`` ``(L, T, n, n)``, 0-d arrays of ``xp``."""
    gains, residual = _gains(h, xp), _residual(h, xp)
    metrics = {
        f"{prefix}/composite_forward_gain": gains["composite_forward"][-1],
        f"{prefix}/composite_backward_gain": gains["composite_backward"][-1],
        f"{prefix}/max_layer_forward_gain": gains["layer_forward"].max(),
        f"{prefix}/max_layer_backward_gain": gains["layer_backward"].max(),
        f"{prefix}/max_sinkhorn_residual": residual.max(),
    }
    for layer in range(h.shape[0]) if per_layer else ():
        for name, value in (
            ("forward_gain", gains["layer_forward"]),
            ("backward_gain", gains["layer_backward"]),
            ("composite_forward_gain", gains["composite_forward"]),
            ("composite_backward_gain", gains["composite_backward"]),
            ("sinkhorn_residual", residual),
        ):
            metrics[f"{prefix}/layer_{layer}/{name}"] = value[layer]
    return metrics


def stream_metrics(h_res, prefix: str = "streams", per_layer: bool = False) -> dict[str, float]:
    """Scalars for a logger: the whole stack's composite gains, the largest
    per-layer gains and the largest Sinkhorn residual; with ``per_layer``, also
    every layer's own and composite gains and its residual
    (``{prefix}/layer_{l}/...``)."""
    return {key: float(value) for key, value in _metrics(_layers(h_res), prefix, per_layer, np).items()}


@dataclass(frozen=True)
class StreamWarning:
    """One warning sign: ``kind`` is ``"gain"``, ``"sinkhorn"`` or ``"non_finite"``."""

    kind: str
    layers: tuple[int, ...]
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


def diagnose_streams(
    h_res, band: tuple[float, float] = GAIN_BAND, sinkhorn_limit: float | None = SINKHORN_RESIDUAL_LIMIT
) -> list[StreamWarning]:
    """Warning signs in a stack's ``h_res`` ``(L, ..., n, n)``; empty when healthy.

    * ``non_finite``: a layer's ``h_res`` holds NaN or inf (the others are
      still checked);
    * ``gain``: the composite forward or backward gain of the first ``l``
      layers leaves ``band`` (the first such depth is named);
    * ``sinkhorn``: a layer's Sinkhorn residual exceeds ``sinkhorn_limit``
      (meaningful for ``mode="mhc"``; HC's ``h_res`` is not meant to be doubly
      stochastic: ``sinkhorn_limit=None`` skips the check).
    """
    h = _layers(h_res)
    warnings: list[StreamWarning] = []
    finite = np.isfinite(h).all(axis=(1, 2, 3))
    if not finite.all():
        bad = tuple(int(i) for i in np.flatnonzero(~finite))
        warnings.append(StreamWarning("non_finite", bad, f"h_res of layer(s) {list(bad)} holds NaN or inf"))
        h = np.where(np.isfinite(h), h, 0.0)
    low, high = band
    gains = h_res_gains(h)
    for direction in ("forward", "backward"):
        composite = gains[f"composite_{direction}"]
        outside = np.flatnonzero((composite < low) | (composite > high))
        if outside.size:
            first = int(outside[0])
            warnings.append(StreamWarning(
                "gain",
                tuple(int(i) for i in outside),
                f"composite {direction} gain {composite[first]:.3g} after layer {first} (and "
                f"{outside.size - 1} deeper) is outside [{low:g}, {high:g}]; at the last layer "
                f"{composite[-1]:.3g}",
            ))
    if sinkhorn_limit is None:
        return warnings
    residual = sinkhorn_residual(h)
    over = np.flatnonzero(residual > sinkhorn_limit)
    if over.size:
        warnings.append(StreamWarning(
            "sinkhorn",
            tuple(int(i) for i in over),
            f"Sinkhorn residual up to {residual.max():.3g} (> {sinkhorn_limit:g}) in layer(s) "
            f"{over.tolist()}: raise sinkhorn_iterations",
        ))
    return warnings


# --- a whole model: every stack's h_res from one forward pass ----------------------------


def _stacks(records: list) -> dict[str, tuple[str, jax.Array]]:
    """Per-layer records, in call order, grouped into stacks.

    ``records`` holds ``(path, stack, mode, h_res)``: the layer's module path,
    its ``StreamSequential``'s path (None for a ``HyperConnection`` of its
    own), its mode and its ``h_res`` ``(..., n, n)``. A ``StreamSequential``'s
    layers form its stack; the other hyper-connections chain in call order,
    one chain per shape of ``h_res``, named by their longest common path.
    Returns ``{name: (mode, h_res (L, ..., n, n))}``; the mode is ``"hc"``
    unless every layer is ``"mhc"``.
    """
    grouped: dict[tuple, list] = {}
    for path, stack, mode, h in records:
        key = ("stack", stack) if stack is not None else ("chain", tuple(h.shape))
        grouped.setdefault(key, []).append((path, mode, h))
    stacks = {}
    for (kind, stack), layers in grouped.items():
        common = stack if kind == "stack" else os.path.commonprefix([path for path, _, _ in layers])
        name = "/".join(common)
        while name in stacks:  # two chains under one common path
            name += "'"
        mode = "mhc" if all(m == "mhc" for _, m, _ in layers) else "hc"
        stacks[name] = (mode, jnp.stack([h for _, _, h in layers]))
    return stacks


def _capture(model: nn.Module, variables, args: tuple, kwargs: dict) -> dict[str, tuple[str, jax.Array]]:
    """``model.apply(variables, *args, **kwargs)``, keeping every layer's ``h_res`` (:func:`_stacks`)."""
    records: list = []
    inside = [0]  # > 0 inside a stack that collects its own layers

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name != "__call__" or inside[0] or not isinstance(module, (HyperConnection, StreamSequential)):
            return next_fun(*call_args, **call_kwargs)
        path = tuple(module.scope.path)
        if isinstance(module, HyperConnection):
            streams = call_args[0] if call_args else call_kwargs["streams"]
            stack = path[:-1] if isinstance(module, _StackedConnection) else None
            records.append((path, stack, module.mode, module.coefficients(streams)[2]))
            return next_fun(*call_args, **call_kwargs)
        if not (module.scan or module.remat):
            return next_fun(*call_args, **call_kwargs)  # its layers record themselves
        # Scanned or rematerialised, the layers are traced inside jax.lax.scan
        # or jax.checkpoint, whose values cannot be kept outside: the stack's
        # coefficients method runs it once more and returns them.
        inside[0] += 1
        try:
            h_res = module.coefficients(*call_args, **call_kwargs)[2]
            out = next_fun(*call_args, **call_kwargs)
        finally:
            inside[0] -= 1
        records.extend((path + (f"layers_{i}",), path, module.mode, h_res[i]) for i in range(module.depth))
        return out

    with nn.intercept_methods(interceptor):
        model.apply(variables, *args, **kwargs)
    return _stacks(records)


def extract_h_res(model: nn.Module, variables, *args, **kwargs) -> dict[str, jax.Array]:
    """Every stack's ``h_res`` in one forward pass of ``model``.

    Runs ``model.apply(variables, *args, **kwargs)`` (``rngs=``, ``method=``
    go to ``apply``) and keeps the ``h_res`` each :class:`HyperConnection`
    computed for its input. Jit-friendly with the model held fixed:
    ``jax.jit(functools.partial(extract_h_res, model))``.

    Returns:
      ``{name: h_res}``, ``h_res`` of shape ``(L, ..., n, n)``, layer first:
      one entry per :class:`StreamSequential` (its module path; a scanned or
      ``remat`` stack runs once more to collect them, drawing its own dropout
      keys if any) and one per chain of other hyper-connections (in call
      order, named by their common path). Hyper-connections inside a Flax
      lifted transform of the user's own (``nn.scan``, ``nn.remat``, ...)
      are not supported.
    """
    return {name: h_res for name, (_, h_res) in _capture(model, variables, args, kwargs).items()}


def stream_monitor(model: nn.Module, *, prefix: str = "streams", per_layer: bool = False):
    """A function ``(variables, *args, **kwargs) -> metrics`` for a training loop.

    The metrics are :func:`stream_metrics`'s keys for every stack of
    :func:`extract_h_res`, ``{prefix}/{stack}/...``, as 0-d arrays computed
    with ``jax.numpy`` (in the arrays' precision, float32 unless x64 is on),
    so the function can be jitted or called inside a jitted step:

        monitor = jax.jit(mhc_jax.stream_monitor(model))
        metrics = {k: float(v) for k, v in monitor(params, batch).items()}
    """

    def monitor(variables, *args, **kwargs) -> dict[str, jax.Array]:
        metrics = {}
        for name, h_res in extract_h_res(model, variables, *args, **kwargs).items():
            metrics.update(_metrics(_tokens(h_res), f"{prefix}/{name}" if name else prefix, per_layer, jnp))
        return metrics

    return monitor


_CURES = {
    ("gain", "hc"): " Unconstrained hyper-connections let the composite mixing grow or shrink with depth: "
    "use mode='mhc', whose doubly stochastic h_res keeps its gain at 1, or lower the learning rate.",
    ("gain", "mhc"): " Sinkhorn's truncation compounds over depth: raise sinkhorn_iterations.",
    ("sinkhorn", "mhc"): "",
    ("non_finite", "mhc"): " The coefficients diverged: lower the learning rate and check the inputs.",
    ("non_finite", "hc"): " The coefficients diverged: lower the learning rate and check the inputs.",
}


def _model_warnings(model: nn.Module, variables, inputs) -> list[tuple[str, str, str]]:
    """``(kind, stack, message)`` for :func:`diagnose_streams`'s warnings on
    every stack of ``model`` (the Sinkhorn check for ``mode="mhc"`` stacks only)."""
    if variables is None or inputs is None:
        raise ValueError(
            f"diagnosing the residual streams of a model needs its variables and an input batch "
            f"(inputs=x or a tuple of arguments), got variables={type(variables).__name__}, "
            f"inputs={type(inputs).__name__}"
        )
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    arrays = [a for a in args if isinstance(a, (np.ndarray, jax.Array))]
    modes: dict[str, str] = {}

    def run(variables, arrays):
        given = iter(arrays)  # other arguments (flags, ...) stay Python values
        call = [next(given) if isinstance(a, (np.ndarray, jax.Array)) else a for a in args]
        stacks = _capture(model, variables, call, {})
        modes.update((name, mode) for name, (mode, _) in stacks.items())  # in call order, while tracing
        return {name: h_res for name, (_, h_res) in stacks.items()}

    # Compiled: op by op, every small operation of a real model is compiled
    # on its own (a small GPT's forward pass then takes tens of seconds).
    h_res_by_stack = jax.jit(run)(variables, arrays)
    found = []
    for name, mode in modes.items():
        h_res = h_res_by_stack[name]
        limit = SINKHORN_RESIDUAL_LIMIT if mode == "mhc" else None
        for warning in diagnose_streams(h_res, sinkhorn_limit=limit):
            message = f"residual streams {name or '(the model)'} (mode={mode!r}): {warning.message}."
            found.append((warning.kind, name, message + _CURES[warning.kind, mode]))
    return found


def plot_h_res_heatmap(h_res, path: str | None = None, title: str = "h_res per layer (mean over tokens)"):
    """One ``n x n`` heatmap per layer of the token-averaged ``h_res`` (needs matplotlib).

    Rows are the output streams ``i``, columns the input streams ``j``
    (``out_i = sum_j h_res[i, j] x_j``). Saves a PNG when ``path`` is given.
    Returns the matplotlib ``Figure``.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plot_h_res_heatmap needs matplotlib: pip install 'mhc-jax-torch[plots]'") from err
    mean = _layers(h_res).mean(axis=1)
    depth, n = mean.shape[0], mean.shape[-1]
    cols = min(depth, 8)
    rows = -(-depth // cols)
    fig = Figure(figsize=(1.0 + 1.6 * cols, 0.8 + 1.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    finite = mean[np.isfinite(mean)]
    vmin, vmax = (min(0.0, finite.min()), max(1.0, finite.max())) if finite.size else (0.0, 1.0)
    image = None
    for index, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if index >= depth:
            ax.axis("off")
            continue
        image = ax.imshow(mean[index], vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_title(f"layer {index}", fontsize=8)
        if n <= 4:
            for (i, j), value in np.ndenumerate(mean[index]):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 * vmax else "white")
    fig.suptitle(title)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="h_res[i, j]")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
