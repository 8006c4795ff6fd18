"""Train a deep hyper-connected MLP with Flax + optax under jit (the headline demo).

    make demo                      # or: python examples/train_flax.py --steps 600

A 12-layer MLP whose residual connections are MHCSkips learns a small
regression task. History is carried explicitly inside each call, so the
jitted step has no hidden state: every batch starts from a fresh window.
The script prints the loss as it trains and, at the end, the mixing weights
each layer learned over its window of earlier states.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mhc_jax

WIDTH, DEPTH, HISTORY = 64, 12, 4


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(WIDTH)(nn.gelu(nn.LayerNorm()(x)))


class Regressor(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(WIDTH)(x)
        # "uniform" init: every layer starts mixing its window equally, and
        # training decides what each keeps (the simplex can switch slots off).
        x = mhc_jax.MHCSequential(
            [Block() for _ in range(DEPTH)], max_history=HISTORY, mode="mhc", mixing_init="uniform", name="stack"
        )(x)
        return nn.Dense(1)(nn.LayerNorm()(x))[:, 0]


def make_task(n: int, seed: int = 0):
    """y = sin(3 x0) cos(2 x1) + x2 x3 + 0.5 tanh(x4 + x5), plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    y = np.sin(3 * x[:, 0]) * np.cos(2 * x[:, 1]) + x[:, 2] * x[:, 3] + 0.5 * np.tanh(x[:, 4] + x[:, 5])
    return x, (y + 0.05 * rng.normal(size=n)).astype(np.float32)


def learned_weights(params) -> np.ndarray:
    """Each layer's mixing weights over its window (rows: layers; columns: slots, latest last)."""
    stack = params["params"]["stack"]
    logits = jnp.stack([stack[f"skip_layers_{i}"]["mixing_logits"] for i in range(DEPTH)])
    window = jnp.minimum(1 + jnp.arange(DEPTH), HISTORY)  # layer l sees min(l + 1, H) states
    return np.asarray(mhc_jax.window_weights(logits, window, mode="mhc"))


def main(steps: int = 600, batch: int = 256, seed: int = 0, log_every: int = 100) -> dict:
    x_train, y_train = make_task(16384, seed)
    x_test, y_test = make_task(1024, seed + 1)
    model = Regressor()
    params = model.init(jax.random.key(seed), x_train[:2])
    schedule = optax.cosine_decay_schedule(3e-3, steps)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = optimizer.init(params)

    def loss_fn(params, x, y):
        return jnp.mean((model.apply(params, x) - y) ** 2)

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    evaluate = jax.jit(loss_fn)
    initial = float(evaluate(params, x_test, y_test))
    print(f"{DEPTH}-layer mHC MLP, width {WIDTH}, H = {HISTORY}; test loss before training {initial:.4f}")
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(x_train), batch)
        params, opt_state, loss = train_step(params, opt_state, x_train[idx], y_train[idx])
        if step % log_every == 0 or step == steps:
            print(f"step {step:5d}  train loss {float(loss):.4f}  ({time.perf_counter() - start:.1f} s)")
    final = float(evaluate(params, x_test, y_test))
    print(f"test loss after training {final:.4f} (before: {initial:.4f})")

    weights = learned_weights(params)
    print("\nlearned mixing weights (rows: layers; columns: window slots, oldest .. latest)")
    for layer, row in enumerate(weights):
        cells = " ".join(f"{w:5.3f}" if w > 0 else "  .  " for w in row)
        print(f"  layer {layer:2d}: {cells}")
    return dict(initial_loss=initial, final_loss=final, weights=weights)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    main(**vars(parser.parse_args()))
