"""Weight conversion between torch state_dicts and Flax parameters, both ways."""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import mhc_jax
import mhc_torch
from mhc_jax.convert import ConversionError, flax_to_torch, stack_layer_params, torch_to_flax, unstack_layer_params
from mhc_torch.convert import load_flax, to_flax
from tests.backends import to_channels_first, to_channels_last


class TorchLM(nn.Module):
    """Embedding -> MHCSequential of MLP blocks -> LayerNorm -> head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.stack = mhc_torch.MHCSequential(
            [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(3)], max_history=2, use_gating=True
        )
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, tokens):
        return self.head(self.norm(self.stack(self.embed(tokens))))


class FlaxLM(fnn.Module):
    """The same model; submodules named after the torch attributes."""

    def setup(self):
        self.embed = fnn.Embed(11, 8)
        self.stack = mhc_jax.MHCSequential(
            [fnn.Sequential([fnn.Dense(16), jax.nn.relu, fnn.Dense(8)]) for _ in range(3)], max_history=2, use_gating=True
        )
        self.norm = fnn.LayerNorm(epsilon=1e-5, use_fast_variance=False)
        self.head = fnn.Dense(5)

    def __call__(self, tokens):
        return self.head(self.norm(self.stack(self.embed(tokens))))


def _tokens():
    return np.random.default_rng(0).integers(0, 11, (2, 7))


def test_a_torch_model_runs_the_same_in_flax_and_back():
    torch.manual_seed(0)
    tmodel = TorchLM()
    with torch.no_grad():
        for skip in tmodel.stack.skip_layers:
            skip.mixing_logits.normal_()
    tokens = _tokens()
    template = FlaxLM().init(jax.random.key(0), tokens)
    params = to_flax(tmodel, template)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, template)
    expected = tmodel(torch.from_numpy(tokens)).detach().numpy()
    np.testing.assert_allclose(FlaxLM().apply(params, tokens), expected, atol=1e-5)

    back = TorchLM()
    load_flax(back, params)
    for key, value in tmodel.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)


def test_a_flax_model_runs_the_same_in_torch():
    tokens = _tokens()
    params = FlaxLM().init(jax.random.key(3), tokens)
    tmodel = load_flax(TorchLM(), params)
    np.testing.assert_allclose(
        tmodel(torch.from_numpy(tokens)).detach().numpy(), FlaxLM().apply(params, tokens), atol=1e-5
    )


def test_conv_kernels_move_between_oihw_and_hwio():
    torch.manual_seed(1)
    tmodel = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, (1, 3), padding=(0, 1)))
    fmodel = fnn.Sequential([fnn.Conv(4, (3, 3), padding=1), jax.nn.relu, fnn.Conv(2, (1, 3), padding=((0, 0), (1, 1)))])
    x = np.random.default_rng(1).normal(size=(2, 3, 5, 6)).astype(np.float32)  # NCHW
    params = to_flax(tmodel, fmodel.init(jax.random.key(0), to_channels_last(x)))
    assert params["params"]["layers_0"]["kernel"].shape == (3, 3, 3, 4)  # HWIO
    out = to_channels_first(np.asarray(fmodel.apply(params, to_channels_last(x))))
    np.testing.assert_allclose(out, tmodel(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_lazily_built_auto_project_maps_travel_both_ways():
    fmodel = mhc_jax.MHCSequential([fnn.Dense(8), fnn.Dense(3)], auto_project=True)
    x = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)
    params = fmodel.init(jax.random.key(0), x)
    tmodel = mhc_torch.MHCSequential([nn.Linear(6, 8), nn.Linear(8, 3)], auto_project=True)
    assert not any("projection" in k for k in tmodel.state_dict())  # not built before a forward
    load_flax(tmodel, params)
    assert tmodel.skip_layers[1].projection_from_8.weight.shape == (3, 8)
    np.testing.assert_allclose(tmodel(torch.from_numpy(x)).detach().numpy(), fmodel.apply(params, x), atol=1e-5)
    round_trip = to_flax(tmodel, params)
    for a, b in zip(jax.tree.leaves(round_trip), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("depth, h", [(1, 4), (6, 2), (7, 3)])
def test_stacking_for_the_scanned_layout_round_trips(depth, h):
    block = fnn.Sequential([fnn.Dense(4), jnp.tanh])
    unrolled = mhc_jax.MHCSequential([block.copy() for _ in range(depth)], max_history=h)
    x = jnp.ones((2, 4))
    params = unrolled.init(jax.random.key(0), x)
    stacked = stack_layer_params(params, h)
    scanned = mhc_jax.MHCSequential.scanned(block, depth, max_history=h)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, scanned.init(jax.random.key(0), x))
    for a, b in zip(jax.tree.leaves(unstack_layer_params(stacked, h)), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_layers_of_unknown_layout_are_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4))
    with pytest.raises(ConversionError, match=r"cannot convert 1 \(GroupNorm, holding 1.weight, 1.bias\)"):
        to_flax(model, {})


def test_keys_without_a_counterpart_are_named():
    template = fnn.Sequential([fnn.Dense(4)]).init(jax.random.key(0), jnp.ones((1, 4)))
    with pytest.raises(ConversionError, match=r"torch parameter '1.weight' has no Flax counterpart"):
        torch_to_flax(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).state_dict(), template)
    with pytest.raises(ConversionError, match=r"Flax parameter layers_1/kernel has no value in the torch state_dict"):
        two = fnn.Sequential([fnn.Dense(4), fnn.Dense(4)]).init(jax.random.key(0), jnp.ones((1, 4)))
        torch_to_flax(nn.Sequential(nn.Linear(4, 4)).state_dict(), two)
    with pytest.raises(ConversionError, match=r"Flax parameter layers_1/kernel has no counterpart in the torch state_dict"):
        flax_to_torch(two, nn.Sequential(nn.Linear(4, 4)).state_dict())


def test_shapes_that_do_not_fit_name_both():
    template = fnn.Sequential([fnn.Dense(3)]).init(jax.random.key(0), jnp.ones((1, 4)))
    with pytest.raises(ConversionError, match=r"'0.weight' of shape \(5, 4\) does not fit Flax layers_0/kernel of shape \(4, 3\)"):
        torch_to_flax(nn.Sequential(nn.Linear(4, 5)).state_dict(), template)
