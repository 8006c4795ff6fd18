"""Presets and explicit configuration, both packages: the options build working
stacks, the TOML table reads the same in both, and nothing is a global."""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mhc_jax
import mhc_torch
from tests.backends import flax_options

NAMES = ("stable", "aggressive", "research")


@pytest.mark.parametrize("name", NAMES)
def test_preset_builds_both_stacks_with_its_options(name):
    options = mhc_torch.get_preset(name)
    stack = mhc_torch.MHCSequential([torch.nn.Linear(3, 3) for _ in range(2)], **options)
    for skip in stack.skip_layers:
        for key in ("mode", "constraint", "epsilon", "temperature"):
            assert getattr(skip, key) == options[key]
    assert torch.isfinite(stack(torch.randn(2, 3))).all()

    flax = mhc_jax.get_preset(name)
    assert flax == flax_options(options)  # the same values, init spelled mixing_init
    model = mhc_jax.MHCSequential([nn.Dense(3) for _ in range(2)], **flax)
    x = jnp.ones((2, 3))
    assert jnp.isfinite(model.apply(model.init(jax.random.key(0), x), x)).all()


def test_stable_keeps_the_latest_weight_above_epsilon():
    # What "stable" promises: the latest state keeps at least epsilon of the weight,
    # whatever the logits learn.
    options = mhc_torch.get_preset("stable")
    logits = torch.randn(64, 4) * 10
    w = mhc_torch.window_weights(
        logits, 4, **{k: options[k] for k in ("mode", "constraint", "temperature", "epsilon")}
    )
    assert (w[:, -1] >= options["epsilon"] - 1e-6).all()


def test_presets_are_the_seed_packages():
    seed = pytest.importorskip("mhc.presets", reason="the mhc package (read for compatibility) is not installed")
    for name in NAMES:
        assert mhc_torch.get_preset(name) == seed.get_preset(name)


@pytest.mark.parametrize("lib", [mhc_torch, mhc_jax], ids=["torch", "jax"])
def test_get_preset_errors_and_copies(lib):
    assert lib.get_preset("STABLE") == lib.get_preset("stable")
    lib.get_preset("stable")["epsilon"] = 0.5  # a copy: the preset itself is unchanged
    assert lib.get_preset("stable")["epsilon"] == 0.1
    for bad in ("fast", None, 3):
        with pytest.raises(ValueError) as err:
            lib.get_preset(bad)
        assert all(name in str(err.value) for name in NAMES) and repr(bad) in str(err.value)


TOML = """
[project]
name = "someone-elses-project"

[tool.mhc]
max_history = 6
constraint = "identity"
epsilon = 0.05
temperature = 1.5
init = "uniform"
detach_history = true
"""


def test_toml_table_configures_both_packages(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text(TOML)
    for lib in (mhc_torch, mhc_jax):
        config = lib.load_config_from_toml(path)
        assert (config.max_history, config.constraint, config.epsilon, config.temperature) == (6, "identity", 0.05, 1.5)
        assert (config.init, config.detach_history, config.mode) == ("uniform", True, "mhc")  # mode: the default

    options = mhc_torch.load_config_from_toml(str(path)).sequential_options()
    stack = mhc_torch.MHCSequential([torch.nn.Linear(3, 3)], **options)
    assert stack.max_history == 6 and stack.history_buffer.detach_history
    assert stack.skip_layers[0].constraint == "identity" and stack.skip_layers[0].temperature == 1.5
    assert torch.equal(stack.skip_layers[0].mixing_logits.detach(), torch.zeros(6))  # init="uniform"

    flax = mhc_jax.load_config_from_toml(path).sequential_options()
    assert flax == flax_options(options)
    model = mhc_jax.MHCSequential([nn.Dense(3)], **flax)
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    np.testing.assert_array_equal(params["params"]["skip_layers_0"]["mixing_logits"], np.zeros(6))


@pytest.mark.parametrize("lib", [mhc_torch, mhc_jax], ids=["torch", "jax"])
def test_toml_errors_name_the_option(lib, tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.mhc]\nmax_history = 4\nwindow = 3\n")
    with pytest.raises(lib.ConfigError, match=r"'window'.*max_history") as err:
        lib.load_config_from_toml(path)
    # The mhc package raised TypeError for an unknown key: old except clauses still catch it.
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)
    path.write_text("[tool.mhc]\nmax_history = 0\n")
    with pytest.raises(ValueError, match="max_history must be an int >= 1, got 0"):
        lib.load_config_from_toml(path)
    path.write_text('[tool.mhc]\nhistory_scope = "layer"\n')
    with pytest.raises(ValueError, match="history_scope.*'layer'"):
        lib.load_config_from_toml(path)
    path.write_text('[tool.mhc]\ndetach_history = "yes"\n')
    with pytest.raises(TypeError, match="detach_history"):
        lib.load_config_from_toml(path)
    path.write_text("[tool.other]\nx = 1\n")
    assert lib.load_config_from_toml(path) == lib.MHCConfig() == lib.get_default_config()
    with pytest.raises(FileNotFoundError):
        lib.load_config_from_toml(tmp_path / "missing.toml")


@pytest.mark.parametrize("lib", [mhc_torch, mhc_jax], ids=["torch", "jax"])
def test_no_global_default(lib):
    changed = lib.MHCConfig(max_history=7)
    with pytest.raises(NotImplementedError, match="sequential_options"):
        lib.set_default_config(changed)
    assert lib.get_default_config() == lib.MHCConfig()
    with pytest.raises(AttributeError):
        lib.get_default_config().max_history = 7


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_config_defaults_are_the_classes_defaults():
    # A default MHCConfig must build what the classes build without options.
    config = mhc_torch.MHCConfig()
    stack_defaults = _defaults(mhc_torch.MHCSequential)
    for key, value in config.sequential_options().items():
        assert stack_defaults[key] == value, key
    inject = config.inject_options()
    inject_defaults = _defaults(mhc_torch.inject_mhc)
    for key in ("max_history", "history_scope", "clear_on_forward"):
        assert inject_defaults[key] == inject[key], key
    flax_defaults = {f.name: f.default for f in mhc_jax.MHCSequential.__dataclass_fields__.values()}
    for key, value in mhc_jax.MHCConfig().sequential_options().items():
        assert flax_defaults[key] == value, key


def test_config_options_for_inject_and_their_limits():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    config = mhc_torch.MHCConfig(history_scope="module", temperature=2.0)
    mhc_torch.inject_mhc(model, torch.nn.Linear, **config.inject_options())
    assert model[0].history is not model[1].history and model[1].skip.temperature == 2.0
    with pytest.raises(ValueError, match="detach_history"):
        mhc_torch.MHCConfig(detach_history=True).inject_options()
    with pytest.raises(ValueError, match="history="):
        mhc_jax.MHCConfig(clear_history_each_forward=False).sequential_options()
