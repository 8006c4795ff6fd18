r"""Projections of mixing logits onto stable manifolds (JAX).

Notation: ``mu`` logits on the last axis (any leading batch axes), ``tau`` the
temperature, ``eps`` the identity floor, ``K`` the size of the last axis.

Every function here is pure and works under ``jit``, ``vmap`` and ``grad``.
Their gradients are the exact derivatives of the maps (docs/mathematics.md).
The twin module :mod:`mhc_torch.projections` computes the same numbers; the
parity tests hold the two to 1e-6.

Two rules hold for :func:`project_softmax`, :func:`project_simplex` and
:func:`project_identity_preserving` alike (and for the torch twins):

* **dtype**: the result has the input's dtype. bfloat16 and float16 logits
  are projected in float32 and the weights rounded once at the end (a
  half-precision sort-and-threshold loses the small weights); float32 and
  float64 are projected in their own precision.
* **non-finite logits are never hidden**: a row (the last axis) holding a NaN
  or an infinite scaled logit ``mu / tau`` gives NaN for every weight of that
  row, never zeros and never an exception. Other rows are unaffected, and so
  are their gradients; the gradient with respect to a non-finite row is 0
  (the NaN reaches the loss through the weights).
"""

from __future__ import annotations

import functools
import math
from numbers import Real

import jax
import jax.numpy as jnp

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


def _projection_dtypes(dtype) -> tuple[jnp.dtype, jnp.dtype]:
    """(the dtype to project in, the dtype of the result) for logits of ``dtype``."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32), jnp.dtype(jnp.float32)
    # Half precision is projected in float32 (see the module docstring).
    return (dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)), dtype


def _scaled_logits(logits: jax.Array, temperature: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``mu / tau`` in the projection dtype with non-finite rows zeroed, and each row's poison.

    The poison, ``sum(z * 0)`` over a row, is 0 for a finite row and NaN for a
    row holding a NaN or an inf (``inf * 0`` is NaN). The NaN weights are taken
    from it rather than from a NaN constant, so nothing here makes a NaN out
    of finite input and ``jax_debug_nans`` stays quiet.

    Zeroing the non-finite rows is the first half of a "double where": no NaN
    or inf enters the projection or its derivative (a NaN there would leak
    into the gradient through the unselected branch of the second where,
    in :func:`_project`, as ``0 * nan``).
    """
    dtype, _ = _projection_dtypes(logits.dtype)
    z = logits.astype(dtype) / temperature.astype(dtype)
    poison = jnp.sum(z * 0, axis=-1, keepdims=True)
    return jnp.where(poison == 0, z, jnp.zeros_like(z)), poison


def _softmax(z: jax.Array) -> jax.Array:
    return jax.nn.softmax(z, axis=-1)


@jax.custom_jvp
@jax.jit  # eager callers compile the sort-and-threshold once per shape, not per primitive
def _simplex_last_axis(z: jax.Array) -> jax.Array:
    # Sort and threshold, batched over leading axes (the arithmetic of the torch
    # twin): rho = #{j : 1/j + u_j - c_j / j > 0} with u the values in
    # decreasing order and c their cumulative sums, alpha = relu(1/rho + z - c_rho / rho).
    # For finite z the test holds at j = 1, so rho >= 1.
    u = jnp.flip(jnp.sort(z, axis=-1), axis=-1)
    cumsum = jnp.cumsum(u, axis=-1)
    j = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype).reshape((1,) * (z.ndim - 1) + (-1,))
    rho = jnp.sum(1 / j + (u - cumsum / j) > 0, axis=-1, keepdims=True)
    theta_sum = jnp.take_along_axis(cumsum, rho - 1, axis=-1)
    rho = rho.astype(z.dtype)
    return jnp.maximum(1 / rho + (z - theta_sum / rho), 0)


@_simplex_last_axis.defjvp
def _simplex_last_axis_jvp(primals, tangents):
    # The sparsemax Jacobian diag(s) - s s^T / |s|, s = (alpha > 0), batched:
    # the support of the output, not the rho of the threshold test, which at an
    # exact support edge can count a slot whose output rounds to 0.
    (z,), (dz,) = primals, tangents
    alpha = _simplex_last_axis(z)
    s = (alpha > 0).astype(dz.dtype)
    mean_on_support = jnp.sum(s * dz, axis=-1, keepdims=True) / jnp.sum(s, axis=-1, keepdims=True)
    return alpha, s * (dz - mean_on_support)


def _simplex(z: jax.Array) -> jax.Array:
    # Shift invariant: subtracting the max keeps the support within [-1, 0].
    return _simplex_last_axis(z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True)))


_BASE_PROJECTIONS = {"simplex": _simplex, "softmax": _softmax}


