"""One small interface over mhc_jax and mhc_torch for the test-suites.

Unit tests state a property once and check it in both packages through it;
the parity tests use it to put the same numpy inputs on the same device in
both frameworks and compare what comes back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401  (check_grads)
import numpy as np
import torch

import mhc_jax
import mhc_torch


@functools.cache
def gpu_unavailable_reason() -> str | None:
    """Why the GPU half of a test cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    try:
        jax.devices("gpu")
    except RuntimeError:
        return "no GPU visible to jax (is the CUDA plugin installed?)"
    return None


def to_channels_last(a: np.ndarray) -> np.ndarray:
    """torch layout (NCHW for 4+ dims) to Flax layout (NHWC); other arrays unchanged."""
    return np.moveaxis(a, 1, -1) if a.ndim >= 4 else a


def to_channels_first(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, -1, 1) if a.ndim >= 4 else a


#: torch-only stack options, with no Flax counterpart (history is never carried
#: implicitly in Flax; checkpointing is ``scan=True, remat=True`` there).
TORCH_ONLY_OPTIONS = ("clear_history_each_forward", "use_checkpointing")


def flax_options(options: dict) -> dict:
    """torch-style skip/stack options as Flax fields: ``init`` is ``mixing_init``
    (Linen reserves ``Module.init``); torch-only options are dropped."""
    return {
        ("mixing_init" if k == "init" else k): v for k, v in options.items() if k not in TORCH_ONLY_OPTIONS
    }


def skip_params_to_flax(params: dict[str, np.ndarray]) -> dict:
    """MHCSkip parameters in torch ``state_dict`` naming to a Flax variable tree."""
    tree = {}
    for name, value in params.items():
        if name.endswith(".weight"):  # projection_from_{n}: Linear (out, in) -> Dense kernel (in, out)
            tree[name.removesuffix(".weight")] = {"kernel": np.ascontiguousarray(value.T)}
        else:
            tree[name] = value
    return {"params": tree}


def skip_params_from_flax(variables: dict) -> dict[str, np.ndarray]:
    out = {}
    for name, value in variables.get("params", {}).items():
        if isinstance(value, dict):
            out[f"{name}.weight"] = np.asarray(value["kernel"]).T
        else:
            out[name] = np.asarray(value)
    return out


@functools.cache
def _jax_jit(fn: Callable) -> Callable:
    # Cached so a test that asks for the same function per example compiles once.
    return jax.jit(fn)


