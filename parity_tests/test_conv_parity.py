"""The convolutional layers agree across packages after weight conversion, both ways.

Chains of ``MHCConv2d`` / ``MHCBasicBlock`` / ``MHCBottleneck`` (torch NCHW,
Flax NHWC), either each layer on its own window ``[x]`` or all sharing one
window (a ``HistoryBuffer`` in torch, a list in JAX), are built with the same
weights (converted torch -> Flax or Flax -> torch, batch-norm statistics
included) and compared: outputs, and gradients with respect to the input and
every parameter, in training mode (batch statistics) and in evaluation mode
(running statistics). The chains change channels and halve the image, so the
windows are resampled and channel-mapped.

Chains of convolutions alone are held to the stack tolerance of
docs/parity.md; blocks contain ReLU and batch norm, each framework's own
kernels, and are held to the "kernel" tolerance. The images are small (6x6,
at most 16 channels) so the convolutions' reductions stay short. The running
statistics a training step writes are compared with the one documented
difference: torch updates ``running_var`` with the unbiased batch variance.
"""

from __future__ import annotations

import flax.linen as fnn
import jax
import numpy as np
import pytest
import torch

import mhc_jax.conv
import mhc_torch.conv
from mhc_jax.convert import flax_to_torch
from mhc_torch import HistoryBuffer
from mhc_torch.convert import load_flax, to_flax
from parity_tests.parity import assert_parity
from tests.backends import flax_options, to_channels_first, to_channels_last


class TorchChain(torch.nn.Module):
    """Layers from ``spec`` (``(class name, options)`` pairs) run in order; with
    ``shared``, one window across them, else each on its own input."""

    def __init__(self, spec, shared: bool) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(getattr(mhc_torch.conv, name)(**dict(kw)) for name, kw in spec)
        self.depth = max(layer.skip.max_history for layer in self.layers)
        self.shared = shared

    def forward(self, x):
        history = HistoryBuffer(self.depth) if self.shared else None
        for layer in self.layers:
            x = layer(x, history)
        return x


class FlaxChain(fnn.Module):
    """The same chain in Flax (``layers_{i}``: the torch ``layers.{i}``)."""

    spec: tuple
    shared: bool

    @fnn.compact
    def __call__(self, x, train: bool):
        history = [] if self.shared else None
        for i, (name, kw) in enumerate(self.spec):
            layer = getattr(mhc_jax.conv, name)(**flax_options(dict(kw)), name=f"layers_{i}")
            norm = {} if name == "MHCConv2d" else {"use_running_average": not train}
            result = layer(x, history, **norm)
            x, history = result if self.shared else (result, None)
        return x


def _spec(*layers):
    return tuple((name, tuple(sorted(kw.items()))) for name, kw in layers)


CONVS = _spec(
    ("MHCConv2d", dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, max_history=3, init="uniform")),
    ("MHCConv2d", dict(in_channels=3, out_channels=3, kernel_size=3, stride=2, padding=1, max_history=3)),
    ("MHCConv2d", dict(in_channels=3, out_channels=4, kernel_size=1, max_history=3, mode="hc", bias=False)),
)
ODD_CONVS = _spec(
    ("MHCConv2d", dict(in_channels=2, out_channels=4, kernel_size=3, padding=1, groups=2, constraint="identity")),
    ("MHCConv2d", dict(in_channels=4, out_channels=4, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), max_history=2)),
    ("MHCConv2d", dict(in_channels=4, out_channels=2, kernel_size=3, padding=2, dilation=2, detach_history=True)),
)
BASIC = _spec(
    ("MHCBasicBlock", dict(in_channels=2, out_channels=3, max_history=2, mode="hc", constraint="identity")),
    ("MHCBasicBlock", dict(in_channels=3, out_channels=4, stride=2, max_history=2, init="uniform")),
    ("MHCBasicBlock", dict(in_channels=4, out_channels=4, mode="residual")),
)
BOTTLENECK = _spec(
    ("MHCBottleneck", dict(in_channels=2, out_channels=2, max_history=4, init="uniform")),
    ("MHCBottleneck", dict(in_channels=8, out_channels=4, stride=2, max_history=4, detach_history=True)),
)

#: (name, spec, shared window, training, torch first, tolerance kind)
CASES = [
    ("convs shared", CONVS, True, True, True, "stack"),
    ("grouped, strided, dilated convs alone", ODD_CONVS, False, True, False, "stack"),
    ("basic blocks, train", BASIC, True, True, True, "kernel"),
    ("basic blocks, eval", BASIC, True, False, False, "kernel"),
    ("bottlenecks, train", BOTTLENECK, True, True, False, "kernel"),
]

SHAPE = (2, 2, 6, 6)  # torch layout


