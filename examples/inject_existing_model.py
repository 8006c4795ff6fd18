"""Add hyper-connections to an existing PyTorch model with inject_mhc.

    python examples/inject_existing_model.py

An ordinary MLP classifier (with one custom, already hyper-connected layer
marked @mhc_compatible) gets an MHCSkip around each of its nn.Linear layers.
Widths change along the model (2 -> 64 -> 64 -> 64 -> 4), so the skips map
history states of other widths with learned projections; example_input
creates them before the optimizer is built. The decorated layer is left as
it was.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from mhc_torch import MHCInjected, MHCSkip, diagnose, extract_mixing_weights, inject_mhc, mhc_compatible


@mhc_compatible
class OwnMixer(nn.Module):
    """Already handles its own hyper-connectivity: injection must not touch it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.skip = MHCSkip(max_history=2, mode="hc")

    def forward(self, x):
        return self.skip(torch.relu(self.fc(x)), [x])


def existing_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(2, 64), nn.GELU(),
        nn.Linear(64, 64), nn.GELU(),
        OwnMixer(64),
        nn.Linear(64, 64), nn.GELU(),
        nn.Linear(64, 4),
    )


def spirals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    r = torch.rand(n, generator=g)
    angle = 4.0 * r + labels * (torch.pi / 2) + 0.2 * torch.randn(n, generator=g)
    return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1), labels


def main(epochs: int = 10, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = existing_model()
    own = model[4]
    inject_mhc(model, nn.Linear, max_history=4, mode="mhc", init="uniform", example_input=torch.zeros(1, 2))
    wrapped = [name for name, m in model.named_modules() if isinstance(m, MHCInjected)]
    print(f"wrapped: {wrapped}; the decorated layer is untouched: {model[4] is own and type(own.fc) is nn.Linear}")

    x_train, y_train = spirals(4096, seed)
    x_test, y_test = spirals(1024, seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train)).split(128):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])  # windows clear at every call
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    print(f"after {epochs} epochs: loss {loss.item():.3f}, test accuracy {accuracy:.3f}")

    weights = extract_mixing_weights(model)
    for name, w in weights.items():
        print(f"  {name:12s} {[round(v, 3) for v in w.tolist()]}")
    for warning in diagnose(weights):
        print("diagnosis:", warning)
    return dict(wrapped=wrapped, accuracy=accuracy, untouched=model[4] is own)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    main(**vars(parser.parse_args()))
