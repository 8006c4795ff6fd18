r"""Mixing weights as a dashboard: extraction, summary metrics, diagnostics, heatmap.

Weights are reported per skip as a vector over its window, oldest first and
latest last (``K`` entries), computed with the skip's own projection (mode,
constraint, temperature, epsilon): the deterministic ``alpha`` of
docs/mathematics.md, before pruning, Gumbel noise and the gate. A skip whose
logits hold a NaN or an infinity reports NaN weights (the projections' rule:
non-finite logits are never hidden).

:func:`diagnose` reports the troubleshooting guide's warning signs:

* **entropy** near its maximum ``log K``: the weights are close to uniform,
  the model lost its specialised paths and defaults to a noisy average;
* **saturation**, the latest weight pinned at ``>= 0.99``: the network ignores
  its history and behaves like a plain sequential stack;
* **symmetry**, every layer's weights identical: the heatmap "symmetry" seen
  when history is never cleared between batches (also the state of a freshly
  initialised model);
* **non-finite** weights: the logits diverged (NaN or inf);
* **empty**: all-zero weights, read before the first forward pass;
* **dead** slots, weights exactly 0 in ``mode="mhc"``: they get no gradient
  and never come back (``leak > 0`` keeps every slot learning).

The twin is :mod:`mhc_jax.monitoring`; both give the same warnings for the
same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .compat import is_mhc_compatible
from .dashboard import plot_mixing_heatmap  # the plots live in dashboard.py; re-exported here
from .skip import MHCSkip, window_weights
from .stream_monitoring import _model_warnings

__all__ = [
    "MixingWarning",
    "extract_mixing_weights",
    "mixing_metrics",
    "entropy",
    "diagnose",
    "plot_mixing_heatmap",
    "ENTROPY_RATIO",
    "SATURATION",
]

#: Entropy at or above this fraction of ``log K`` counts as near-uniform.
ENTROPY_RATIO = 0.95
#: A latest-state weight at or above this counts as saturated.
SATURATION = 0.99
#: Layers whose weights differ by less than this count as identical.
SYMMETRY_TOLERANCE = 1e-6


def _skips(model: nn.Module) -> list[tuple[str, MHCSkip]]:
    """Skips inside every @mhc_compatible module found by recursive search.

    The search does not descend into a compatible module once found: it
    handles its own hyper-connectivity, and its skips are reported under it.
    """
    found: list[tuple[str, MHCSkip]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        if is_mhc_compatible(module):
            found.extend(
                (".".join(p for p in (prefix, name) if p), sub)
                for name, sub in module.named_modules()
                if isinstance(sub, MHCSkip)
            )
            return
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(model, "")
    return found


@torch.no_grad()
def extract_mixing_weights(model: nn.Module, num_states: int | None = None) -> dict[str, np.ndarray]:
    """Every skip's mixing weights, keyed by its path in ``model``.

    Only skips inside ``@mhc_compatible`` modules are reported (``MHCSkip``
    and ``MHCSequential`` are compatible themselves).

    Args:
      model: any module.
      num_states: the window size ``K`` to report for every skip; by default
        the size each skip last mixed (0, all-zero weights, before the first
        forward pass).
    Returns:
      ``{path: weights}``, each of shape ``(K,)``, oldest first, latest last;
      all NaN for a skip whose logits are not all finite (:func:`diagnose`
      reports it as ``non_finite``).
    """
    out = {}
    for name, skip in _skips(model):
        k = skip.last_num_states if num_states is None else min(num_states, skip.max_history)
        if skip.mode == "residual":
            logits = torch.zeros(skip.max_history)
        else:
            logits = skip.mixing_logits.detach().float().cpu()
        w = window_weights(
            logits, k, mode=skip.mode, constraint=skip.constraint, temperature=skip.temperature, epsilon=skip.epsilon,
            leak=skip.leak,
        )
        out[name] = _nan_unless_finite(w.numpy()[skip.max_history - k :], logits.numpy())
    return out


def _nan_unless_finite(weights: np.ndarray, logits: np.ndarray) -> np.ndarray:
    # A diverged logit is reported even where the window does not read it
    # (a slot outside a short window), so diagnose always sees it.
    return weights if np.isfinite(logits).all() else np.full_like(weights, np.nan)


def entropy(weights: np.ndarray) -> float:
    """``-sum w log w`` over the positive weights (0 for an empty window, NaN if any is not finite)."""
    w = np.asarray(weights, np.float64)
    if not np.isfinite(w).all():
        return math.nan
    w = w[w > 0]
    return float(-(w * np.log(w)).sum())


def mixing_metrics(weights: dict[str, np.ndarray], prefix: str = "mhc") -> dict[str, float]:
    """Scalars to log: each skip's latest-state weight and entropy."""
    metrics = {}
    for name, w in weights.items():
        metrics[f"{prefix}/{name}/latest_weight"] = float(w[-1]) if len(w) else 0.0
        metrics[f"{prefix}/{name}/entropy"] = entropy(w)
    return metrics


