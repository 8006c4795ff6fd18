"""Speed and memory of MHCSequential against a plain residual stack, side by side.

    python benchmarks/bench_stack.py            # everything (a few minutes on 2 CPU cores)
    python benchmarks/bench_stack.py --quick    # fewer pairs, no torch.compile

Every ratio is measured in one run, alternating single training steps
(baseline, candidate, baseline, ...) and taking the median of the per-step
ratios, so a slow spell of a shared machine hits both sides alike. A step is
forward + backward of ``mean(out^2)`` with respect to every parameter.

Eager torch is also timed with each stack alone in a fresh process, with
glibc's default allocator settings and with freed memory kept in the process:
alternating steps share one heap, and with the defaults the page faults one
stack's frees cause can land on the other's step.

Setup: depth 50, width 256, batch 128, H = 4, each layer ``f = GELU(Linear)``;
the residual baseline ``x + f(x)`` uses the very same layer objects (torch) or
the same layer definitions (JAX).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

import mhc_jax
import mhc_torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    jax_compile_seconds,
    jax_temp_bytes,
    jax_train_step,
    once,
    paired_ratio,
    ratio_row,
    torch_peak_bytes,
    torch_train_step,
)

DEPTH, WIDTH, BATCH, H = 50, 256, 128, 4
TARGETS = {"torch eager": 1.25, "torch.compile": 1.15, "jax unrolled (jit)": 1.20, "jax scanned (jit)": 1.20}


# --- torch ------------------------------------------------------------------------------


def torch_block() -> nn.Module:
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU())


class TorchResidual(nn.Module):
    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x):
        for f in self.layers:
            x = x + f(x)
        return x


def torch_models(**options):
    torch.manual_seed(0)
    mhc = mhc_torch.MHCSequential([torch_block() for _ in range(DEPTH)], max_history=H, **options)
    return mhc, TorchResidual(mhc.wrapped_modules)


def seed_models():
    """The seed library (``pip install mhc``), when installed."""
    try:
        import mhc as seed
    except Exception:  # not installed, or its matplotlib import failed
        return None
    torch.manual_seed(0)
    model = seed.MHCSequential([torch_block() for _ in range(DEPTH)], max_history=H)
    return model, TorchResidual(model.wrapped_modules)


# --- JAX --------------------------------------------------------------------------------


class JaxBlock(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        return fnn.gelu(fnn.Dense(WIDTH)(x), approximate=False)


class JaxResidual(fnn.Module):
    depth: int

    @fnn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = x + JaxBlock()(x)
        return x


class _ResidualStep(fnn.Module):
    @fnn.compact
    def __call__(self, x, _):
        return x + JaxBlock()(x), None


class JaxScannedResidual(fnn.Module):
    depth: int

    @fnn.compact
    def __call__(self, x):
        scanned = fnn.scan(_ResidualStep, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth)
        return scanned()(x, None)[0]


# --- report -------------------------------------------------------------------------------


def torch_rows(x: torch.Tensor, pairs: int) -> None:
    mhc, residual = (m.to(x.device) for m in torch_models())
    print(_row("torch eager", paired_ratio(torch_train_step(residual, x), torch_train_step(mhc, x), pairs)), flush=True)


# glibc returns freed blocks above these sizes to the OS; the next allocation
# then pays page faults again. Raised, freed memory stays in the process
# (what jemalloc and tcmalloc do by default).
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
ALONE = ("residual", "mhc")


def alone_ms(which: str, steps: int) -> float:
    """Median step time (ms) of one eager torch stack with the process to itself."""
    mhc, residual = torch_models()
    step = torch_train_step(residual if which == "residual" else mhc, torch.randn(BATCH, WIDTH))
    for _ in range(5):
        step()
    return 1e3 * statistics.median(once(step) for _ in range(steps))


def alone_rows(rounds: int, steps: int) -> None:
    """Eager torch stacks, each in a fresh process, so no stack runs on a heap
    the other left behind; with glibc's defaults and with freed memory kept."""
    print("| allocator | residual ms | mhc ms | ratio |")
    print("| --- | ---: | ---: | ---: |", flush=True)
    for name, extra in (("glibc defaults", {}), ("glibc keeping freed memory", KEEP_FREED_MEMORY)):
        times = {which: [] for which in ALONE}
        for _ in range(rounds):  # round-robin, so a slow spell hits every stack
            for which in ALONE:
                command = [sys.executable, __file__, "--alone", which, "--steps", str(steps)]
                done = subprocess.run(command, env={**os.environ, **extra}, capture_output=True, text=True, check=True)
                times[which].append(float(done.stdout.split()[-1]))
        base = times["residual"]
        cells = [f"{statistics.median(base):.2f}"]
        for which in ALONE[1:]:
            ratio = statistics.median(c / b for c, b in zip(times[which], base, strict=True))
            cells += [f"{statistics.median(times[which]):.2f}", f"{ratio:.3f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def _row(name: str, m: dict) -> str:
    return ratio_row(name, m, TARGETS.get(name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer pairs, no torch.compile")
    parser.add_argument("--pairs", type=int, default=None, help="step pairs per ratio (default 60, quick 15)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--alone", choices=ALONE, help=argparse.SUPPRESS)  # one stack, for alone_rows
    parser.add_argument("--steps", type=int, default=30, help=argparse.SUPPRESS)
    args = parser.parse_args()
    pairs = args.pairs or (15 if args.quick else 60)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.alone:
        print(alone_ms(args.alone, args.steps))
        return

    print(f"# mhc benchmark: depth {DEPTH}, width {WIDTH}, batch {BATCH}, H = {H}, f = GELU(Linear)")
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__} ({device}), jax {jax.__version__} ({jax.default_backend()}), "
        f"{pairs} step pairs per ratio\n"
    )
    print("## training step (forward + backward), MHCSequential over a plain residual stack\n")
    print("| stack | residual ms | mhc ms | ratio (IQR) | target |")
    print("| --- | ---: | ---: | --- | --- |")

    x = torch.randn(BATCH, WIDTH, device=device)
    torch_rows(x, pairs)
    mhc, residual = (m.to(device) for m in torch_models())
    if not (args.quick or args.no_compile):
        compiled_mhc, compiled_res = torch.compile(mhc), torch.compile(residual)
        print(_row("torch.compile", paired_ratio(torch_train_step(compiled_res, x), torch_train_step(compiled_mhc, x), pairs)), flush=True)
    seed = seed_models()
    if seed is None:
        print("| seed library `mhc`            | not installed (pip install mhc matplotlib) |")
    else:
        s_mhc, s_res = (m.to(device) for m in seed)
        print(_row("seed library mhc 0.5 (eager)", paired_ratio(torch_train_step(s_res, x), torch_train_step(s_mhc, x), pairs)), flush=True)

    xj = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, WIDTH)).astype(np.float32))
    unrolled = mhc_jax.MHCSequential([JaxBlock() for _ in range(DEPTH)], max_history=H)
    scanned = mhc_jax.MHCSequential.scanned(JaxBlock(), DEPTH, max_history=H)
    for name, model, base in (
        ("jax unrolled (jit)", unrolled, JaxResidual(DEPTH)),
        ("jax scanned (jit)", scanned, JaxScannedResidual(DEPTH)),
    ):
        base_step = jax_train_step(base, xj)
        print(_row(name, paired_ratio(base_step, jax_train_step(model, xj), pairs)), flush=True)

    if device == "cpu" and platform.system() == "Linux":
        print(
            "\n## eager torch, each stack alone in a fresh process (median of 5 rounds)\n\n"
            "Alternating steps share one heap: with glibc's defaults, memory one stack frees and glibc\n"
            "returns to the OS costs page faults in the next step, whichever stack runs it. Kept freed\n"
            "memory: " + " ".join(f"{k}={v}" for k, v in KEEP_FREED_MEMORY.items()) + ".\n"
        )
        alone_rows(rounds=5 if not args.quick else 2, steps=30 if not args.quick else 10)

    print("\n## compile time of the jitted training step (seconds)\n")
    print("| depth | scanned mhc | unrolled mhc |")
    print("| ---: | ---: | ---: |")
    times = {}
    for depth in (8, 64, 256):
        scan_s = jax_compile_seconds(mhc_jax.MHCSequential.scanned(JaxBlock(), depth, max_history=H), xj)
        unrolled_s = (
            jax_compile_seconds(mhc_jax.MHCSequential([JaxBlock() for _ in range(depth)], max_history=H), xj)
            if depth <= 64 and not args.quick
            else float("nan")
        )
        times[depth] = scan_s
        print(f"| {depth} | {scan_s:.2f} | {unrolled_s:.2f} |", flush=True)
    flat = times[256] / times[8]
    print(f"\nscanned depth 256 / depth 8: {flat:.2f}x ({'meets' if flat <= 2 else 'MISSES'} <= 2x)")

    print("\n## memory of one training step, detach_history off / on\n")
    print("| stack | detach_history=False | detach_history=True |")
    print("| --- | --- | --- |")
    cells = []
    for detach in (False, True):
        model, _ = (m.to(device) for m in torch_models(detach_history=detach))
        peak, saved = torch_peak_bytes(model, x)
        cells.append(f"peak {peak / 2**20:.2f} MiB, saved activations {saved / 2**20:.2f} MiB")
    print(f"| torch eager | {cells[0]} | {cells[1]} |")
    cells = []
    for detach in (False, True):
        temp = jax_temp_bytes(mhc_jax.MHCSequential([JaxBlock() for _ in range(DEPTH)], max_history=H, detach_history=detach), xj)
        cells.append("n/a" if temp is None else f"XLA temp buffers {temp / 2**20:.2f} MiB")
    print(f"| jax unrolled (jit) | {cells[0]} | {cells[1]} |")
    temp = jax_temp_bytes(JaxResidual(DEPTH), xj)
    print(f"| jax residual baseline | XLA temp buffers {temp / 2**20:.2f} MiB | |")
    _, residual = torch_models()
    peak, saved = torch_peak_bytes(residual.to(device), x)
    print(f"| torch residual baseline | peak {peak / 2**20:.2f} MiB, saved activations {saved / 2**20:.2f} MiB | |")


if __name__ == "__main__":
    main()
