"""Matched torch / Flax layers and stacks for the whole-model parity tests.

Each layer kind is built the same way in both frameworks, so a converted
state_dict makes them compute the same function: a torch ``nn.Sequential``
index is a Flax ``nn.Sequential`` list position, LayerNorm uses torch's
two-pass variance (``use_fast_variance=False``; the fast ``E[x^2] - E[x]^2``
cancels in float32), and images are NCHW in torch and NHWC in Flax.

Three layers are computed by each framework's own kernels, and differ by more
than float32 rounding even alone: tanh and the erf GELU (each framework
approximates them its own way, ~1 ulp apart) and LayerNorm (up to ~2.5e-6 on
one application). Through a deep stack that reaches 1e-5 to 2e-5 even in
``mode="residual"``, where none of this library runs. ReLU is computed alike
but has a kink: a pre-activation within rounding of 0 takes the other branch
in one framework, and a gradient then differs by a whole term (seen: 3e-5 on a
logit gradient of 4.5e-3 through 10 layers). So the random stacks use layers
both frameworks compute alike up to summation order and that are smooth:
Linear, Conv and softsign ``x / (1 + |x|)``, built from correctly rounded
operations in both, with a continuous derivative. "linear_relu",
"linear_tanh", "mlp_gelu" and "norm_linear" have fixed tests with their own
tolerance. LayerNorm normalises only 4 features here, whose sample variance
can be tiny; epsilon 1e-2 keeps its gradient from amplifying rounding by up to
~300x (at epsilon 1e-5).
"""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
from torch import nn

import mhc_jax
import mhc_torch
from tests.backends import flax_options

WIDTH = 4  # features (channels for "conv")
LAYER_NORM_EPS = 1e-2


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


def torch_layer(kind: str) -> nn.Module:
    if kind == "linear_softsign":
        return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Softsign())
    if kind == "linear_relu":
        return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU())
    if kind == "linear_tanh":
        return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
    if kind == "mlp":
        return nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.Softsign(), nn.Linear(2 * WIDTH, WIDTH))
    if kind == "mlp_gelu":
        return nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))
    if kind == "norm_linear":
        return nn.Sequential(nn.LayerNorm(WIDTH, eps=LAYER_NORM_EPS), nn.Linear(WIDTH, WIDTH))
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(WIDTH, WIDTH, 3, padding=1), nn.Softsign())
    raise ValueError(kind)


def flax_layer(kind: str) -> fnn.Module:
    if kind == "linear_softsign":
        return fnn.Sequential([fnn.Dense(WIDTH), jax.nn.soft_sign])
    if kind == "linear_relu":
        return fnn.Sequential([fnn.Dense(WIDTH), jax.nn.relu])
    if kind == "linear_tanh":
        return fnn.Sequential([fnn.Dense(WIDTH), jnp.tanh])
    if kind == "mlp":
        return fnn.Sequential([fnn.Dense(2 * WIDTH), jax.nn.soft_sign, fnn.Dense(WIDTH)])
    if kind == "mlp_gelu":
        return fnn.Sequential([fnn.Dense(2 * WIDTH), _gelu, fnn.Dense(WIDTH)])
    if kind == "norm_linear":
        return fnn.Sequential([fnn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False), fnn.Dense(WIDTH)])
    if kind == "conv":
        return fnn.Sequential([fnn.Conv(WIDTH, (3, 3), padding=1), jax.nn.soft_sign])
    raise ValueError(kind)


def input_shape(kind: str) -> tuple[int, ...]:
    """torch layout; 16 to 32 elements, so reductions stay short (see the skip tests)."""
    return (2, WIDTH, 2, 2) if kind == "conv" else (2, 2, WIDTH)


def torch_stack(kind: str, depth: int, options: dict) -> mhc_torch.MHCSequential:
    return mhc_torch.MHCSequential([torch_layer(kind) for _ in range(depth)], **options)


def flax_stack(kind: str, depth: int, options: dict, *, scan: bool = False) -> mhc_jax.MHCSequential:
    """The same stack in Flax (torch option names: ``init`` becomes ``mixing_init``)."""
    options = flax_options(options)
    if scan:
        return mhc_jax.MHCSequential.scanned(flax_layer(kind), depth, **options)
    return mhc_jax.MHCSequential([flax_layer(kind) for _ in range(depth)], **options)
