"""mhc_jax's mix primitive and its C++ weight-gradient call (mhc_jax/_native.py),
against the plain jnp forms and against calculus."""

from __future__ import annotations

import shutil
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mhc_jax import MHCSequential, _native


def _states(k: int, shape=(3, 37), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=shape).astype(dtype)) for _ in range(k)]


def _weights(k: int, dtype=np.float32):
    return jnp.asarray(np.linspace(-0.7, 1.3, k).astype(dtype))


@pytest.fixture
def library():
    lib = _native.native_library()
    if lib is None:
        pytest.skip("the C++ custom call could not be built here")
    return lib


def _compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_the_custom_call_builds_wherever_there_is_a_compiler():
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler on this machine: XLA's reductions run")
    assert _native.native_library() is not None, "a compiler is present but the call did not build (see the warning)"


# Sizes around the kernel's 16-float blocks (the tail loop), state counts
# around its groups of four (4 + 1, 4 + 3, ...).
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(1,), (15,), (3, 37), (2, 4, 64)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_custom_call_equals_the_sums(library, k, shape, dtype):
    with jax.enable_x64(bool(dtype == np.float64)):
        states = _states(k, shape, dtype)
        g = _states(1, shape, dtype, seed=1)[0]
        fn = lambda g, *hs: _native.window_dots(g, hs)
        assert "mhc_window_dots" in _compiled_text(fn, g, *states)
        got = np.asarray(jax.jit(fn)(g, *states))
        want = np.array([np.sum(np.asarray(g, np.float64) * np.asarray(h, np.float64)) for h in states])
        assert got.dtype == dtype
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.sqrt(np.prod(shape)))


def test_custom_call_is_deterministic(library):
    states, g = _states(4, (64, 129)), _states(1, (64, 129), seed=3)[0]
    fn = jax.jit(lambda g, *hs: _native.window_dots(g, hs))
    first = np.asarray(fn(g, *states))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(fn(g, *states)), first)


def test_half_precision_and_big_states_use_xla_reductions(library):
    fn = lambda g, *hs: _native.window_dots(g, hs)
    half = _states(2, (8, 8), np.float32)
    half = [h.astype(jnp.bfloat16) for h in half]
    assert "mhc_window_dots" not in _compiled_text(fn, half[0], *half)
    big = jax.ShapeDtypeStruct((_native.MAX_NATIVE_SIZE + 1,), jnp.float32)
    assert "mhc_window_dots" not in jax.jit(fn).lower(big, big, big).compile().as_text()


def test_mismatched_inputs_get_a_clear_error():
    states = _states(2, (3, 4))
    with pytest.raises(ValueError, match="one shape and dtype"):
        _native.mix(_weights(3), states)
    with pytest.raises(ValueError, match="one shape and dtype"):
        _native.window_dots(states[0], [states[0], states[1][:2]])
    with pytest.raises(ValueError, match="one shape and dtype"):
        _native.window_dots(states[0], [states[0], states[1].astype(jnp.bfloat16)])


def _mix_loss(w, *states):
    return jnp.sum(jnp.sin(_native.mix(w, states)))


def _reference_loss(w, *states):
    return jnp.sum(jnp.sin(_native.mix_reference(w, *states)))


@pytest.mark.parametrize("argnums", [(0,), (1, 3), (0, 1, 2, 3)])
def test_reverse_mode_equals_plain_autodiff(argnums):
    w, states = _weights(3), _states(3)
    got = jax.jit(jax.grad(_mix_loss, argnums=argnums))(w, *states)
    want = jax.grad(_reference_loss, argnums=argnums)(w, *states)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_forward_mode_and_higher_derivatives_equal_plain_autodiff():
    w, states = _weights(3), _states(3, (4, 5))
    for transform in (jax.jacfwd, jax.jacrev, jax.hessian):
        got = transform(_mix_loss)(w, *states)
        want = transform(_reference_loss)(w, *states)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Second order through the states too (the dots primitive's own rules).
    got = jax.hessian(_mix_loss, argnums=(0, 2))(w, *states)
    want = jax.hessian(_reference_loss, argnums=(0, 2))(w, *states)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_check_grads_both_modes_second_order():
    with jax.enable_x64(True):
        w, states = _weights(3, np.float64), _states(3, (2, 3), np.float64)
        check_grads(lambda w, a, b, c: _mix_loss(w, a, b, c), (w, *states), order=2, modes=("fwd", "rev"))
        g = _states(1, (2, 3), np.float64, seed=5)[0]
        dots = lambda g, a, b, c: jnp.sum(jnp.cos(_native.window_dots(g, (a, b, c))))
        check_grads(dots, (g, *states), order=2, modes=("fwd", "rev"))


def test_vmap_of_grad_equals_a_loop():
    ws = jnp.stack([_weights(3) * s for s in (1.0, -0.5, 2.0)])
    states = _states(3, (4, 5))
    per_example = jax.vmap(jax.grad(_mix_loss, argnums=(0, 1)), in_axes=(0, None, None, None))
    got = per_example(ws, *states)
    for i in range(3):
        want = jax.grad(_reference_loss, argnums=(0, 1))(ws[i], *states)
        for a, b in zip((got[0][i], got[1][i]), want, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(x.shape[-1])(x))


def _stack_grads(model, x):
    params = model.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + 0.3 * jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), params)
    loss = lambda p, x: jnp.sum(model.apply(p, x) * jnp.linspace(-1, 1, x.size).reshape(x.shape))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return step, params


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(mode="hc", use_gating=True),
        dict(detach_history=True),
        dict(scan=True),
        dict(scan=True, remat=True),
        dict(max_history=6),
    ],
)
def test_stack_gradients_with_and_without_the_custom_call(library, options):
    depth = 7
    layers = [_Block()] * depth if options.get("scan") else [_Block() for _ in range(depth)]
    model = MHCSequential(layers, **{"max_history": 3, **options})
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32))
    step, params = _stack_grads(model, x)
    assert "mhc_window_dots" in step.lower(params, x).compile().as_text()
    got = step(params, x)
    with _native.reference_kernel():
        step, params = _stack_grads(model, x)
        assert "mhc_window_dots" not in step.lower(params, x).compile().as_text()
        want = step(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_env_switch_and_failed_build_fall_back(monkeypatch, tmp_path):
    saved = dict(_native._state)
    try:
        _native._state.clear()
        monkeypatch.setenv("MHC_JAX_NATIVE", "0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the switch skips the attempt silently
            assert _native.native_library() is None
        _native._state.clear()
        monkeypatch.setenv("MHC_JAX_NATIVE", "1")
        monkeypatch.setenv("CXX", "/nonexistent/c++")
        monkeypatch.setenv("MHC_JAX_EXTENSIONS_DIR", str(tmp_path))
        with pytest.warns(RuntimeWarning, match="could not build"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "mhc_jax: compiling")  # the attempt's announcement
            assert _native.native_library() is None
        # ... and the stack still trains, on XLA's reductions.
        model = MHCSequential([_Block() for _ in range(3)])
        x = jnp.ones((2, 4))
        step, params = _stack_grads(model, x)
        assert "mhc_window_dots" not in step.lower(params, x).compile().as_text()
        assert np.all(np.isfinite(jax.tree.leaves(step(params, x))[0]))
    finally:
        _native._state.clear()
        _native._state.update(saved)