@dataclass(frozen=True)
class MixingWarning:
    """One warning sign: its kind, the layers showing it, and what to change."""

    kind: str
    layers: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return self.message


def _names(layers) -> str:
    layers = list(layers)
    return ", ".join(layers[:5]) + (f" and {len(layers) - 5} more" if len(layers) > 5 else "")


def diagnose(
    weights: dict[str, np.ndarray],
    *,
    entropy_ratio: float = ENTROPY_RATIO,
    saturation: float = SATURATION,
    model=None,
    inputs=None,
) -> list[MixingWarning]:
    """The warning signs in ``weights`` (from :func:`extract_mixing_weights`).

    Windows of one state (``K = 1``) carry no choice and are not judged for
    entropy, saturation or symmetry.

    With ``model`` and ``inputs`` (a batch, or a tuple of arguments) it also
    runs ``model(*inputs)`` once and reports its residual streams' warning
    signs (:func:`~mhc_torch.diagnose_streams` on every stack of
    :func:`~mhc_torch.stream_monitoring.extract_h_res`; ``weights`` may then
    be ``{}``): ``gain``, a composite gain outside ``[0.5, 2]``;
    ``sinkhorn``, a ``mode="mhc"`` layer's Sinkhorn residual above 1e-3;
    ``non_finite``. Their ``layers`` name the stack.
    """
    warnings: list[MixingWarning] = []
    arrays = {name: np.asarray(w, np.float64) for name, w in weights.items()}

    bad = [n for n, w in arrays.items() if not np.isfinite(w).all()]
    if bad:
        warnings.append(MixingWarning("non_finite", tuple(bad), (
            f"non-finite mixing weights in {_names(bad)}: the logits diverged. Lower the learning "
            "rate, prefer mode='mhc' to 'hc' (the simplex projection can zero out noisy history), "
            "and normalise the inputs (mHC amplifies what it is given)."
        )))
    finite = {n: w for n, w in arrays.items() if np.isfinite(w).all()}

    empty = [n for n, w in finite.items() if not (w != 0).any()]
    if empty:
        warnings.append(MixingWarning("empty", tuple(empty), (
            f"all-zero mixing weights in {_names(empty)}: they were read before any state was "
            "pushed (the window is empty until the first forward pass). Run a forward pass first."
        )))

    judged = {n: w for n, w in finite.items() if len(w) >= 2}
    uniform = [n for n, w in judged.items() if entropy(w) >= entropy_ratio * math.log(len(w))]
    if uniform:
        warnings.append(MixingWarning("entropy", tuple(uniform), (
            f"near-uniform mixing weights in {_names(uniform)} (entropy >= {entropy_ratio:.0%} of "
            "log K): the model lost its specialised paths and averages its history. Lower the "
            "temperature (keep it within 0.5-2.0) or use mode='mhc', whose exact zeros prune slots."
        )))
    pinned = [n for n, w in judged.items() if w[-1] >= saturation]
    if pinned:
        warnings.append(MixingWarning("saturation", tuple(pinned), (
            f"latest-state weight >= {saturation} in {_names(pinned)}: the network ignores its "
            "history and behaves like a plain sequential stack (expected right after the default "
            "identity init; a warning if it persists). Raise the temperature or lower epsilon."
        )))
    dead = [n for n, w in judged.items() if (w == 0).any() and (w != 0).any()]
    if dead:
        warnings.append(MixingWarning("dead", tuple(dead), (
            f"dead history slots (weights exactly 0) in {_names(dead)}: the simplex projection of "
            "mode='mhc' gives a slot at 0 no gradient, so it never comes back. If pruning that "
            "history is what you want, nothing to change. To keep every slot learning, pass "
            "leak=0.05 (a share of softmax weights, never exactly 0) or use mode='hc'; a higher "
            "temperature also leaves fewer slots at 0."
        )))
    by_size: dict[int, list[str]] = {}
    for n, w in judged.items():
        by_size.setdefault(len(w), []).append(n)
    for size, names in by_size.items():
        if len(names) >= 2 and all(np.abs(judged[n] - judged[names[0]]).max() < SYMMETRY_TOLERANCE for n in names):
            warnings.append(MixingWarning("symmetry", tuple(names), (
                f"every layer with a window of {size} ({_names(names)}) has the same mixing weights: "
                "if history is never cleared between batches the manifold collapses into one global "
                "state. Clear it every batch (clear_history(), MHCLightningCallback, or "
                "clear_history_each_forward=True). A freshly initialised model also looks like this."
            )))
    if model is not None:
        found = _model_warnings(model, inputs)
        warnings += [MixingWarning(kind, (stack,), message) for kind, stack, message in found]
    return warnings