def _project(
    logits: jax.typing.ArrayLike,
    temperature: jax.typing.ArrayLike,
    epsilon: jax.typing.ArrayLike | None,
    base: str,
) -> jax.Array:
    """``base`` of ``logits / temperature``, floored by ``epsilon`` unless None; NaN across non-finite rows."""
    # Not jitted as a whole: compiled as one graph, XLA fuses the scaling into
    # the max-shift and the top slot's shifted logit can miss 0 by an ulp,
    # moving the weights a few ulp away from the eager arithmetic (the torch
    # twin's). Only the sort-and-threshold is compiled on its own.
    logits = jnp.asarray(logits)
    z, poison = _scaled_logits(logits, jnp.asarray(temperature))
    alpha = _BASE_PROJECTIONS[base](z)
    if epsilon is not None:
        epsilon = jnp.asarray(epsilon, alpha.dtype)
        alpha = ((1 - epsilon) * alpha).at[..., -1].add(epsilon)
    alpha = jnp.where(poison == 0, alpha, poison)
    return alpha.astype(_projection_dtypes(logits.dtype)[1])


def project_softmax(logits: jax.Array, temperature: jax.typing.ArrayLike = 1.0) -> jax.Array:
    r"""Softmax of temperature-scaled logits on the last axis.

    .. math:: \alpha = \mathrm{softmax}(\mu / \tau)

    A row holding a NaN or an infinite ``mu / tau`` (even ``-inf``, which a
    plain softmax would turn into a silent 0) gives NaN weights across that
    row; the result has the dtype of ``logits`` (module docstring).

    Args:
      logits: ``mu``, shape ``(..., K)``.
      temperature: ``tau > 0``; small values sharpen, large values flatten.

    Returns:
      Weights of the same shape and dtype: positive, summing to 1 on the last
      axis (NaN across a row with a non-finite logit).
    """
    check_temperature(temperature)
    return _project(logits, temperature, None, "softmax")


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

    A row holding a NaN or an infinite ``mu / tau`` (even ``-inf``, whose slot
    the limit would switch off) gives NaN weights across that row; the result
    has the dtype of ``logits`` (module docstring).

    Args:
      logits: ``mu``, shape ``(..., K)``.
      temperature: ``tau > 0``.

    Returns:
      Weights of the same shape and dtype: non-negative, summing to 1 on the
      last axis (NaN across a row with a non-finite logit).
    """
    check_temperature(temperature)
    return _project(logits, temperature, None, "simplex")


def project_identity_preserving(
    logits: jax.Array,
    epsilon: jax.typing.ArrayLike = 0.1,
    temperature: jax.typing.ArrayLike = 1.0,
    base: str = "simplex",
) -> jax.Array:
    r"""Base projection with an epsilon floor on the latest (last) slot.

    .. math:: \alpha = (1 - \varepsilon)\, \mathrm{base}(\mu, \tau) + \varepsilon\, e_K

    so ``alpha_K >= eps`` whatever the (finite) logits: the latest state can
    never be switched off, and ``eps = 0`` gives the base projection.

    A row holding a NaN or an infinite ``mu / tau`` gives NaN weights across
    that row, the floored slot included; the result has the dtype of
    ``logits`` (module docstring; the floor is added before rounding to a
    half-precision dtype).

    Args:
      logits: ``mu``, shape ``(..., K)``; the last entry is the latest state.
      epsilon: ``eps`` in ``[0, 1)``.
      temperature: ``tau > 0``.
      base: ``"simplex"`` (:func:`project_simplex`) or ``"softmax"``.

    Returns:
      Weights of the same shape and dtype, summing to 1, with the last one
      ``>= eps`` (NaN across a row with a non-finite logit).
    """
    check_epsilon(epsilon)
    check_base(base)
    check_temperature(temperature)
    return _project(logits, temperature, epsilon, base)


def project_doubly_stochastic(
    logits: jax.Array,
    iterations: int = 20,
    temperature: jax.typing.ArrayLike = 1.0,
) -> jax.Array:
    r"""Sinkhorn-Knopp projection of ``exp(M / tau)`` to a doubly stochastic matrix.

    Works in log space, so large logits cannot overflow. Starting from
    ``L_0 = M / tau``, each of the ``T = iterations`` sweeps normalises the
    columns, then the rows:

    .. math::
        C_t = L_{t-1} - \log \textstyle\sum_i \exp (L_{t-1})_{ij}, \qquad
        L_t = C_t - \log \textstyle\sum_j \exp (C_t)_{ij}, \qquad
        P = \exp(L_T).

    Rows sum to 1 exactly (the last step normalises them); columns converge to
    1 as ``iterations`` grows (fast for moderate logits, slowly when
    ``M / tau`` is nearly a permutation) and carry the truncation error.

    **Gradient.** The derivative is that of the ``T`` sweeps as written (the
    truncated loop, not the limit), but the forward pass keeps only ``M / tau``
    for it, never the ``2T`` iterates: the backward pass recomputes the sweeps
    and walks them back. With ``s = softmax`` of a step's input (its output's
    exponential), the pullback of ``y = x - logsumexp(x)`` along an axis is
    ``g_x = g_y - exp(y) * sum(g_y)``, so

    .. math::
        \bar L_T = \bar P \odot P, \quad
        \bar C_t = \bar L_t - e^{L_t} \textstyle\sum_j (\bar L_t)_{ij}, \quad
        \bar L_{t-1} = \bar C_t - e^{C_t} \textstyle\sum_i (\bar C_t)_{ij}.

    The iterates live only while one backward pass runs; between the forward
    and the backward pass a layer holds one ``(..., n, n)`` array. (Implicit
    differentiation at the fixed point would need no recomputation, but its
    gradient is that of the limit, not of the ``T`` sweeps the forward pass
    computed.) The map is a ``jax.custom_vjp``: reverse mode, ``jit``,
    ``vmap`` and ``scan`` work; forward mode (``jax.jvp``, ``jacfwd``) does not.

    **dtype.** bfloat16 and float16 logits are projected in float32 and the
    result rounded once to their dtype; float32 and float64 stay in their own
    precision.

    **Non-finite logits.** A matrix holding a NaN or an infinite ``M / tau``
    (even ``-inf``) gives NaN for every entry of that matrix, never a silent
    zero; other matrices of the batch, and their gradients, are unaffected.

    Args:
      logits: ``M``, shape ``(..., n, n)`` (square in the last two axes).
      iterations: number of column-then-row sweeps ``T``, an int ``>= 1``.
      temperature: ``tau > 0``.

    Returns:
      Non-negative matrices of the same shape and dtype (NaN for a matrix with
      a non-finite logit).
    """
    check_temperature(temperature)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    logits = jnp.asarray(logits)
    if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(
            "project_doubly_stochastic needs square matrices in the last two "
            f"axes, got shape {tuple(logits.shape)}"
        )
    dtype = logits.dtype if jnp.issubdtype(logits.dtype, jnp.floating) else jnp.dtype(jnp.float32)
    # Half precision is projected in float32: a bfloat16 logsumexp loses the
    # small entries that the column sums are made of.
    compute = dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)
    return _sinkhorn_projection(logits.astype(compute), jnp.asarray(temperature, compute), iterations).astype(dtype)


@functools.partial(jax.jit, static_argnums=2)
def _sinkhorn_projection(logits: jax.Array, temperature: jax.Array, iterations: int) -> jax.Array:
    return _sinkhorn(logits / temperature, iterations)


def _sinkhorn_sweep(log_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One sweep: (columns normalised, then rows normalised), in log space."""
    # log_softmax is L - logsumexp(L) computed as (L - max) - log(sum(exp(L - max))):
    # the exact subtraction comes first, so log-values of order 1e3-1e7 do not
    # lose the small normaliser to rounding.
    log_c = jax.nn.log_softmax(log_p, axis=-2)
    return log_c, jax.nn.log_softmax(log_c, axis=-1)


