"""mhc_torch under hostile use: compilers, sharding, threads, bad options, odd sizes, NaN.

Each test states the behaviour a user is owed (a correct answer or a clear
error, never a silent wrong one or a crash from deep inside); each failed on
the library before issue 13.
"""

from __future__ import annotations

import copy
import math
import shutil
import socket
import sys
import threading

import pytest
import torch
from torch import nn

from mhc_torch import HistoryBuffer, MHCSequential, MHCSkip

WIDTH = 8


def _stack(depth: int = 3, width: int = WIDTH, **options) -> MHCSequential:
    """A small stack with random mixing logits (so every window state matters)."""
    torch.manual_seed(0)
    model = MHCSequential([nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)], **options)
    with torch.no_grad():
        for skip in model.skip_layers:
            for p in skip.parameters():
                p.add_(0.5 * torch.randn_like(p))
    return model


def _reference(model: MHCSequential, x: torch.Tensor) -> torch.Tensor:
    """The contract's loop, each skip called on its own with the last H states."""
    h, window = model.max_history, [x]
    for layer, skip in zip(model.wrapped_modules, model.skip_layers, strict=True):
        x = skip(layer(x), window[-h:])
        window.append(x)
    return x


def _loss_and_grads(fn, model: nn.Module, x: torch.Tensor):
    x = x.detach().requires_grad_(True)
    out = fn(x)
    grads = torch.autograd.grad(out.square().mean(), [x, *model.parameters()])
    return out.detach(), grads


# --- torch.compile ------------------------------------------------------------


def _compile_unavailable(backend: str) -> str | None:
    if not sys.platform.startswith("linux"):
        return "torch.compile is tested on Linux"
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    from torch import _dynamo

    if not _dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version_info[:2]} in this torch"
    if backend == "inductor" and shutil.which("c++") is None and shutil.which("g++") is None:
        return "inductor compiles C++ on CPU and no C++ compiler is installed"
    return None


# aot_eager traces with dynamo and AOT autograd (where a library breaks a
# fullgraph capture) without inductor's C++ compile; one inductor case checks
# the default backend end to end (~1 min cold, seconds with its cache).
COMPILE_CASES = [
    pytest.param("aot_eager", False, id="aot_eager"),
    pytest.param("aot_eager", True, id="aot_eager-checkpointing"),
    pytest.param("inductor", False, id="inductor"),
]


