"""mhc_jax.History: a fixed-shape ring buffer that works under jit, vmap, grad and scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mhc_jax import History, MHCSkip


def _states(n, shape=(2, 3), seed=0):
    return list(jax.random.normal(jax.random.key(seed), (n, *shape)))


def _pushed(states, max_history):
    history = History.empty(states[0], max_history)
    for s in states:
        history = history.push(s)
    return history


@given(h=st.integers(1, 6), n=st.integers(1, 15))
def test_the_window_is_the_last_h_states_oldest_first(h, n):
    states = _states(n)
    history = _pushed(states, h)
    assert int(history.count) == n and int(history.num_states) == min(n, h)
    window = history.to_list()
    assert len(window) == min(n, h)
    for got, want in zip(window, states[-h:], strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(history.latest(), states[-1])


def test_create_holds_x0_and_empty_holds_nothing():
    x0 = jnp.arange(6.0).reshape(2, 3)
    history = History.create(x0, 4)
    assert history.states.shape == (4, 2, 3) and int(history.num_states) == 1
    np.testing.assert_array_equal(history.to_list()[0], x0)
    empty = History.empty(jax.ShapeDtypeStruct((2, 3), jnp.float32), 4)
    assert empty.to_list() == [] and int(empty.num_states) == 0
    np.testing.assert_array_equal(empty.latest(), jnp.zeros((2, 3)))


@given(h=st.integers(1, 6), count=st.integers(0, 20))
def test_slot_weights_follow_the_states_into_their_slots(h, count):
    # Window weight j belongs to the state pushed H-1-j pushes before the
    # latest; that state sits in slot (count-1-(H-1-j)) % H.
    history = History(jnp.zeros((h, 1)), jnp.asarray(count, jnp.int32))
    k = min(count, h)
    window = jnp.where(jnp.arange(h) >= h - k, jnp.arange(1.0, h + 1), 0.0)
    slots = np.asarray(history.slot_weights(window))
    for j in range(h - k, h):
        assert slots[(count - 1 - (h - 1 - j)) % h] == window[j]
    assert np.isclose(slots.sum(), window.sum())


def test_push_under_jit_and_as_a_jit_argument():
    states = _states(5)

    @jax.jit
    def push_all(history, xs):
        for x in xs:
            history = history.push(x)
        return history

    history = push_all(History.create(states[0], 3), states[1:])
    eager = _pushed(states, 3)
    np.testing.assert_array_equal(history.states, eager.states)
    assert int(history.count) == int(eager.count)


def test_history_is_a_scan_carry():
    xs = jnp.stack(_states(9))

    def step(history, x):
        history = history.push(x)
        return history, history.latest()

    history, latest = jax.lax.scan(step, History.create(xs[0], 4), xs[1:])
    np.testing.assert_array_equal(latest, xs[1:])
    for got, want in zip(history.to_list(), xs[-4:], strict=True):
        np.testing.assert_array_equal(got, want)


def test_history_under_vmap_matches_each_example():
    skip = MHCSkip(max_history=3, mixing_init="uniform")
    batch = jax.random.normal(jax.random.key(1), (5, 4, 2))  # 5 examples, 4 states of shape (2,)
    x = jax.random.normal(jax.random.key(2), (5, 2))
    params = skip.init(jax.random.key(0), x[0], list(batch[0]))

    def one(x, states):
        history = History.create(states[0], 3)
        for s in states[1:]:
            history = history.push(s)
        return skip.apply(params, x, history)

    batched = jax.vmap(one)(x, batch)
    for i in range(5):
        np.testing.assert_allclose(batched[i], skip.apply(params, x[i], list(batch[i])), atol=1e-6)


@pytest.mark.parametrize("mode", ["residual", "hc", "mhc"])
@given(h=st.integers(1, 5), n=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_a_history_mixes_like_the_list_of_its_window(mode, h, n, seed):
    states = _states(n, shape=(3,), seed=seed) if n else []
    x = jax.random.normal(jax.random.key(seed + 1), (3,))
    skip = MHCSkip(mode=mode, max_history=h, use_gating=True)
    params = skip.init(jax.random.key(0), x, states)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(seed), p.shape), params)

    def loss(x, states, ring):
        history = (_pushed(states, h) if states else History.empty(x, h)) if ring else states
        return jnp.sum(skip.apply(params, x, history) ** 2)

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    ring_value, (ring_dx, ring_ds) = grad(x, states, True)
    list_value, (list_dx, list_ds) = grad(x, states, False)
    np.testing.assert_allclose(ring_value, list_value, rtol=1e-6)
    np.testing.assert_allclose(ring_dx, list_dx, rtol=1e-6, atol=1e-6)
    for a, b in zip(ring_ds, list_ds, strict=True):  # evicted states get zero gradient in both
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_gradients_flow_back_through_pushed_states():
    skip = MHCSkip(max_history=2, mixing_init="uniform")
    x0 = jnp.ones(3)
    params = skip.init(jax.random.key(0), x0, [x0])

    def net(x0):
        history = History.create(x0, 2)
        x1 = skip.apply(params, 2 * x0, history)  # 2 x0 + x0 = 3 x0
        return jnp.sum(skip.apply(params, x1, history.push(x1)))  # x1 + (x0 + x1) / 2 = 5 x0

    np.testing.assert_allclose(jax.grad(net)(x0), jnp.full(3, 5.0))


def test_push_rejects_another_shape_or_dtype():
    history = History.create(jnp.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match=r"states of shape \(2, 3\), got a state of shape \(3, 2\)"):
        history.push(jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="float32 states, got a bfloat16 state"):
        history.push(jnp.zeros((2, 3), jnp.bfloat16))


@pytest.mark.parametrize("h", [0, -1, 2.0, True])
def test_max_history_must_be_a_positive_int(h):
    with pytest.raises(ValueError, match=f"max_history must be an int >= 1, got {h!r}"):
        History.create(jnp.zeros(3), h)


def test_to_list_explains_it_needs_a_concrete_history():
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(lambda h: h.to_list()[0])(History.create(jnp.zeros(3), 2))
