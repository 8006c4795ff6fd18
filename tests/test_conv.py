"""Properties of the convolutional layers, ``mhc_torch.conv`` (NCHW) and ``mhc_jax.conv`` (NHWC).

The skip's part of a layer's output, ``out - y`` (``y`` the convolution or the
block's branch), must equal the window mixed by the equation of
docs/mathematics.md computed here in numpy: weights from a numpy projection
of the last ``K`` logits, every state subsampled with the stride ``ceil(S/T)``
and mapped by its channel map. Torch runs the properties over hypothesis'
examples; JAX, whose eager dispatch compiles every new shape, runs fixed
examples of the same properties.
"""

from __future__ import annotations

import functools
import inspect

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mhc_jax
import mhc_jax.conv
import mhc_torch
import mhc_torch.conv
from mhc_jax.convert import ConversionError
from mhc_torch import HistoryBuffer
from mhc_torch.convert import to_flax

CONV_MODULES = [mhc_torch.conv, mhc_jax.conv]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- numpy reference --------------------------------------------------------------


def _simplex64(z: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the simplex (sort and threshold), in float64."""
    u = np.sort(z)[::-1]
    css = np.cumsum(u) - 1
    k = np.nonzero(u - css / np.arange(1, len(z) + 1) > 0)[0][-1]
    return np.maximum(z - css[k] / (k + 1), 0)


def _weights64(logits: np.ndarray, k: int, mode: str, tau: float) -> np.ndarray:
    z = np.asarray(logits[len(logits) - k :], np.float64) / tau
    if mode == "hc":
        e = np.exp(z - z.max())
        return e / e.sum()
    return _simplex64(z)


def _mixed_window64(window, size, alpha, maps) -> np.ndarray:
    """``sum_k alpha_k P(D(h_k))`` for NCHW numpy states; ``maps[c]`` the ``(out, c)``
    channel map of states with ``c`` channels (absent: the identity)."""
    total = 0.0
    for a, h in zip(alpha, window, strict=True):
        s1, s2 = _ceil_div(h.shape[2], size[0]), _ceil_div(h.shape[3], size[1])
        d = np.asarray(h, np.float64)[:, :, ::s1, ::s2]
        if h.shape[1] in maps:
            d = np.einsum("oc,nchw->nohw", np.asarray(maps[h.shape[1]], np.float64), d)
        total = total + a * d
    return total


# --- resampling --------------------------------------------------------------------


@given(size=st.integers(1, 40), strides=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       kernel=st.sampled_from([1, 3, 5]), dilation=st.integers(1, 2))
def test_states_fit_after_any_chain_of_size_keeping_strided_convolutions(size, strides, kernel, dilation):
    t = size
    for s in strides:  # torch's Conv2d output size, padding dilation * (kernel - 1) / 2
        pad = dilation * (kernel - 1) // 2
        t = (t + 2 * pad - dilation * (kernel - 1) - 1) // s + 1
    for module in CONV_MODULES:
        found = module.resample_strides((size, size), (t, t))
        assert found is not None and all(_ceil_div(size, s) == t for s in found)


@given(s_in=st.integers(1, 30), s_out=st.integers(1, 30))
def test_a_stride_is_found_exactly_when_one_exists(s_in, s_out):
    exists = any(_ceil_div(s_in, s) == s_out for s in range(1, s_in + 1))
    for module in CONV_MODULES:
        found = module.resample_strides((s_in,), (s_out,))
        assert (found is not None) == exists
        if found is not None:
            assert _ceil_div(s_in, found[0]) == s_out


@pytest.mark.parametrize("size, target", [((7, 8), (4, 4)), ((8, 8), (2, 8)), ((5, 5), (5, 5))])
def test_resampling_reads_what_a_strided_1x1_convolution_reads(size, target):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 3, *size)).astype(np.float32)
    strides = mhc_torch.conv.resample_strides(size, target)
    eye = np.eye(3, dtype=np.float32)
    expected = F.conv2d(torch.from_numpy(h), torch.from_numpy(eye[:, :, None, None]), stride=strides).numpy()
    np.testing.assert_array_equal(mhc_torch.conv.resample_state(torch.from_numpy(h), target).numpy(), expected)
    got = mhc_jax.conv.resample_state(jnp.asarray(np.moveaxis(h, 1, -1)), target)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(got), -1, 1), expected)


# --- torch: the skip adds the mixed window ----------------------------------------


@functools.cache
def _torch_layer(kind, stride, in_channels, out_channels, h, mode):
    # Built once per configuration (construction costs more than the forward);
    # each example draws its own logits.
    torch.manual_seed(0)
    options = dict(stride=stride, max_history=h, mode=mode, temperature=0.7)
    if kind == "conv":
        return mhc_torch.conv.MHCConv2d(in_channels, out_channels, 3, padding=1, **options).eval()
    cls = mhc_torch.conv.MHCBasicBlock if kind == "basic" else mhc_torch.conv.MHCBottleneck
    return cls(in_channels, out_channels, **options).eval()


def _maps(skip) -> dict[int, np.ndarray]:
    return {
        int(name.removeprefix("projection_from_")): m.weight.detach().numpy()
        for name, m in skip.named_children()
        if name.startswith("projection_from_")
    }


def _expected_torch(layer, y, window, relu):
    window = [h.detach().numpy() for h in window]
    skip = layer.skip
    if skip.mode == "residual":
        window, alpha = window[-1:], np.ones(1)
    else:
        window = window[-skip.max_history :]
        alpha = _weights64(skip.mixing_logits.detach().numpy(), len(window), skip.mode, skip.temperature)
    out = y.detach().numpy().astype(np.float64) + _mixed_window64(window, y.shape[2:], alpha, _maps(skip))
    return np.maximum(out, 0) if relu else out


@given(
    kind=st.sampled_from(["conv", "basic", "bottleneck"]),
    stride=st.integers(1, 2),
    in_channels=st.integers(1, 4),
    out_channels=st.integers(1, 4),
    h=st.integers(1, 4),
    mode=st.sampled_from(["residual", "hc", "mhc"]),
    older=st.integers(0, 3),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_torch_skip_adds_the_mixed_window(kind, stride, in_channels, out_channels, h, mode, older, shared, seed):
    rng = np.random.default_rng(seed)
    layer = _torch_layer(kind, stride, in_channels, out_channels, h, mode)
    if mode != "residual":
        with torch.no_grad():
            layer.skip.mixing_logits.copy_(torch.from_numpy(rng.normal(size=h).astype(np.float32)))
    x = torch.from_numpy(rng.normal(size=(2, in_channels, 4, 4)).astype(np.float32))
    # Older states: the image at twice the size, other channel counts.
    states = [torch.from_numpy(rng.normal(size=(2, 1 + i, 8, 8)).astype(np.float32)) for i in range(older)]
    history = None
    if shared:
        history = HistoryBuffer(8)
        for s in states + [x]:
            history.append(s)
    window = history.get() if shared else [x]
    with torch.no_grad():
        out = layer(x, history)
        if kind == "conv":
            y = layer.conv(x)
        elif kind == "basic":
            y = layer.bn2(layer.conv2(F.relu(layer.bn1(layer.conv1(x)))))
        else:
            y = F.relu(layer.bn2(layer.conv2(F.relu(layer.bn1(layer.conv1(x))))))
            y = layer.bn3(layer.conv3(y))
    assert out.shape == (2, out_channels * (4 if kind == "bottleneck" else 1), _ceil_div(4, stride), _ceil_div(4, stride))
    np.testing.assert_allclose(out.numpy(), _expected_torch(layer, y, window, kind != "conv"), rtol=1e-5, atol=1e-5)
    if shared:  # the output joined the window
        assert len(history) == min(len(window) + 1, 8) and history.get()[-1] is out


def test_torch_blocks_alone_are_resnet_blocks_with_a_1x1_strided_shortcut():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7)
    same = mhc_torch.conv.MHCBasicBlock(4, 4).eval()
    with torch.no_grad():
        y = same.bn2(same.conv2(F.relu(same.bn1(same.conv1(x)))))
        torch.testing.assert_close(same(x), F.relu(y + x), rtol=0, atol=1e-6)  # K = 1: weight 1 on x
        down = mhc_torch.conv.MHCBasicBlock(4, 8, stride=2).eval()
        y = down.bn2(down.conv2(F.relu(down.bn1(down.conv1(x)))))
        shortcut = F.conv2d(x, down.skip.projection_from_4.weight[:, :, None, None], stride=2)
        torch.testing.assert_close(down(x), F.relu(y + shortcut), rtol=1e-5, atol=1e-5)
    assert down(x).shape == (2, 8, 4, 4)
    bottleneck = mhc_torch.conv.MHCBottleneck(4, 2, stride=2)
    assert bottleneck(x).shape == (2, 8, 4, 4) and bottleneck.expansion == 4


def test_torch_width_changing_layers_own_their_shortcut_from_construction():
    # An optimizer built right after construction must see the shortcut's map.
    for layer in (
        mhc_torch.conv.MHCConv2d(3, 5, 3, padding=1),
        mhc_torch.conv.MHCBasicBlock(3, 5, stride=2),
        mhc_torch.conv.MHCBottleneck(3, 2),
    ):
        names = dict(layer.named_parameters())
        before = set(names)
        layer(torch.randn(1, 3, 4, 4))
        assert "skip.projection_from_3.weight" in before and set(dict(layer.named_parameters())) == before


def test_torch_calls_without_history_keep_no_state():
    torch.manual_seed(0)
    block = mhc_torch.conv.MHCBasicBlock(2, 2).eval()
    x = torch.randn(2, 2, 4, 4)
    first = block(x)
    block(torch.randn(3, 2, 4, 4))  # another batch, another batch size
    torch.testing.assert_close(block(x), first, rtol=0, atol=0)


def test_torch_detach_history_leaves_the_input_gradient_to_the_convolution():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    layer = mhc_torch.conv.MHCConv2d(3, 3, 3, padding=1, detach_history=True)
    layer(x).sum().backward()
    xc = x.detach().clone().requires_grad_(True)
    F.conv2d(xc, layer.conv.weight, layer.conv.bias, padding=1).sum().backward()
    torch.testing.assert_close(x.grad, xc.grad)


def test_torch_gradient_reaches_every_slot_of_a_shared_window():
    torch.manual_seed(0)
    layers = [mhc_torch.conv.MHCConv2d(2, 2, 3, padding=1, max_history=3, init="uniform") for _ in range(3)]
    history = HistoryBuffer(3)
    x = torch.randn(2, 2, 4, 4)
    for layer in layers:
        x = layer(x, history)
    x.square().sum().backward()
    assert (layers[-1].skip.mixing_logits.grad != 0).all()  # its window was full: K = H = 3


# --- JAX: the same properties on fixed examples -------------------------------------


def _flax_maps(params) -> dict[int, np.ndarray]:
    return {
        int(name.removeprefix("projection_from_")): np.asarray(value["kernel"]).T
        for name, value in params.items()
        if name.startswith("projection_from_")
    }


def _random_variables(template, rng) -> dict:
    """Values for a Flax template of shapes: weights around 0.3, batch norms
    with unit statistics and scale (what a fresh model has), random logits."""

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        if name == "mean":
            return np.zeros(leaf.shape, np.float32)
        return (0.3 * rng.normal(size=leaf.shape) + (name == "mixing_logits")).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, template)


def _jax_branch(module, x, kind):
    """The layer's ``y`` (before the skip), from its own submodules; batch norms evaluating."""
    if kind == "conv":
        return module.conv(x)
    ura = {"use_running_average": True}
    y = fnn.relu(module.bn1(module.conv1(x), **ura))
    if kind == "basic":
        return module.bn2(module.conv2(y), **ura)
    y = fnn.relu(module.bn2(module.conv2(y), **ura))
    return module.bn3(module.conv3(y), **ura)


@pytest.mark.parametrize("kind", ["conv", "basic", "bottleneck"])
def test_jax_skip_adds_the_mixed_window(kind):
    rng = np.random.default_rng(1)
    nchw = [rng.normal(size=shape).astype(np.float32) for shape in [(2, 1, 8, 8), (2, 3, 4, 4)]]
    window = [jnp.asarray(np.moveaxis(a, 1, -1)) for a in nchw]
    x = window[-1]
    if kind == "conv":
        layer = mhc_jax.conv.MHCConv2d(3, 4, 3, stride=2, padding=1, max_history=3, mode="hc", temperature=0.7)
    else:
        cls = mhc_jax.conv.MHCBasicBlock if kind == "basic" else mhc_jax.conv.MHCBottleneck
        layer = cls(3, 4, stride=2, max_history=3, temperature=0.7, use_running_average=True)
    # Shapes only, then one compiled call (eager Flax compiles every small operation).
    variables = _random_variables(jax.eval_shape(layer.init, jax.random.key(0), x, window), rng)

    @jax.jit
    def run(variables, x, window):
        def both(module, x, window):
            return module(x, window), _jax_branch(module, x, kind)

        return layer.apply(variables, x, window, method=both)

    (out, grown), y = run(variables, x, window)
    assert len(grown) == 3 and out.shape == (2, 2, 2, 16 if kind == "bottleneck" else 4)
    np.testing.assert_array_equal(grown[-1], out)
    y = np.moveaxis(np.asarray(y), -1, 1)
    skip = variables["params"]["skip"]
    alpha = _weights64(skip["mixing_logits"], 2, layer.mode, layer.temperature)
    expected = y + _mixed_window64(nchw, y.shape[2:], alpha, _flax_maps(skip))
    expected = expected if kind == "conv" else np.maximum(expected, 0)
    np.testing.assert_allclose(np.moveaxis(np.asarray(out), -1, 1), expected, rtol=1e-5, atol=1e-5)


def test_jax_block_alone_is_a_resnet_block():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, 4)).astype(np.float32))
    block = mhc_jax.conv.MHCBasicBlock(4, 4, use_running_average=True)
    variables = _random_variables(jax.eval_shape(block.init, jax.random.key(0), x), np.random.default_rng(3))

    @jax.jit
    def run(variables, x):
        def both(module, x):  # K = 1: weight 1 on x
            return module(x), fnn.relu(_jax_branch(module, x, "basic") + x)

        return block.apply(variables, x, method=both)

    out, plain = run(variables, x)
    np.testing.assert_allclose(out, plain, rtol=0, atol=1e-6)


