r"""The mix as a JAX primitive, its weight gradient a C++ custom call on CPU.

.. math::
    \mathrm{mix}(w, h_1..h_K) = \sum_k w_k h_k, \qquad
    \mathrm{dots}(g, h_1..h_K)_k = \langle g, h_k \rangle

The two are each other's transpose in ``w`` (and in ``g``), which is what
reverse mode needs: the cotangent of the weights of a mix is
``dots(ct, h)``, and the cotangent of each state is ``w_k ct``.

Written as plain ``jnp`` (what :func:`mhc_jax.skip.weighted_sum` did before),
XLA lowers ``dots`` to ``K`` separate library reductions, one thunk each, and
in a 50-layer stack on XLA:CPU those ~200 thunks are nearly all that
separates a training step from a plain residual stack's (README,
"Benchmark"). So both are primitives (``jax.extend.core.Primitive``) with
their own differentiation, transposition and batching rules:

* ``mix`` lowers to the same elementwise ops as before, on every platform.
* ``dots`` lowers on CPU to one XLA FFI custom call (``csrc/window_dots.cpp``)
  that reads ``g`` once per four states; elsewhere (GPU, TPU), for other
  dtypes than float32/float64, or for states over ``MAX_NATIVE_SIZE``
  elements (beyond which XLA's multi-threaded reductions catch up), to the
  ``jnp`` reductions.
* Forward mode, reverse mode, higher derivatives and ``vmap`` all work: the
  rules are the bilinear ones, written in terms of the two primitives (or
  plain ``jnp`` under ``vmap``), never of the custom call.

The custom call is compiled from ``csrc/window_dots.cpp`` with the system's
C++ compiler the first time a CPU backward pass is lowered (a few seconds,
once per machine and jaxlib; cached under ``MHC_JAX_EXTENSIONS_DIR``, by
default ``~/.cache/mhc_jax``). Without a compiler you get one warning and the
``jnp`` reductions; ``MHC_JAX_NATIVE=0`` skips the attempt. Results agree to
float rounding (the custom call sums in a fixed order of its own).
:func:`native_library` says whether it is in use. The choice is made when a
function is lowered, so it holds for a jitted function from its first call.

``jax.export`` refuses custom calls it does not know: export a gradient with
``MHC_JAX_NATIVE=0`` set (forward passes never contain the call).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = [
    "MAX_NATIVE_SIZE",
    "dots_reference",
    "mix",
    "mix_reference",
    "mixable",
    "native_library",
    "reference_kernel",
    "window_dots",
]

_TARGET = "mhc_window_dots"
_SOURCE = Path(__file__).with_name("csrc") / "window_dots.cpp"

#: Largest state (in elements) whose dot products the custom call computes.
#: It runs on one thread: on the 2-core benchmark machine, for four states,
#: it took 0.52 ms against XLA's 0.79 ms at 2^20 elements, but 3.2 ms
#: against 3.0 ms at 2^22, where XLA's multi-threaded reductions catch up.
MAX_NATIVE_SIZE = 1 << 20

_state: dict[str, object] = {}  # the loaded library (or None), once decided
_registered = False


# --- reference forms (plain jnp) ---------------------------------------------------------


def mix_reference(w: jax.Array, *states: jax.Array) -> jax.Array:
    # An unrolled elementwise multiply-add over the (few) states: on XLA:CPU
    # this fuses into one loop, whereas einsum/tensordot over a stacked
    # history ran 10-30x slower.
    total = w[0] * states[0]
    for k in range(1, len(states)):
        total = total + w[k] * states[k]
    return total


def dots_reference(g: jax.Array, *states: jax.Array) -> jax.Array:
    return jnp.stack([jnp.sum(g * h) for h in states])


# --- the primitives ----------------------------------------------------------------------

mix_p = Primitive("mhc_window_mix")
dots_p = Primitive("mhc_window_dots")


def mixable(w: jax.Array, states: Sequence[jax.Array]) -> bool:
    """Whether :func:`mix` takes these: ``w`` of shape ``(K,)`` and ``K >= 1``
    states of one shape, all in ``w``'s dtype."""
    return _matches(w, (len(states),), states)


def _matches(first: jax.Array, first_shape: tuple, states: Sequence[jax.Array]) -> bool:
    return (
        bool(states)
        and tuple(first.shape) == first_shape
        and all(h.shape == states[0].shape and h.dtype == first.dtype for h in states)
    )


