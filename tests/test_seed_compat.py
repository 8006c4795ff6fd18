"""Code written for the ``mhc`` package (0.5.5) runs with only the import changed.

The script below uses that package's public API as its README and docstrings
show it; it runs against ``mhc_torch`` here, and against ``mhc`` itself when
that package is installed (proof that the script is the old package's code).
Errors the old package raised as ``RuntimeError`` are instances of both that
and this package's own type, so old and new ``except`` clauses both work.
"""

from __future__ import annotations

import os
import random
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import mhc_jax
import mhc_torch

SEED_SCRIPT = '''
import torch
from torch import nn

mhc.set_seed(0)
layers = [nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(4)]
model = mhc.MHCSequential(layers, max_history=3, mode="mhc", temperature=1.0, use_gating=True)
x = torch.randn(2, 8)
y = model(x)

buffer = mhc.HistoryBuffer(max_history=2)
buffer.append(x)
buffer.append(2 * x)
mixed = mhc.MHCSkip(mode="hc", max_history=2)(x, buffer.get())
recent = utils.get_last_k(utils.ensure_list(x) + buffer.get(), 2)

net = mhc.inject_mhc_default(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)))
injected = net(x)

profiler = mhc.ForwardProfiler(model, filter_fn=lambda name, module: isinstance(module, nn.Linear))
profiler.start()
model(x)
profiler.stop()
times = profiler.summary()

with mhc.autocast_context():
    model(x)
stable = mhc.MHCSkip(**mhc.get_preset("stable"))
default_history = mhc.get_default_config().max_history
default_buffer = mhc.HistoryBuffer()

try:
    mhc.MHCSkip(max_history=2)(x, [torch.randn(2, 3)])
except RuntimeError as err:
    shape_error = err
'''


def _run_script(mhc, utils) -> dict:
    namespace = {"mhc": mhc, "utils": utils}
    exec(SEED_SCRIPT, namespace)
    return namespace


@pytest.fixture
def global_state(monkeypatch):
    """set_seed changes process-wide state: give the rest of the suite its own back."""
    monkeypatch.setenv("PYTHONHASHSEED", os.environ.get("PYTHONHASHSEED", "0"))
    saved = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.random.set_rng_state(saved[2])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def _check_script_results(ns: dict) -> None:
    assert ns["y"].shape == (2, 8) and torch.isfinite(ns["y"]).all()
    assert ns["mixed"].shape == (2, 8)
    assert len(ns["recent"]) == 2 and ns["recent"][-1] is ns["buffer"].get()[-1]
    assert ns["injected"].shape == (2, 8)
    linears = {name for name, m in ns["model"].named_modules() if isinstance(m, nn.Linear)}
    assert set(ns["times"]) == linears and all(t > 0 for t in ns["times"].values())
    assert ns["default_history"] == 4 and ns["default_buffer"].max_history == 4
    assert isinstance(ns["shape_error"], RuntimeError)


def test_a_script_for_mhc_runs_on_mhc_torch(global_state):
    ns = _run_script(mhc_torch, mhc_torch)
    _check_script_results(ns)
    assert isinstance(ns["shape_error"], ValueError)  # and this package's own type
    assert ns["stable"].constraint == "identity"
    # set_seed made the run reproducible: the same script gives the same output.
    again = _run_script(mhc_torch, mhc_torch)
    torch.testing.assert_close(again["y"], ns["y"], rtol=0, atol=0)


def test_the_script_is_the_mhc_packages_code(global_state):
    mhc = pytest.importorskip("mhc", reason="the mhc package (read for compatibility) is not installed")
    if not hasattr(mhc, "ForwardProfiler"):
        pytest.skip(f"an unrelated package named mhc is installed: {mhc!r}")
    import mhc.utils  # noqa: F401  (its helpers live there)

    _check_script_results(_run_script(mhc, mhc.utils))


# --- set_seed ---------------------------------------------------------------


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


@pytest.mark.usefixtures("global_state")
def test_set_seed_seeds_python_numpy_and_torch():
    mhc_torch.set_seed(123, verbose=False)
    first = _draws()
    mhc_torch.set_seed(123, verbose=False)
    assert _draws() == first
    mhc_torch.set_seed(124, verbose=False)
    assert _draws() != first
    assert os.environ["PYTHONHASHSEED"] == "124"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic = False
    mhc_torch.set_seed(1, verbose=False, deterministic=False)
    assert not torch.backends.cudnn.deterministic  # left alone when asked


