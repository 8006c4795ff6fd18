"""The training dashboard, in both packages: history contributions and gradient
norms equal the quantities computed independently (the skip's own mix, the norm
of each layer's gradients), the figures plot those numbers and save PNGs, and
bad input is refused with a clear error."""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mhc_jax
import mhc_torch

DASHBOARDS = [mhc_jax.dashboard, mhc_torch.dashboard]
BOTH = pytest.mark.parametrize("dash", DASHBOARDS, ids=["jax", "torch"])
PNG = b"\x89PNG\r\n\x1a\n"
#: Windows of 1 to 4 states, as a 4-layer stack with max_history=4 mixes them,
#: one layer with exact zeros (mode="mhc").
WEIGHTS = {
    "stack.skip_layers.0": np.array([1.0]),
    "stack.skip_layers.1": np.array([0.3, 0.7]),
    "stack.skip_layers.2": np.array([0.1, 0.2, 0.7]),
    "stack.skip_layers.3": np.array([0.5, 0.0, 0.25, 0.25]),
}
#: A dead layer (zero gradient) and a diverged one: both drawn as markers.
NORMS = {"embed": 0.5, "stack.layers.0": 2e-3, "stack.layers.1": 0.0, "stack.skip_layers.1": float("nan"), "head": 3.0}


def _right_aligned(w: np.ndarray, width: int) -> np.ndarray:
    """The window's weights in the last len(w) of width slots, zeros before."""
    return np.concatenate([np.zeros(width - len(w)), w])


# --- history contributions ---------------------------------------------------------------


@BOTH
@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_contributions_are_each_layers_weights_latest_last(dash, sizes, seed):
    rng = np.random.default_rng(seed)
    weights = {f"layer {i}": rng.dirichlet(np.ones(k)) if k else np.zeros(0) for i, k in enumerate(sizes)}
    shares = dash.history_contributions(weights)
    width = max(sizes)
    assert shares.shape == (len(sizes), width)
    for row, (k, w) in enumerate(zip(sizes, weights.values())):
        np.testing.assert_array_equal(shares[row, width - k :], w)
        assert not shares[row, : width - k].any()  # slots the window lacks supply nothing
        assert shares[row].sum() == pytest.approx(1.0 if k else 0.0)


def test_torch_contributions_are_each_slots_share_of_the_skips_mix():
    # out - x = sum_k alpha_k h_k: the contributions times the window's states
    # must rebuild the mix the skip actually added.
    torch.manual_seed(0)
    skip = mhc_torch.MHCSkip(max_history=4, mode="mhc", init="uniform")
    with torch.no_grad():
        skip.mixing_logits.normal_()
    x, states = torch.randn(2, 5), [torch.randn(2, 5) for _ in range(3)]
    mix = (skip(x, states) - x).detach().numpy()
    (shares,) = mhc_torch.history_contributions(mhc_torch.extract_mixing_weights(skip))
    np.testing.assert_allclose(np.einsum("k,kbd->bd", shares, torch.stack(states).numpy()), mix, atol=1e-6)


def test_jax_contributions_are_each_slots_share_of_the_skips_mix():
    skip = mhc_jax.MHCSkip(max_history=4, mode="mhc", mixing_init="uniform")
    rng = np.random.default_rng(0)
    x, states = rng.normal(size=(2, 5)).astype(np.float32), rng.normal(size=(3, 2, 5)).astype(np.float32)
    params = {"params": {"mixing_logits": rng.normal(size=4).astype(np.float32)}}
    mix = np.asarray(skip.apply(params, x, list(states))) - x
    (shares,) = mhc_jax.history_contributions(mhc_jax.extract_mixing_weights({"skip": params["params"]}, skip, num_states=3))
    np.testing.assert_allclose(np.einsum("k,kbd->bd", shares, states), mix, atol=1e-6)


# --- gradient norms -----------------------------------------------------------------------


def _torch_model(depth: int = 3) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(4, 4), nn.Softsign()) for _ in range(depth)]
    return nn.Sequential(nn.Linear(3, 4), mhc_torch.MHCSequential(layers, max_history=3, init="uniform"), nn.Linear(4, 1))


def test_torch_gradient_norms_are_each_modules_gradient_norm():
    model = _torch_model()
    model[0].bias.requires_grad_(False)  # frozen: no gradient, left out
    model(torch.randn(8, 3)).square().mean().backward()
    expected = {}
    for name, module in model.named_modules():
        grads = [p.grad.flatten() for p in module.parameters(recurse=False) if p.grad is not None]
        if grads:
            expected[name] = torch.linalg.norm(torch.cat(grads).double()).item()
    norms = mhc_torch.gradient_norms(model)
    assert list(norms) == list(expected)  # the model's order
    np.testing.assert_allclose(list(norms.values()), list(expected.values()), rtol=1e-12)
    assert norms["0"] == pytest.approx(torch.linalg.norm(model[0].weight.grad.double()).item())
    # level=2: every parameter under the stack's layer list or its skips, together.
    grouped = mhc_torch.gradient_norms(model, level=2)
    assert list(grouped) == ["0", "1.wrapped_modules", "1.skip_layers", "2"]
    skips = torch.cat([s.mixing_logits.grad for s in model[1].skip_layers]).double()
    assert grouped["1.skip_layers"] == pytest.approx(torch.linalg.norm(skips).item(), rel=1e-12)


