"""A character-level transformer on the Python standard library's source: residual vs HC vs mHC.

    python experiments/char_lm.py            # about 15-30 min on 2 cores; writes docs/results/char_lm.*
    python experiments/char_lm.py --smoke    # seconds: checks the script runs

The corpus is the text of this interpreter's standard library: the ``.py``
files directly in its ``stdlib`` folder, sorted by name; every tenth file
(index 9, 19, ...) is the validation set, the rest the training set. Tokens
are the files' UTF-8 bytes (vocabulary 256; the text is 99.99% ASCII, so a
byte is a character), files joined with a blank line.

The model is a small pre-norm transformer: byte and position embeddings,
``layers`` blocks each of two branches, ``LayerNorm -> causal attention`` and
``LayerNorm -> MLP (4x, GELU)``, then ``LayerNorm -> Linear``. The ``2 *
layers`` branches are joined by one of four residual connections:

* ``residual``: ``x + f(x)`` after every branch;
* ``mhc``: the history window, ``mhc_torch.MHCSequential(max_history=4)``;
* ``streams-hc``: ``mhc_torch.StreamSequential(num_streams=4, mode="hc")``,
  Zhu et al.'s unconstrained hyper-connections;
* ``streams-mhc``: the same with ``mode="mhc"``, DeepSeek's Sinkhorn-projected
  ``h_res``.

Every variant trains for the same number of steps on the same batches (Adam,
linear warm-up then cosine decay, gradient norm clipped at 1). Every
``eval_every`` steps: bits per character on a fixed set of validation windows,
and, for the streams, the composite forward and backward gains of ``h_res``
on the first validation batch (``StreamSequential.coefficients`` and
``mhc_torch.h_res_gains``: the largest absolute row and column sums of
``h_res^(l) ... h_res^(1)`` at every depth ``l``, largest over the tokens).
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import harness

VARIANTS = ("residual", "mhc", "streams-hc", "streams-mhc")
SETTINGS = dict(seeds=(0,), width=128, layers=4, heads=4, context=64, batch=16, steps=400, lr=2e-3,
                warmup=40, eval_every=25, eval_batches=12, max_history=4, num_streams=4, max_files=None)
SMOKE = dict(SETTINGS, width=16, layers=1, heads=2, context=16, batch=2, steps=2, warmup=1, eval_every=1,
             eval_batches=1, max_files=12)
VALIDATION_EVERY = 10  # file i is validation text when i % 10 == 9


def load_corpus(max_files: int | None = None) -> dict:
    """The training and validation bytes, and what identifies the corpus."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(folder.glob("*.py"))[:max_files]
    parts = {"train": [], "validation": []}
    for index, file in enumerate(files):
        split = "validation" if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
        parts[split].append(file.read_bytes())
    data = {split: torch.frombuffer(bytearray(b"\n\n".join(chunks)), dtype=torch.uint8).long()
            for split, chunks in parts.items()}
    digest = hashlib.sha256(b"".join(bytes(data[s].to(torch.uint8).numpy()) for s in ("train", "validation")))
    data["description"] = dict(folder=str(folder), files=len(files), train_bytes=len(data["train"]),
                               validation_bytes=len(data["validation"]), sha256=digest.hexdigest()[:16])
    return data


