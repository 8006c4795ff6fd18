"""A deep MLP on scikit-learn's bundled digits data: plain residual vs hyper-connections.

    python experiments/digits_mlp.py            # about 20-40 min on 2 cores; writes docs/results/digits_mlp.*
    python experiments/digits_mlp.py --smoke    # seconds: checks the script runs

The 1,797 8x8 handwritten digits (scikit-learn's ``load_digits``, shipped
with the package: no download) are split once, stratified, into 1,347
training and 450 test images. The model is ``Linear(64, W)``, then ``depth``
layers ``LayerNorm -> Linear(W, W) -> GELU`` joined by one of five residual
connections, then ``LayerNorm -> Linear(W, 10)``:

* ``residual``: ``x + f(x)``;
* ``hc`` / ``mhc``: the history window, ``mhc_torch.MHCSequential`` with
  ``max_history=4`` (softmax weights / simplex projection);
* ``streams-hc`` / ``streams-mhc``: ``mhc_torch.StreamSequential`` with
  ``num_streams=4`` (Zhu et al.'s unconstrained coefficients / DeepSeek's
  Sinkhorn-projected ``h_res``).

Every variant trains with the same Adam settings for the same number of steps
on the same batches (the seed fixes the init and the batch order), three
seeds each, at depth 32 and 64. Test loss and accuracy are measured every
``eval_every`` steps on the whole test set.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

import harness

VARIANTS = harness.VARIANTS
SETTINGS = dict(depths=(32, 64), seeds=(0, 1, 2), width=64, steps=120, batch=256, lr=1e-3, eval_every=10,
                max_history=4, num_streams=4)
SMOKE = dict(SETTINGS, depths=(2,), seeds=(0,), width=8, steps=2, eval_every=1)


def load_digits_split() -> tuple[torch.Tensor, ...]:
    """The fixed split: ``x_train, y_train, x_test, y_test`` (pixels scaled to [0, 1])."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=450, stratify=y, random_state=0)
    f, i = torch.float32, torch.long
    return (torch.tensor(x_train, dtype=f), torch.tensor(y_train, dtype=i),
            torch.tensor(x_test, dtype=f), torch.tensor(y_test, dtype=i))


def build(variant: str, depth: int, width: int, settings: dict) -> nn.Module:
    layers = [nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(depth)]
    return nn.Sequential(nn.Linear(64, width), harness.connect(variant, layers, width, settings),
                         nn.LayerNorm(width), nn.Linear(width, 10))


