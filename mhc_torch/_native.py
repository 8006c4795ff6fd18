"""The C++ mixing kernel (``csrc/mix.cpp``), built on first use.

A Python ``torch.autograd.Function`` costs about 20 µs of interpreter time per
call in forward and again in backward; in a 50-layer stack that is most of
what separates :class:`~mhc_torch.MHCSequential` from a plain residual stack.
``csrc/mix.cpp`` is the same node (``_Mix`` and :class:`StackGradients` in
``skip.py``: same operations, same gradient routing) written against
PyTorch's C++ autograd API, so neither pass re-enters Python. On CPUs with
AVX2 it also mixes contiguous float32/float64 tensors in one fused loop per
pass (forward: ``y + sum_k w_k h_k``; backward: the ``K`` dot products and
the ``K`` state gradients) instead of a chain of ATen ops.

It is compiled with ``torch.utils.cpp_extension.load`` the first time a skip
mixes (about 30 s, once per machine and torch version; the result is cached
under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).
Without a C++ compiler, or with ``MHC_TORCH_NATIVE=0`` in the environment,
the Python version runs instead: same results, slower. :func:`native_kernel`
says which one is in use.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

__all__ = ["native_kernel"]

_NAME = "mhc_torch_mix"
_SOURCE = Path(__file__).with_name("csrc") / "mix.cpp"
_loaded: dict[str, ModuleType | None] = {}


def native_kernel() -> ModuleType | None:
    """The compiled mixing kernel, building it on the first call; None when unavailable.

    Unavailable means ``MHC_TORCH_NATIVE=0`` is set, or the build failed (a
    warning then says why, once). Either way the skips fall back to the
    Python implementation.
    """
    if _NAME in _loaded:
        return _loaded[_NAME]
    module = None
    if os.environ.get("MHC_TORCH_NATIVE", "1") != "0":
        try:
            module = _build()
        except Exception as err:  # no compiler, no ninja, a broken toolchain, ...
            warnings.warn(
                f"mhc_torch: could not build the C++ mixing kernel ({type(err).__name__}: "
                f"{str(err).strip()[:300]}); using the Python implementation (same results, "
                "slower). Set MHC_TORCH_NATIVE=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
    _loaded[_NAME] = module
    return module


@contextlib.contextmanager
def python_kernel() -> Iterator[None]:
    """Inside the block, skips mix with the Python node (as with
    ``MHC_TORCH_NATIVE=0``): for side-by-side tests and benchmarks."""
    missing = object()
    saved = _loaded.get(_NAME, missing)
    _loaded[_NAME] = None
    try:
        yield
    finally:
        if saved is missing:
            del _loaded[_NAME]
        else:
            _loaded[_NAME] = saved


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    build_dir = getattr(cpp_extension, "_get_build_directory", None)  # private: may go away
    if build_dir is not None and not any(Path(build_dir(_NAME, verbose=False)).glob(f"{_NAME}*.so")):
        # A silent 30 s pause in the first forward would look like a hang.
        warnings.warn(
            "mhc_torch: compiling the C++ mixing kernel (first use on this machine, about 30 s)",
            RuntimeWarning,
            stacklevel=4,
        )
    path = os.environ.get("PATH", "")
    try:  # the `ninja` package's binary, for an environment that is not activated
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
    except ImportError:
        pass
    try:
        return cpp_extension.load(_NAME, sources=[str(_SOURCE)], extra_cflags=_cflags(), verbose=False)
    finally:
        os.environ["PATH"] = path


def _cflags() -> list[str]:
    import torch

    # The fused loops rely on the compiler vectorising them, which without
    # AVX2 gives 128-bit vectors: slower than ATen's own kernels, which pick
    # the widest the CPU has at run time. So they are built only where the
    # CPU (as torch sees it) has AVX2; elsewhere the node runs ATen ops. The
    # flags are part of torch's build cache key, so a cache shared between
    # different machines never hands one a build for the other.
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-O3", "-mavx2", "-mfma", "-DMHC_FUSED_LOOPS"]
    return ["-O3"]
