"""Residual-stream modules built the same way in both frameworks, for the unit and parity tests.

Branches are small blocks defined twice (torch and Flax) with matching
parameter names, so the generic weight conversion (:mod:`mhc_jax.convert`)
moves weights between them. Parameters travel as numpy dicts in torch
``state_dict`` naming; runners return outputs and gradients in that naming.
An independent numpy implementation of the equations in docs/streams.md is here too.
"""

from __future__ import annotations

import functools

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

import mhc_jax
import mhc_torch
from mhc_jax.convert import flax_to_torch, stack_stream_params, torch_to_flax, unstack_stream_params

#: Branch kinds: "linear" (one Linear: the streams' arithmetic alone) and
#: "prenorm" (LayerNorm, Linear, tanh, Linear: a pre-norm residual block).
KINDS = ("linear", "prenorm")


class TorchBlock(nn.Module):
    def __init__(self, width: int, kind: str = "linear") -> None:
        super().__init__()
        self.kind = kind
        if kind == "prenorm":
            self.norm = nn.LayerNorm(width)
            self.linear2 = nn.Linear(width, width)
        self.linear = nn.Linear(width, width)

    def forward(self, u: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        if self.kind == "prenorm":
            return self.linear2(torch.tanh(self.linear(self.norm(u))))
        return scale * self.linear(u)


class FlaxBlock(fnn.Module):
    width: int
    kind: str = "linear"

    @fnn.compact
    def __call__(self, u: jax.Array, scale: float = 1.0) -> jax.Array:
        if self.kind == "prenorm":
            h = fnn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm")(u)
            return fnn.Dense(self.width, name="linear2")(jnp.tanh(fnn.Dense(self.width, name="linear")(h)))
        return scale * fnn.Dense(self.width, name="linear")(u)


def torch_hyper_connection(width: int, options: dict, kind: str = "linear") -> mhc_torch.HyperConnection:
    return mhc_torch.HyperConnection(width, TorchBlock(width, kind), **options)


def flax_hyper_connection(width: int, options: dict, kind: str = "linear") -> mhc_jax.HyperConnection:
    return mhc_jax.HyperConnection(FlaxBlock(width, kind), **options)


def torch_stack(width: int, depth: int, options: dict, kind: str = "linear", **extra) -> mhc_torch.StreamSequential:
    return mhc_torch.StreamSequential([TorchBlock(width, kind) for _ in range(depth)], **options, dim=width, **extra)


def flax_stack(width: int, depth: int, options: dict, kind: str = "linear", **extra) -> mhc_jax.StreamSequential:
    return mhc_jax.StreamSequential([FlaxBlock(width, kind) for _ in range(depth)], **options, **extra)


def random_params(
    module: nn.Module, seed: int, spread: float = 0.5, branch_gain: float = 1.0, alpha_max: float = 1.0
) -> dict[str, np.ndarray]:
    """``module``'s parameters (torch naming), moved away from the init.

    The init is symmetric (identical streams, uniform coefficients), which
    would hide a mix-up of streams or of ``h_res`` and its transpose: biases
    get ``N(0, spread)`` noise and the gating factors a random size in
    ``[0.05, 1] * alpha_max``. The
    branches' weights are multiplied by ``branch_gain`` (``1/sqrt(depth)``
    keeps a deep linear stack from growing geometrically).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in module.state_dict().items():
        value = value.detach().numpy().copy()
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("b_pre", "b_post", "b_res"):
            value = value + rng.normal(0, spread, value.shape).astype(np.float32)
        elif leaf in ("a_pre", "a_post", "a_res"):
            value = (alpha_max * rng.uniform(0.05, 1.0, value.shape)).astype(np.float32)
        elif "branch." in name and leaf == "weight":
            value = (branch_gain * value).astype(np.float32)
        out[name] = value
    return out


def _options_key(options: dict) -> tuple:
    return tuple(sorted(options.items()))


# --- runners -----------------------------------------------------------------------------


@functools.cache
def _flax_vjp(module_key: tuple) -> callable:
    kind_of_module, width, options, kind, extra = module_key
    options, extra = dict(options), dict(extra)

    if kind_of_module == "hyper_connection":
        module = flax_hyper_connection(width, options, kind)
    elif extra.pop("scan", False):
        module = mhc_jax.StreamSequential.scanned(FlaxBlock(width, kind), extra.pop("depth"), **options, **extra)
    else:
        module = flax_stack(width, extra.pop("depth"), options, kind, **extra)

    @jax.jit
    def run(variables, x, cotangent):
        out, pullback = jax.vjp(lambda v, a: module.apply(v, a), variables, x)
        d_vars, d_x = pullback(cotangent.astype(out.dtype))
        return out, d_vars, d_x

    return module, run


def run_flax(kind_of_module: str, width: int, options: dict, params: dict, x: np.ndarray, cotangent: np.ndarray,
             kind: str = "linear", device: str = "cpu", **extra) -> tuple[np.ndarray, dict]:
    """Output and gradients (``"x"`` and every parameter, torch naming) of a Flax
    ``HyperConnection`` (``kind_of_module="hyper_connection"``, ``x`` the
    streams) or ``StreamSequential`` (``"stack"``, ``extra`` holds ``depth``
    and optionally ``scan``/``remat``: the scanned stack, its weights moved
    with :func:`mhc_jax.convert.stack_stream_params`)."""
    key = (kind_of_module, width, _options_key(options), kind, _options_key(extra))
    module, run = _flax_vjp(key)
    dev = jax.devices(device)[0]
    scanned = extra.get("scan", False)
    if scanned:
        unrolled = flax_stack(width, extra["depth"], options, kind)
        template = jax.eval_shape(unrolled.init, jax.random.key(0), jnp.asarray(x))
        variables = stack_stream_params(torch_to_flax(params, template))
    else:
        template = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))
        variables = torch_to_flax(params, template)
    variables = jax.device_put(variables, dev)
    out, d_vars, d_x = run(variables, jax.device_put(x, dev), jax.device_put(cotangent, dev))
    d_vars = jax.tree.map(np.asarray, d_vars)
    grads = flax_to_torch(unstack_stream_params(d_vars) if scanned else d_vars, params)
    grads["x"] = np.asarray(d_x)
    return np.asarray(out), grads


def run_torch(module: nn.Module, params: dict, x: np.ndarray, cotangent: np.ndarray,
              device: str = "cpu", *args, **kwargs) -> tuple[np.ndarray, dict]:
    """Output and gradients (``"x"`` and every parameter) of a torch module loaded with ``params``."""
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    module = module.to(dev)
    module.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
    x = torch.as_tensor(np.array(x), device=dev).requires_grad_(True)
    out = module(x, *args, **kwargs)
    (out * torch.as_tensor(cotangent, device=dev).to(out.dtype)).sum().backward()
    grads = {name: p.grad.detach().cpu().numpy() for name, p in module.named_parameters()}
    grads["x"] = x.grad.detach().cpu().numpy()
    return out.detach().cpu().numpy(), grads


# --- the equations in numpy (float64), written from docs/streams.md ----------------------------------


def sinkhorn64(z: np.ndarray, iterations: int) -> np.ndarray:
    log_p = np.asarray(z, np.float64)
    for _ in range(iterations):
        for axis in (-2, -1):  # columns, then rows
            top = log_p.max(axis=axis, keepdims=True)
            log_p = log_p - (top + np.log(np.exp(log_p - top).sum(axis=axis, keepdims=True)))
    return np.exp(log_p)


def coefficients64(streams: np.ndarray, params: dict, mode: str, iterations: int = 20, prefix: str = ""):
    """(h_pre, h_post, h_res) of docs/streams.md for the parameters ``{prefix}b_pre`` etc."""
    x = np.asarray(streams, np.float64)
    n = x.shape[-2]
    p = {k[len(prefix):]: np.asarray(v, np.float64) for k, v in params.items() if k.startswith(prefix)}
    pre, post, res = p["b_pre"], p["b_post"], p["b_res"]
    if "phi" in p:
        v = x.reshape(*x.shape[:-2], -1)
        v = v / np.sqrt(np.mean(v**2, axis=-1, keepdims=True) + 1e-6)
        d = v @ p["phi"]
        squash = np.tanh if mode == "hc" else (lambda a: a)
        pre = p["a_pre"][0] * squash(d[..., :n]) + pre
        post = p["a_post"][0] * squash(d[..., n : 2 * n]) + post
        res = p["a_res"][0] * squash(d[..., 2 * n :].reshape(*d.shape[:-1], n, n)) + res
    if mode == "hc":
        return pre, post, res
    sigmoid = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    return sigmoid(pre), 2 * sigmoid(post), sinkhorn64(res, iterations)


def block64(u: np.ndarray, params: dict, prefix: str, kind: str = "linear") -> np.ndarray:
    p = {k[len(prefix):]: np.asarray(v, np.float64) for k, v in params.items() if k.startswith(prefix)}
    if kind == "prenorm":
        mean = u.mean(-1, keepdims=True)
        var = ((u - mean) ** 2).mean(-1, keepdims=True)
        h = (u - mean) / np.sqrt(var + 1e-5) * p["norm.weight"] + p["norm.bias"]
        h = np.tanh(h @ p["linear.weight"].T + p["linear.bias"])
        return h @ p["linear2.weight"].T + p["linear2.bias"]
    return u @ p["linear.weight"].T + p["linear.bias"]


def hyper_connection64(streams, params, mode, iterations=20, prefix="", kind="linear"):
    """The layer of docs/streams.md: u = sum_j h_pre[j] x[j]; out[i] = sum_j h_res[i, j] x[j] + h_post[i] F(u)."""
    x = np.asarray(streams, np.float64)
    h_pre, h_post, h_res = coefficients64(x, params, mode, iterations, prefix)
    lead = x.shape[:-2]
    h_pre, h_post = np.broadcast_to(h_pre, (*lead, x.shape[-2])), np.broadcast_to(h_post, (*lead, x.shape[-2]))
    h_res = np.broadcast_to(h_res, (*lead, x.shape[-2], x.shape[-2]))
    u = np.einsum("...j,...jc->...c", h_pre, x)
    y = block64(u, params, f"{prefix}branch.", kind)
    return np.einsum("...ij,...jc->...ic", h_res, x) + h_post[..., :, None] * y[..., None, :]


def stack64(x, params, depth, num_streams, mode, iterations=20, kind="linear"):
    streams = np.repeat(np.asarray(x, np.float64)[..., None, :], num_streams, axis=-2)
    for i in range(depth):
        streams = hyper_connection64(streams, params, mode, iterations, f"layers.{i}.", kind)
    return streams.sum(-2)
