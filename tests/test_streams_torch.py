"""Residual streams, torch only: checkpointing, dtypes, torch.compile, weight conversion."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import mhc_jax
import mhc_torch
from mhc_torch.convert import load_flax, to_flax
from tests.stream_helpers import FlaxBlock, flax_stack, random_params, torch_hyper_connection, torch_stack


def _loss_and_grads(model, x, owner=None):
    """Output, input gradient and parameter gradients (``owner``'s parameters:
    a compiled module shares its original's)."""
    owner = owner or model
    x = x.clone().requires_grad_(True)
    out = model(x)
    torch.sin(out).sum().backward()
    grads = {name: p.grad.clone() for name, p in owner.named_parameters()}
    owner.zero_grad()
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_checkpointing_gives_the_same_outputs_and_gradients(mode):
    torch.manual_seed(0)
    options = dict(num_streams=3, mode=mode)
    plain = torch_stack(8, 4, options, "prenorm")
    checkpointed = torch_stack(8, 4, options, "prenorm", use_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 8)
    a, b = _loss_and_grads(plain, x), _loss_and_grads(checkpointed, x)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_streams_keep_their_dtype(dtype):
    n, width = 4, 8
    hc = mhc_torch.HyperConnection(width, torch.nn.Tanh(), num_streams=n)
    streams = torch.randn(3, n, width).to(dtype)
    with torch.no_grad():
        out = hc(streams)
        assert out.dtype == dtype
        assert all(h.dtype == torch.float32 for h in hc.coefficients(streams))
        reference = hc(streams.float())
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


def test_reset_parameters_restores_the_documented_init():
    hc = torch_hyper_connection(6, dict(num_streams=3, mode="hc", layer_index=4))
    with torch.no_grad():
        for p in (hc.b_pre, hc.b_post, hc.b_res, hc.a_pre):
            p.add_(1.0)
    hc.reset_parameters()
    np.testing.assert_array_equal(hc.b_pre.detach().numpy(), np.eye(3)[4 % 3])
    np.testing.assert_array_equal(hc.b_res.detach().numpy(), np.eye(3))
    np.testing.assert_array_equal(hc.a_pre.detach().numpy(), np.float32([0.01]))


def test_parameters_are_one_dimensional_for_fsdp():
    # FSDP2 shards every parameter along dim 0: no 0-d parameters.
    hc = torch_hyper_connection(6, dict(num_streams=3))
    assert all(p.dim() >= 1 for p in hc.parameters())
    assert {name for name, _ in hc.named_parameters() if not name.startswith("branch.")} == {
        "phi", "a_pre", "a_post", "a_res", "b_pre", "b_post", "b_res",
    }
    static = torch_hyper_connection(6, dict(num_streams=3, dynamic=False))
    assert {name for name, _ in static.named_parameters() if not name.startswith("branch.")} == {
        "b_pre", "b_post", "b_res",
    }


def test_compiled_hyper_connection_equals_eager():
    # One graph (fullgraph=True): the Sinkhorn's autograd.Function included.
    torch.manual_seed(0)
    hc = torch_hyper_connection(8, dict(num_streams=4))
    compiled = torch.compile(hc, fullgraph=True)
    streams = torch.randn(2, 3, 4, 8)
    a, b = _loss_and_grads(hc, streams), _loss_and_grads(compiled, streams, owner=hc)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=1e-4, atol=1e-5, msg=name)


# The whole stack in one graph (fullgraph=True), forward and backward, with
# the aot_eager backend: dynamo and AOT autograd, where a capture breaks,
# without inductor's C++ build (the test above runs inductor on the same
# operations). Depth 2: a float shared by two checkpointed layers once crashed
# dynamo under dynamic shapes. Two Sinkhorn sweeps keep the traced graph small.
@pytest.mark.parametrize(
    "dynamic, checkpointing",
    [(False, False), (True, False), (True, True)],
    ids=["static", "dynamic", "dynamic-checkpointing"],
)
def test_compiled_stack_equals_eager(dynamic, checkpointing):
    width, options = 8, dict(num_streams=3, sinkhorn_iterations=2)
    model = torch_stack(width, 2, options, "prenorm", use_checkpointing=checkpointing)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in random_params(model, 0).items()})
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    generator = torch.Generator().manual_seed(0)
    for batch in (4, 7) if dynamic else (4,):  # dynamic: one graph serves a second batch size
        x = torch.randn(batch, width, generator=generator)
        a, b = _loss_and_grads(model, x), _loss_and_grads(compiled, x, owner=model)
        torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)
        for name in a[2]:
            torch.testing.assert_close(b[2][name], a[2][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_weights_convert_both_ways(mode):
    # mhc_torch.convert: torch -> Flax gives the same outputs; Flax -> torch
    # gives back the same state_dict.
    depth, width = 3, 6
    options = dict(num_streams=2, mode=mode)
    torch_model = torch_stack(width, depth, options, "prenorm")
    torch_model.load_state_dict({k: torch.as_tensor(v) for k, v in random_params(torch_model, 0).items()})
    flax_model = flax_stack(width, depth, options, "prenorm")
    x = np.random.default_rng(0).normal(size=(2, 3, width)).astype(np.float32)
    params = to_flax(torch_model, flax_model.init(jax.random.key(0), x))
    with torch.no_grad():
        want = torch_model(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(flax_model.apply(params, x)), want, rtol=1e-4, atol=1e-5)
    fresh = torch_stack(width, depth, options, "prenorm")
    load_flax(fresh, params)
    for name, value in torch_model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0, msg=name)
    scanned = mhc_jax.StreamSequential.scanned(FlaxBlock(width, "prenorm"), depth, **options)
    stacked = mhc_jax.convert.stack_stream_params(params)
    np.testing.assert_allclose(np.asarray(scanned.apply(stacked, x)), want, rtol=1e-4, atol=1e-5)


def test_a_branch_that_is_not_callable_is_a_type_error():
    with pytest.raises(TypeError, match=r"branch must be a module or a callable, got 3 \(int\)"):
        mhc_torch.HyperConnection(4, 3)