def _check(name: str, first: jax.Array, first_shape: tuple, states: Sequence[jax.Array]) -> None:
    if not _matches(first, first_shape, states):
        raise ValueError(
            f"{name} takes states of one shape and dtype and a first argument of shape {first_shape} "
            f"in that dtype; got {first.shape} {first.dtype} and states "
            f"{[(tuple(h.shape), str(h.dtype)) for h in states]}"
        )


def mix(w: jax.Array, states: Sequence[jax.Array]) -> jax.Array:
    """``sum_k w[k] * states[k]``: ``w`` of shape ``(K,)``, states of one shape and dtype."""
    _check("mix", w, (len(states),), states)
    return mix_p.bind(w, *states)


def window_dots(g: jax.Array, states: Sequence[jax.Array]) -> jax.Array:
    """``[<g, states[k]>]_k``, shape ``(K,)``: the transpose of :func:`mix` in ``w``."""
    _check("window_dots", g, tuple(states[0].shape) if states else (), states)
    return dots_p.bind(g, *states)


mix_p.def_impl(mix_reference)
dots_p.def_impl(dots_reference)
mix_p.def_abstract_eval(lambda w, *states: jax.core.ShapedArray(states[0].shape, states[0].dtype))
dots_p.def_abstract_eval(lambda g, *states: jax.core.ShapedArray((len(states),), g.dtype))


def _is_zero(t) -> bool:
    return type(t) is ad.Zero


def _zero_like(x: jax.Array) -> ad.Zero:
    return ad.Zero(jax.core.get_aval(x).to_tangent_aval())


def _nonzero(tangents) -> list[int]:
    return [k for k, t in enumerate(tangents) if not _is_zero(t)]


def _bilinear_jvp(prim: Primitive, moving_term):
    """JVP of ``prim(a, h_1..h_K)``, linear in ``a`` and in each ``h_k``:
    ``prim(da, h) + moving_term(a, dh, moving)``, the second over the states
    whose tangents are not symbolic zeros (``moving``, their indices)."""

    def jvp(primals, tangents):
        a, *states = primals
        da, *dstates = tangents
        out = prim.bind(a, *states)
        terms = [] if _is_zero(da) else [prim.bind(da, *states)]
        moving = _nonzero(dstates)  # constant states (e.g. detach_history) add nothing
        if moving:
            terms.append(moving_term(a, [dstates[k] for k in moving], moving, len(states)))
        if not terms:
            return out, _zero_like(out)
        return out, sum(terms[1:], terms[0])

    return jvp


def _bilinear_transpose(other: Primitive, state_cotangent):
    """Transpose of a primitive linear in ``a`` (states known), giving
    ``other(ct, h)``, or in the states (``a`` known), giving
    ``state_cotangent(a, ct, k)`` for each unknown ``h_k``; never in both."""

    def transpose(ct, a, *states):
        if ad.is_undefined_primal(a):
            return [ad.Zero(a.aval) if _is_zero(ct) else other.bind(ct, *states)] + [None] * len(states)
        return [None] + [
            (ad.Zero(h.aval) if _is_zero(ct) else state_cotangent(a, ct, k)) if ad.is_undefined_primal(h) else None
            for k, h in enumerate(states)
        ]

    return transpose


def _mix_moving(w, dstates, moving, num):
    # Every state moving is the common case (a plain training step): no
    # gather of w, which XLA:CPU would run as one more thunk per layer.
    return mix_p.bind(w if len(moving) == num else w[np.asarray(moving)], *dstates)


def _dots_moving(g, dstates, moving, num):
    part = dots_p.bind(g, *dstates)
    if len(moving) == num:
        return part
    zero = jnp.zeros((), part.dtype)
    return jnp.stack([part[moving.index(k)] if k in moving else zero for k in range(num)])


def _front(args, dims):
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    return [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims, strict=True)]


def _mix_batched(args, dims):
    # Under vmap the mix runs as plain jnp (a per-example w is a broadcast).
    w, *states = _front(args, dims)
    lead = (slice(None),) + (None,) * (states[0].ndim - 1)
    return sum((w[:, k][lead] * h for k, h in enumerate(states[1:], 1)), w[:, 0][lead] * states[0]), 0


def _dots_batched(args, dims):
    g, *states = _front(args, dims)
    axes = tuple(range(1, g.ndim))
    return jnp.stack([jnp.sum(g * h, axis=axes) for h in states], axis=1), 0