class JaxBackend:
    name = "jax"
    lib = mhc_jax

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._device = jax.devices(device)[0]

    def array(self, a: np.ndarray) -> jax.Array:
        return jax.device_put(np.asarray(a), self._device)

    def numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def vjp(
        self, fn: Callable, args: Sequence[np.ndarray], cotangent: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """``fn(*args)`` and the gradients of ``sum(fn(*args) * cotangent)``."""
        out, pullback = jax.vjp(fn, *[self.array(a) for a in args])
        grads = pullback(self.array(cotangent).astype(out.dtype))
        return self.numpy(out), [self.numpy(g) for g in grads]

    def check_grads(self, fn: Callable, x: np.ndarray) -> None:
        """Compare ``fn``'s reverse-mode gradient with finite differences, in float64."""
        with jax.enable_x64(True):
            jax.test_util.check_grads(
                fn, (jnp.asarray(x, jnp.float64),), order=1, modes=("rev",), atol=1e-5, rtol=1e-5
            )

    def jit(self, fn: Callable) -> Callable:
        return _jax_jit(fn)

    def fresh_skip_params(self, options: dict, x: np.ndarray, states: Sequence[np.ndarray]) -> dict:
        """The parameters of a freshly initialised ``MHCSkip``, in torch naming."""
        options = flax_options(options)
        arrays = [self.array(to_channels_last(a)) for a in (x, *states)]
        variables = mhc_jax.MHCSkip(**options).init(jax.random.key(0), arrays[0], arrays[1:])
        return skip_params_from_flax(variables)

    def run_skip(
        self,
        options: dict,
        params: dict[str, np.ndarray],
        x: np.ndarray,
        states: Sequence[np.ndarray],
        cotangent: np.ndarray,
        *,
        training: bool = False,
        gumbel_noise: np.ndarray | None = None,
        ring: bool = False,
    ) -> tuple[np.ndarray, dict]:
        """Run an ``MHCSkip`` built from torch-style ``options`` and ``params``.

        Arrays go in and come out in torch layout (channels first for 4+ dims).
        ``ring=True`` passes the states as a ``History`` (pushed in order)
        instead of a list. Returns the output and the gradients of
        ``sum(out * cotangent)``: ``"x"``, ``"states"`` (a list) and one entry per
        parameter, in torch naming.
        """
        options = flax_options(options)
        skip = mhc_jax.MHCSkip(**options)
        variables = jax.device_put(skip_params_to_flax(params), self._device)
        noise = None if gumbel_noise is None else self.array(gumbel_noise)

        def run(variables, x, *states):
            if ring:
                history = mhc_jax.History.empty(states[0] if states else x, skip.max_history)
                for state in states:
                    history = history.push(state)
            else:
                history = list(states)
            return skip.apply(variables, x, history, deterministic=not training, gumbel_noise=noise)

        arrays = [self.array(to_channels_last(a)) for a in (x, *states)]
        out, pullback = jax.vjp(run, variables, *arrays)
        d_vars, d_x, *d_states = pullback(self.array(to_channels_last(cotangent)))
        grads = {"x": to_channels_first(self.numpy(d_x))}
        grads["states"] = [to_channels_first(self.numpy(g)) for g in d_states]
        grads.update(skip_params_from_flax(d_vars))
        return to_channels_first(self.numpy(out)), grads


class TorchBackend:
    name = "torch"
    lib = mhc_torch

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._device = torch.device("cuda" if device == "gpu" else "cpu")

    def array(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.array(a), device=self._device)

    def numpy(self, a) -> np.ndarray:
        return a.detach().cpu().numpy()

    def vjp(
        self, fn: Callable, args: Sequence[np.ndarray], cotangent: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """``fn(*args)`` and the gradients of ``sum(fn(*args) * cotangent)``."""
        inputs = [self.array(a).requires_grad_(True) for a in args]
        out = fn(*inputs)
        (out * self.array(cotangent).to(out.dtype)).sum().backward()
        grads = [self.numpy(t.grad) if t.grad is not None else np.zeros_like(a) for t, a in zip(inputs, args, strict=True)]
        return self.numpy(out), grads

    def check_grads(self, fn: Callable, x: np.ndarray) -> None:
        """Compare ``fn``'s autograd gradient with finite differences, in float64."""
        x = torch.tensor(x, dtype=torch.float64, device=self._device, requires_grad=True)
        assert torch.autograd.gradcheck(fn, (x,), atol=1e-5, rtol=1e-5)

    def jit(self, fn: Callable) -> Callable:
        return fn  # eager is torch's reference; torch.compile is exercised in benchmarks

    def run_skip(
        self,
        options: dict,
        params: dict[str, np.ndarray],
        x: np.ndarray,
        states: Sequence[np.ndarray],
        cotangent: np.ndarray,
        *,
        training: bool = False,
        gumbel_noise: np.ndarray | None = None,
        ring: bool = False,
    ) -> tuple[np.ndarray, dict]:
        """Run an ``MHCSkip``; see :meth:`JaxBackend.run_skip` (``ring`` has no torch meaning)."""
        if ring:
            raise ValueError("a torch MHCSkip takes a list or a HistoryBuffer, not a ring buffer")
        skip = mhc_torch.MHCSkip(**options).to(self._device)
        skip.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
        skip.train(training)
        inputs = [self.array(a).requires_grad_(True) for a in (x, *states)]
        noise = None if gumbel_noise is None else self.array(gumbel_noise)
        out = skip(inputs[0], inputs[1:], gumbel_noise=noise)
        (out * self.array(cotangent)).sum().backward()

        def grad(t, like):
            return self.numpy(t.grad) if t.grad is not None else np.zeros(like.shape, np.float32)

        grads = {"x": grad(inputs[0], x), "states": [grad(t, a) for t, a in zip(inputs[1:], states, strict=True)]}
        grads.update({name: grad(p, p) for name, p in skip.named_parameters()})
        return self.numpy(out), grads

    def fresh_skip_params(self, options: dict, x: np.ndarray, states: Sequence[np.ndarray]) -> dict:
        """The parameters of a freshly built ``MHCSkip`` (after one forward, which
        creates any ``auto_project`` maps), in torch naming."""
        skip = mhc_torch.MHCSkip(**options).to(self._device)
        skip(self.array(x), [self.array(s) for s in states])
        return {k: self.numpy(v) for k, v in skip.state_dict().items()}


BACKENDS = {"jax": JaxBackend, "torch": TorchBackend}
