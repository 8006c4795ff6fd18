"""Properties of matrix mixing (MatrixMHCSkip), checked in both packages (``backend`` fixture).

The reference is the equation of docs/mathematics.md ("Matrix mixing")
written again in float64 numpy: Sinkhorn in plain (not log) space on the
trailing ``K x K`` block, the window mixed by the whole matrix, and the last
mixed state added to ``x``.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mhc_jax
import mhc_torch
from mhc_torch.convert import load_flax, to_flax

#: One matrix size and one state shape for the properties, so jit compiles
#: JAX's program once per option set, not once per example; other sizes are
#: covered by the fixed tests below and by parity_tests/.
H = 4
SHAPE = (2, 3)
ITERATIONS = [1, 10]


def _sinkhorn(block: np.ndarray, iterations: int) -> np.ndarray:
    p = np.exp(block - block.max())
    for _ in range(iterations):
        p = p / p.sum(axis=0, keepdims=True)  # columns, then rows (docs/mathematics.md)
        p = p / p.sum(axis=1, keepdims=True)
    return p


def _row_softmax(block: np.ndarray) -> np.ndarray:
    e = np.exp(block - block.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _reference_weights(logits, k: int, doubly_stochastic: bool, iterations: int) -> np.ndarray:
    """The ``H x H`` matrix: the projected trailing ``k x k`` block, zeros elsewhere (float64)."""
    m = np.asarray(logits, np.float64)
    h = len(m)
    w = np.zeros((h, h))
    if k:
        block = m[h - k :, h - k :]
        w[h - k :, h - k :] = _sinkhorn(block, iterations) if doubly_stochastic else _row_softmax(block)
    return w


def _reference(logits, x, states, doubly_stochastic: bool, iterations: int) -> np.ndarray:
    """``x + (W [h_1; ...; h_K])[K]`` in float64, over the last H states."""
    h = len(logits)
    window = [np.asarray(s, np.float64) for s in states][-h:]
    k = len(window)
    if k == 0:
        return np.asarray(x, np.float64)
    w = _reference_weights(logits, k, doubly_stochastic, iterations)[h - k :, h - k :]
    mixed = np.tensordot(w, np.stack(window), axes=1)  # slot i of the mixed window
    return x + mixed[-1]


def _case(seed: int, h: int, k: int, shape, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.normal(size=(h, h))).astype(np.float32)
    x = rng.normal(size=shape).astype(np.float32)
    states = [rng.normal(size=shape).astype(np.float32) for _ in range(k)]
    return logits, x, states


@functools.cache
def _jax_skip(**options):
    """A jitted ``(logits, x, history) -> MatrixMHCSkip`` output, one compile per option set and H."""
    skip = mhc_jax.MatrixMHCSkip(max_history=H, **options)
    return jax.jit(lambda logits, x, history: skip.apply({"params": {"mixing_logits": logits}}, x, history))


@functools.cache
def _jax_weights(**options):
    return jax.jit(lambda logits, k: mhc_jax.matrix_weights(logits, k, **options))


def _skip_output(backend, logits, x, states, **options) -> np.ndarray:
    """The output of a MatrixMHCSkip (H = 4) over ``states``; in JAX a History under jit (traced K)."""
    if backend.name == "jax":
        # The ring layout of mhc_jax.History (state i in slot i % H), built in
        # numpy: pushing eagerly would cost more than the mix.
        ring = np.zeros((H, *x.shape), x.dtype)
        for i, s in enumerate(states):
            ring[i % H] = s
        history = mhc_jax.History(jnp.asarray(ring), jnp.int32(len(states)))
        return np.asarray(_jax_skip(**options)(jnp.asarray(logits), jnp.asarray(x), history))
    return backend.numpy(
        backend.lib.matrix_mix(backend.array(x), backend.array(logits), [backend.array(s) for s in states], **options)
    )


def _weights(backend, logits, k: int, **options) -> np.ndarray:
    if backend.name == "jax":
        return np.asarray(_jax_weights(**options)(jnp.asarray(logits), jnp.int32(k)))
    return backend.numpy(backend.lib.matrix_weights(backend.array(logits), k, **options))


def _mix_fn(backend, k: int, **options):
    """``(logits, x, *states) -> matrix_mix`` for ``backend.vjp``."""
    return lambda logits, x, *states: backend.lib.matrix_mix(x, logits, list(states[:k]), **options)


# --- the equation ------------------------------------------------------------------------


@given(
    k=st.integers(0, H + 2),
    doubly_stochastic=st.booleans(),
    iterations=st.sampled_from(ITERATIONS),
    scale=st.sampled_from([0.01, 1.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_output_is_x_plus_the_latest_row_of_the_mixed_window(backend, k, doubly_stochastic, iterations, scale, seed):
    logits, x, states = _case(seed, H, k, SHAPE, scale)  # more than H states: the last H are mixed
    options = dict(doubly_stochastic=doubly_stochastic, iterations=iterations)
    out = _skip_output(backend, logits, x, states, **options)
    np.testing.assert_allclose(out, _reference(logits, x, states, **options), rtol=1e-5, atol=1e-5)


@given(
    k=st.integers(0, H),
    iterations=st.sampled_from(ITERATIONS),
    scale=st.sampled_from([0.01, 1.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_sinkhorn_weights_are_doubly_stochastic_in_the_trailing_block(backend, k, iterations, scale, seed):
    logits = _case(seed, H, 0, SHAPE, scale)[0]
    w = _weights(backend, logits, k, iterations=iterations).astype(np.float64)
    ref = _reference_weights(logits, k, True, iterations)
    assert (w[ref == 0] == 0).all() and (w >= 0).all()  # zero outside the block: exp never underflows inside
    block = w[H - k :, H - k :]
    np.testing.assert_allclose(block.sum(axis=1), 1.0, atol=1e-6)  # the last step normalises rows
    # Columns carry the truncation error of `iterations` sweeps: no more than
    # float64 Sinkhorn's own, plus float32 rounding.
    ref_block = ref[H - k :, H - k :]
    assert (np.abs(block.sum(axis=0) - 1) <= np.abs(ref_block.sum(axis=0) - 1) + 1e-5).all()
    np.testing.assert_allclose(w, ref, atol=1e-5)


@given(k=st.integers(0, H), seed=st.integers(0, 2**16))
def test_softmax_weights_are_row_softmaxes_of_the_trailing_block(backend, k, seed):
    logits = _case(seed, H, 0, SHAPE, 3.0)[0]
    w = _weights(backend, logits, k, doubly_stochastic=False)
    np.testing.assert_allclose(w, _reference_weights(logits, k, False, 1), atol=1e-6)


@pytest.mark.parametrize("doubly_stochastic", [True, False])
def test_the_block_does_not_depend_on_the_matrix_around_it(backend, doubly_stochastic):
    # The trailing block of a 6 x 6 matrix gives what the block alone gives,
    # whatever the other logits are (here large, to tempt any leak).
    big = _case(11, 6, 0, SHAPE, 1.0)[0]
    big[:3] = 50.0
    options = dict(doubly_stochastic=doubly_stochastic, iterations=7)
    for k in (2, 5):
        alone = backend.numpy(backend.lib.matrix_weights(backend.array(big[6 - k :, 6 - k :]), k, **options))
        inside = backend.numpy(backend.lib.matrix_weights(backend.array(big), k, **options))
        np.testing.assert_allclose(inside[6 - k :, 6 - k :], alone, atol=1e-6)


def test_sinkhorn_columns_converge_with_more_iterations(backend):
    logits = _case(3, 4, 0, (1,))[0]
    w = backend.numpy(backend.lib.matrix_weights(backend.array(logits), 4, iterations=200))
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-5)


@pytest.mark.parametrize("doubly_stochastic", [True, False])
def test_empty_window_returns_x_and_gives_no_logit_gradient(backend, doubly_stochastic):
    logits, x, _ = _case(0, 3, 0, (2, 3))
    cotangent = np.ones_like(x)
    out, (d_logits, d_x) = backend.vjp(
        _mix_fn(backend, 0, doubly_stochastic=doubly_stochastic), [logits, x], cotangent
    )
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(d_x, cotangent)
    assert (d_logits == 0).all()


@pytest.mark.parametrize("doubly_stochastic", [True, False])
def test_one_state_is_a_plain_residual_whatever_the_logits(backend, doubly_stochastic):
    logits, x, states = _case(1, 4, 1, (2, 3), scale=5.0)
    out = backend.lib.matrix_mix(
        backend.array(x), backend.array(logits), [backend.array(states[0])], doubly_stochastic=doubly_stochastic
    )
    np.testing.assert_allclose(backend.numpy(out), x + states[0], atol=1e-6)


def test_only_the_last_max_history_states_are_mixed(backend):
    logits, x, states = _case(2, 3, 6, (4,))
    cotangent = np.ones_like(x)
    long, grads = backend.vjp(_mix_fn(backend, 6), [logits, x, *states], cotangent)
    short, _ = backend.vjp(_mix_fn(backend, 3), [logits, x, *states[-3:]], cotangent)
    np.testing.assert_array_equal(long, short)
    assert all((g == 0).all() for g in grads[2:5])  # the evicted states get no gradient
    assert all((g != 0).any() for g in grads[5:])


@pytest.mark.parametrize("doubly_stochastic", [True, False])
def test_logit_gradients_match_finite_differences(backend, doubly_stochastic):
    _, x, states = _case(4, 3, 3, (3,))
    logits = np.random.default_rng(5).normal(size=(3, 3))

    def fn(m):
        arrays = [backend.array(a.astype(np.float64)) for a in (x, *states)]
        if backend.name == "torch":
            arrays = [a.to(m.device) for a in arrays]
        return backend.lib.matrix_mix(arrays[0], m, arrays[1:], doubly_stochastic=doubly_stochastic, iterations=5)

    if backend.name == "jax":
        with jax.enable_x64(True):
            backend.check_grads(fn, logits)
    else:
        backend.check_grads(fn, logits)


@pytest.mark.parametrize("doubly_stochastic", [True, False])
def test_a_non_finite_logit_in_the_block_is_never_hidden(backend, doubly_stochastic):
    # Outside the trailing block a logit is unused; inside it, the output is
    # NaN (Sinkhorn: the whole block; softmax: its row, here the latest one).
    logits, x, states = _case(12, 4, 2, SHAPE)
    mix = _mix_fn(backend, 2, doubly_stochastic=doubly_stochastic)
    for value in (np.nan, np.inf, -np.inf):
        outside, inside = logits.copy(), logits.copy()
        outside[0, 0] = outside[3, 1] = value
        inside[3, 2] = value
        ok, _ = backend.vjp(mix, [outside, x, *states], np.ones_like(x))
        np.testing.assert_allclose(ok, _reference(logits, x, states, doubly_stochastic, 10), atol=1e-5)
        bad, _ = backend.vjp(mix, [inside, x, *states], np.ones_like(x))
        assert np.isnan(bad).all()


# --- the module ------------------------------------------------------------------------------


def _module_output(backend, logits, x, states, **options):
    if backend.name == "torch":
        skip = mhc_torch.MatrixMHCSkip(max_history=len(logits), **options)
        skip.load_state_dict({"mixing_logits": torch.as_tensor(logits)})
        return skip(torch.as_tensor(x), [torch.as_tensor(s) for s in states]).detach().numpy()
    skip = mhc_jax.MatrixMHCSkip(max_history=len(logits), **options)
    return np.asarray(skip.apply({"params": {"mixing_logits": logits}}, jnp.asarray(x), list(states)))


@pytest.mark.parametrize("doubly_stochastic", [True, False])
def test_the_module_mixes_with_its_own_logits(backend, doubly_stochastic):
    logits, x, states = _case(6, 4, 3, (2, 3))
    out = _module_output(backend, logits, x, states, doubly_stochastic=doubly_stochastic, iterations=4)
    np.testing.assert_allclose(out, _reference(logits, x, states, doubly_stochastic, 4), atol=1e-5)


def test_fresh_logits_are_small_and_random():
    torch_logits = mhc_torch.MatrixMHCSkip(max_history=6).mixing_logits.detach().numpy()
    x = jnp.zeros(3)
    jax_logits = mhc_jax.MatrixMHCSkip(max_history=6).init(jax.random.key(0), x, [x])["params"]["mixing_logits"]
    for logits in (torch_logits, np.asarray(jax_logits)):
        assert logits.shape == (6, 6) and logits.dtype == np.float32
        assert 0.005 < logits.std() < 0.02 and len(np.unique(logits)) == 36


BAD_OPTIONS = [
    (dict(max_history=0), ValueError, "max_history"),
    (dict(max_history=2.0), ValueError, "max_history"),
    (dict(max_history=True), ValueError, "max_history"),
    (dict(iterations=0), ValueError, "iterations"),
    (dict(iterations=2.5), ValueError, "iterations"),
    (dict(doubly_stochastic="False"), TypeError, "doubly_stochastic"),
    (dict(doubly_stochastic=1), TypeError, "doubly_stochastic"),
]


@pytest.mark.parametrize(("options", "error", "name"), BAD_OPTIONS)
def test_bad_options_are_rejected_at_construction(options, error, name):
    with pytest.raises(error, match=name):
        mhc_torch.MatrixMHCSkip(**options)
    with pytest.raises(error, match=name):
        mhc_jax.MatrixMHCSkip(**options)


def test_a_state_shaped_unlike_x_names_both_shapes(backend):
    logits, x, states = _case(7, 3, 2, (2, 3))
    states[1] = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3\)"):
        _module_output(backend, logits, x, states)


def test_a_bare_tensor_as_history_is_a_type_error():
    skip = mhc_torch.MatrixMHCSkip(max_history=2)
    with pytest.raises(TypeError, match="wrap a single state"):
        skip(torch.zeros(3), torch.zeros(3))
    jskip = mhc_jax.MatrixMHCSkip(max_history=2)
    params = {"params": {"mixing_logits": np.zeros((2, 2), np.float32)}}
    with pytest.raises(TypeError, match="wrap a single state"):
        jskip.apply(params, jnp.zeros(3), jnp.zeros(3))


def test_window_size_outside_the_matrix_is_rejected(backend):
    logits = backend.array(np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match=r"num_states.*\[0, 3\].*4"):
        backend.lib.matrix_weights(logits, 4)
    with pytest.raises(ValueError, match=r"square.*\(3, 2\)"):
        backend.lib.matrix_weights(backend.array(np.zeros((3, 2), np.float32)), 1)


def test_torch_accepts_a_history_buffer_and_none():
    logits, x, states = _case(8, 3, 4, (3,))
    skip = mhc_torch.MatrixMHCSkip(max_history=3)
    skip.load_state_dict({"mixing_logits": torch.as_tensor(logits)})
    buffer = mhc_torch.HistoryBuffer(max_history=3)
    for s in states:
        buffer.append(torch.as_tensor(s))
    got = skip(torch.as_tensor(x), buffer).detach().numpy()
    np.testing.assert_array_equal(got, skip(torch.as_tensor(x), [torch.as_tensor(s) for s in states]).detach().numpy())
    assert torch.equal(skip(torch.as_tensor(x), None), torch.as_tensor(x))


# --- JAX: History, jit ----------------------------------------------------------------------


@pytest.mark.parametrize("doubly_stochastic", [True, False])
def test_a_history_under_jit_mixes_like_the_list(doubly_stochastic):
    # Under jit the window size K is traced: matrix_weights switches between
    # the H + 1 static blocks, which must give what a Python-int K gives.
    h = 3
    logits, x, states = _case(9, h, h + 2, (2, 3), scale=2.0)
    skip = mhc_jax.MatrixMHCSkip(max_history=h, doubly_stochastic=doubly_stochastic)
    params = {"params": {"mixing_logits": jnp.asarray(logits)}}
    run = jax.jit(skip.apply)
    history = mhc_jax.History.empty(jnp.asarray(x), h)
    for k in range(h + 3):
        if k:
            history = history.push(jnp.asarray(states[k - 1]))
        expected = skip.apply(params, jnp.asarray(x), [jnp.asarray(s) for s in states[:k]])
        np.testing.assert_allclose(run(params, jnp.asarray(x), history), expected, atol=1e-6)


def test_a_history_with_another_slot_count_is_rejected():
    skip = mhc_jax.MatrixMHCSkip(max_history=3)
    params = {"params": {"mixing_logits": np.zeros((3, 3), np.float32)}}
    history = mhc_jax.History.create(jnp.zeros(2), 4)
    with pytest.raises(ValueError, match="4 slots.*max_history=3"):
        skip.apply(params, jnp.zeros(2), history)


# --- conversion ----------------------------------------------------------------------------------


def test_weights_convert_both_ways():
    logits, x, states = _case(10, 4, 3, (2, 3), scale=1.0)
    torch_skip = mhc_torch.MatrixMHCSkip(max_history=4, iterations=5)
    torch_skip.load_state_dict({"mixing_logits": torch.as_tensor(logits)})
    flax_skip = mhc_jax.MatrixMHCSkip(max_history=4, iterations=5)
    template = flax_skip.init(jax.random.key(1), jnp.asarray(x), [jnp.asarray(s) for s in states])
    params = to_flax(torch_skip, template)
    out_t = torch_skip(torch.as_tensor(x), [torch.as_tensor(s) for s in states]).detach().numpy()
    out_j = flax_skip.apply(params, jnp.asarray(x), [jnp.asarray(s) for s in states])
    np.testing.assert_allclose(out_j, out_t, atol=1e-6)

    fresh = load_flax(mhc_torch.MatrixMHCSkip(max_history=4, iterations=5), template)
    np.testing.assert_array_equal(fresh.mixing_logits.detach().numpy(), template["params"]["mixing_logits"])
