"""A small CNN of mHC convolutional blocks: train in torch, run the same weights in JAX.

    python examples/cnn_mhc.py                # 300 steps on scikit-learn's digits
    python examples/cnn_mhc.py --steps 40     # a quick run

The network is a stem ``MHCConv2d``, two ``MHCBasicBlock`` (the second halves
the image and doubles the width) and an ``MHCBottleneck``, all sharing one
window of earlier states: a fresh ``HistoryBuffer`` per forward (torch), a
list carried through the call (Flax). Each block mixes the last three states,
read with a stride where the image is larger and mapped to its width.

Data: the 8x8 digit images bundled with scikit-learn when it is installed,
otherwise random images whose labels a fixed random linear map decides (the
script says which it used). After training, the script prints test accuracy
and each layer's learned mixing weights (an exact 0 is a slot that
``mode="mhc"`` switched off), converts the weights (batch-norm
statistics included) to the Flax twin, and prints how far the JAX outputs are
from torch's on the test images.
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

WIDTH, HISTORY, CLASSES = 16, 3, 10
#: Every layer's skip: a window of three states, the other options at their
#: defaults (mode "mhc" and the identity init: each layer starts as a plain
#: residual, and training moves the weights).
SKIP = dict(max_history=HISTORY)


class TorchCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = mhc_torch.MHCConv2d(1, WIDTH, 3, padding=1, **SKIP)
        self.block1 = mhc_torch.MHCBasicBlock(WIDTH, WIDTH, **SKIP)
        self.block2 = mhc_torch.MHCBasicBlock(WIDTH, 2 * WIDTH, stride=2, **SKIP)
        self.block3 = mhc_torch.MHCBottleneck(2 * WIDTH, WIDTH // 2, **SKIP)
        self.head = nn.Linear(2 * WIDTH, CLASSES)

    def forward(self, images):  # NCHW
        history = mhc_torch.HistoryBuffer(HISTORY)  # this call's window, starting with the images
        x = self.stem(images, history)
        for block in (self.block1, self.block2, self.block3):
            x = block(x, history)
        return self.head(x.mean(dim=(2, 3)))


class FlaxCNN(fnn.Module):
    """The same network in Flax; submodules named after the torch attributes."""

    @fnn.compact
    def __call__(self, images, train: bool = False):  # NHWC
        bn = {"use_running_average": not train}
        x, history = mhc_jax.MHCConv2d(1, WIDTH, 3, padding=1, **SKIP, name="stem")(images, [])
        x, history = mhc_jax.MHCBasicBlock(WIDTH, WIDTH, **SKIP, name="block1")(x, history, **bn)
        x, history = mhc_jax.MHCBasicBlock(WIDTH, 2 * WIDTH, stride=2, **SKIP, name="block2")(x, history, **bn)
        x, _ = mhc_jax.MHCBottleneck(2 * WIDTH, WIDTH // 2, **SKIP, name="block3")(x, history, **bn)
        return fnn.Dense(CLASSES, name="head")(x.mean(axis=(1, 2)))


def load_data(seed: int = 0) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(source, x_train, y_train, x_test, y_test), images NCHW in [0, 1]."""
    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        x = rng.uniform(size=(1797, 1, 8, 8)).astype(np.float32)
        y = (x.reshape(len(x), -1) @ rng.normal(size=(64, CLASSES))).argmax(axis=1)
        source = "random images (scikit-learn is not installed)"
    else:
        digits = load_digits()
        x = (digits.images[:, None] / 16.0).astype(np.float32)
        y = digits.target
        source = "scikit-learn digits"
    order = rng.permutation(len(x))
    train, test = order[:1500], order[1500:]
    return source, x[train], y[train], x[test], y[test]


def mixing_weights(model: TorchCNN) -> dict[str, np.ndarray]:
    """Each layer's weights over its window as the last forward saw it (latest state last)."""
    out = {}
    for name in ("stem", "block1", "block2", "block3"):
        skip = getattr(model, name).skip
        k = skip.last_num_states
        out[name] = skip.mixing_weights(k).detach().numpy()[skip.max_history - k :]
    return out


def main(steps: int = 300, batch: int = 64, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    source, x_train, y_train, x_test, y_test = load_data(seed)
    model = TorchCNN()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    with torch.no_grad():  # one forward first: it creates the channel maps of older, narrower states
        model.eval()(xt[:2])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(xt), (batch,))
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  loss {np.mean(losses[-20:]):.3f}")

    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x_test)).numpy()
    accuracy = float((logits.argmax(axis=1) == y_test).mean())
    weights = mixing_weights(model)
    print(f"data: {source}; test accuracy {accuracy:.3f}")
    for name, w in weights.items():
        print(f"  {name:6s} mixing weights over its window (latest last): {np.round(w, 3)}")

    # The same weights in Flax. Conversion needs only the parameter shapes, so
    # the template comes from jax.eval_shape (nothing is computed).
    flax_model = FlaxCNN()
    test_nhwc = np.moveaxis(x_test, 1, -1)
    template = jax.eval_shape(flax_model.init, jax.random.key(0), test_nhwc[:2])
    variables = to_flax(model, template)
    jax_logits = np.asarray(jax.jit(flax_model.apply)(variables, test_nhwc))
    difference = float(np.abs(jax_logits - logits).max())
    print(f"JAX twin on the test images: max |jax - torch| = {difference:.2e}")
    return dict(
        source=source,
        initial_loss=float(np.mean(losses[:10])),
        final_loss=float(np.mean(losses[-10:])),
        accuracy=accuracy,
        jax_accuracy=float((jax_logits.argmax(axis=1) == y_test).mean()),
        difference=difference,
        weights=weights,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    main(**vars(parser.parse_args()))