# --- options and errors ----------------------------------------------------------


def _torch_classes():
    return mhc_torch.conv.MHCConv2d, mhc_torch.conv.MHCBasicBlock, mhc_torch.conv.MHCBottleneck


BAD_OPTIONS = [
    (dict(in_channels=0), ValueError, "in_channels must be an int >= 1, got 0"),
    (dict(out_channels=True), ValueError, "out_channels must be an int >= 1, got True"),
    (dict(stride=0), ValueError, "stride must be an int >= 1 or a pair of them, got 0"),
    (dict(stride=(2,)), ValueError, r"stride must be .* got \(2,\)"),
    (dict(mode="resnet"), ValueError, "mode must be one of"),
    (dict(max_history=0), ValueError, "max_history must be an int >= 1, got 0"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(detach_history="yes"), TypeError, "detach_history must be a bool"),
]
CONV_ONLY = [
    (dict(kernel_size=0), ValueError, "kernel_size must be an int >= 1 or a pair of them, got 0"),
    (dict(padding=-1), ValueError, "padding must be an int >= 0 or a pair of them, got -1"),
    (dict(dilation=0), ValueError, "dilation must be an int >= 1"),
    (dict(groups=3), ValueError, "groups must divide in_channels and out_channels, got groups=3"),
    (dict(bias="no"), TypeError, "bias must be a bool"),
]


