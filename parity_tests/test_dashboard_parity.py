"""Both packages' gradient flow agrees: the same model, the same loss, the same
per-layer gradient norms (docs/parity.md, stack tolerance)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import torch

import mhc_jax
import mhc_torch
from mhc_torch.convert import to_flax
from parity_tests.parity import assert_parity
from parity_tests.stacks import flax_stack, input_shape, torch_stack

KIND, DEPTH = "linear_softsign", 4
OPTIONS = dict(max_history=3, mode="mhc", init="uniform", temperature=0.7)


def test_torch_and_jax_give_the_same_gradient_norms_per_layer():
    torch.manual_seed(0)
    tmodel = torch_stack(KIND, DEPTH, OPTIONS)
    with torch.no_grad():
        for skip in tmodel.skip_layers:
            skip.mixing_logits.uniform_(-0.1, 0.1)  # near uniform: no exact zeros, every logit learns
    x = np.random.default_rng(0).normal(size=input_shape(KIND)).astype(np.float32)
    fmodel = flax_stack(KIND, DEPTH, OPTIONS)
    params = jax.tree_util.tree_map(jnp.asarray, to_flax(tmodel, jax.jit(fmodel.init)(jax.random.key(0), x)))

    tmodel(torch.from_numpy(x)).square().mean().backward()
    from_torch = mhc_torch.gradient_norms(tmodel, level=2)  # wrapped_modules.{i}, skip_layers.{i}
    grads = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(fmodel.apply(p, x)))))(params)
    from_jax = mhc_jax.gradient_norms(grads, level=1)  # layers_{i}, skip_layers_{i}

    # torch's wrapped_modules.{i} / skip_layers.{i} are Flax's layers_{i} / skip_layers_{i}.
    renamed = {re.sub(r"^(?:wrapped_modules|(skip_)layers)\.(\d+)$", r"\1layers_\2", k): v for k, v in from_torch.items()}
    assert sorted(renamed) == sorted(from_jax) and len(from_jax) == 2 * DEPTH
    names = sorted(from_jax)
    assert_parity([from_jax[n] for n in names], [renamed[n] for n in names], kind="stack", device="cpu",
                  what="per-layer gradient norms")
    # Layer 0 mixes a window of one state (weight 1, no gradient); every other layer learns.
    assert [n for n in names if from_jax[n] == 0] == [n for n in names if renamed[n] == 0] == ["skip_layers_0"]
