"""Watch what each layer learns to mix: a heatmap of layers x history slots.

    python examples/heatmap.py       # needs matplotlib: pip install 'mhc-jax-torch[plots]'

Trains a 10-layer MHCSequential (mode="mhc", uniform init; the mixing logits
with their own, larger learning rate) on a small regression task, then saves the learned mixing weights as a PNG heatmap
(examples/out/mixing_heatmap.png) and prints the diagnosis. Exact zeros of
the simplex projection show as switched-off history slots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from mhc_torch import MHCSequential, diagnose, extract_mixing_weights, plot_mixing_heatmap

OUT = Path(__file__).resolve().parent / "out"


def main(steps: int = 400, seed: int = 0, path: str | None = None) -> dict:
    torch.manual_seed(seed)
    width = 32
    model = nn.Sequential(
        nn.Linear(8, width),
        MHCSequential([nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(10)],
                      max_history=4, mode="mhc", init="uniform"),
        nn.Linear(width, 1),
    )
    x = torch.randn(2048, 8)
    y = torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:2]) + x[:, 2:3] * x[:, 3:4]
    # The mixing logits are few and far from the loss: give them their own,
    # larger learning rate, or they barely move from their init.
    mixing = [p for n, p in model.named_parameters() if n.endswith("mixing_logits")]
    others = [p for n, p in model.named_parameters() if not n.endswith("mixing_logits")]
    optimizer = torch.optim.Adam([{"params": others, "lr": 3e-3}, {"params": mixing, "lr": 5e-2}])
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,))
        loss = (model(x[idx]) - y[idx]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained {steps} steps, loss {loss.item():.4f}")

    weights = extract_mixing_weights(model)
    path = Path(path) if path else OUT / "mixing_heatmap.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_mixing_heatmap(weights, path=str(path), title="learned mixing weights (mode='mhc')")
    print(f"heatmap saved to {path}")
    warnings = diagnose(weights)
    for warning in warnings:
        print("diagnosis:", warning)
    if not warnings:
        print("diagnosis: no warning signs")
    return dict(path=path, weights=weights, warnings=warnings)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    main(**vars(parser.parse_args()))
