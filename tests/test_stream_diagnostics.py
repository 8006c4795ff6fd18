"""Residual-stream diagnostics of whole models, in both packages: every stack's
``h_res`` from one forward pass (extract_h_res), the logged metrics
(stream_monitor, jit-friendly in JAX) and diagnose(model=...)'s warnings
against the band and limits of docs/streams.md."""

from __future__ import annotations

import functools

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import mhc_jax
import mhc_torch
from mhc_jax.convert import stack_stream_params
from mhc_torch.stream_monitoring import _Recorder

WIDTH, BATCH, TOKENS = 4, 2, 3
#: ``mode="hc"`` with this ``b_res``: row sums 2.4, 1.9, 1.9 and column sums
#: 2.1, 2.1, 2.0 (so forward and backward gains differ), far from doubly
#: stochastic; the composite gain leaves [0.5, 2] at the first layer.
FAR_B_RES = np.eye(3) + np.array([[0.5, 0.5, 0.4], [0.3, 0.3, 0.3], [0.3, 0.3, 0.3]])


def composite_gains64(h_res) -> tuple[float, float]:
    """The whole stack's forward and backward gain, computed here from the
    definitions: P = h_res^(L) ... h_res^(1) per token, max absolute row
    (forward) and column (backward) sum over every token."""
    h = np.asarray(h_res, np.float64)
    h = h.reshape(h.shape[0], -1, h.shape[-2], h.shape[-1])
    forward = backward = 0.0
    for token in range(h.shape[1]):
        product = np.linalg.multi_dot([*h[::-1, token], np.eye(h.shape[-1])])
        forward = max(forward, np.abs(product).sum(axis=1).max())
        backward = max(backward, np.abs(product).sum(axis=0).max())
    return forward, backward


# --- models ------------------------------------------------------------------------


class TorchModel(nn.Module):
    """Two StreamSequential stacks, then a chain of two hyper-connections of their own."""

    def __init__(self, mode: str = "mhc", n: int = 3, sinkhorn_iterations: int = 20) -> None:
        super().__init__()
        options = dict(num_streams=n, mode=mode, sinkhorn_iterations=sinkhorn_iterations, dim=WIDTH)
        self.first = mhc_torch.StreamSequential([nn.Linear(WIDTH, WIDTH) for _ in range(3)], **options)
        self.second = mhc_torch.StreamSequential([nn.Linear(WIDTH, WIDTH) for _ in range(2)], **options)
        del options["dim"]
        self.chain = nn.ModuleList(mhc_torch.HyperConnection(WIDTH, nn.Linear(WIDTH, WIDTH), **options) for _ in range(2))
        self.n = n

    def forward(self, x):
        streams = mhc_torch.expand_streams(self.second(self.first(x)), self.n)
        for layer in self.chain:
            streams = layer(streams)
        return mhc_torch.reduce_streams(streams)


class FlaxChain(fnn.Module):
    options: dict

    @fnn.compact
    def __call__(self, streams):
        for i in range(2):
            streams = mhc_jax.HyperConnection(fnn.Dense(WIDTH), **self.options, name=f"layers_{i}")(streams)
        return streams


class FlaxModel(fnn.Module):
    """The same in Flax; ``scan=True`` runs the second stack scanned."""

    mode: str = "mhc"
    n: int = 3
    sinkhorn_iterations: int = 20
    scan: bool = False

    @fnn.compact
    def __call__(self, x):
        options = dict(num_streams=self.n, mode=self.mode, sinkhorn_iterations=self.sinkhorn_iterations)
        x = mhc_jax.StreamSequential([fnn.Dense(WIDTH) for _ in range(3)], **options, name="first")(x)
        second = [fnn.Dense(WIDTH)] * 2 if self.scan else [fnn.Dense(WIDTH) for _ in range(2)]  # scan: one block
        x = mhc_jax.StreamSequential(second, **options, scan=self.scan, name="second")(x)
        streams = FlaxChain(options, name="chain")(mhc_jax.expand_streams(x, self.n))
        return mhc_jax.reduce_streams(streams)


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(BATCH, TOKENS, WIDTH)).astype(np.float32)


def _torch(mode="mhc", b_res=None, **options):
    torch.manual_seed(0)
    model = TorchModel(mode, **options)
    if b_res is not None:
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, mhc_torch.HyperConnection):
                    layer.b_res.copy_(torch.as_tensor(b_res))
    return model


