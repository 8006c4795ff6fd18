"""Train in PyTorch, convert the weights, run the same model in JAX.

    python examples/torch_to_jax.py

A small image classifier (a conv stem, a conv MHCSequential, a linear head)
is trained with torch on synthetic 8x8 images, its state_dict converted to
Flax parameters (Conv kernels OIHW -> HWIO, Linear kernels transposed) and
evaluated by the Flax twin on the same images (NCHW -> NHWC). The outputs
match to float32 rounding, and the JAX copy can be jitted and trained on.
"""

from __future__ import annotations

import argparse

import flax.linen as fnn
import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mhc_jax
import mhc_torch
from mhc_torch.convert import to_flax

CHANNELS, DEPTH, CLASSES = 8, 4, 3


class TorchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, CHANNELS, 3, padding=1)
        self.stack = mhc_torch.MHCSequential(
            [nn.Sequential(nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), nn.ReLU()) for _ in range(DEPTH)],
            max_history=3,
        )
        self.head = nn.Linear(CHANNELS, CLASSES)

    def forward(self, images):  # NCHW
        return self.head(self.stack(self.stem(images)).mean(dim=(2, 3)))


class FlaxNet(fnn.Module):
    """The same network; submodules named after the torch attributes."""

    @fnn.compact
    def __call__(self, images):  # NHWC
        x = fnn.Conv(CHANNELS, (3, 3), padding=1, name="stem")(images)
        layers = [fnn.Sequential([fnn.Conv(CHANNELS, (3, 3), padding=1), jax.nn.relu]) for _ in range(DEPTH)]
        x = mhc_jax.MHCSequential(layers, max_history=3, name="stack")(x)
        return fnn.Dense(CLASSES, name="head")(x.mean(axis=(1, 2)))


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: horizontal stripes, 1: vertical stripes, 2: a bright centre; plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    grid = np.arange(8)
    patterns = np.stack([
        np.tile((grid % 2)[:, None], (1, 8)),
        np.tile((grid % 2)[None, :], (8, 1)),
        np.pad(np.ones((4, 4)), 2),
    ]).astype(np.float32)
    x = patterns[labels] + 0.7 * rng.normal(size=(n, 8, 8))
    return x[:, None].astype(np.float32), labels


def main(steps: int = 300, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x_train, y_train = images(2048, seed)
    x_test, y_test = images(512, seed + 1)
    model = TorchNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(xt), (128,))
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            print(f"torch step {step:4d}  loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()

    nhwc = np.transpose(x_test, (0, 2, 3, 1))
    template = FlaxNet().init(jax.random.key(0), nhwc[:1])
    params = to_flax(model, template)
    jax_logits = np.asarray(jax.jit(FlaxNet().apply)(params, nhwc))

    difference = float(np.abs(jax_logits - torch_logits).max())
    torch_acc = float((torch_logits.argmax(-1) == y_test).mean())
    jax_acc = float((jax_logits.argmax(-1) == y_test).mean())
    print(f"\ntest accuracy: torch {torch_acc:.3f}, jax {jax_acc:.3f}")
    print(f"max |jax - torch| over {len(x_test)} test logits: {difference:.2e}")
    return dict(difference=difference, torch_accuracy=torch_acc, jax_accuracy=jax_acc)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    main(**vars(parser.parse_args()))
