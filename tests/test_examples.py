"""Every example in examples/ runs (with smaller settings) and shows what it promises."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import jax
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def standard_promotion():
    # The suite turns on strict dtype promotion to check this library; the
    # examples are user programs, and optax's Adam mixes int and float.
    with jax.numpy_dtype_promotion("standard"):
        yield


def _load(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name))  # defines main() without running it


def test_projections_tour_shows_exact_zeros_and_parity(capsys):
    runpy.run_path(str(EXAMPLES / "projections_tour.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "exact zeros" in out
    assert float(re.search(r"max \|jax - torch\| = (\S+)", out).group(1)) <= 1e-6


def test_flax_training_loop_learns_and_prints_the_mixing_weights(capsys):
    result = _load("train_flax.py")["main"](steps=150, log_every=50)
    assert result["final_loss"] < 0.5 * result["initial_loss"]
    weights = result["weights"]
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    assert "learned mixing weights" in capsys.readouterr().out


def test_manual_history_loop_learns_and_shows_temporal_bleeding():
    result = _load("torch_manual_history.py")["main"](epochs=3)
    assert result["accuracy"] > 0.8
    assert result["bleeding"] > 1e-3  # not clearing changes the outputs
    assert result["cleared"] == 0.0  # clearing restores them exactly


def test_torch_trained_model_runs_the_same_in_jax():
    result = _load("torch_to_jax.py")["main"](steps=100)
    assert result["difference"] < 1e-4
    assert result["jax_accuracy"] == result["torch_accuracy"] > 0.9


def test_decorated_custom_layer_gets_the_ecosystem():
    result = _load("custom_layer.py")["main"]()
    assert result["window"] > 0 and result["untouched"]
    assert str(result["moved"]) == "torch.float64"
    assert set(result["weights"]) == {"left.skip", "right.skip"}


def test_injection_into_an_existing_model_trains_and_spares_the_decorated_layer():
    result = _load("inject_existing_model.py")["main"](epochs=3)
    assert result["wrapped"] == ["0", "2", "5", "7"] and result["untouched"]
    assert result["accuracy"] > 0.8


def test_lightning_training_logs_the_mixing_metrics():
    result = _load("lightning_training.py")["main"](epochs=1, log_interval=8)
    assert result["steps"] == [8, 16, 24, 32]
    assert "mhc/stack.skip_layers.5/latest_weight" in result["columns"]
    assert result["accuracy"] > 0.5


def test_heatmap_example_saves_a_png_of_learned_weights(tmp_path):
    result = _load("heatmap.py")["main"](steps=100, path=str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert any((w == 0).any() for w in result["weights"].values())  # mode="mhc" switched slots off


def test_flax_monitoring_logs_metrics_and_diagnoses_from_params(tmp_path):
    result = _load("flax_monitoring.py")["main"](steps=60, log_every=30, path=str(tmp_path / "f.png"))
    assert [h["step"] for h in result["history"]] == [30, 60]
    assert len(result["weights"]) == 16 and (tmp_path / "f.png").exists()
    assert result["accuracy"] > 0.5


def test_dashboard_example_draws_the_same_dashboard_in_both_packages(tmp_path):
    result = _load("dashboard.py")["main"](steps=20, depth=4, log_every=5, path=str(tmp_path / "t.png"), jax_path=str(tmp_path / "j.png"))
    assert (tmp_path / "t.png").read_bytes()[:4] == (tmp_path / "j.png").read_bytes()[:4] == b"\x89PNG"
    assert [len(v) for v in result["curves"].values()] == [4, 4]
    # torch 0 / 1.wrapped_modules.{i} / 1.skip_layers.{i} are Flax layers_0 / layers_1/layers_{i} / layers_1/skip_layers_{i}.
    renamed = {
        re.sub(r"^1\.(wrapped_modules|skip_layers)\.", lambda m: "layers_1/" + ("skip_" if m[1] == "skip_layers" else "") + "layers_",
               re.sub(r"^(\d)$", r"layers_\1", name)): norm
        for name, norm in result["norms"].items()
    }
    assert sorted(renamed) == sorted(result["jax_norms"])
    np.testing.assert_allclose([result["jax_norms"][n] for n in renamed], list(renamed.values()), rtol=1e-4, atol=1e-7)
    assert renamed["layers_1/skip_layers_0"] == 0.0  # a window of one state has nothing to learn


def test_cnn_example_trains_mhc_blocks_and_runs_them_in_jax():
    result = _load("cnn_mhc.py")["main"](steps=25, batch=32)
    assert result["final_loss"] < result["initial_loss"]
    if result["source"] == "scikit-learn digits":
        assert result["accuracy"] > 0.2  # ten classes: chance is 0.1
    assert result["difference"] < 1e-4  # the converted Flax twin computes the same logits
    weights = result["weights"]
    assert [len(w) for w in weights.values()] == [1, 2, 3, 3]  # the shared window fills up to H = 3
    for w in weights.values():
        np.testing.assert_allclose(w.sum(), 1.0, atol=1e-5)


def test_gpt_on_residual_streams_trains_in_flax_and_runs_the_same_in_torch():
    # Both examples in their smoke mode; the torch one takes the trained Flax model.
    flax_result = _load("gpt_streams_flax.py")["main"](smoke=True)
    history = flax_result["history"]
    assert flax_result["final_loss"] < history[0]["loss"] - 0.5  # the loss goes down
    # Doubly stochastic mixing: composite gain 1, and the diagnosis is clean.
    assert abs(history[-1]["streams/blocks/composite_forward_gain"] - 1) < 1e-3 and flax_result["warnings"] == []
    result = _load("gpt_streams_torch.py")["main"](smoke=True, flax_result=flax_result)
    # The tolerance of docs/parity.md for stacks of framework kernels (LayerNorm, GELU, softmax).
    assert result["difference"] / max(1.0, result["logit_scale"]) < 1e-4
    assert np.isfinite(result["losses"]).all() and result["val_loss"] < np.log(len(flax_result["vocab"]))