def _flax(mode="mhc", b_res=None, **options):
    """The unrolled model and its variables, ``b_res`` forced on every layer when given."""
    model = FlaxModel(mode, **options)
    variables = model.init(jax.random.key(0), _x())
    if b_res is not None:
        variables = jax.tree_util.tree_map_with_path(
            lambda path, v: jnp.broadcast_to(jnp.asarray(b_res, v.dtype), v.shape)
            if jax.tree_util.keystr(path).endswith("['b_res']") else v,
            variables,
        )
    return model, variables


# --- extract_h_res ------------------------------------------------------------------


def test_torch_h_res_of_each_stack_is_what_its_layers_computed():
    model, x = _torch(), torch.from_numpy(_x())
    h = mhc_torch.stream_monitoring.extract_h_res(model, x)
    assert list(h) == ["first", "second", "chain"]
    torch.testing.assert_close(h["first"], model.first.coefficients(x)[2], rtol=0, atol=0)
    y = model.first(x)
    torch.testing.assert_close(h["second"], model.second.coefficients(y)[2], rtol=0, atol=0)
    streams, expected = mhc_torch.expand_streams(model.second(y), 3), []
    for layer in model.chain:
        expected.append(layer.coefficients(streams)[2])
        streams = layer(streams)
    torch.testing.assert_close(h["chain"], torch.stack(expected), rtol=0, atol=0)
    assert not h["first"].requires_grad
    assert all(not layer._forward_pre_hooks for layer in model.modules())  # the hooks are gone


# --- stream_monitor -----------------------------------------------------------------


def _check_metrics(metrics: dict, h_res: dict, prefix: str, tolerance: float) -> None:
    for name, h in h_res.items():
        key = f"{prefix}/{name}" if name else prefix
        forward, backward = composite_gains64(h)
        assert metrics[f"{key}/composite_forward_gain"] == pytest.approx(forward, rel=tolerance)
        assert metrics[f"{key}/composite_backward_gain"] == pytest.approx(backward, rel=tolerance)
        depth = np.asarray(h).shape[0]
        assert {k for k in metrics if k.startswith(f"{key}/layer_")} == {
            f"{key}/layer_{i}/{what}" for i in range(depth) for what in (
                "forward_gain", "backward_gain", "composite_forward_gain", "composite_backward_gain", "sinkhorn_residual"
            )
        }
        last = f"{key}/layer_{depth - 1}/composite_forward_gain"
        assert metrics[last] == pytest.approx(metrics[f"{key}/composite_forward_gain"], rel=tolerance)


def test_torch_stream_monitor_reports_the_composite_gains_of_every_stack():
    # Gains far from 1 and unequal by direction, so a wrong product order or axis shows.
    model, x = _torch("hc", b_res=FAR_B_RES), torch.from_numpy(_x())
    metrics = mhc_torch.stream_monitoring.stream_monitor(model, prefix="p", per_layer=True)(x)
    h_res = {k: v.numpy() for k, v in mhc_torch.stream_monitoring.extract_h_res(model, x).items()}
    assert composite_gains64(h_res["first"])[0] > 3
    _check_metrics(metrics, h_res, "p", 1e-12)


def test_jax_h_res_and_metrics_under_jit_are_what_the_layers_computed():
    _, variables = _flax("hc", b_res=FAR_B_RES)
    # The same weights with the second stack scanned (its init is slow: built from the unrolled one).
    scanned = FlaxModel("hc", scan=True)
    params = dict(variables["params"], second=stack_stream_params(variables["params"]["second"]))
    x = jnp.asarray(_x())
    extract = functools.partial(mhc_jax.stream_monitoring.extract_h_res, scanned)
    monitor = mhc_jax.stream_monitoring.stream_monitor(scanned, prefix="p", per_layer=True)
    h_res, metrics = jax.jit(lambda v, x: (extract(v, x), monitor(v, x)))({"params": params}, x)

    assert set(h_res) == {"first", "second", "chain"}  # (jit returns dicts sorted by key)
    params, options = variables["params"], dict(num_streams=3, mode="hc")
    y = x
    for name, depth in (("first", 3), ("second", 2)):  # the unrolled stacks, on their own
        stack, p = mhc_jax.StreamSequential([fnn.Dense(WIDTH) for _ in range(depth)], **options), {"params": params[name]}
        np.testing.assert_allclose(h_res[name], stack.apply(p, y, method="coefficients")[2], atol=1e-6)
        y = stack.apply(p, y)
    streams, expected = mhc_jax.expand_streams(y, 3), []
    for i in range(2):
        layer, p = mhc_jax.HyperConnection(fnn.Dense(WIDTH), **options), {"params": params["chain"][f"layers_{i}"]}
        expected.append(layer.apply(p, streams, method="coefficients")[2])
        streams = layer.apply(p, streams)
    np.testing.assert_allclose(h_res["chain"], np.stack(expected), atol=1e-6)

    assert all(v.shape == () for v in metrics.values())
    assert composite_gains64(h_res["first"])[0] > 3
    _check_metrics({k: float(v) for k, v in metrics.items()}, h_res, "p", 1e-5)  # float32 products