def test_torch_gradient_norms_need_a_backward_pass_and_a_module():
    with pytest.raises(ValueError, match=r"call loss.backward\(\) before gradient_norms"):
        mhc_torch.gradient_norms(_torch_model())
    with pytest.raises(TypeError, match="takes a torch.nn.Module, got dict"):
        mhc_torch.gradient_norms({"a": 1.0})


def _jax_grads(model, params, x):
    return jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(model.apply(p, x)))))(params)


def test_jax_gradient_norms_are_each_layers_gradient_norm_scanned_or_not():
    depth, h = 4, 3  # scanned: one chunk of 3 layers and a tail of 1
    x = np.random.default_rng(1).normal(size=(4, 2)).astype(np.float32)
    unrolled = mhc_jax.MHCSequential([fnn.Dense(2) for _ in range(depth)], max_history=h, mixing_init="uniform")
    params = jax.jit(unrolled.init)(jax.random.key(0), x)
    grads = _jax_grads(unrolled, params, x)
    norms = mhc_jax.gradient_norms(grads, level=1)
    names = [f"layers_{i}" for i in range(depth)] + [f"skip_layers_{i}" for i in range(depth)]
    assert list(norms) == names
    for name in names:
        leaves = jax.tree_util.tree_leaves(grads["params"][name])
        expected = np.linalg.norm(np.concatenate([np.asarray(g, np.float64).ravel() for g in leaves]))
        assert norms[name] == pytest.approx(expected, rel=1e-12), name
    # Default: the module owning each leaf; the outer {"params": ...} is not part of the names.
    assert list(mhc_jax.gradient_norms(grads)) == names
    assert mhc_jax.gradient_norms(grads["params"]) == mhc_jax.gradient_norms(grads)
    # A scanned stack's gradients, unstacked as the docstring says: one entry per layer, the same norms.
    scanned = mhc_jax.MHCSequential.scanned(fnn.Dense(2), depth, max_history=h, mixing_init="uniform")
    scanned_grads = _jax_grads(scanned, mhc_jax.convert.stack_layer_params(params, h), x)
    per_layer = mhc_jax.gradient_norms(mhc_jax.convert.unstack_layer_params(scanned_grads, h), level=1)
    assert list(per_layer) == names
    np.testing.assert_allclose(list(per_layer.values()), list(norms.values()), rtol=1e-5)


def test_jax_gradient_norms_come_in_numeric_order():
    # A gradient pytree's dicts are sorted by key (layers_10 before layers_2).
    grads = {f"layers_{i}": {"Dense_0": {"kernel": np.full(2, float(i))}} for i in (10, 2, 1, 0)}
    norms = mhc_jax.gradient_norms(jax.tree_util.tree_map(jnp.asarray, grads))
    assert list(norms) == ["layers_0/Dense_0", "layers_1/Dense_0", "layers_2/Dense_0", "layers_10/Dense_0"]
    assert norms["layers_10/Dense_0"] == pytest.approx(10 * np.sqrt(2))


@pytest.mark.parametrize(
    "grads, level, error, message",
    [
        ({}, None, ValueError, "holds no arrays"),
        ({"layer": {"kernel": "oops"}}, None, TypeError, "grads must hold arrays, got str at 'layer/kernel'"),
        ({"layer": {"kernel": np.ones(2)}}, 0, ValueError, "level must be a positive int or None, got 0"),
    ],
)
def test_jax_gradient_norms_refuse_bad_input(grads, level, error, message):
    with pytest.raises(error, match=message):
        mhc_jax.gradient_norms(grads, level=level)


def test_torch_gradient_norms_refuse_a_bad_level():
    with pytest.raises(ValueError, match="level must be a positive int or None, got 1.5"):
        mhc_torch.gradient_norms(_torch_model(), level=1.5)


# --- figures --------------------------------------------------------------------------------


def _contribution_bars(ax) -> dict[str, np.ndarray]:
    """{slot label: bar widths, one per layer}."""
    return {bars.get_label(): np.array([p.get_width() for p in bars]) for bars in ax.containers}


@BOTH
def test_contribution_plot_draws_the_weights_as_stacked_bars(dash, tmp_path):
    path = tmp_path / "contributions.png"
    fig = dash.plot_history_contribution(WEIGHTS, path=str(path))
    assert path.read_bytes()[:8] == PNG
    bars = _contribution_bars(fig.axes[0])
    assert list(bars) == ["latest", "t-1", "t-2", "t-3"]  # latest first, so its share reads from 0
    for j, label in enumerate(["t-3", "t-2", "t-1", "latest"]):
        expected = [_right_aligned(w, 4)[j] for w in WEIGHTS.values()]
        np.testing.assert_allclose(bars[label], expected)
    # The stacked bars fill each layer's whole history mix.
    np.testing.assert_allclose(sum(bars.values()), 1.0)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0", "1", "2", "3"]
    assert fig.axes[0].get_ylabel() == "layer (stack.skip_layers.<n>)"


