"""mhc_jax.MHCSequential: fresh history per call, carried history, scan, remat, errors."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from mhc_jax import History, MHCSequential, MHCSkip
from mhc_jax.convert import stack_layer_params, unstack_layer_params

WIDTH = 6


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(WIDTH)(x))


def _x(batch=4, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, WIDTH))


def _manual(params, x, depth, h, detach=False, **skip_options):
    """The documented loop (docs/mathematics.md), written out with one MHCSkip per layer and a list window."""
    p = params["params"]
    keep = jax.lax.stop_gradient if detach else (lambda v: v)
    window = [keep(x)]
    for i in range(depth):
        y = Block().apply({"params": p[f"layers_{i}"]}, x)
        skip = MHCSkip(max_history=h, **skip_options)
        x = skip.apply({"params": p.get(f"skip_layers_{i}", {})}, y, window[-h:])
        window.append(keep(x))
    return x, window[-h:]


def _perturbed(params, seed=1):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [v + 0.3 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)])


@pytest.mark.parametrize("mode", ["residual", "hc", "mhc"])
@pytest.mark.parametrize("detach", [False, True])
def test_stack_is_the_spec_loop(mode, detach):
    model = MHCSequential([Block() for _ in range(5)], max_history=3, mode=mode, use_gating=True, detach_history=detach)
    x = _x()
    params = _perturbed(model.init(jax.random.key(0), x))
    options = dict(mode=mode, use_gating=True)
    np.testing.assert_allclose(model.apply(params, x), _manual(params, x, 5, 3, detach, **options)[0], atol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(model.apply(params, x) ** 2))(x)
    manual = jax.grad(lambda x: jnp.sum(_manual(params, x, 5, 3, detach, **options)[0] ** 2))(x)
    np.testing.assert_allclose(grad, manual, atol=1e-5)


def test_detaching_the_history_changes_only_the_history_path():
    model = MHCSequential([Block() for _ in range(4)], max_history=3, mixing_init="uniform")
    detached = model.clone(detach_history=True)
    x = _x()
    params = model.init(jax.random.key(0), x)
    np.testing.assert_allclose(model.apply(params, x), detached.apply(params, x), atol=1e-7)
    full = jax.grad(lambda x: jnp.sum(model.apply(params, x)))(x)
    cut = jax.grad(lambda x: jnp.sum(detached.apply(params, x)))(x)
    assert not np.allclose(full, cut)


def test_every_call_starts_fresh_so_a_split_batch_gives_the_same_outputs():
    model = MHCSequential([Block() for _ in range(6)], max_history=4)
    x = _x(batch=8)
    params = _perturbed(model.init(jax.random.key(0), x))
    whole = jax.jit(model.apply)(params, x)
    halves = jnp.concatenate([jax.jit(model.apply)(params, x[:4]), jax.jit(model.apply)(params, x[4:])])
    np.testing.assert_allclose(whole, halves, atol=1e-6)


def test_carried_history_is_the_explicit_opt_in():
    model = MHCSequential([Block() for _ in range(3)], max_history=4)
    x1, x2 = _x(seed=1), _x(seed=2)
    params = _perturbed(model.init(jax.random.key(0), x1))
    out1, history = model.apply(params, x1, History.empty(x1, 4))
    np.testing.assert_allclose(out1, model.apply(params, x1), atol=1e-6)  # empty history = fresh
    _, window = _manual(params, x1, 3, 4)
    for got, want in zip(history.to_list(), window, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    out2, history2 = jax.jit(model.apply)(params, x2, history)
    assert int(history2.count) == 8  # x1, 3 outputs, x2, 3 outputs
    assert not np.allclose(out2, model.apply(params, x2))  # it did see call 1's states


@functools.cache
def _unrolled_and_scanned(mode: str, depth: int, h: int):
    """Both forms and their jitted value-and-grad, built once per configuration."""
    unrolled = MHCSequential([Block() for _ in range(depth)], max_history=h, mode=mode, use_gating=True)
    scanned = MHCSequential.scanned(Block(), depth, max_history=h, mode=mode, use_gating=True)

    def grad(model):
        loss = lambda p, x: jnp.sum(jnp.sin(model.apply(p, x)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    init = unrolled.init(jax.random.key(0), _x())
    assert jax.tree.map(jnp.shape, stack_layer_params(init, h)) == jax.tree.map(
        jnp.shape, scanned.init(jax.random.key(0), _x())
    )
    return init, grad(unrolled), grad(scanned)


#: (depth, H): fewer layers than H, whole chunks, chunks and a tail, H = 1.
SHAPES = [(1, 4), (4, 2), (7, 3), (5, 1)]


@pytest.mark.parametrize("mode", ["residual", "hc", "mhc"])
@given(depth_h=st.sampled_from(SHAPES), seed=st.integers(0, 2**16))
def test_scanned_stack_equals_the_unrolled_one(mode, depth_h, seed):
    depth, h = depth_h
    init, grad_unrolled, grad_scanned = _unrolled_and_scanned(mode, depth, h)
    x = _x(seed=seed)
    params = _perturbed(init, seed)
    stacked = stack_layer_params(params, h)
    va, (ga, gxa) = grad_unrolled(params, x)
    vb, (gb, gxb) = grad_scanned(stacked, x)
    np.testing.assert_allclose(va, vb, atol=1e-5)
    np.testing.assert_allclose(gxa, gxb, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(unstack_layer_params(gb, h)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_scanned_stack_carries_history_and_remat_changes_nothing():
    x = _x()
    scanned = MHCSequential.scanned(Block(), 5, max_history=3)
    remat = MHCSequential.scanned(Block(), 5, max_history=3, remat=True)
    unrolled = MHCSequential([Block() for _ in range(5)], max_history=3)
    params = _perturbed(scanned.init(jax.random.key(0), x))
    out, history = scanned.apply(params, x, History.empty(x, 3))
    ref, ref_history = unrolled.apply(unstack_layer_params(params, 3), x, History.empty(x, 3))
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_array_equal(history.count, ref_history.count)
    for a, b in zip(history.to_list(), ref_history.to_list(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    grads = [_squared_norm_grad(m, params, x) for m in (scanned, remat)]
    for a, b in zip(*map(jax.tree.leaves, grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _squared_norm_grad(model, params, x):
    return jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(params)


def test_vmap_over_examples_matches_the_batch():
    model = MHCSequential([Block() for _ in range(3)], max_history=2)
    x = _x()
    params = model.init(jax.random.key(0), x)
    per_example = jax.vmap(lambda xi: model.apply(params, xi[None])[0])(x)
    np.testing.assert_allclose(per_example, model.apply(params, x), atol=1e-6)


def test_auto_project_lets_layers_change_the_width():
    layers = [nn.Dense(8), nn.Dense(8), nn.Dense(3)]
    model = MHCSequential(layers, max_history=3, auto_project=True)
    x = _x()
    params = model.init(jax.random.key(0), x)
    assert model.apply(params, x).shape == (4, 3)
    assert params["params"]["skip_layers_0"]["projection_from_6"]["kernel"].shape == (6, 8)
    assert params["params"]["skip_layers_2"]["projection_from_8"]["kernel"].shape == (8, 3)
    with pytest.raises(ValueError, match=r"history state 0 has shape \(4, 6\) but x has shape \(4, 8\)"):
        MHCSequential(layers, max_history=3).init(jax.random.key(0), x)


def test_stochastic_stack_uses_the_gumbel_stream_in_training_only():
    model = MHCSequential([Block() for _ in range(3)], stochastic=True)
    x = _x()
    params = model.init(jax.random.key(0), x)  # init needs no deterministic flag
    evaluated = model.apply(params, x, deterministic=True)
    np.testing.assert_allclose(evaluated, model.clone(stochastic=False).apply(params, x), atol=1e-7)
    a = model.apply(params, x, deterministic=False, rngs={"gumbel": jax.random.key(1)})
    b = model.apply(params, x, deterministic=False, rngs={"gumbel": jax.random.key(2)})
    assert not np.allclose(a, b)
    noise = jax.random.gumbel(jax.random.key(3), (3, 4))
    scanned = MHCSequential.scanned(Block(), 3, stochastic=True)
    np.testing.assert_allclose(
        model.apply(params, x, deterministic=False, gumbel_noise=noise),
        scanned.apply(stack_layer_params(params, 4), x, deterministic=False, gumbel_noise=noise),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match=r"rngs=\{'gumbel': key\}"):
        model.apply(params, x, deterministic=False)
    with pytest.raises(ValueError, match=r"gumbel_noise must have shape \(3, 4\)"):
        model.apply(params, x, deterministic=False, gumbel_noise=jnp.zeros((2, 4)))


def test_bad_stacks_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"at least one layer \(depth >= 1\), got 0"):
        MHCSequential([])
    with pytest.raises(ValueError, match="depth must be an int >= 1, got 0"):
        MHCSequential.scanned(Block(), 0)
    with pytest.raises(ValueError, match="layer 1 differs from layer 0"):
        MHCSequential([nn.Dense(3), nn.Dense(4)], scan=True)
    with pytest.raises(ValueError, match="remat=True applies to the scanned stack"):
        MHCSequential([Block()], remat=True)
    with pytest.raises(ValueError, match=r"mixing_init must be one of \('identity', 'uniform'\), got 'zeros'"):
        MHCSequential([Block()], mixing_init="zeros")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got -1.0"):
        MHCSequential([Block()], temperature=-1.0)


def test_a_scanned_block_must_keep_the_shape():
    model = MHCSequential.scanned(nn.Dense(3), 2)
    with pytest.raises(ValueError, match=r"keep the state's shape: a layer maps \(4, 6\) to \(4, 3\)"):
        model.init(jax.random.key(0), _x())


def test_nnx_users_can_wrap_the_linen_stack():
    x = _x()
    model = nnx.bridge.ToNNX(MHCSequential([Block() for _ in range(3)]), rngs=nnx.Rngs(0)).lazy_init(x)
    assert model(x).shape == x.shape
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    # Layer 0 mixes only x_0 (weight 1 whatever its logits); layer 2 mixes three states.
    np.testing.assert_array_equal(grads.skip_layers_0.mixing_logits[...], 0.0)
    assert jnp.abs(grads.skip_layers_2.mixing_logits[...]).sum() > 0


def test_the_stack_owns_layers_built_inline_in_a_compact_method():
    # flax.linen binds a module built inside @compact to the enclosing module;
    # the stack copies such layers in, so their parameters sit under layers_{i}.
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            shared = nn.Dense(WIDTH)
            x = MHCSequential([Block() for _ in range(2)], name="stack")(x)
            return MHCSequential([shared, shared], name="tied")(x)

    params = Model().init(jax.random.key(0), _x())["params"]
    assert set(params) == {"stack", "tied"}
    assert {"layers_0", "layers_1"} <= set(params["stack"])
    assert "layers_0" in params["tied"] and "layers_1" not in params["tied"]  # one shared layer


def _program_size(h: int, depth: int = 32) -> int:
    """Operations in the lowered training step of a scanned stack (what XLA compiles)."""
    model = MHCSequential.scanned(Block(), depth, max_history=h)
    x = _x()
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    step = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x) ** 2)))
    return step.lower(params, x).as_text().count(" = ")


def test_scanned_program_grows_linearly_in_max_history():
    # A scan iteration unrolls C layers of H-term sums. With C = H (as before
    # MAX_CHUNK) the program, and so the compile time, grew as H^2: doubling H
    # from 16 to 32 quadrupled it. Capped, doubling H at most doubles it.
    # The run time follows the same count of mixing terms (C H per C layers).
    sizes = {h: _program_size(h) for h in (8, 16, 32)}
    assert sizes[32] / sizes[16] < 2.3, sizes
    assert sizes[16] / sizes[8] < 2.3, sizes
