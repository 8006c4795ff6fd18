"""Mixing-weight extraction, metrics, diagnostics and heatmap, in both packages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import mhc_jax
import mhc_torch

MONITORS = {"jax": mhc_jax.monitoring, "torch": mhc_torch.monitoring}


@pytest.fixture(params=sorted(MONITORS))
def monitor(request):
    return MONITORS[request.param]


def _kinds(warnings) -> dict[str, tuple[str, ...]]:
    return {w.kind: w.layers for w in warnings}


def test_healthy_weights_raise_no_warning(monitor):
    # No weight exactly 0: in mode="mhc" that is a dead slot, which diagnose reports.
    weights = {"a": np.array([0.1, 0.3, 0.6]), "b": np.array([0.05, 0.4, 0.55]), "first": np.array([1.0])}
    assert monitor.diagnose(weights) == []


@pytest.mark.parametrize(
    "weights, kind, cure",
    [
        ({"a": np.full(4, 0.25), "b": np.array([0.1, 0.2, 0.3, 0.4])}, "entropy", "Lower the temperature"),
        ({"a": np.array([0.0, 0.005, 0.995]), "b": np.array([0.2, 0.3, 0.5])}, "saturation", "Raise the temperature or lower epsilon"),
        ({"a": np.array([0.2, 0.3, 0.5]), "b": np.array([0.2, 0.3, 0.5])}, "symmetry", "Clear it every batch"),
        ({"a": np.array([np.nan, 0.5, 0.5]), "b": np.array([0.2, 0.3, 0.5])}, "non_finite", "Lower the learning rate"),
        ({"a": np.zeros(0), "b": np.array([0.2, 0.3, 0.5])}, "empty", "Run a forward pass first"),
    ],
)
def test_each_warning_sign_names_its_layers_and_its_cure(monitor, weights, kind, cure):
    warnings = monitor.diagnose(weights)
    assert kind in _kinds(warnings)
    found = next(w for w in warnings if w.kind == kind)
    assert "a" in found.layers and cure in found.message
    if kind != "symmetry":
        assert "b" not in found.layers


def test_metrics_are_the_latest_weight_and_the_entropy(monitor):
    metrics = monitor.mixing_metrics({"x": np.array([0.25, 0.25, 0.5])}, prefix="p")
    assert metrics["p/x/latest_weight"] == 0.5
    assert metrics["p/x/entropy"] == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))


def test_torch_weights_are_empty_before_the_first_forward():
    model = mhc_torch.MHCSequential([nn.Linear(2, 2) for _ in range(3)])
    weights = mhc_torch.extract_mixing_weights(model)
    assert all(len(w) == 0 for w in weights.values())
    assert "empty" in _kinds(mhc_torch.diagnose(weights))
    assert [len(w) for w in mhc_torch.extract_mixing_weights(model, num_states=4).values()] == [4, 4, 4]


def test_only_compatible_modules_are_searched():
    class Custom(nn.Module):  # undecorated, with its own raw logits
        def __init__(self):
            super().__init__()
            self.mixing_logits = nn.Parameter(torch.zeros(4))

    model = nn.Sequential(Custom(), nn.Sequential(mhc_torch.MHCSkip()))
    assert list(mhc_torch.extract_mixing_weights(model, num_states=4)) == ["1.0"]


def test_heatmap_is_saved_as_a_png(monitor, tmp_path):
    weights = {"layer 0": np.array([1.0]), "layer 1": np.array([0.3, 0.7]), "layer 2": np.array([0.1, 0.2, 0.7])}
    path = tmp_path / "heatmap.png"
    fig = monitor.plot_mixing_heatmap(weights, path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = np.ma.filled(fig.axes[0].images[0].get_array(), np.nan)  # blank cells are masked
    assert image.shape == (3, 3)
    assert np.isnan(image[0, 0]) and image[0, 2] == 1.0 and image[2, 0] == pytest.approx(0.1)


# --- diverged logits: reported, never hidden and never an exception -----------------------

BAD_LOGITS = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}
#: Every projection a skip can use.
WEIGHTED_OPTIONS = [
    dict(mode="mhc", constraint="simplex"),
    dict(mode="mhc", constraint="identity"),
    dict(mode="hc", constraint="simplex"),
    dict(mode="hc", constraint="identity"),
]
#: Slot 2 is in every window of a max_history=3 stack; slot 0 is outside layer 1's
#: two-state window (a logit the projection does not read, still a diverged one).
BAD_SLOTS = {"in the window": 2, "outside the window": 0}


def _assert_only_layer_is_non_finite(monitor, weights: dict, layer: str) -> None:
    assert np.isnan(weights[layer]).all() and len(weights[layer]) == 2, weights
    assert all(np.isfinite(w).all() for name, w in weights.items() if name != layer), weights
    assert _kinds(monitor.diagnose(weights))["non_finite"] == (layer,)
    metrics = monitor.mixing_metrics(weights)
    assert math.isnan(metrics[f"mhc/{layer}/latest_weight"]) and math.isnan(metrics[f"mhc/{layer}/entropy"])


@pytest.mark.parametrize("slot", BAD_SLOTS.values(), ids=BAD_SLOTS.keys())
@pytest.mark.parametrize("bad", BAD_LOGITS.values(), ids=BAD_LOGITS.keys())
@pytest.mark.parametrize("options", WEIGHTED_OPTIONS, ids=lambda o: f"{o['mode']}-{o['constraint']}")
def test_torch_non_finite_logits_are_reported(options, bad, slot):
    model = mhc_torch.MHCSequential([nn.Linear(2, 2) for _ in range(3)], max_history=3, **options)
    model(torch.randn(2, 2))  # windows of 1, 2 and 3 states
    with torch.no_grad():
        model.skip_layers[1].mixing_logits[slot] = bad
    _assert_only_layer_is_non_finite(mhc_torch.monitoring, mhc_torch.extract_mixing_weights(model), "skip_layers.1")


@pytest.mark.parametrize("scanned", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("slot", BAD_SLOTS.values(), ids=BAD_SLOTS.keys())
@pytest.mark.parametrize("bad", BAD_LOGITS.values(), ids=BAD_LOGITS.keys())
@pytest.mark.parametrize("options", WEIGHTED_OPTIONS, ids=lambda o: f"{o['mode']}-{o['constraint']}")
def test_jax_non_finite_logits_are_reported(options, bad, slot, scanned):
    logits = np.tile(np.array([0.0, 0.25, 1.0], np.float32), (3, 1))
    logits[1, slot] = bad
    if scanned:  # one row per layer, as a scanned stack stores them
        params = {"params": {"skip_layers": {"mixing_logits": logits}}}
    else:
        params = {"params": {f"skip_layers_{i}": {"mixing_logits": row} for i, row in enumerate(logits)}}
    weights = mhc_jax.extract_mixing_weights(params, **options)
    _assert_only_layer_is_non_finite(mhc_jax.monitoring, weights, "skip_layers_1")
