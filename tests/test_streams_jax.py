"""Residual streams, JAX only: the scanned stack, jit/vmap, dtypes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mhc_jax
from mhc_jax.convert import stack_stream_params, unstack_stream_params
from tests.stream_helpers import FlaxBlock, flax_hyper_connection, flax_stack


def _stacked(variables: dict, depth: int) -> dict:
    """Unrolled parameters ``layers_{i}/...`` as the scanned layout ``layers/...``, written here."""
    layers = [variables["params"][f"layers_{i}"] for i in range(depth)]
    return {"params": {"layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}}


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("dynamic", [False, True])
def test_scanned_stack_equals_the_unrolled_stack(mode, remat, dynamic):
    depth, width, n = 5, 8, 3
    x = jax.random.normal(jax.random.key(0), (2, 4, width))
    options = dict(num_streams=n, mode=mode, dynamic=dynamic)
    unrolled = flax_stack(width, depth, options, "prenorm")
    scanned = mhc_jax.StreamSequential.scanned(FlaxBlock(width, "prenorm"), depth, **options, remat=remat)
    variables = unrolled.init(jax.random.key(1), x)
    # Perturb the biases so that layers differ (the scan must not mix them up).
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.3 * jax.random.normal(jax.random.key(len(str(path))), v.shape)
        if "b_" in str(path[-1]) else v,
        variables,
    )
    stacked = _stacked(variables, depth)

    def loss(model, v, x):
        return jnp.sum(jnp.sin(model.apply(v, x)))

    out_u, out_s = unrolled.apply(variables, x), scanned.apply(stacked, x)
    np.testing.assert_allclose(out_s, out_u, rtol=1e-5, atol=1e-5)
    g_u = jax.grad(loss, argnums=(1, 2))(unrolled, variables, x)
    g_s = jax.grad(loss, argnums=(1, 2))(scanned, stacked, x)
    np.testing.assert_allclose(g_s[1], g_u[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_s[0]), jax.tree.leaves(_stacked(g_u[0], depth)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    h_u = unrolled.apply(variables, x, method="coefficients")
    h_s = scanned.apply(stacked, x, method="coefficients")
    for a, b in zip(h_s, h_u, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scanned_init_gives_each_layer_its_index():
    # mode="hc": h_pre one-hot on stream layer_index mod n, as in the unrolled stack.
    x = jnp.zeros((1, 4))
    params = mhc_jax.StreamSequential.scanned(FlaxBlock(4), 5, num_streams=3, mode="hc").init(jax.random.key(0), x)
    np.testing.assert_array_equal(params["params"]["layers"]["b_pre"], np.eye(3)[np.arange(5) % 3])


def test_stack_stream_params_round_trip():
    depth, x = 4, jnp.ones((2, 6))
    variables = flax_stack(6, depth, dict(num_streams=2)).init(jax.random.key(0), x)
    stacked = stack_stream_params(variables)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(_stacked(variables, depth)), strict=True):
        np.testing.assert_array_equal(a, b)
    back = unstack_stream_params(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


def _program_size(depth: int, scan: bool) -> int:
    x = jnp.ones((2, 8))
    model = (
        mhc_jax.StreamSequential.scanned(FlaxBlock(8), depth, num_streams=2)
        if scan
        else flax_stack(8, depth, dict(num_streams=2))
    )
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    step = jax.jit(jax.grad(lambda v, x: jnp.sum(model.apply(v, x))))
    # Operations, one a line (the text's length would count the depth's digits in the shapes).
    return len(step.lower(variables, x).as_text().splitlines())


def test_scanned_stack_is_compiled_once_for_any_depth():
    # The lowered training step of the scanned stack does not grow with depth
    # (the unrolled one does, which shows that the measure can tell).
    assert _program_size(2, scan=True) == _program_size(32, scan=True)
    assert _program_size(8, scan=False) > 2 * _program_size(2, scan=False)


def test_hyper_connection_under_jit_and_vmap():
    n, width = 3, 4
    streams = jax.random.normal(jax.random.key(0), (5, n, width))
    hc = flax_hyper_connection(width, dict(num_streams=n))
    variables = hc.init(jax.random.key(1), streams)
    eager = hc.apply(variables, streams)
    np.testing.assert_allclose(jax.jit(hc.apply)(variables, streams), eager, rtol=1e-6, atol=1e-6)
    mapped = jax.vmap(hc.apply, in_axes=(None, 0))(variables, streams)
    np.testing.assert_allclose(mapped, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_streams_keep_their_dtype(dtype):
    # Coefficients in float32, the output rounded once to the streams' dtype:
    # equal to the float32 layer on the same (rounded) streams, rounded.
    n, width = 4, 8
    streams = jax.random.normal(jax.random.key(0), (3, n, width)).astype(dtype)
    hc = mhc_jax.HyperConnection(lambda u: jnp.tanh(u), num_streams=n)
    variables = hc.init(jax.random.key(1), streams)
    out = hc.apply(variables, streams)
    assert out.dtype == dtype
    assert all(h.dtype == jnp.float32 for h in hc.apply(variables, streams, method="coefficients"))
    reference = hc.apply(variables, streams.astype(jnp.float32))
    # tanh of the rounded branch input differs from tanh of the float32 one by
    # one rounding of u; the rest is one rounding of the output.
    np.testing.assert_allclose(out.astype(jnp.float32), reference, rtol=2e-2, atol=2e-2)


def test_dropout_rng_reaches_every_scanned_layer():
    class Noise(nn.Module):
        @nn.compact
        def __call__(self, u):
            return u + jax.random.uniform(self.make_rng("dropout"), u.shape, u.dtype)

    x = jnp.ones((2, 4))
    model = mhc_jax.StreamSequential.scanned(Noise(), 3, num_streams=2)
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    a = model.apply(variables, x, rngs={"dropout": jax.random.key(2)})
    b = model.apply(variables, x, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(a, b)


def test_branches_built_inline_live_under_their_layer():
    # A branch constructed inside a parent's compact method is bound to the
    # parent; the layer (and the stack) take a copy, so its parameters sit
    # under "branch" as in torch, whatever the construction site.
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            streams = mhc_jax.HyperConnection(nn.Dense(4), num_streams=2)(mhc_jax.expand_streams(x, 2))
            return mhc_jax.StreamSequential([nn.Dense(4), nn.Dense(4)], num_streams=2)(mhc_jax.reduce_streams(streams))

    params = Model().init(jax.random.key(0), jnp.ones((3, 4)))["params"]
    assert set(params) == {"HyperConnection_0", "StreamSequential_0"}
    assert set(params["HyperConnection_0"]["branch"]) == {"kernel", "bias"}
    stack = params["StreamSequential_0"]
    assert set(stack) == {"layers_0", "layers_1"} and all("branch" in stack[k] for k in stack)


def test_a_branch_that_is_not_callable_is_a_type_error():
    with pytest.raises(TypeError, match=r"branch must be a Flax module or a function, got 3 \(int\)"):
        mhc_jax.HyperConnection(3)