def _construct(package, cls_name, overrides):
    kw = dict(in_channels=4, out_channels=4)
    if cls_name == "MHCConv2d":
        kw.update(kernel_size=3, padding=1)
    if package == "jax" and "init" in overrides:
        overrides = {"mixing_init": overrides.pop("init"), **overrides}
    return getattr(mhc_torch.conv if package == "torch" else mhc_jax.conv, cls_name)(**{**kw, **overrides})


@pytest.mark.parametrize("package", ["torch", "jax"])
@pytest.mark.parametrize("cls_name", ["MHCConv2d", "MHCBasicBlock", "MHCBottleneck"])
def test_bad_options_fail_at_construction_naming_the_value(package, cls_name):
    cases = BAD_OPTIONS + (CONV_ONLY if cls_name == "MHCConv2d" else [])
    for overrides, error, message in cases:
        with pytest.raises(error, match=message):
            _construct(package, cls_name, dict(overrides))


def test_bad_inputs_and_windows_fail_at_the_first_call_naming_them():
    conv = mhc_torch.conv.MHCConv2d(3, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"NCHW images with in_channels=3 .* got \(2, 4, 5, 5\)"):
        conv(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"got \(3, 5, 5\)"):
        conv(torch.randn(3, 5, 5))
    with pytest.raises(TypeError, match="history must be a HistoryBuffer .* got list"):
        conv(torch.randn(2, 3, 5, 5), [torch.randn(2, 3, 5, 5)])
    valid = mhc_torch.conv.MHCConv2d(3, 4, 3)  # no padding: 6x6 -> 4x4, no stride fits
    with pytest.raises(ValueError, match=r"history state 0 has shape \(2, 3, 6, 6\), which cannot be subsampled to the spatial size \(4, 4\)"):
        valid(torch.randn(2, 3, 6, 6))

    # Shapes only (jax.eval_shape): the errors come while tracing, with nothing compiled.
    key, x = jax.random.key(0), jnp.ones((2, 5, 5, 3))
    fconv = mhc_jax.conv.MHCConv2d(3, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"NHWC images with in_channels=3 .* got \(2, 3, 5, 5\)"):
        jax.eval_shape(fconv.init, key, jnp.ones((2, 3, 5, 5)))
    with pytest.raises(TypeError, match="list of arrays .* not a History"):
        jax.eval_shape(fconv.init, key, x, mhc_jax.History.create(x, 4))
    with pytest.raises(TypeError, match="history must be a list of arrays .* got dict"):
        jax.eval_shape(fconv.init, key, x, {})
    with pytest.raises(ValueError, match=r"\(2, 6, 6, 3\), which cannot be subsampled to the spatial size \(4, 4\)"):
        jax.eval_shape(mhc_jax.conv.MHCConv2d(3, 4, 3).init, key, jnp.ones((2, 6, 6, 3)))
    with pytest.raises(ValueError, match="needs use_running_average"):
        jax.eval_shape(mhc_jax.conv.MHCBasicBlock(3, 3).init, key, x)