@pytest.mark.usefixtures("global_state")
def test_jax_set_seed_seeds_python_numpy_and_returns_the_key():
    key = mhc_jax.set_seed(123, verbose=False)
    first = (random.random(), float(np.random.rand()))
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(123)))
    mhc_jax.set_seed(123, verbose=False)
    assert (random.random(), float(np.random.rand())) == first


@pytest.mark.parametrize("lib", [mhc_torch, mhc_jax], ids=["torch", "jax"])
def test_bad_seed_is_named(lib):
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match=rf"seed must be an int in \[0, 2\*\*32\), got {bad}"):
            lib.set_seed(bad)
    for bad in ("a", 1.5, True, None):
        with pytest.raises(TypeError, match="seed must be an int"):
            lib.set_seed(bad)


# --- ForwardProfiler --------------------------------------------------------


class _Slow(nn.Module):
    """Sleeps a known time, so a measured time has a lower bound."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def test_profiler_times_each_module_and_parents_include_children():
    model = nn.Sequential(_Slow(0.01), nn.Sequential(_Slow(0.02), nn.ReLU()))
    with mhc_torch.ForwardProfiler(model) as profiler:
        model(torch.ones(2))
        model(torch.ones(2))
    times, calls = profiler.summary(), profiler.times_ms
    assert set(times) == {"", "0", "1", "1.0", "1.1"}
    assert all(len(calls[name]) == 2 for name in times)
    assert times["0"] >= 10 and times["1.0"] >= 20  # milliseconds, at least the sleeps
    assert times["1"] >= times["1.0"] and times[""] >= times["0"] + times["1"]
    model(torch.ones(2))  # stopped: nothing more is recorded
    assert all(len(calls[name]) == 2 for name in times)


def test_profiler_filter_shared_layers_and_a_failing_forward():
    shared = _Slow(0.0)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    profiler = mhc_torch.ForwardProfiler(model, filter_fn=lambda name, module: isinstance(module, _Slow))
    profiler.start()
    with pytest.raises(RuntimeError, match="already started"):
        profiler.start()
    model(torch.ones(1))
    assert set(profiler.times_ms) == {"0"} and len(profiler.times_ms["0"]) == 2  # one module, called twice
    shared.seconds = "not a number"  # the next forward raises inside the hooked module
    with pytest.raises(TypeError):
        model(torch.ones(1))
    shared.seconds = 0.0
    model(torch.ones(1))
    assert len(profiler.times_ms["0"]) == 5  # the failed call's start was popped, not left behind
    profiler.stop()
    profiler.reset()
    assert profiler.summary() == {}


def test_profiler_bad_arguments_are_named():
    with pytest.raises(TypeError, match="nn.Module"):
        mhc_torch.ForwardProfiler(None)
    with pytest.raises(TypeError, match="filter_fn"):
        mhc_torch.ForwardProfiler(nn.ReLU(), filter_fn="Linear")


# --- compile_model, autocast_context, inject_mhc_default ---------------------


def test_compile_model_is_torch_compile():
    model = nn.Linear(2, 2)
    compiled = mhc_torch.compile_model(model)
    assert isinstance(compiled, nn.Module) and compiled is not model
    assert compiled.state_dict().keys() == {f"_orig_mod.{k}" for k in model.state_dict()}
    with pytest.raises(TypeError, match="nn.Module"):
        mhc_torch.compile_model(lambda x: x)


def test_autocast_context():
    a = torch.ones(4, 4)
    with mhc_torch.autocast_context("cpu", torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with mhc_torch.autocast_context():  # "cuda" without CUDA: full precision, no error
            assert (a @ a).dtype == torch.float32


def test_inject_mhc_default_wraps_linear_conv_and_norm_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4), nn.Linear(4, 4))
    mhc_torch.inject_mhc_default(model, max_history=3, history_scope="module")
    wrapped = [type(m.layer) for m in model if isinstance(m, mhc_torch.MHCInjected)]
    assert wrapped == [nn.Linear, nn.LayerNorm, nn.Linear] and isinstance(model[1], nn.ReLU)
    assert all(m.skip.max_history == 3 for m in model if isinstance(m, mhc_torch.MHCInjected))
    assert model(torch.randn(2, 4)).shape == (2, 4)
    conv = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))
    mhc_torch.inject_mhc_default(conv)
    assert isinstance(conv[0], mhc_torch.MHCInjected)
    assert conv(torch.randn(1, 3, 5, 5)).shape == (1, 3, 5, 5)


# --- history helpers --------------------------------------------------------


@pytest.mark.parametrize("lib", [mhc_torch, mhc_jax], ids=["torch", "jax"])
def test_history_helpers(lib):
    make = torch.ones if lib is mhc_torch else jnp.ones
    states = [make(2) * i for i in range(5)]
    assert len(lib.ensure_list(states[0])) == 1 and lib.ensure_list(states[0])[0] is states[0]
    assert lib.ensure_list(states) is states and lib.ensure_list(tuple(states)) == states
    for k in range(7):
        last = lib.get_last_k(states, k)
        assert len(last) == min(k, 5) and all(a is b for a, b in zip(last, states[5 - len(last) :]))
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="k must be an int >= 0"):
            lib.get_last_k(states, bad)


def test_history_helpers_read_the_containers():
    buffer = mhc_torch.HistoryBuffer(3)
    for i in range(4):
        buffer.append(torch.full((1,), float(i)))
    assert [float(s) for s in mhc_torch.get_last_k(buffer, 2)] == [2.0, 3.0]
    history = mhc_jax.History.create(jnp.zeros(1), 3)
    for i in range(1, 4):
        history = history.push(jnp.full((1,), float(i)))
    assert [float(s[0]) for s in mhc_jax.get_last_k(history, 2)] == [2.0, 3.0]


# --- errors that are both the old type and the new --------------------------


def _torch_mistakes():
    x = torch.randn(2, 4)
    return {
        "history state of another shape": lambda: mhc_torch.MHCSkip()(x, [torch.randn(2, 3)]),
        "the same, residual mode": lambda: mhc_torch.MHCSkip(mode="residual")(x, [torch.randn(2, 3)]),
        "auto_project beyond the feature axis": lambda: mhc_torch.MHCSkip(auto_project=True)(x, [torch.randn(3, 3)]),
        "a stack layer that changes the width": lambda: mhc_torch.MHCSequential([nn.Linear(4, 3)])(x),
        "a tensor as the history": lambda: mhc_torch.MHCSkip()(x, torch.randn(3, 2, 4)),
    }


#: What each mistake raised in mhc 0.5.5 (all RuntimeError) and here before.
OLD_AND_NEW = {
    "history state of another shape": (RuntimeError, ValueError),
    "the same, residual mode": (RuntimeError, ValueError),
    "auto_project beyond the feature axis": (RuntimeError, ValueError),
    "a stack layer that changes the width": (RuntimeError, ValueError),
    "a tensor as the history": (RuntimeError, TypeError),
}


@pytest.mark.parametrize("mistake", sorted(OLD_AND_NEW))
def test_torch_errors_are_the_old_type_and_the_new(mistake):
    with pytest.raises(Exception) as err:
        _torch_mistakes()[mistake]()
    for kind in OLD_AND_NEW[mistake]:
        assert isinstance(err.value, kind), (mistake, type(err.value).__mro__)


@pytest.mark.parametrize("mistake", sorted(OLD_AND_NEW))
def test_mhc_raised_those_types(mistake):
    mhc = pytest.importorskip("mhc", reason="the mhc package (read for compatibility) is not installed")
    if not hasattr(mhc, "ForwardProfiler"):
        pytest.skip(f"an unrelated package named mhc is installed: {mhc!r}")
    old = types.SimpleNamespace(MHCSkip=mhc.MHCSkip, MHCSequential=mhc.MHCSequential)
    x = torch.randn(2, 4)
    calls = {
        "history state of another shape": lambda: old.MHCSkip()(x, [torch.randn(2, 3)]),
        "the same, residual mode": lambda: old.MHCSkip(mode="residual")(x, [torch.randn(2, 3)]),
        "auto_project beyond the feature axis": lambda: old.MHCSkip(auto_project=True)(x, [torch.randn(3, 3)]),
        "a stack layer that changes the width": lambda: old.MHCSequential([nn.Linear(4, 3)])(x),
        "a tensor as the history": lambda: old.MHCSkip()(x, torch.randn(3, 2, 4)),
    }
    with pytest.raises(OLD_AND_NEW[mistake][0]):
        calls[mistake]()


def test_jax_history_errors_are_the_same_types():
    x = jnp.ones((2, 4))
    skip = mhc_jax.MHCSkip()
    params = skip.init(jax.random.key(0), x, [x])
    with pytest.raises(mhc_jax.HistoryShapeError) as err:
        skip.apply(params, x, [jnp.ones((2, 3))])
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)
    with pytest.raises(mhc_jax.HistoryShapeError):
        mhc_jax.History.create(x, 2).push(jnp.ones((2, 3)))
    with pytest.raises(mhc_jax.HistoryTypeError) as err:
        skip.apply(params, x, jnp.ones((3, 2, 4)))
    assert isinstance(err.value, TypeError) and isinstance(err.value, RuntimeError)
    assert mhc_torch.HistoryShapeError.__mro__[1:3] == mhc_jax.HistoryShapeError.__mro__[1:3]