@BOTH
def test_gradient_flow_plot_draws_the_norms_and_marks_zero_and_non_finite(dash, tmp_path):
    path = tmp_path / "flow.png"
    fig = dash.plot_gradient_flow(NORMS, path=str(path))
    assert path.read_bytes()[:8] == PNG
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    heights = {int(round(p.get_x() + p.get_width() / 2)): p.get_height() for p in ax.patches}
    values = list(NORMS.values())
    assert heights == {i: v for i, v in enumerate(values) if np.isfinite(v)}
    markers = {line.get_label(): list(line.get_xdata()) for line in ax.lines if line.get_label() in ("zero gradient", "non-finite")}
    assert markers == {"zero gradient": [2], "non-finite": [3]}
    assert [t.get_text() for t in ax.get_xticklabels()] == list(NORMS)


@BOTH
def test_dashboard_draws_heatmap_contributions_flow_and_curves(dash, tmp_path):
    path = tmp_path / "dashboard.png"
    curves = {"loss": [2.0, 1.0, 0.5], "accuracy": [0.2, 0.6, 0.9]}
    fig = dash.create_training_dashboard(WEIGHTS, NORMS, path=str(path), curves=curves, curve_steps=[10, 20, 30])
    assert path.read_bytes()[:8] == PNG
    heatmap = next(ax for ax in fig.axes if ax.images)
    grid = np.ma.filled(heatmap.images[0].get_array(), np.nan)
    for row, w in enumerate(WEIGHTS.values()):
        np.testing.assert_array_equal(grid[row, 4 - len(w) :], w)
        assert np.isnan(grid[row, : 4 - len(w)]).all()
    assert any(ax.get_ylabel() == "mixing weight alpha" for ax in fig.axes)  # the colour bar
    by_title = {ax.get_title(): ax for ax in fig.axes}
    np.testing.assert_allclose(sum(_contribution_bars(by_title["history contribution per layer"]).values()), 1.0)
    flow = by_title["gradient flow"]
    assert sorted(p.get_height() for p in flow.patches) == sorted(v for v in NORMS.values() if np.isfinite(v))
    for name, values in curves.items():
        np.testing.assert_array_equal(by_title[name].lines[0].get_ydata(), values)
        np.testing.assert_array_equal(by_title[name].lines[0].get_xdata(), [10, 20, 30])
    assert fig.get_suptitle() == "mHC training dashboard"


@BOTH
def test_large_stacks_keep_their_axes_readable(dash):
    weights = {f"skip_layers.{i}": np.full(min(i + 1, 4), 1 / min(i + 1, 4)) for i in range(48)}
    fig = dash.create_training_dashboard(weights, {f"layers.{i}": 1.0 + i for i in range(96)})
    heatmap = next(ax for ax in fig.axes if ax.images)
    assert not heatmap.texts  # 48 rows: no per-cell numbers to overlap
    for ax in fig.axes:
        assert len(ax.get_yticklabels()) <= 48 and len(ax.get_xticklabels()) <= 48


BAD_INPUT = [
    ("plot_history_contribution", ({},), ValueError, "weights is empty"),
    ("plot_history_contribution", (np.ones(3),), TypeError, r"weights must be a mapping \{layer: weights\}"),
    ("plot_mixing_heatmap", ({"a": np.ones((2, 2))},), ValueError, r"weights\['a'\] must be 1-D .* got shape \(2, 2\)"),
    ("plot_gradient_flow", ({},), ValueError, "norms is empty"),
    ("plot_gradient_flow", ([1.0],), TypeError, r"norms must be a mapping \{layer: norm\}"),
    ("plot_gradient_flow", ({"a": -1.0},), ValueError, r"gradient norms are >= 0, got -1.0 for 'a'"),
    ("plot_gradient_flow", ({"a": np.ones(2)},), TypeError, r"norms\['a'\] must be one number"),
    ("create_training_dashboard", (WEIGHTS, {}), ValueError, "norms is empty"),
]


@BOTH
@pytest.mark.parametrize("name, args, error, message", BAD_INPUT, ids=[f"{b[0]}-{b[3][:20]}" for b in BAD_INPUT])
def test_plots_refuse_bad_input(dash, name, args, error, message):
    with pytest.raises(error, match=message):
        getattr(dash, name)(*args)


@BOTH
def test_dashboard_refuses_an_empty_curve_or_steps_that_do_not_match(dash):
    with pytest.raises(ValueError, match=r"curves\['loss'\] must be a non-empty 1-D sequence"):
        dash.create_training_dashboard(WEIGHTS, NORMS, curves={"loss": []})
    with pytest.raises(ValueError, match=r"curve_steps has 2 entries but curves\['loss'\] has 3"):
        dash.create_training_dashboard(WEIGHTS, NORMS, curves={"loss": [3.0, 2.0, 1.0]}, curve_steps=[1, 2])
