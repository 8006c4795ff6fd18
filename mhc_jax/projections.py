r"""Projections of mixing logits onto stable manifolds (JAX).

Notation: ``mu`` logits on the last axis (any leading batch axes), ``tau`` the
temperature, ``eps`` the identity floor, ``K`` the size of the last axis.

Every function here is pure and works under ``jit``, ``vmap`` and ``grad``.
Their gradients are the exact derivatives of the maps (SPEC.md). The twin
module :mod:`mhc_torch.projections` computes the same numbers; the parity tests
hold the two to 1e-6.
"""

from __future__ import annotations

import functools
import math
from numbers import Real

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "project_softmax",
    "project_simplex",
    "project_identity_preserving",
    "project_doubly_stochastic",
    "BASES",
]

#: Base projections that ``project_identity_preserving`` can wrap.
BASES = ("simplex", "softmax")


def check_temperature(temperature) -> None:
    """Raise ``ValueError`` unless a Python-number temperature is finite and > 0.

    Arrays (possibly traced) are not checked: reading their value would force a
    host synchronisation, and under ``jit`` there is no value to read.
    """
    if isinstance(temperature, bool) or (
        isinstance(temperature, Real)
        and not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(
            f"temperature must be a finite number > 0, got {temperature!r}"
        )


def check_epsilon(epsilon) -> None:
    """Raise ``ValueError`` unless a Python-number epsilon lies in [0, 1)."""
    if isinstance(epsilon, bool) or (
        isinstance(epsilon, Real) and not 0.0 <= epsilon < 1.0
    ):
        raise ValueError(f"epsilon must be a number in [0, 1), got {epsilon!r}")


def check_base(base: str) -> None:
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")


def project_softmax(logits: jax.Array, temperature: jax.typing.ArrayLike = 1.0) -> jax.Array:
    r"""Softmax of temperature-scaled logits on the last axis.

    .. math:: \alpha = \mathrm{softmax}(\mu / \tau)

    Args:
      logits: ``mu``, shape ``(..., K)``.
      temperature: ``tau > 0``; small values sharpen, large values flatten.

    Returns:
      Weights of the same shape: positive, summing to 1 on the last axis.
    """
    check_temperature(temperature)
    return jax.nn.softmax(logits / temperature, axis=-1)


def _unit_simplex(z: jax.Array) -> jax.Array:
    # optax's sort-and-threshold projection of one vector. Its arithmetic mixes
    # int and float arrays, so it runs under standard promotion even when the
    # caller (our test-suite) turned on strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        return optax.projections.projection_simplex(z)


@jax.custom_jvp
@jax.jit  # eager callers compile the sort-and-threshold once per shape, not per primitive
def _simplex_last_axis(z: jax.Array) -> jax.Array:
    return jnp.vectorize(_unit_simplex, signature="(k)->(k)")(z)


@_simplex_last_axis.defjvp
def _simplex_last_axis_jvp(primals, tangents):
    # The sparsemax Jacobian diag(s) - s s^T / |s|, s = (alpha > 0), batched.
    # Ours rather than optax's rule: that one is traced whenever JAX
    # differentiates a jitted caller, and it is not strict-promotion clean.
    (z,), (dz,) = primals, tangents
    alpha = _simplex_last_axis(z)
    s = (alpha > 0).astype(dz.dtype)
    mean_on_support = jnp.sum(s * dz, axis=-1, keepdims=True) / jnp.sum(s, axis=-1, keepdims=True)
    return alpha, s * (dz - mean_on_support)


def project_simplex(logits: jax.Array, temperature: jax.typing.ArrayLike = 1.0) -> jax.Array:
    r"""Exact Euclidean projection of ``mu / tau`` onto the probability simplex.

    .. math::
        \alpha = \arg\min_{a \ge 0,\ \sum a = 1} \tfrac12 \lVert a - \mu/\tau \rVert^2
               = \max(\mu/\tau - \theta, 0)

    with the threshold ``theta`` found by sorting (sparsemax). Unlike softmax
    the result has exact zeros: a slot whose scaled logit is more than the
    threshold below the others is switched off entirely.

    The Jacobian is ``diag(s) - s s^T / |s|`` (``s`` the support indicator,
    scaled by ``1/tau``): slots outside the support get no gradient, and a
    one-hot result has a zero Jacobian.

    The logits are shifted by their (gradient-stopped) maximum first. The
    projection is shift invariant, and the shift keeps every value in the
    support within ``[-1, 0]``, so logits of 1e7 after scaling still give
    weights that sum to 1 in float32.

    Args:
      logits: ``mu``, shape ``(..., K)``.
      temperature: ``tau > 0``.

    Returns:
      Weights of the same shape: non-negative, summing to 1 on the last axis.
    """
    check_temperature(temperature)
    z = logits / temperature
    z = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    return _simplex_last_axis(z)


def project_identity_preserving(
    logits: jax.Array,
    epsilon: jax.typing.ArrayLike = 0.1,
    temperature: jax.typing.ArrayLike = 1.0,
    base: str = "simplex",
) -> jax.Array:
    r"""Base projection with an epsilon floor on the latest (last) slot.

    .. math:: \alpha = (1 - \varepsilon)\, \mathrm{base}(\mu, \tau) + \varepsilon\, e_K

    so ``alpha_K >= eps`` whatever the logits: the latest state can never be
    switched off, and ``eps = 0`` gives the base projection.

    Args:
      logits: ``mu``, shape ``(..., K)``; the last entry is the latest state.
      epsilon: ``eps`` in ``[0, 1)``.
      temperature: ``tau > 0``.
      base: ``"simplex"`` (:func:`project_simplex`) or ``"softmax"``.

    Returns:
      Weights of the same shape, summing to 1, with the last one ``>= eps``.
    """
    check_epsilon(epsilon)
    check_base(base)
    project = project_simplex if base == "simplex" else project_softmax
    alpha = project(logits, temperature)
    epsilon = jnp.asarray(epsilon, alpha.dtype)
    return ((1 - epsilon) * alpha).at[..., -1].add(epsilon)


def project_doubly_stochastic(
    logits: jax.Array,
    iterations: int = 20,
    temperature: jax.typing.ArrayLike = 1.0,
) -> jax.Array:
    r"""Sinkhorn-Knopp projection of ``exp(M / tau)`` to a doubly stochastic matrix.

    Works in log space, so large logits cannot overflow. Each iteration
    normalises columns, then rows:

    .. math::
        L \leftarrow L - \mathrm{logsumexp}_{\text{rows}}(L), \qquad
        L \leftarrow L - \mathrm{logsumexp}_{\text{cols}}(L), \qquad
        P = \exp(L)

    starting from ``L = M / tau``. Rows sum to 1 exactly (the last step
    normalises them); columns converge to 1 as ``iterations`` grows (fast for
    moderate logits, slowly when ``M / tau`` is nearly a permutation).

    Args:
      logits: ``M``, shape ``(..., n, n)`` (square in the last two axes).
      iterations: number of column-then-row sweeps, ``>= 1``.
      temperature: ``tau > 0``.

    Returns:
      Non-negative matrices of the same shape.
    """
    check_temperature(temperature)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(
            "project_doubly_stochastic needs square matrices in the last two "
            f"axes, got shape {tuple(logits.shape)}"
        )

    return _sinkhorn(logits / temperature, iterations)


def _sinkhorn_sweep(_, log_p: jax.Array) -> jax.Array:
    # log_softmax is L - logsumexp(L) computed as (L - max) - log(sum(exp(L - max))):
    # the exact subtraction comes first, so log-values of order 1e3-1e7 do not
    # lose the small normaliser to rounding.
    log_p = jax.nn.log_softmax(log_p, axis=-2)
    return jax.nn.log_softmax(log_p, axis=-1)


@functools.partial(jax.jit, static_argnums=1)
def _sinkhorn(log_p: jax.Array, iterations: int) -> jax.Array:
    return jnp.exp(jax.lax.fori_loop(0, iterations, _sinkhorn_sweep, log_p))