ad.primitive_jvps[mix_p] = _bilinear_jvp(mix_p, _mix_moving)
ad.primitive_jvps[dots_p] = _bilinear_jvp(dots_p, _dots_moving)
# mix and dots are each other's transpose in their first argument.
ad.primitive_transposes[mix_p] = _bilinear_transpose(dots_p, lambda w, ct, k: w[k] * ct)
ad.primitive_transposes[dots_p] = _bilinear_transpose(mix_p, lambda g, ct, k: ct[k] * g)
batching.primitive_batchers[mix_p] = _mix_batched
batching.primitive_batchers[dots_p] = _dots_batched
mlir.register_lowering(mix_p, mlir.lower_fun(mix_reference, multiple_results=False))
mlir.register_lowering(dots_p, mlir.lower_fun(dots_reference, multiple_results=False))


def _dots_cpu_lowering(ctx, g, *states, **params):
    aval = ctx.avals_in[0]
    if aval.dtype in (np.float32, np.float64) and aval.size <= MAX_NATIVE_SIZE and native_library() is not None:
        return jax.ffi.ffi_lowering(_TARGET)(ctx, g, *states, **params)
    return mlir.lower_fun(dots_reference, multiple_results=False)(ctx, g, *states, **params)


mlir.register_lowering(dots_p, _dots_cpu_lowering, platform="cpu")


# --- building and loading the custom call -------------------------------------------------


def native_library() -> ctypes.CDLL | None:
    """The compiled custom call, building it on the first call; None when unavailable.

    Unavailable means ``MHC_JAX_NATIVE=0`` is set, or the build failed (a
    warning then says why, once). Either way ``dots`` lowers to ``jnp``.
    """
    if _TARGET in _state:
        return _state[_TARGET]
    library = None
    if os.environ.get("MHC_JAX_NATIVE", "1") != "0":
        try:
            library = _load()
        except Exception as err:  # no compiler, missing headers, a broken toolchain, ...
            warnings.warn(
                f"mhc_jax: could not build the C++ custom call for the mixing weights' gradient "
                f"({type(err).__name__}: {str(err).strip()[:300]}); using XLA's reductions (same "
                "results, slower on CPU). Set MHC_JAX_NATIVE=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=2,
            )
    _state[_TARGET] = library
    return library


@contextlib.contextmanager
def reference_kernel() -> Iterator[None]:
    """Inside the block, functions lowered (first jitted) use the ``jnp``
    reductions, as with ``MHC_JAX_NATIVE=0``: for side-by-side tests and benchmarks.

    JAX caches a function's lowering: one already jitted with the same
    arguments keeps the call. Use fresh functions inside the block, or set
    ``MHC_JAX_NATIVE=0`` before the process starts (e.g. for ``jax.export``).
    """
    missing = object()
    saved = _state.get(_TARGET, missing)
    _state[_TARGET] = None
    try:
        yield
    finally:
        if saved is missing:
            del _state[_TARGET]
        else:
            _state[_TARGET] = saved


def _cflags() -> list[str]:
    flags = ["-O3", "-shared", "-fPIC", "-std=c++17"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # The build is for this machine (and the cache key holds its CPU
        # flags, so a cache shared between machines never hands one a build
        # for the other): AVX2/AVX-512 vectors where the CPU has them.
        flags.append("-march=native")
    return flags


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    include = jax.ffi.include_dir()
    flags = _cflags()
    key = hashlib.sha256(
        "\0".join(
            [_SOURCE.read_text(), compiler, *flags, jax.__version__, platform.machine(), _cpu_signature()]
        ).encode()
    ).hexdigest()[:16]
    root = Path(os.environ.get("MHC_JAX_EXTENSIONS_DIR") or Path.home() / ".cache" / "mhc_jax")
    path = root / f"window_dots_{key}.so"
    if not path.exists():
        warnings.warn(
            "mhc_jax: compiling the C++ custom call for the mixing weights' gradient "
            "(first use on this machine, a few seconds)",
            RuntimeWarning,
            stacklevel=4,
        )
        root.mkdir(parents=True, exist_ok=True)
        # Build to a temporary name and rename: concurrent processes (pytest
        # workers) never load a half-written library.
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            out = Path(tmp) / path.name
            done = subprocess.run(
                [compiler, *flags, "-I", include, str(_SOURCE), "-o", str(out)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-600:]}")
            os.replace(out, path)
    library = ctypes.CDLL(str(path))
    _register(library)
    return library


def _register(library: ctypes.CDLL) -> None:
    # Once per process: XLA keeps a registered target for the process's life.
    global _registered
    if not _registered:
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.MhcWindowDots), platform="cpu")
        _registered = True

