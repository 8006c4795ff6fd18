"""Helpers a training script calls around the model (PyTorch).

Seeding (:func:`set_seed`), compiling (:func:`compile_model`), mixed
precision (:func:`autocast_context`) and per-module forward times
(:class:`ForwardProfiler`), with the names and arguments of the ``mhc``
package, so a script written for it runs unchanged. Each is a thin layer
over torch's own API. The JAX twin, :mod:`mhc_jax.runtime`, has
:func:`~mhc_jax.set_seed` only: JAX's randomness is an explicit key, ``jax.jit``
compiles, and XLA fuses modules, so a per-module time under ``jit`` has no
meaning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from numbers import Integral

import numpy as np
import torch
from torch import nn

from .history import check_bool

__all__ = ["set_seed", "compile_model", "autocast_context", "ForwardProfiler", "check_seed"]

_log = logging.getLogger(__name__)


def check_seed(seed) -> None:
    """``TypeError`` unless ``seed`` is an integer, ``ValueError`` unless it lies in ``[0, 2**32)``
    (NumPy's range, which both packages keep)."""
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"seed must be an int in [0, 2**32), got {seed!r} of type {type(seed).__name__}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")


def set_seed(seed: int = 42, verbose: bool = True, deterministic: bool = True) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every GPU).

    Args:
        seed: an int in ``[0, 2**32)``.
        verbose: log the seed (logger ``mhc_torch.runtime``, level INFO).
        deterministic: also make cuDNN choose deterministic kernels and turn
            its autotuner off (``torch.backends.cudnn.deterministic = True``,
            ``benchmark = False``), as ``mhc.set_seed`` always did. Process-wide
            settings, and slower convolutions on a GPU; pass False to keep them.

    ``PYTHONHASHSEED`` is set for subprocesses started afterwards (this
    process's string hashing was fixed when it started).
    """
    check_seed(seed)
    check_bool("verbose", verbose)
    check_bool("deterministic", deterministic)
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device as well
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if verbose:
        _log.info("random seed set to %d", seed)


def compile_model(model: nn.Module, **kwargs) -> nn.Module:
    """``torch.compile(model, **kwargs)``: the model, compiled on its first call."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_model expects an nn.Module, got {type(model).__name__}")
    return torch.compile(model, **kwargs)


@contextlib.contextmanager
def autocast_context(device_type: str = "cuda", dtype: torch.dtype = torch.float16) -> Iterator[None]:
    """``torch.autocast(device_type, dtype)``; on a machine without CUDA a
    ``"cuda"`` context does nothing (full precision), as in the ``mhc``
    package, so a GPU script runs unchanged on a CPU.

    Any other device type (``"cpu"`` with ``torch.bfloat16``, say) always
    autocasts; one torch does not know is torch's own error.
    """
    if device_type == "cuda" and not torch.cuda.is_available():
        yield
        return
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


class ForwardProfiler:
    """Per-module forward times, from torch's forward hooks.

    ``start()`` hooks every module of ``model`` that ``filter_fn(name,
    module)`` accepts (all by default, the model itself under the name
    ``""``), ``stop()`` removes the hooks, and ``summary()`` gives the mean
    time per call in milliseconds. A module's time includes its submodules'.
    Also a context manager::

        with ForwardProfiler(model, filter_fn=lambda name, m: isinstance(m, MHCSkip)) as profiler:
            model(x)
        print(profiler.summary())

    Times are host wall-clock times: GPU work is asynchronous, so pass
    ``use_cuda_sync=True`` to synchronise before each reading (slower, but the
    time is the kernels'). For kernel-level detail use ``torch.profiler``.

    Attributes:
        times_ms: ``{module name: [milliseconds of each call]}``, kept across
            ``start``/``stop`` until :meth:`reset`.
    """

    def __init__(
        self,
        model: nn.Module,
        filter_fn: Callable[[str, nn.Module], bool] | None = None,
        use_cuda_sync: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ForwardProfiler expects an nn.Module, got {type(model).__name__}")
        if filter_fn is not None and not callable(filter_fn):
            raise TypeError(f"filter_fn must be None or a callable (name, module) -> bool, got {filter_fn!r}")
        check_bool("use_cuda_sync", use_cuda_sync)
        self.model = model
        self.filter_fn = filter_fn
        self.use_cuda_sync = use_cuda_sync
        self.times_ms: dict[str, list[float]] = {}
        self._handles: list = []
        # A stack per module: a module may run inside itself (recursion) or
        # several times per forward (a shared layer).
        self._starts: dict[str, list[float]] = {}

    def _now(self) -> float:
        if self.use_cuda_sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> ForwardProfiler:
        """Hook the selected modules; raises ``RuntimeError`` if already started."""
        if self._handles:
            raise RuntimeError("ForwardProfiler is already started; call stop() first")
        for name, module in self.model.named_modules():
            if self.filter_fn is not None and not self.filter_fn(name, module):
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            # always_call: a forward that raises still pops its start time.
            self._handles.append(module.register_forward_hook(self._post_hook(name), always_call=True))
        return self

    def _pre_hook(self, name: str):
        def hook(module, args):
            self._starts.setdefault(name, []).append(self._now())

        return hook

    def _post_hook(self, name: str):
        def hook(module, args, output):
            started = self._starts.get(name)
            if started:
                self.times_ms.setdefault(name, []).append((self._now() - started.pop()) * 1000.0)

        return hook

    def stop(self) -> None:
        """Remove the hooks (the times stay); a no-op when not started."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._starts.clear()

    def reset(self) -> None:
        """Forget the recorded times."""
        self.times_ms.clear()

    def summary(self) -> dict[str, float]:
        """``{module name: mean milliseconds per call}`` for every module that ran."""
        return {name: sum(times) / len(times) for name, times in self.times_ms.items() if times}

    def __enter__(self) -> ForwardProfiler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
