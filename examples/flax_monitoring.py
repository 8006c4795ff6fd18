"""Monitor mixing weights from a Flax + optax training loop (scanned stack).

    python examples/flax_monitoring.py

A 16-layer classifier built with MHCSequential.scanned (compiled once) trains
under jit, its mixing logits with their own learning rate (optax.multi_transform);
every few steps the loop reads the mixing weights straight from
the parameters, logs each layer's latest-state weight and entropy, and runs
the same diagnostics as the PyTorch package. At the end it saves a heatmap
(examples/out/flax_mixing_heatmap.png, needs matplotlib).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import optax

import mhc_jax

OUT = Path(__file__).resolve().parent / "out"
DEPTH, WIDTH = 16, 32
STACK_OPTIONS = dict(max_history=4, mode="mhc", mixing_init="uniform")


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(WIDTH)(nn.gelu(nn.LayerNorm()(x)))


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(WIDTH)(x)
        x = mhc_jax.MHCSequential.scanned(Block(), DEPTH, **STACK_OPTIONS, name="stack")(x)
        return nn.Dense(4)(x)


def rings(n: int, seed: int):
    """Four concentric noisy rings, one class each."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    angle = rng.uniform(0, 2 * np.pi, n)
    radius = 1.0 + labels + 0.25 * rng.normal(size=n)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1) / 4
    return x.astype(np.float32), labels


def main(steps: int = 300, log_every: int = 100, seed: int = 0, path: str | None = None) -> dict:
    x_train, y_train = rings(8192, seed)
    x_test, y_test = rings(1024, seed + 1)
    model = Classifier()
    params = model.init(jax.random.key(seed), x_train[:2])
    # The mixing logits get their own, larger learning rate (optax.multi_transform
    # by parameter name), or they barely move from their init.
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "mixing" if "mixing_logits" in jax.tree_util.keystr(path) else "rest", params
    )
    optimizer = optax.multi_transform({"rest": optax.adam(3e-3), "mixing": optax.adam(5e-2)}, labels)
    opt_state = optimizer.init(params)
    # The skips' options (mode, temperature, ...) come from a module built like the stack.
    stack_options = mhc_jax.MHCSequential.scanned(Block(), DEPTH, **STACK_OPTIONS)

    @jax.jit
    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    history = []
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(x_train), 256)
        params, opt_state, loss = train_step(params, opt_state, x_train[idx], y_train[idx])
        if step % log_every == 0 or step == steps:
            weights = mhc_jax.extract_mixing_weights(params["params"]["stack"], stack_options)
            metrics = mhc_jax.mixing_metrics(weights)
            latest = np.mean([v for k, v in metrics.items() if k.endswith("latest_weight")])
            spread = np.mean([v for k, v in metrics.items() if k.endswith("entropy")])
            warnings = mhc_jax.diagnose(weights)
            history.append(dict(step=step, loss=float(loss), metrics=metrics, warnings=warnings))
            print(f"step {step:4d}  loss {float(loss):.3f}  mean latest weight {latest:.3f}  "
                  f"mean entropy {spread:.3f}  warnings {[w.kind for w in warnings]}")

    accuracy = float((model.apply(params, x_test).argmax(-1) == y_test).mean())
    print(f"test accuracy {accuracy:.3f}")
    path = Path(path) if path else OUT / "flax_mixing_heatmap.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    mhc_jax.plot_mixing_heatmap(weights, path=str(path), title="Flax: learned mixing weights (mode='mhc')")
    print(f"heatmap saved to {path}")
    return dict(accuracy=accuracy, history=history, weights=weights, path=path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    main(**vars(parser.parse_args()))