def run(config: dict) -> dict:
    """One training run; returns its curves and final numbers."""
    settings, variant, depth, seed = config["settings"], config["variant"], config["depth"], config["seed"]
    harness.start_run(seed)
    x_train, y_train, x_test, y_test = load_digits_split()
    model = build(variant, depth, settings["width"], settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    order = torch.Generator().manual_seed(seed)
    curve = dict(step=[], test_loss=[], test_accuracy=[], train_loss=[])
    train_losses = []
    start = time.perf_counter()
    for step in range(1, settings["steps"] + 1):
        batch = torch.randint(0, len(x_train), (settings["batch"],), generator=order)
        loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train_losses.append(loss.item())
        if step % settings["eval_every"] == 0 or step == settings["steps"]:
            with torch.no_grad():
                logits = model(x_test)
            curve["step"].append(step)
            curve["test_loss"].append(nn.functional.cross_entropy(logits, y_test).item())
            curve["test_accuracy"].append((logits.argmax(-1) == y_test).float().mean().item())
            curve["train_loss"].append(float(np.mean(train_losses)))
            train_losses = []
    wall = time.perf_counter() - start
    with torch.no_grad():
        connection = harness.connection_summary(model[1], model[0](x_test))
    print(f"depth {depth:3d} {variant:12s} seed {seed}: test accuracy {curve['test_accuracy'][-1]:.4f}, "
          f"test loss {curve['test_loss'][-1]:.4f} ({wall:.0f} s)", flush=True)
    return dict(variant=variant, depth=depth, seed=seed, wall_s=wall, curve=curve, connection=connection)


def summarise(records: list[dict], settings: dict) -> tuple[list[dict], str]:
    """Per-run CSV rows, and the table: mean and spread over the seeds per depth and variant."""
    rows = [dict(depth=r["depth"], variant=r["variant"], seed=r["seed"],
                 test_accuracy=f"{r['curve']['test_accuracy'][-1]:.4f}",
                 test_loss=f"{r['curve']['test_loss'][-1]:.4f}",
                 best_test_accuracy=f"{max(r['curve']['test_accuracy']):.4f}",
                 wall_s=f"{r['wall_s']:.1f}") for r in records]
    table = []
    for depth in settings["depths"]:
        for variant in VARIANTS:
            runs = [r for r in records if r["depth"] == depth and r["variant"] == variant]
            accuracy = np.array([r["curve"]["test_accuracy"][-1] for r in runs]) * 100
            loss = np.array([r["curve"]["test_loss"][-1] for r in runs])
            table.append([str(depth), f"`{variant}`",
                          f"{accuracy.mean():.2f} ({', '.join(f'{a:.2f}' for a in accuracy)})",
                          f"{loss.mean():.3f} ({', '.join(f'{v:.3f}' for v in loss)})"])
    header = ["depth", "variant", f"test accuracy % after {settings['steps']} steps: mean (per seed)",
              "test loss: mean (per seed)"]
    return rows, harness.markdown_table(header, table)


def plot(records: list[dict], settings: dict, path) -> None:
    """Test accuracy and test loss against steps: one row per depth, the seeds' mean with their range shaded."""
    from matplotlib.figure import Figure

    depths = settings["depths"]
    fig = Figure(figsize=(11, 3.6 * len(depths)), layout="constrained")
    axes = fig.subplots(len(depths), 2, squeeze=False)
    colours = dict(zip(VARIANTS, ("black", "tab:orange", "tab:blue", "tab:red", "tab:green"), strict=True))
    for row, depth in zip(axes, depths, strict=True):
        for variant in VARIANTS:
            runs = [r for r in records if r["depth"] == depth and r["variant"] == variant]
            steps = runs[0]["curve"]["step"]
            for ax, key, scale in ((row[0], "test_accuracy", 100), (row[1], "test_loss", 1)):
                values = np.array([r["curve"][key] for r in runs]) * scale
                ax.plot(steps, values.mean(0), color=colours[variant], label=variant)
                ax.fill_between(steps, values.min(0), values.max(0), color=colours[variant], alpha=0.15)
        row[0].set_ylabel(f"test accuracy (%), depth {depth}")
        row[1].set_ylabel(f"test loss (cross-entropy), depth {depth}")
        row[1].set_yscale("log")
        for ax in row:
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
        row[0].set_ylim(max(0, row[0].get_ylim()[0]), 100)
    axes[0][0].legend(title="residual connection")
    fig.suptitle(f"Deep MLP on scikit-learn digits (width {settings['width']}, batch {settings['batch']}, "
                 f"Adam lr {settings['lr']:g}): mean of {len(settings['seeds'])} seeds, range shaded")
    fig.savefig(path, dpi=110)


def main(out=harness.RESULTS, jobs: int = 2, smoke: bool = False) -> dict:
    settings = SMOKE if smoke else SETTINGS
    configs = [dict(settings=settings, variant=v, depth=d, seed=s)
               for d in settings["depths"] for s in settings["seeds"] for v in VARIANTS]
    # The deepest, slowest runs first, so the last worker does not start one alone.
    configs.sort(key=lambda c: (-c["depth"], -VARIANTS.index(c["variant"])))

    def order(r):  # the table's order
        return (r["depth"], VARIANTS.index(r["variant"]), r["seed"])

    return harness.experiment("digits_mlp", run, configs, order, summarise, plot, settings, out, jobs)


if __name__ == "__main__":
    args = harness.parser(__doc__).parse_args()
    main(args.out, args.jobs, args.smoke)
