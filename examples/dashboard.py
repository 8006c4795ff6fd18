"""A training dashboard: mixing heatmap, history contributions, gradient flow, curves.

    python examples/dashboard.py     # needs matplotlib: pip install 'mhc-jax-torch[plots]'

Trains a 12-layer MHCSequential (mode="mhc", uniform init, the mixing logits
with their own larger learning rate) on a small regression task, logging the
loss and the mean entropy of the mixing weights. Then it takes the gradients
of one batch and draws everything as one PNG (examples/out/dashboard.png):
which history slots each layer mixes, how much of each layer's mix comes from
each slot, and each layer's gradient norm. A zero gradient marks a skip with
nothing to learn: layer 0 (a window of one state) and, in this run, most
skips, whose weights settled on a single slot; at such a vertex mode="mhc"'s
exact zeros pass no gradient, so the skip stays there.

The same model converted to Flax gives the JAX dashboard
(examples/out/dashboard_jax.png): gradient norms from the ``jax.grad`` pytree.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

import mhc_jax
import mhc_torch
from mhc_torch.convert import to_flax

OUT = Path(__file__).resolve().parent / "out"
WIDTH = 16
STACK = dict(max_history=4, mode="mhc")


def main(steps: int = 200, depth: int = 12, log_every: int = 10, seed: int = 0, path: str | None = None,
         jax_path: str | None = None) -> dict:
    torch.manual_seed(seed)
    block = lambda: nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Softsign())  # noqa: E731
    model = nn.Sequential(nn.Linear(4, WIDTH), mhc_torch.MHCSequential([block() for _ in range(depth)], init="uniform", **STACK),
                          nn.Linear(WIDTH, 1))
    x = torch.randn(2048, 4)
    y = torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:2]) + x[:, 2:3] * x[:, 3:4]
    mixing = [p for n, p in model.named_parameters() if n.endswith("mixing_logits")]
    others = [p for n, p in model.named_parameters() if not n.endswith("mixing_logits")]
    optimizer = torch.optim.Adam([{"params": others, "lr": 3e-3}, {"params": mixing, "lr": 5e-2}])
    curves: dict[str, list[float]] = {"loss": [], "mean mixing entropy": []}
    logged: list[int] = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (256,))
        loss = (model(x[idx]) - y[idx]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % log_every == 0:
            metrics = mhc_torch.mixing_metrics(mhc_torch.extract_mixing_weights(model))
            logged.append(step)
            curves["loss"].append(loss.item())
            curves["mean mixing entropy"].append(float(np.mean([v for k, v in metrics.items() if k.endswith("entropy")])))
    print(f"trained {steps} steps, loss {loss.item():.4f}")

    # The gradients of one batch, read before any optimizer step clears them.
    batch = x[:256], y[:256]
    optimizer.zero_grad()
    (model(batch[0]) - batch[1]).square().mean().backward()
    weights = mhc_torch.extract_mixing_weights(model)
    norms = mhc_torch.gradient_norms(model, level=3)  # 0, 1.wrapped_modules.{i}, 1.skip_layers.{i}, 2
    path = Path(path) if path else OUT / "dashboard.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    mhc_torch.create_training_dashboard(weights, norms, path=str(path), curves=curves, curve_steps=logged,
                                        title=f"mHC training dashboard: {depth} layers, mode='mhc', {steps} steps")
    print(f"dashboard saved to {path}")
    dead = [name for name, norm in norms.items() if norm == 0]
    print(f"layers with zero gradient: {dead or 'none'}")

    # JAX: the same model in Flax (a torch nn.Sequential index is a Flax
    # nn.Sequential list position), its gradients a pytree.
    layers = [fnn.Sequential([fnn.Dense(WIDTH), jax.nn.soft_sign]) for _ in range(depth)]
    flax_model = fnn.Sequential([fnn.Dense(WIDTH), mhc_jax.MHCSequential(layers, mixing_init="uniform", **STACK), fnn.Dense(1)])
    bx, by = batch[0].numpy(), batch[1].numpy()
    params = to_flax(model, jax.jit(flax_model.init)(jax.random.key(0), bx))
    grads = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(flax_model.apply(p, bx) - by))))(params)
    jax_weights = mhc_jax.extract_mixing_weights(params["params"]["layers_1"], mode=STACK["mode"])
    jax_norms = mhc_jax.gradient_norms(grads, level=2)  # layers_0, layers_1/layers_{i}, layers_1/skip_layers_{i}, layers_2
    jax_path = Path(jax_path) if jax_path else OUT / "dashboard_jax.png"
    mhc_jax.create_training_dashboard(jax_weights, jax_norms, path=str(jax_path), title="the same model in Flax")
    print(f"JAX dashboard saved to {jax_path}")
    return dict(path=path, jax_path=jax_path, weights=weights, norms=norms, curves=curves,
                jax_weights=jax_weights, jax_norms=jax_norms)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    main(**vars(parser.parse_args()))
