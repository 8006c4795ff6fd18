"""Flax specifics of mhc_jax.MHCSkip: parameters, rng streams, jit, dtypes, NNX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax import History, MHCSkip


def _inputs(k=3, shape=(2, 4)):
    keys = jax.random.split(jax.random.key(0), k + 1)
    return jax.random.normal(keys[0], shape), [jax.random.normal(key, shape) for key in keys[1:]]


def test_parameter_tree_uses_the_shared_names():
    x, states = _inputs()
    tree = jax.tree.map(jnp.shape, MHCSkip(use_gating=True, max_history=5).init(jax.random.key(0), x, states))
    assert tree == {"params": {"mixing_logits": (5,), "gate_logit": (1,)}}
    assert MHCSkip(mode="residual").init(jax.random.key(0), x, states) == {}


def test_parameters_do_not_depend_on_the_first_calls_window():
    x, states = _inputs()
    skip = MHCSkip(max_history=4)
    with_history = skip.init(jax.random.key(0), x, states)
    without = skip.init(jax.random.key(0), x, [])
    assert jax.tree.map(jnp.shape, with_history) == jax.tree.map(jnp.shape, without)


def test_jit_apply_matches_eager():
    x, states = _inputs()
    skip = MHCSkip(mode="hc", use_gating=True, prune_threshold=0.05)
    params = skip.init(jax.random.key(0), x, states)
    params = jax.tree.map(lambda p: p + 0.3, params)
    np.testing.assert_allclose(jax.jit(skip.apply)(params, x, states), skip.apply(params, x, states), atol=1e-6)


def test_stochastic_training_needs_the_gumbel_stream():
    x, states = _inputs()
    skip = MHCSkip(stochastic=True, mixing_init="uniform")
    params = skip.init(jax.random.key(0), x, states, deterministic=True)
    with pytest.raises(ValueError, match=r"rngs=\{'gumbel': key\}"):
        skip.apply(params, x, states, deterministic=False)
    a = skip.apply(params, x, states, deterministic=False, rngs={"gumbel": jax.random.key(1)})
    b = skip.apply(params, x, states, deterministic=False, rngs={"gumbel": jax.random.key(2)})
    again = skip.apply(params, x, states, deterministic=False, rngs={"gumbel": jax.random.key(1)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, again)
    evaluated = skip.apply(params, x, states, deterministic=True, rngs={"gumbel": jax.random.key(1)})
    np.testing.assert_allclose(evaluated, x + sum(states) / 3, atol=1e-6)


def test_deterministic_comes_from_the_field_or_the_call():
    x, states = _inputs()
    params = MHCSkip(stochastic=True).init(jax.random.key(0), x, states, deterministic=True)
    MHCSkip(stochastic=True, deterministic=True).apply(params, x, states)  # field alone is enough
    with pytest.raises(ValueError, match="deterministic"):
        MHCSkip(stochastic=True).apply(params, x, states)  # neither given


def test_gumbel_noise_must_align_with_the_logits():
    x, states = _inputs()
    skip = MHCSkip(stochastic=True, max_history=4)
    params = skip.init(jax.random.key(0), x, states, deterministic=True)
    with pytest.raises(ValueError, match=r"gumbel_noise must have shape \(4,\)"):
        skip.apply(params, x, states, deterministic=False, gumbel_noise=jnp.zeros(3))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_keep_their_dtype(dtype):
    x, states = _inputs()
    x, states = x.astype(dtype), [s.astype(dtype) for s in states]
    skip = MHCSkip(mode="mhc", use_gating=True)
    params = skip.init(jax.random.key(0), x, states)
    out = skip.apply(params, x, states)
    assert out.dtype == dtype
    history = History.create(states[0], 4).push(states[1]).push(states[2])
    assert jax.jit(skip.apply)(params, x, history).dtype == dtype


def test_auto_project_on_a_history_of_another_feature_size():
    x, _ = _inputs(shape=(2, 4))
    _, states = _inputs(shape=(2, 6))
    skip = MHCSkip(auto_project=True, max_history=3)
    history = History.create(states[0], 3).push(states[1])
    params = skip.init(jax.random.key(0), x, history)
    assert params["params"]["projection_from_6"]["kernel"].shape == (6, 4)
    np.testing.assert_allclose(skip.apply(params, x, history), skip.apply(params, x, states[:2]), atol=1e-6)


def test_nnx_users_can_wrap_the_linen_skip():
    # Flax NNX code uses Linen modules through nnx.bridge.ToNNX.
    x, states = _inputs()
    linen_skip = MHCSkip(mode="mhc", use_gating=True)
    model = nnx.bridge.ToNNX(linen_skip, rngs=nnx.Rngs(0)).lazy_init(x, states)
    assert model.mixing_logits.shape == (4,)
    params = {"params": {"mixing_logits": model.mixing_logits[...], "gate_logit": model.gate_logit[...]}}
    np.testing.assert_allclose(model(x, states), linen_skip.apply(params, x, states), atol=1e-6)

    def loss(model):
        return jnp.sum(model(x, states) ** 2)

    grads = nnx.grad(loss)(model)
    linen_grads = jax.grad(lambda p: jnp.sum(linen_skip.apply(p, x, states) ** 2))(params)
    np.testing.assert_allclose(grads.mixing_logits[...], linen_grads["params"]["mixing_logits"], atol=1e-6)