@pytest.mark.parametrize("backend, checkpointing", COMPILE_CASES)
def test_torch_compile_fullgraph_dynamic_matches_eager(backend, checkpointing):
    reason = _compile_unavailable(backend)
    if reason:
        pytest.skip(reason)
    model = _stack(max_history=3, use_gating=True, use_checkpointing=checkpointing).train()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    for batch in (4, 7):  # a second batch size: the dynamic graph serves it
        x = torch.randn(batch, WIDTH)
        expected, expected_grads = _loss_and_grads(model, model, x)
        out, grads = _loss_and_grads(compiled, model, x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# --- FSDP2 --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def single_process_group():
    """A gloo process group of one process on a free localhost port."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_every_parameter_is_at_least_1d_so_fsdp2_can_shard_it():
    model = MHCSequential([nn.Linear(4, 4)], use_gating=True)
    assert {n: tuple(p.shape) for n, p in model.named_parameters() if p.dim() < 1} == {}
    assert tuple(model.skip_layers[0].gate_logit.shape) == (1,)


def test_fully_shard_a_gated_stack_trains_like_the_unsharded_one(single_process_group):
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    model = _stack(max_history=3, use_gating=True).train()
    unsharded = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.wrapped_modules:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randn(5, WIDTH)
    out = model(x)
    out.square().mean().backward()
    expected = unsharded(x)
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    names = [n for n, _ in unsharded.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == names
    for name, p, q in zip(names, model.parameters(), unsharded.parameters(), strict=True):
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(grad, q.grad, rtol=1e-6, atol=1e-6, msg=f"gradient of {name}")


# --- threads ------------------------------------------------------------------


def test_one_model_shared_by_threads_gives_each_caller_its_own_answer():
    # clear_history_each_forward=True: a forward's window is its own, so a
    # model may serve several threads at once for inference.
    threads, calls = 4, 50
    model = _stack(depth=6, width=16, max_history=4, clear_history_each_forward=True).eval()
    inputs = [torch.randn(3, 16) * (t + 1) for t in range(threads)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    barrier = threading.Barrier(threads)
    results: list[list[torch.Tensor]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def serve(t: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():  # grad mode is per thread
                for _ in range(calls):
                    results[t].append(model(inputs[t]))
        except BaseException as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    workers = [threading.Thread(target=serve, args=(t,)) for t in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so calls interleave mid-forward
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert not any(w.is_alive() for w in workers), "a thread did not finish"
    assert not errors, f"a thread raised: {errors[0]!r}"
    wrong = sum(
        not torch.allclose(out, expected[t], rtol=1e-6, atol=1e-6) for t in range(threads) for out in results[t]
    )
    assert [len(r) for r in results] == [calls] * threads
    assert wrong == 0, f"{wrong} of {threads * calls} outputs differ from the single-threaded answer"


# --- boolean options ------------------------------------------------------------

BAD_BOOLS = [
    pytest.param(lambda: MHCSkip(stochastic="False"), "stochastic", id="MHCSkip-stochastic"),
    pytest.param(lambda: MHCSkip(use_gating=1), "use_gating", id="MHCSkip-use_gating"),
    pytest.param(lambda: MHCSkip(auto_project="yes"), "auto_project", id="MHCSkip-auto_project"),
    pytest.param(
        lambda: MHCSequential([nn.Linear(2, 2)], detach_history="no"), "detach_history", id="MHCSequential-detach"
    ),
    pytest.param(
        lambda: MHCSequential([nn.Linear(2, 2)], clear_history_each_forward="False"),
        "clear_history_each_forward",
        id="MHCSequential-clear",
    ),
    pytest.param(
        lambda: MHCSequential([nn.Linear(2, 2)], use_checkpointing=0), "use_checkpointing", id="MHCSequential-ckpt"
    ),
    pytest.param(lambda: MHCSequential([nn.Linear(2, 2)], stochastic=1), "stochastic", id="MHCSequential-stochastic"),
    pytest.param(lambda: HistoryBuffer(4, detach_history="x"), "detach_history", id="HistoryBuffer-detach"),
]


@pytest.mark.parametrize("build, name", BAD_BOOLS)
def test_boolean_options_reject_non_booleans(build, name):
    # bool("False") is True: a string or number where a switch belongs is an error.
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        build()


# --- sizes ----------------------------------------------------------------------


def test_a_window_longer_than_64_states_trains():
    h = 65
    model = _stack(depth=h + 3, width=4, max_history=h, init="uniform").train()
    x = torch.randn(2, 4)
    out, grads = _loss_and_grads(model, model, x)
    expected, expected_grads = _loss_and_grads(lambda x: _reference(model, x), model, x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().mean().backward()
    optimizer.step()
    assert torch.isfinite(model(x)).all()


# --- non-finite logits ------------------------------------------------------------

BAD_LOGITS = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}


@pytest.mark.parametrize("bad", BAD_LOGITS.values(), ids=BAD_LOGITS.keys())
@pytest.mark.parametrize(
    "options",
    [dict(mode="mhc"), dict(mode="hc"), dict(mode="mhc", constraint="identity", use_gating=True)],
    ids=["mhc", "hc", "mhc-identity-gated"],
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_non_finite_logit_makes_the_stack_output_nan(options, bad, train):
    # Never the residual alone (a skip that silently disappears), never an exception.
    model = _stack(depth=3, max_history=3, **options).train(train)
    with torch.no_grad():
        model.skip_layers[1].mixing_logits[-1] = bad
    out = model(torch.randn(4, WIDTH))
    assert torch.isnan(out).all(), f"a {bad} logit gave {out}"
    single = model.skip_layers[1](torch.zeros(2, WIDTH), [torch.ones(2, WIDTH)] * 3)
    assert torch.isnan(single).all(), "the skip called on its own hides the bad logit"
