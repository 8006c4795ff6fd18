"""Manage a HistoryBuffer yourself (PyTorch): the "manual buffer loop" pattern.

    python examples/torch_manual_history.py

A model that applies one block several times per sample keeps the block's
earlier outputs in a HistoryBuffer and mixes them back in with an MHCSkip.
The buffer lives on the module and persists across forward calls, so the
training loop clears it at the start of every batch; without that, features
of one batch leak into the next ("temporal bleeding"), which the end of this
script shows.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from mhc_torch import HistoryBuffer, MHCSkip


class IterativeRefiner(nn.Module):
    """Refine a representation ``steps`` times with one shared block.

    The model is the "governor" of its HistoryBuffer: it decides which states
    are remembered (each refinement step's output) and when to forget them.
    """

    def __init__(self, dim: int = 32, classes: int = 4, steps: int = 6, max_history: int = 4) -> None:
        super().__init__()
        self.steps = steps
        self.embed = nn.Linear(2, dim)
        self.block = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.skip = MHCSkip(max_history=max_history, mode="mhc", init="uniform")
        self.buffer = HistoryBuffer(max_history=max_history)
        self.head = nn.Linear(dim, classes)

    def clear_history(self) -> None:
        self.buffer.clear()

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        x = self.embed(points)
        self.buffer.append(x)
        for _ in range(self.steps):
            hist = self.buffer.get()  # 1. fetch the current window
            out = self.skip(self.block(x), hist)  # 2. transform and mix
            self.buffer.append(out)  # 3. remember the new state (evicts the oldest)
            x = out
        return self.head(x)


def spirals(n: int, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    r = torch.rand(n, generator=g)
    angle = 4.0 * r + labels * (2 * torch.pi / classes) + 0.2 * torch.randn(n, generator=g)
    return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1), labels


def main(epochs: int = 15, batch: int = 128, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x_train, y_train = spirals(4096, seed=seed)
    x_test, y_test = spirals(1024, seed=seed + 1)
    model = IterativeRefiner()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            model.clear_history()
            return (model(x_test).argmax(-1) == y_test).float().mean().item()

    print(f"test accuracy before training: {accuracy():.3f}")
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(x_train)).split(batch):
            model.clear_history()  # CRITICAL: every batch starts with an empty window
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % 5 == 0 or epoch == epochs:
            print(f"epoch {epoch:3d}  loss {loss.item():.3f}  test accuracy {accuracy():.3f}")
    final = accuracy()

    # Temporal bleeding: the same batch twice, without clearing in between.
    model.eval()
    with torch.no_grad():
        model.clear_history()
        first = model(x_test[:8])
        again = model(x_test[:8])  # the window still holds the first call's states
        model.clear_history()
        cleared = model(x_test[:8])
    bled = (first - again).abs().max().item()
    print(f"\nsame batch, history not cleared: outputs differ by {bled:.3f} (temporal bleeding)")
    print(f"same batch, history cleared:     outputs differ by {(first - cleared).abs().max().item():.3f}")
    return dict(accuracy=final, bleeding=bled, cleared=(first - cleared).abs().max().item())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    main(**vars(parser.parse_args()))