def test_batch_norm_statistics_need_the_whole_flax_variables():
    block = mhc_torch.conv.MHCBasicBlock(2, 2)
    flax_block = mhc_jax.conv.MHCBasicBlock(2, 2)
    template = jax.eval_shape(lambda k: flax_block.init(k, jnp.ones((1, 3, 3, 2)), use_running_average=True), jax.random.key(0))
    converted = to_flax(block, template)
    assert set(converted) == {"params", "batch_stats"}
    np.testing.assert_array_equal(converted["batch_stats"]["bn1"]["var"], block.bn1.running_var.numpy())
    with pytest.raises(ConversionError, match="'bn1.running_mean' is a batch-norm running statistic"):
        to_flax(block, {"params": template["params"]})


# --- the seed library's signatures -------------------------------------------------


def test_constructors_take_the_seed_librarys_arguments():
    # Code written against mhc 0.5.5 (its docstring examples) runs unchanged.
    assert mhc_torch.conv.MHCConv2d(3, 8, kernel_size=3, padding=1, max_history=4)(torch.randn(2, 3, 6, 6)).shape == (2, 8, 6, 6)
    assert mhc_torch.conv.MHCBasicBlock(8, 8, stride=1)(torch.randn(2, 8, 6, 6)).shape == (2, 8, 6, 6)
    assert mhc_torch.conv.MHCBottleneck(32, 8, stride=1)(torch.randn(2, 32, 6, 6)).shape == (2, 32, 6, 6)
    assert mhc_torch.conv.MHCBasicBlock(8, 8, **mhc_torch.get_preset("stable")).skip.constraint == "identity"
    seed = pytest.importorskip("mhc.layers.conv_mhc", reason="the mhc package (read for compatibility) is not installed")
    for ours in _torch_classes():
        theirs = inspect.signature(getattr(seed, ours.__name__)).parameters
        mine = list(inspect.signature(ours).parameters)
        assert mine[: len(theirs)] == list(theirs), ours.__name__