def windows(text: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets of the windows starting at ``starts``."""
    index = starts[:, None] + torch.arange(context + 1)
    chunk = text[index]
    return chunk[:, :-1], chunk[:, 1:]


class Attention(nn.Module):
    """``LayerNorm -> causal multi-head self-attention``: a branch ``(B, T, C) -> (B, T, C)``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


def mlp(width: int) -> nn.Module:
    """``LayerNorm -> Linear(C, 4C) -> GELU -> Linear(4C, C)``: a branch."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


class CharLM(nn.Module):
    def __init__(self, variant: str, settings: dict):
        super().__init__()
        width = settings["width"]
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.randn(settings["context"], width) * 0.02)
        branches = []
        for _ in range(settings["layers"]):
            branches += [Attention(width, settings["heads"]), mlp(width)]
        self.stack = harness.connect(variant, branches, width, settings)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 256))

    def inputs(self, tokens):
        """What enters the residual connection: ``(B, T, C)``."""
        return self.embed(tokens) + self.position[: tokens.shape[1]]

    def forward(self, tokens):
        return self.head(self.stack(self.inputs(tokens)))


def learning_rate(step: int, settings: dict) -> float:
    """Linear warm-up to ``lr``, then cosine decay to a tenth of it at the last step."""
    if step <= settings["warmup"]:
        return settings["lr"] * step / settings["warmup"]
    progress = (step - settings["warmup"]) / max(1, settings["steps"] - settings["warmup"])
    return settings["lr"] * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def run(config: dict) -> dict:
    """One training run; returns its curves and final numbers."""
    settings, variant, seed = config["settings"], config["variant"], config["seed"]
    harness.start_run(seed)
    corpus = load_corpus(settings["max_files"])
    context, batch = settings["context"], settings["batch"]
    # The same validation windows for every run, the same training batches for every variant of a seed.
    validation_starts = torch.randint(0, len(corpus["validation"]) - context - 1,
                                      (settings["eval_batches"], batch), generator=torch.Generator().manual_seed(1234))
    order = torch.Generator().manual_seed(seed)
    model = CharLM(variant, settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    curve = dict(step=[], validation_bpc=[], train_bpc=[], connection=[])
    train_losses = []

    def evaluate(step):
        model.eval()
        with torch.no_grad():
            losses = [nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                      for x, y in (windows(corpus["validation"], s, context) for s in validation_starts)]
            x, _ = windows(corpus["validation"], validation_starts[0], context)
            connection = harness.connection_summary(model.stack, model.inputs(x))
        model.train()
        curve["step"].append(step)
        curve["validation_bpc"].append(float(np.mean(losses)) / math.log(2))
        curve["train_bpc"].append(float(np.mean(train_losses)) / math.log(2) if train_losses else None)
        curve["connection"].append(connection)
        train_losses.clear()

    evaluate(0)
    start = time.perf_counter()
    for step in range(1, settings["steps"] + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        x, y = windows(corpus["train"], torch.randint(0, len(corpus["train"]) - context - 1, (batch,),
                                                      generator=order), context)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_losses.append(loss.item())
        if step % settings["eval_every"] == 0 or step == settings["steps"]:
            evaluate(step)
    wall = time.perf_counter() - start
    print(f"{variant:12s} seed {seed}: validation {curve['validation_bpc'][-1]:.4f} bits/char ({wall:.0f} s)",
          flush=True)
    return dict(variant=variant, seed=seed, wall_s=wall, parameters=sum(p.numel() for p in model.parameters()),
                corpus=corpus["description"], curve=curve)


def peak_gain(record: dict, direction: str) -> tuple[float, float]:
    """The largest composite gain over depth: at the last evaluation, and the highest over training."""
    per_eval = [max(c[f"composite_{direction}"]) for c in record["curve"]["connection"]]
    return per_eval[-1], max(per_eval)


def summarise(records: list[dict], settings: dict) -> tuple[list[dict], str]:
    rows, table = [], []
    for r in records:
        streams = r["variant"].startswith("streams")
        gains = {d: peak_gain(r, d) if streams else (float("nan"),) * 2 for d in ("forward", "backward")}
        rows.append(dict(variant=r["variant"], seed=r["seed"], parameters=r["parameters"],
                         validation_bpc=f"{r['curve']['validation_bpc'][-1]:.4f}",
                         best_validation_bpc=f"{min(r['curve']['validation_bpc']):.4f}",
                         composite_forward_gain_final=f"{gains['forward'][0]:.4g}",
                         composite_forward_gain_peak=f"{gains['forward'][1]:.4g}",
                         composite_backward_gain_final=f"{gains['backward'][0]:.4g}",
                         composite_backward_gain_peak=f"{gains['backward'][1]:.4g}",
                         wall_s=f"{r['wall_s']:.0f}",
                         ms_per_step=f"{1000 * r['wall_s'] / settings['steps']:.0f}"))
        row = rows[-1]
        gain = (lambda d: f"{row[f'composite_{d}_gain_final']} (peak {row[f'composite_{d}_gain_peak']})") \
            if streams else (lambda d: "-")
        table.append([f"`{r['variant']}`", str(r["seed"]), f"{r['parameters']:,}", row["validation_bpc"],
                      gain("forward"), gain("backward"), row["wall_s"]])
    header = ["variant", "seed", "parameters", f"validation bits/char after {settings['steps']} steps",
              "composite forward gain: end (peak over training)", "composite backward gain: end (peak)",
              "wall time (s)"]
    return rows, harness.markdown_table(header, table)


def plot(records: list[dict], settings: dict, path) -> None:
    """Validation bits/char and the streams' composite gains over training, and the final gain over depth."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    (bpc, depth_ax), (forward, backward) = fig.subplots(2, 2)
    colours = dict(zip(VARIANTS, ("black", "tab:blue", "tab:red", "tab:green"), strict=True))
    for r in records:
        steps, colour, label = r["curve"]["step"], colours[r["variant"]], f"{r['variant']} (seed {r['seed']})"
        bpc.plot(steps[1:], r["curve"]["validation_bpc"][1:], color=colour, label=label)
        if not r["variant"].startswith("streams"):
            continue
        for ax, direction in ((forward, "forward"), (backward, "backward")):
            ax.plot(steps, [max(c[f"composite_{direction}"]) for c in r["curve"]["connection"]],
                    color=colour, label=label)
        final = r["curve"]["connection"][-1]
        layers = np.arange(1, len(final["composite_forward"]) + 1)
        depth_ax.plot(layers, final["composite_forward"], color=colour, label=f"{label}, forward")
        depth_ax.plot(layers, final["composite_backward"], color=colour, linestyle="--", label=f"{label}, backward")
    bpc.set(xlabel="training step", ylabel="validation bits per character", title="validation loss")
    bpc.legend()
    for ax, direction in ((forward, "forward"), (backward, "backward")):
        ax.set(xlabel="training step", ylabel=f"composite {direction} gain (max over depth)", yscale="log",
               title=f"largest {'row' if direction == 'forward' else 'column'} sum of h_res(l)...h_res(1)")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.legend()
    depth_ax.set(xlabel="depth l (hyper-connections, attention and MLP counted separately)",
                 ylabel="composite gain after training", yscale="log", title="gain of the first l layers' h_res")
    depth_ax.axhline(1.0, color="grey", linewidth=0.8)
    depth_ax.legend(fontsize=8)
    for ax in (bpc, depth_ax, forward, backward):
        ax.grid(alpha=0.3)
    fig.suptitle(f"Character-level LM on the Python standard library ({settings['layers']} blocks, width "
                 f"{settings['width']}, {settings['steps']} steps of {settings['batch']}x{settings['context']} bytes)")
    fig.savefig(path, dpi=110)


def main(out=harness.RESULTS, jobs: int = 2, smoke: bool = False) -> dict:
    settings = SMOKE if smoke else SETTINGS
    configs = [dict(settings=settings, variant=v, seed=s) for s in settings["seeds"] for v in reversed(VARIANTS)]

    def order(r):  # the table's order
        return (VARIANTS.index(r["variant"]), r["seed"])

    return harness.experiment("char_lm", run, configs, order, summarise, plot, settings, out, jobs)


if __name__ == "__main__":
    args = harness.parser(__doc__).parse_args()
    main(args.out, args.jobs, args.smoke)
