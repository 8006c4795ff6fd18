"""mhc in one screen: the projections, and one skip computed by both packages.

    python examples/projections_tour.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

import mhc_jax
import mhc_torch


def show_projections() -> None:
    mu = np.array([0.0, 3.0, 2.5, -4.0], np.float32)  # logits for 4 history slots, oldest first
    print("logits                      ", mu)
    print("softmax   (mode='hc')       ", np.round(np.asarray(mhc_jax.project_softmax(jnp.asarray(mu))), 4))
    print("simplex   (mode='mhc')      ", np.asarray(mhc_jax.project_simplex(jnp.asarray(mu))),
          " <- exact zeros switch noisy history off")
    floor = mhc_jax.project_identity_preserving(jnp.asarray(mu), epsilon=0.3)
    print("identity  (epsilon=0.3)     ", np.round(np.asarray(floor), 4), " <- latest slot >= 0.3")


def show_parity() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8)).astype(np.float32)
    states = [rng.normal(size=(2, 8)).astype(np.float32) for _ in range(3)]
    logits = np.array([0.2, -0.5, 0.1, 0.9], np.float32)

    torch_skip = mhc_torch.MHCSkip(mode="mhc", max_history=4)
    with torch.no_grad():
        torch_skip.mixing_logits.copy_(torch.from_numpy(logits))
    out_torch = torch_skip(torch.from_numpy(x), [torch.from_numpy(s) for s in states]).detach().numpy()

    jax_skip = mhc_jax.MHCSkip(mode="mhc", max_history=4)
    history = mhc_jax.History.create(jnp.asarray(states[0]), 4).push(jnp.asarray(states[1])).push(jnp.asarray(states[2]))
    out_jax = np.asarray(jax.jit(jax_skip.apply)({"params": {"mixing_logits": jnp.asarray(logits)}}, jnp.asarray(x), history))

    print(f"\nMHCSkip, same weights: max |jax - torch| = {np.abs(out_jax - out_torch).max():.2e}")


if __name__ == "__main__":
    show_projections()
    show_parity()