def _finite_part(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Which matrices are finite, and ``z`` with the others zeroed (so no NaN enters the sweeps)."""
    finite = jnp.all(jnp.isfinite(z), axis=(-2, -1), keepdims=True)
    return finite, jnp.where(finite, z, jnp.zeros_like(z))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sinkhorn(z: jax.Array, iterations: int) -> jax.Array:
    finite, z = _finite_part(z)
    p = jnp.exp(jax.lax.fori_loop(0, iterations, lambda _, log_p: _sinkhorn_sweep(log_p)[1], z))
    return jnp.where(finite, p, jnp.full_like(p, jnp.nan))


def _sinkhorn_fwd(z: jax.Array, iterations: int) -> tuple[jax.Array, jax.Array]:
    # The only residual is the input: the iterates (and the finite mask) are
    # recomputed in _sinkhorn_bwd.
    return _sinkhorn(z, iterations), z


def _sinkhorn_bwd(iterations: int, z: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    finite, z = _finite_part(z)

    def forward(log_p, _):
        log_c, log_r = _sinkhorn_sweep(log_p)
        return log_r, (jnp.exp(log_c), jnp.exp(log_r))

    _, (c, r) = jax.lax.scan(forward, z, None, length=iterations)

    def backward(g_log, exps):
        c_t, r_t = exps
        g_col = g_log - r_t * jnp.sum(g_log, axis=-1, keepdims=True)  # through the row step
        return g_col - c_t * jnp.sum(g_col, axis=-2, keepdims=True), None  # through the column step

    g = jnp.where(finite, g, jnp.zeros_like(g))
    g_z, _ = jax.lax.scan(backward, g * r[-1], (c, r), reverse=True)
    return (jnp.where(finite, g_z, jnp.zeros_like(g_z)),)


_sinkhorn.defvjp(_sinkhorn_fwd, _sinkhorn_bwd)