# --- diagnose(model=...) -------------------------------------------------------------


def _diagnose(package: str, weights=None, **build):
    weights = {} if weights is None else weights
    if package == "torch":
        return mhc_torch.diagnose(weights, model=_torch(**build), inputs=torch.from_numpy(_x()))
    model, variables = _flax(**build)
    return mhc_jax.diagnose(weights, model=model, variables=variables, inputs=jnp.asarray(_x()))


@pytest.mark.parametrize("package", ["torch", "jax"])
@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_fresh_stacks_raise_no_warning(package, mode):
    assert _diagnose(package, mode=mode) == []


@pytest.mark.parametrize("package", ["torch", "jax"])
def test_hc_stacks_forced_far_from_doubly_stochastic_get_a_gain_warning(package):
    warnings = _diagnose(package, mode="hc", b_res=FAR_B_RES)
    gains = [w for w in warnings if w.kind == "gain"]
    named = {w.layers for w in gains}
    assert named == {("first",), ("second",), ("chain",)} and len(gains) == 6  # forward and backward each
    assert all("use mode='mhc'" in w.message and "outside [0.5, 2]" in w.message for w in gains)
    assert not any(w.kind == "sinkhorn" for w in warnings)  # hc's h_res is not meant to be doubly stochastic


@pytest.mark.parametrize("package", ["torch", "jax"])
def test_truncated_sinkhorn_gets_a_sinkhorn_warning(package):
    # Nearly permutation logits and a single sweep: the columns stay far from 1.
    b_res = 6.0 * np.array([[0, 1, 0], [0, 0, 1], [0, 1, 0]], np.float32)
    warnings = _diagnose(package, mode="mhc", b_res=b_res, sinkhorn_iterations=1)
    sinkhorn = [w for w in warnings if w.kind == "sinkhorn"]
    assert sinkhorn and all("raise sinkhorn_iterations" in w.message for w in sinkhorn)


@pytest.mark.parametrize("package", ["torch", "jax"])
def test_history_warnings_are_kept_beside_the_stream_warnings(package):
    warnings = _diagnose(package, {"skip": np.array([0.0, 0.005, 0.995])}, mode="hc", b_res=FAR_B_RES)
    assert {"saturation", "gain"} <= {w.kind for w in warnings}


def test_a_model_without_its_inputs_is_an_error_naming_them():
    with pytest.raises(ValueError, match="inputs=None"):
        mhc_torch.diagnose({}, model=_torch())
    model, variables = _flax()
    with pytest.raises(ValueError, match="variables=NoneType"):
        mhc_jax.diagnose({}, model=model, inputs=jnp.asarray(_x()))


# --- torch.compile ---------------------------------------------------------------------


def test_recorder_hooks_are_traced_by_torch_compile():
    torch.manual_seed(0)
    layer = mhc_torch.HyperConnection(WIDTH, nn.Linear(WIDTH, WIDTH), num_streams=2)
    recorder = _Recorder(layer)  # before the first compiled call, as the Lightning callback does
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    streams = torch.randn(BATCH, 2, WIDTH)
    compiled(streams).sum().backward()
    assert recorder.captured == {}  # inactive: nothing kept
    recorder.start()
    compiled(streams).sum().backward()
    (stack, mode, h_res), = recorder.captured.values()
    torch.testing.assert_close(h_res, layer.coefficients(streams)[2], rtol=0, atol=0)
    recorder.remove()