def _randomise(tree: dict, rng, *, everything: bool) -> dict:
    """Move the logits off their init and give batch norms non-trivial values,
    so the comparison sees every weight and statistic matter; with
    ``everything``, also draw the kernels and biases (the Flax side's own
    weights, before they go to torch)."""
    out = {}
    for name, value in tree.items():
        shape = np.shape(value)
        if isinstance(value, dict):
            out[name] = _randomise(value, rng, everything=everything)
        elif name == "mixing_logits":
            out[name] = (np.asarray(value) + 0.3 * rng.normal(size=shape)).astype(np.float32)
        elif name in ("scale", "var"):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name in ("bias", "mean") or everything:
            out[name] = (0.3 * rng.normal(size=shape)).astype(np.float32)
        else:
            out[name] = np.asarray(value)
    return out


def _build(spec, shared, torch_first, seed, device):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    x = rng.normal(size=SHAPE).astype(np.float32)
    tmodel = TorchChain(spec, shared).to("cuda" if device == "gpu" else "cpu")
    with torch.no_grad():  # create the lazily built channel maps (evaluation: no statistics move)
        out_shape = tmodel.eval()(torch.as_tensor(x, device=next(tmodel.parameters()).device)).shape
    fmodel = FlaxChain(spec, shared)
    # Shapes only (eager Flax init would compile every small operation: seconds).
    template = jax.eval_shape(lambda key, x: fmodel.init(key, x, train=False), jax.random.key(0), to_channels_last(x))
    if torch_first:
        variables = _randomise(to_flax(tmodel, template), rng, everything=False)
    else:
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
        variables = _randomise(zeros, rng, everything=True)
    load_flax(tmodel, variables)
    return tmodel, fmodel, variables, x, rng.uniform(-1, 1, out_shape).astype(np.float32)


def _run_torch(pt, tmodel, x, cotangent, training):
    tmodel.train(training)
    counts = {}  # values per channel each batch norm normalises over (N H W)
    hooks = [
        m.register_forward_hook(lambda m, args, out, name=name: counts.__setitem__(name, args[0][:, 0].numel()))
        for name, m in tmodel.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    xt = pt.array(x).requires_grad_(True)
    out = tmodel(xt)
    for hook in hooks:
        hook.remove()
    (out * pt.array(cotangent)).sum().backward()
    grads = {n: pt.numpy(p.grad) for n, p in tmodel.named_parameters()}
    return pt.numpy(out), pt.numpy(xt.grad), grads, counts


def _run_flax(jx, fmodel, variables, x, cotangent, training):
    """Output, input and parameter gradients, and the updated ``batch_stats``."""

    # Under jit: one compilation per chain, where eager dispatch would compile
    # every small operation of every shape on its own (minutes, not seconds).
    @jax.jit
    def run(variables, x, cotangent):
        def forward(params, x):
            others = {k: v for k, v in variables.items() if k != "params"}
            return fmodel.apply({"params": params, **others}, x, training, mutable=["batch_stats"])

        out, pullback, updated = jax.vjp(forward, variables["params"], x, has_aux=True)
        return out, *pullback(cotangent), updated

    variables = jax.device_put(variables, jx._device)
    out, d_params, d_x, updated = run(variables, jx.array(to_channels_last(x)), jx.array(to_channels_last(cotangent)))
    return to_channels_first(np.asarray(out)), to_channels_first(np.asarray(d_x)), d_params, updated


def _check_running_statistics(tmodel, before, after, counts, check):
    """After a training step from the same statistics the means agree; torch's
    variance update uses the batch variance times ``m / (m - 1)`` (``m = N H W``),
    Flax's the biased one (the difference documented in mhc_jax.conv)."""
    state = tmodel.state_dict()
    for name, m in counts.items():
        path = name.replace("layers.", "layers_").split(".")
        old = jax.tree.map(np.asarray, before)
        new = jax.tree.map(np.asarray, after)
        for p in path:
            old, new = old[p], new[p]
        assert_parity(new["mean"], state[f"{name}.running_mean"].cpu().numpy(), what="running mean", **check)
        biased = (new["var"] - 0.9 * old["var"]) / 0.1
        unbiased_update = 0.9 * old["var"] + 0.1 * biased * m / (m - 1)
        assert_parity(unbiased_update, state[f"{name}.running_var"].cpu().numpy(), what="running var", **check)


@pytest.mark.parametrize("name, spec, shared, training, torch_first, kind", CASES, ids=[c[0] for c in CASES])
def test_chains_agree_after_conversion(jx, pt, device, name, spec, shared, training, torch_first, kind):
    tmodel, fmodel, variables, x, cotangent = _build(spec, shared, torch_first, len(name), device)
    out_t, dx_t, grads_t, counts = _run_torch(pt, tmodel, x, cotangent, training)
    out_j, dx_j, d_params, updated = _run_flax(jx, fmodel, variables, x, cotangent, training)
    check = dict(kind=kind, device=device)
    assert_parity(out_j, out_t, what="conv chain output", **check)
    assert_parity(dx_j, dx_t, what="conv chain grad x", **check)
    grads_j = flax_to_torch({"params": d_params}, dict(tmodel.named_parameters()))
    assert grads_j.keys() == grads_t.keys()
    for key, g in grads_t.items():
        assert_parity(grads_j[key], g, what="conv chain grad parameters", **check)
    if training and counts:
        _check_running_statistics(tmodel, variables["batch_stats"], updated["batch_stats"], counts, check)
