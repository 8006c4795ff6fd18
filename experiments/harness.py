"""What the experiment scripts share: reproducible processes, a grid of runs, saved records.

Every run is one call of a top-level function on one config dict, in a
process of its own with one CPU thread and its seed set first, so its numbers
do not depend on how many runs go in parallel (``--jobs``) or in which order.
One thread also keeps the float reductions in one fixed order: the same
machine and library versions give the same numbers on every rerun.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import multiprocessing
import platform
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
#: The residual connections compared: plain, the history window (softmax or
#: simplex weights), residual streams (unconstrained or Sinkhorn ``h_res``).
VARIANTS = ("residual", "hc", "mhc", "streams-hc", "streams-mhc")


def start_run(seed: int) -> None:
    """One thread, deterministic kernels, every random generator seeded."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_grid(run: Callable[[dict], dict], configs: Sequence[dict], jobs: int) -> list[dict]:
    """``[run(c) for c in configs]``, in ``jobs`` worker processes when ``jobs > 1``.

    ``spawn`` gives every run a fresh interpreter (no torch state inherited
    from the parent); results come back in the order of ``configs``.
    """
    if jobs <= 1:
        return [run(config) for config in configs]
    with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        return pool.map(run, configs, chunksize=1)


def experiment(name: str, run, configs, order, summarise, plot, settings: dict, out: Path, jobs: int) -> dict:
    """Run every config, then save the records in ``order``, the table and the figure, and print the table."""
    records = sorted(run_grid(run, configs, jobs), key=order)
    rows, table = summarise(records, settings)
    save(out, name, settings, records, rows, table)
    plot(records, settings, out / f"{name}.png")
    print(table)
    return dict(records=records, table=table)


def parser(description: str) -> argparse.ArgumentParser:
    """The options every experiment takes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON, CSV, table and figure")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one CPU thread each; the numbers do not change)")
    p.add_argument("--smoke", action="store_true", help="a tiny version that only checks the script runs")
    return p


def library_digest() -> str:
    """A hash of the ``mhc_torch`` source the runs imported: which version of the library made a table."""
    import mhc_torch

    digest = hashlib.sha256()
    for file in sorted(Path(mhc_torch.__file__).parent.glob("*.py")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def environment() -> dict:
    """The versions a table was made with (its numbers are tied to them)."""
    return dict(
        mhc_torch_source_sha256=library_digest(),
        python=sys.version.split()[0],
        torch=torch.__version__,
        numpy=np.__version__,
        machine=platform.machine(),
        processor=platform.processor() or "unknown",
    )


def save(out: Path, name: str, settings: dict, records: list[dict], rows: list[dict], table: str) -> None:
    """``name.json`` (settings, environment, every run with its curves),
    ``name.csv`` (one row per run) and ``name.md`` (the summary table)."""
    out.mkdir(parents=True, exist_ok=True)
    document = dict(settings=settings, environment=environment(), runs=records)
    (out / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.md").write_text(table)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def connection_summary(stack: torch.nn.Module, x: torch.Tensor, *args) -> dict:
    """What the residual connection learned, for one batch ``x`` entering ``stack``.

    History window: the mean weight of the newest state over the layers (1
    is a plain residual connection; less means the layers mix in older
    states). Streams: the composite forward and backward gains of ``h_res``
    (the largest over the tokens of ``x``), at every depth.
    """
    import mhc_torch

    if isinstance(stack, mhc_torch.MHCSequential):
        weights = mhc_torch.extract_mixing_weights(stack)
        return dict(newest_weight=float(np.mean([w[-1] for w in weights.values()])),
                    min_newest_weight=float(np.min([w[-1] for w in weights.values()])))
    if isinstance(stack, mhc_torch.StreamSequential):
        with torch.no_grad():
            h_res = stack.coefficients(x, *args)[2]
        gains = mhc_torch.h_res_gains(h_res)
        return {key: gains[key].tolist() for key in ("composite_forward", "composite_backward",
                                                     "layer_forward", "layer_backward")}
    return {}


class Residual(torch.nn.Module):
    """The plain residual stack, ``x_{l+1} = x_l + f_l(x_l)``."""

    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def connect(variant: str, layers: list[torch.nn.Module], width: int, settings: dict) -> torch.nn.Module:
    """``layers`` joined by ``variant``'s residual connection (one of :data:`VARIANTS`)."""
    import mhc_torch

    if variant == "residual":
        return Residual(layers)
    if variant in ("hc", "mhc"):
        return mhc_torch.MHCSequential(layers, max_history=settings["max_history"], mode=variant)
    if variant in ("streams-hc", "streams-mhc"):
        return mhc_torch.StreamSequential(layers, num_streams=settings["num_streams"],
                                          mode=variant.split("-")[1], dim=width)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
