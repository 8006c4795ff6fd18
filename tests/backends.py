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
        grads = [self.numpy(t.grad) if t.grad is not None else np.zeros_like(a) for t, a in zip(inputs, args)]
        return self.numpy(out), grads

    def check_grads(self, fn: Callable, x: np.ndarray) -> None:
        """Compare ``fn``'s autograd gradient with finite differences, in float64."""
        x = torch.tensor(x, dtype=torch.float64, device=self._device, requires_grad=True)
        assert torch.autograd.gradcheck(fn, (x,), atol=1e-5, rtol=1e-5)

    def jit(self, fn: Callable) -> Callable:
        return fn  # eager is torch's reference; torch.compile is exercised in benchmarks


BACKENDS = {"jax": JaxBackend, "torch": TorchBackend}
