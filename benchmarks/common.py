"""Timing and memory helpers shared by the benchmarks (not part of the library).

Every ratio is measured in one run, alternating single training steps
(baseline, candidate, baseline, ...) and taking the median of the per-step
ratios, so a slow spell of a shared machine hits both sides alike.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import jax
import torch


def once(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def paired_ratio(baseline: Callable[[], None], candidate: Callable[[], None], pairs: int, warmup: int = 3) -> dict:
    """Median over ``pairs`` of candidate / mean(baseline before, baseline after)."""
    for _ in range(warmup):
        baseline(), candidate()
    ratios, base_times, cand_times = [], [], []
    for _ in range(pairs):
        b1, c, b2 = once(baseline), once(candidate), once(baseline)
        ratios.append(c / ((b1 + b2) / 2))
        base_times.append((b1 + b2) / 2)
        cand_times.append(c)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return dict(
        ratio=statistics.median(ratios),
        iqr=(q1, q3),
        base_ms=1e3 * statistics.median(base_times),
        cand_ms=1e3 * statistics.median(cand_times),
    )


def ratio_row(name: str, m: dict, target: float | None) -> str:
    """One markdown table row: baseline ms, candidate ms, ratio (IQR), verdict."""
    verdict = "" if target is None else ("meets" if m["ratio"] <= target else "MISSES") + f" <= {target:.2f}x"
    return (
        f"| {name:<28} | {m['base_ms']:8.2f} | {m['cand_ms']:8.2f} | {m['ratio']:5.3f}x "
        f"({m['iqr'][0]:.2f}-{m['iqr'][1]:.2f}) | {verdict:<14} |"
    )


def torch_train_step(model: torch.nn.Module, *inputs: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of ``mean(model(*inputs)^2)`` with respect to every parameter."""

    def step():
        model.zero_grad(set_to_none=True)
        model(*inputs).square().mean().backward()

    return step


def torch_peak_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(peak bytes allocated during a training step, bytes of activations saved for backward).

    The peak is above what was allocated before the step (parameters, input):
    on CUDA the allocator's own statistic, on CPU the profiler's memory
    timeline (allocations and frees in order). Saved bytes count each storage
    the autograd graph holds once, parameters excluded.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    def step():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).square().mean()
        loss.backward()

    model.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, sum(saved.values())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the CUDA snapshot API has no CPU twin
        prof.export_memory_timeline(f.name, device="cpu")
        _, sizes = json.load(open(f.name))
    totals = [sum(s) for s in sizes]
    return max(totals) - totals[0], sum(saved.values())


def jax_loss_grad(model, x):
    """The jitted ``value_and_grad`` of ``mean(model(x)^2)`` and abstract parameters."""
    import jax.numpy as jnp

    params = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(model.apply(p, x) ** 2))), params


def jax_train_step(model, x) -> Callable[[], None]:
    """A jitted training step, compiled up front."""
    grad, _ = jax_loss_grad(model, x)
    params = model.init(jax.random.key(0), x)
    compiled = grad.lower(params, x).compile()

    def step():
        jax.block_until_ready(compiled(params, x))

    return step


def jax_compile_seconds(model, x) -> float:
    grad, params = jax_loss_grad(model, x)
    start = time.perf_counter()
    grad.lower(params, x).compile()
    return time.perf_counter() - start


def jax_temp_bytes(model, x) -> int | None:
    """XLA's temporary buffers of the compiled training step (activations included)."""
    grad, params = jax_loss_grad(model, x)
    analysis = grad.lower(params, x).compile().memory_analysis()
    return None if analysis is None else analysis.temp_size_in_bytes
