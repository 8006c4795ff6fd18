r"""Stability diagnostics of the residual streams' mixing matrices ``h_res``.

Input: every layer's ``h_res`` as one tensor ``(L, ..., n, n)`` (layer first,
any token axes), e.g. the third result of ``model.coefficients(x)`` for a
:class:`~mhc_torch.StreamSequential`. With ``P_l = h_res^(l) ... h_res^(1)``
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

Everything is computed in float64 numpy; the twin is
:mod:`mhc_jax.stream_monitoring` (the same code, the same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "StreamWarning",
    "h_res_gains",
    "sinkhorn_residual",
    "stream_metrics",
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
    if isinstance(h_res, torch.Tensor):
        h_res = h_res.detach().to("cpu", torch.float64).numpy()
    h = np.asarray(h_res, np.float64)
    if h.ndim < 3 or h.shape[-1] != h.shape[-2]:
        raise ValueError(f"h_res must have shape (L, ..., n, n) (layers first), got shape {tuple(h.shape)}")
    return h.reshape(h.shape[0], -1, h.shape[-2], h.shape[-1])


def _forward_gain(m: np.ndarray) -> np.ndarray:
    return np.abs(m).sum(axis=-1).max(axis=-1)


def _backward_gain(m: np.ndarray) -> np.ndarray:
    return np.abs(m).sum(axis=-2).max(axis=-1)


def h_res_gains(h_res) -> dict[str, np.ndarray]:
    """Per-layer and composite gains, each the largest over the tokens.

    Args:
      h_res: ``(L, ..., n, n)``, layer ``l`` first.

    Returns:
      ``{"layer_forward", "layer_backward", "composite_forward",
      "composite_backward"}``, each of shape ``(L,)``: entry ``l`` is the gain
      of ``h_res^(l)`` alone, or of the composite ``P_l = h_res^(l) ... h_res^(1)``.
    """
    h = _layers(h_res)
    composite = np.empty_like(h)
    product = np.broadcast_to(np.eye(h.shape[-1]), h.shape[1:])
    for layer in range(h.shape[0]):
        product = h[layer] @ product
        composite[layer] = product
    return {
        "layer_forward": _forward_gain(h).max(axis=-1),
        "layer_backward": _backward_gain(h).max(axis=-1),
        "composite_forward": _forward_gain(composite).max(axis=-1),
        "composite_backward": _backward_gain(composite).max(axis=-1),
    }


def sinkhorn_residual(h_res) -> np.ndarray:
    """``max(|row sum - 1|, |column sum - 1|)`` per layer, the largest over the tokens: ``(L,)``."""
    h = _layers(h_res)
    rows = np.abs(h.sum(axis=-1) - 1).max(axis=(-2, -1))
    columns = np.abs(h.sum(axis=-2) - 1).max(axis=(-2, -1))
    return np.maximum(rows, columns)


def stream_metrics(h_res, prefix: str = "streams") -> dict[str, float]:
    """Scalars for a logger: the whole stack's composite gains, the largest
    per-layer gains and the largest Sinkhorn residual."""
    gains = h_res_gains(h_res)
    return {
        f"{prefix}/composite_forward_gain": float(gains["composite_forward"][-1]),
        f"{prefix}/composite_backward_gain": float(gains["composite_backward"][-1]),
        f"{prefix}/max_layer_forward_gain": float(gains["layer_forward"].max()),
        f"{prefix}/max_layer_backward_gain": float(gains["layer_backward"].max()),
        f"{prefix}/max_sinkhorn_residual": float(sinkhorn_residual(h_res).max()),
    }


@dataclass(frozen=True)
class StreamWarning:
    """One warning sign: ``kind`` is ``"gain"``, ``"sinkhorn"`` or ``"non_finite"``."""

    kind: str
    layers: tuple[int, ...]
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


def diagnose_streams(
    h_res, band: tuple[float, float] = GAIN_BAND, sinkhorn_limit: float = SINKHORN_RESIDUAL_LIMIT
) -> list[StreamWarning]:
    """Warning signs in a stack's ``h_res`` ``(L, ..., n, n)``; empty when healthy.

    * ``non_finite``: a layer's ``h_res`` holds NaN or inf (the others are
      still checked);
    * ``gain``: the composite forward or backward gain of the first ``l``
      layers leaves ``band`` (the first such depth is named);
    * ``sinkhorn``: a layer's Sinkhorn residual exceeds ``sinkhorn_limit``
      (meaningful for ``mode="mhc"``; HC's ``h_res`` is not meant to be doubly
      stochastic).
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
