r"""Training dashboard: mixing heatmap, per-layer history contributions, gradient flow.

The data are plain functions returning numpy:

* :func:`history_contributions`: layer ``l`` adds ``mix_l = sum_k alpha^(l)_k h_k``
  to its output (docs/mathematics.md); the weights are ``>= 0`` and sum to 1, so
  ``C[l, k] = alpha^(l)_k`` is the share of that mix coming from window slot ``k``;
* :func:`gradient_norms`: per layer, ``||g_l|| = sqrt(sum_p ||grad p||_2^2)`` over
  the parameters ``p`` the layer owns, read from a gradient pytree (what
  ``jax.grad`` of the loss returns for the Flax parameters).

The figures are matplotlib ``Figure`` objects built without pyplot (headless,
no global state; install the ``plots`` extra): :func:`plot_mixing_heatmap`,
:func:`plot_history_contribution` (a stacked bar per layer),
:func:`plot_gradient_flow` (a bar per layer, log scale) and
:func:`create_training_dashboard` (all three, with optional training curves,
as one PNG). The plotting names are those of the ``mhc`` package's
visualisation module; here they take the extracted data, not a model.

The twin is :mod:`mhc_torch.dashboard` (the same plots; its
:func:`~mhc_torch.dashboard.gradient_norms` reads ``.grad`` from a module).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np

__all__ = [
    "history_contributions",
    "gradient_norms",
    "plot_mixing_heatmap",
    "plot_history_contribution",
    "plot_gradient_flow",
    "create_training_dashboard",
]

#: Rows up to which the heatmap prints each weight in its cell.
ANNOTATE_ROWS = 24
#: What separates the parts of a layer's name (torch ``.``, Flax ``/``, ``layers_{i}``).
SEPARATORS = "./_ "


def history_contributions(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    r"""Each layer's share of its history mix per window slot, shape ``(L, W)``.

    ``C[l, k] = alpha^(l)_k``, the fraction of ``mix_l = sum_k alpha^(l)_k h_k``
    that slot ``k`` supplies. Rows follow ``weights`` (from
    ``extract_mixing_weights``), columns are slots with the latest state last
    (``W`` the longest window); slots a shorter window lacks contribute 0.
    A layer with non-finite weights keeps its NaN row.
    """
    arrays = _check_weights(weights)
    width = max(len(w) for w in arrays.values())
    out = np.zeros((len(arrays), width))
    for row, w in enumerate(arrays.values()):
        out[row, width - len(w) :] = w
    return out


def gradient_norms(grads, level: int | None = None) -> dict[str, float]:
    r"""Per-layer gradient norms from a gradient pytree (``jax.grad`` of the loss).

    ``||g_l|| = sqrt(sum_{p in l} ||grad p||_2^2)`` (float64): the L2 norm of all
    of layer ``l``'s gradients taken together. A layer is the module owning the
    parameters (the parameter's path without its last part, ``"(root)"`` for
    leaves at the top), or with ``level`` that path cut to its first ``level``
    parts (``level=2`` groups ``stack/layers_4/Dense_0/kernel`` under
    ``stack/layers_4``). An outer ``{"params": ...}`` is not part of the names.
    For a scanned ``MHCSequential`` (one leaf per chunk of layers), pass its
    gradients through :func:`mhc_jax.convert.unstack_layer_params` first to get
    one entry per layer.

    Returns:
      ``{layer: norm}``, ordered by path with numbers in numeric order
      (``layers_2`` before ``layers_10``): a gradient pytree's dicts come sorted
      by key, so the model's own order is not available.
    """
    _check_level(level)
    tree = grads["params"] if isinstance(grads, Mapping) and set(grads) == {"params"} else grads
    squares: dict[str, float] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        try:
            value = np.asarray(leaf, np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"grads must hold arrays, got {type(leaf).__name__} at {'/'.join(parts)!r}") from None
        layer = _layer(parts, level)
        squares[layer] = squares.get(layer, 0.0) + float(np.square(value).sum())
    if not squares:
        raise ValueError("grads holds no arrays: pass the gradients of the loss with respect to the parameters")
    return {layer: math.sqrt(squares[layer]) for layer in sorted(squares, key=_natural)}


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _layer(parts: Sequence[str], level: int | None) -> str:
    module = list(parts[:-1]) if level is None else list(parts[:-1])[:level]
    return "/".join(module) or "(root)"


def _check_level(level) -> None:
    if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level < 1):
        raise ValueError(f"level must be a positive int or None, got {level!r}")


# --- plots: the same code in mhc_torch.dashboard --------------------------------------------


def _figure(caller: str, **kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{caller} needs matplotlib: pip install 'mhc-jax-torch[plots]'") from err
    return Figure(layout="constrained", **kwargs)


def _save(fig, path) -> None:
    if path is not None:
        fig.savefig(path, dpi=100)


def _check_weights(weights) -> dict[str, np.ndarray]:
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping {{layer: weights}} from extract_mixing_weights, got {type(weights).__name__}")
    if not weights:
        raise ValueError("weights is empty: the model has no mHC skips to plot")
    arrays = {str(name): np.asarray(w, np.float64) for name, w in weights.items()}
    for name, w in arrays.items():
        if w.ndim != 1:
            raise ValueError(f"weights[{name!r}] must be 1-D (one weight per window slot), got shape {w.shape}")
    return arrays


def _check_norms(norms) -> dict[str, float]:
    if not isinstance(norms, Mapping):
        raise TypeError(f"norms must be a mapping {{layer: norm}} from gradient_norms, got {type(norms).__name__}")
    if not norms:
        raise ValueError("norms is empty: no layer has a gradient to plot")
    out = {}
    for name, v in norms.items():
        try:
            out[str(name)] = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"norms[{name!r}] must be one number (a layer's gradient norm), got {v!r:.80}") from None
    negative = [name for name, v in out.items() if v < 0]
    if negative:
        raise ValueError(f"gradient norms are >= 0, got {out[negative[0]]} for {negative[0]!r}")
    return out


def _slot_labels(width: int) -> list[str]:
    return [f"t-{width - 1 - j}" if j < width - 1 else "latest" for j in range(width)]


def _short_names(names: list[str]) -> tuple[list[str], str]:
    """Names without their common prefix (cut after a separator), and that prefix,
    where what is left is a plain index or name (``skip_layers.{i}``)."""
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    cut = max(prefix.rfind(sep) for sep in SEPARATORS) + 1
    rest = [n[cut:] for n in names]
    if len(names) < 2 or cut == 0 or any(not r or any(sep in r for sep in SEPARATORS) for r in rest):
        return names, ""
    return rest, names[0][:cut]


def _label_layers(ax, names: list[str], axis: str = "y") -> None:
    short, prefix = _short_names(names)
    stride = max(1, math.ceil(len(names) / 48))
    ticks = range(0, len(names), stride)
    size = 8 if len(names) <= 16 else 6
    if axis == "y":
        ax.set_yticks(list(ticks), [short[i] for i in ticks], fontsize=size)
        ax.set_ylabel(f"layer ({prefix}<n>)" if prefix else "layer")
    else:
        ax.set_xticks(list(ticks), [short[i] for i in ticks], fontsize=size, rotation=90)
        ax.set_xlabel(f"layer ({prefix}<n>)" if prefix else "layer")


def _draw_heatmap(ax, arrays: dict[str, np.ndarray], title: str) -> None:
    grid = history_contributions(arrays)
    for row, w in enumerate(arrays.values()):
        grid[row, : grid.shape[1] - len(w)] = np.nan  # slots this window does not have: blank
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    _label_layers(ax, list(arrays))
    ax.set_xticks(range(grid.shape[1]), _slot_labels(grid.shape[1]))
    ax.set_xlabel("history slot")
    ax.set_title(title)
    if len(grid) <= ANNOTATE_ROWS:
        for (row, col), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")
    ax.figure.colorbar(image, ax=ax, label="mixing weight alpha")


def _draw_contributions(ax, arrays: dict[str, np.ndarray], title: str) -> None:
    shares = history_contributions(arrays)
    rows, width = shares.shape
    from matplotlib import colormaps

    # Qualitative colours: slots are categories here, unlike the heatmap's values.
    palette = colormaps["tab10"].colors
    colours = [palette[(width - 1 - col) % len(palette)] for col in range(width)]
    left = np.zeros(rows)
    for col in reversed(range(width)):  # latest first, so its share reads from 0
        share = np.nan_to_num(shares[:, col])
        ax.barh(range(rows), share, left=left, height=0.8, color=colours[col], label=_slot_labels(width)[col])
        left += share
    for row, w in enumerate(arrays.values()):
        note = "non-finite weights" if not np.isfinite(w).all() else "empty window" if not w.any() else ""
        if note:
            ax.text(0.02, row, note, va="center", fontsize=7, color="crimson")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(rows - 0.5, -0.5)  # layer 0 on top, as in the heatmap
    _label_layers(ax, list(arrays))
    ax.set_xlabel("share of the history mix (alpha)")
    ax.set_title(title)
    ax.legend(title="slot", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _draw_gradient_flow(ax, values: dict[str, float], title: str) -> None:
    names = list(values)
    heights = np.array(list(values.values()))
    finite = np.isfinite(heights)
    positive = heights[finite & (heights > 0)]
    x = np.arange(len(heights))
    ax.bar(x[finite], heights[finite], width=0.8, color="tab:blue")
    if positive.size:
        ax.set_yscale("log")
        floor = positive.min() / 3
        ax.axhline(float(np.median(positive)), color="grey", linestyle="--", linewidth=1,
                   label=f"median {np.median(positive):.2e}")
    else:
        floor = 0.0
    for mask, marker, label in ((finite & (heights == 0), "v", "zero gradient"), (~finite, "X", "non-finite")):
        if mask.any():
            ax.plot(x[mask], np.full(mask.sum(), floor), marker, color="crimson", label=label, linestyle="none")
    _label_layers(ax, names, axis="x")
    ax.set_xlim(-0.6, len(heights) - 0.4)
    ax.set_ylabel("gradient L2 norm" + (" (log scale)" if positive.size else ""))
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_mixing_heatmap(weights: dict[str, np.ndarray], path: str | None = None, title: str = "mHC mixing weights"):
    """A layers x history-slots heatmap of the mixing weights, with a colour bar.

    Rows are layers in order, columns window slots with the latest state on the
    right; slots a short window does not have are left blank, and each weight is
    printed in its cell up to ``ANNOTATE_ROWS`` layers. Saves a PNG when ``path``
    is given. Returns the matplotlib ``Figure``.
    """
    arrays = _check_weights(weights)
    width = max(len(w) for w in arrays.values())
    fig = _figure("plot_mixing_heatmap", figsize=(2.4 + 0.9 * width, 1.2 + 0.25 * len(arrays)))
    _draw_heatmap(fig.add_subplot(), arrays, title)
    _save(fig, path)
    return fig


def plot_history_contribution(
    weights: dict[str, np.ndarray], path: str | None = None, title: str = "history contribution per layer"
):
    """A stacked bar per layer: the share of its history mix from each window slot.

    The bars are :func:`history_contributions` (each sums to 1), latest slot
    first, layer 0 on top; a legend names the slots. Saves a PNG when ``path``
    is given. Returns the matplotlib ``Figure``.
    """
    arrays = _check_weights(weights)
    fig = _figure("plot_history_contribution", figsize=(7.0, 1.4 + 0.22 * len(arrays)))
    _draw_contributions(fig.add_subplot(), arrays, title)
    _save(fig, path)
    return fig


def plot_gradient_flow(norms: dict[str, float], path: str | None = None, title: str = "gradient flow"):
    """A bar per layer of its gradient norm (from :func:`gradient_norms`), log scale.

    A dashed line marks the median; zero gradients (a dead slot's logits, a
    frozen path) and non-finite ones are marked in red at the bottom, where a
    log axis cannot draw them. Saves a PNG when ``path`` is given. Returns the
    matplotlib ``Figure``.
    """
    values = _check_norms(norms)
    fig = _figure("plot_gradient_flow", figsize=(min(3.0 + 0.16 * len(values), 16.0), 4.0))
    _draw_gradient_flow(fig.add_subplot(), values, title)
    _save(fig, path)
    return fig


def create_training_dashboard(
    weights: dict[str, np.ndarray],
    norms: dict[str, float],
    path: str | None = None,
    *,
    curves: Mapping[str, Sequence[float]] | None = None,
    curve_steps: Sequence[int] | None = None,
    title: str = "mHC training dashboard",
):
    """One figure: mixing heatmap and history contributions side by side, the
    gradient flow below, and one panel per training curve (``{"loss": [...]}``,
    one value per log entry) when ``curves`` is given, drawn against
    ``curve_steps`` (the training step of each entry) when given.

    ``weights`` come from ``extract_mixing_weights``, ``norms`` from
    :func:`gradient_norms`. Saves a PNG when ``path`` is given. Returns the
    matplotlib ``Figure``.
    """
    arrays, flow = _check_weights(weights), _check_norms(norms)
    curves = dict(curves or {})
    for name, values in curves.items():
        if np.asarray(values).ndim != 1 or not len(values):
            raise ValueError(f"curves[{name!r}] must be a non-empty 1-D sequence of values, got {values!r:.80}")
        if curve_steps is not None and len(curve_steps) != len(values):
            raise ValueError(f"curve_steps has {len(curve_steps)} entries but curves[{name!r}] has {len(values)}")
    top = 1.5 + 0.2 * len(arrays)
    heights = [top, 4.0] + ([2.6] if curves else [])
    fig = _figure("create_training_dashboard", figsize=(14.0, sum(heights)))
    grid = fig.add_gridspec(len(heights), max(2, len(curves)), height_ratios=heights)
    _draw_heatmap(fig.add_subplot(grid[0, : grid.ncols // 2]), arrays, "mixing weights")
    _draw_contributions(fig.add_subplot(grid[0, grid.ncols // 2 :]), arrays, "history contribution per layer")
    _draw_gradient_flow(fig.add_subplot(grid[1, :]), flow, "gradient flow")
    for col, (name, values) in enumerate(curves.items()):
        ax = fig.add_subplot(grid[2, col])
        x = np.arange(1, len(values) + 1) if curve_steps is None else np.asarray(curve_steps)
        ax.plot(x, np.asarray(values, np.float64))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("log entry" if curve_steps is None else "training step")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, path)
    return fig
