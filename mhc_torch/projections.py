r"""Projections of mixing logits onto stable manifolds (PyTorch).

Notation: ``mu`` logits on the last dimension (any leading batch dimensions),
``tau`` the temperature, ``eps`` the identity floor, ``K`` the size of the last
dimension.

Plain differentiable functions; autograd gives the exact derivatives of the
maps (docs/mathematics.md). The twin module :mod:`mhc_jax.projections`
computes the same numbers; the parity tests hold the two to 1e-6.

Two rules hold for :func:`project_softmax`, :func:`project_simplex` and
:func:`project_identity_preserving` alike (and for the JAX twins):

* **dtype**: the result has the input's dtype. bfloat16 and float16 logits
  are projected in float32 and the weights rounded once at the end (a
  half-precision sort-and-threshold loses the small weights); float32 and
  float64 are projected in their own precision.
* **non-finite logits are never hidden**: a row (the last dimension) holding a
  NaN or an infinite scaled logit ``mu / tau`` gives NaN for every weight of
  that row, never zeros and never an exception. Other rows are unaffected, and
  so are their gradients; the gradient with respect to a non-finite row is 0
  (the NaN reaches the loss through the weights). The check is two
  ``torch.where`` calls: no host synchronisation.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

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

    Tensors are not checked: reading their value would force a host sync.
    Comparisons only (no ``math.isfinite``), so ``torch.compile`` can trace the
    check when it turns a Python float into a symbolic one (``dynamic=True``).
    """
    if isinstance(temperature, bool) or (
        isinstance(temperature, Real) and not 0 < temperature < math.inf
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


def _projection_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(the dtype to project in, the dtype of the result) for logits of ``dtype``."""
    if not dtype.is_floating_point:
        return torch.float32, torch.float32
    # Half precision is projected in float32 (see the module docstring).
    return torch.promote_types(dtype, torch.float32), dtype


def _scaled_logits(logits: torch.Tensor, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """``mu / tau`` in the projection dtype with non-finite rows zeroed, and the finite-row mask.

    The first half of a "double where": a non-finite row is projected as
    zeros, so no NaN or inf enters the projection (where the sort-and-threshold
    would find no support) or its derivative (a NaN there would leak into the
    gradient through the unselected branch of the second where,
    in :func:`_project`, as ``0 * nan``).
    """
    z = logits.to(_projection_dtypes(logits.dtype)[0]) / temperature
    finite = torch.isfinite(z).all(dim=-1, keepdim=True)
    return torch.where(finite, z, 0), finite


def _softmax(z: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z, dim=-1)


def project_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""Softmax of temperature-scaled logits on the last dimension.

    .. math:: \alpha = \mathrm{softmax}(\mu / \tau)

    A row holding a NaN or an infinite ``mu / tau`` (even ``-inf``, which a
    plain softmax would turn into a silent 0) gives NaN weights across that
    row; the result has the dtype of ``logits`` (module docstring).

    Args:
        logits: ``mu``, shape ``(..., K)``.
        temperature: ``tau > 0``; small values sharpen, large values flatten.

    Returns:
        Weights of the same shape and dtype: positive, summing to 1 on the last
        dimension (NaN across a row with a non-finite logit).
    """
    check_temperature(temperature)
    return _project(logits, temperature, None, "softmax")


def _simplex_threshold(z: torch.Tensor) -> torch.Tensor:
    # Sort and threshold (the arithmetic of the JAX twin):
    # rho = #{j : 1/j + u_j - c_j / j > 0}, alpha = relu(1/rho + z - c_rho / rho).
    # For finite z the test holds at j = 1, so rho >= 1 and the gather is in range.
    u, _ = torch.sort(z, dim=-1, descending=True)
    cumsum = u.cumsum(dim=-1)
    j = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    rho = (1 / j + (u - cumsum / j) > 0).sum(dim=-1, keepdim=True)
    theta_sum = cumsum.gather(-1, rho - 1)
    rho = rho.to(z.dtype)
    return torch.relu(1 / rho + (z - theta_sum / rho))


def _sparsemax_jacobian_product(alpha: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # (diag(s) - s s^T / |s|) v with s = (alpha > 0); the matrix is symmetric,
    # so this is the VJP as well as the JVP.
    s = (alpha > 0).to(v.dtype)
    mean_on_support = (s * v).sum(dim=-1, keepdim=True) / s.sum(dim=-1, keepdim=True)
    return s * (v - mean_on_support)


class _SimplexProjection(torch.autograd.Function):
    """Simplex projection whose derivative follows the support of its output.

    Autograd through the threshold formula would follow ``rho`` instead, and
    at an exact support edge float rounding can make ``rho`` count a slot
    whose output is 0 (the threshold test is then not monotone in ``j``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: torch.Tensor) -> torch.Tensor:
        return _simplex_threshold(z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (alpha,) = ctx.saved_tensors
        return _sparsemax_jacobian_product(alpha, grad)

    # No jvp: torch.compile (Dynamo) cannot trace a Function that defines one,
    # and a compiled model matters more than forward-mode AD through this map.


def _simplex(z: torch.Tensor) -> torch.Tensor:
    # Shift invariant: subtracting the max keeps the support within [-1, 0].
    return _SimplexProjection.apply(z - z.detach().amax(dim=-1, keepdim=True))


_BASE_PROJECTIONS = {"simplex": _simplex, "softmax": _softmax}


def _project(logits: torch.Tensor, temperature, epsilon, base: str) -> torch.Tensor:
    """``base`` of ``logits / temperature``, floored by ``epsilon`` unless None; NaN across non-finite rows."""
    z, finite = _scaled_logits(logits, temperature)
    alpha = _BASE_PROJECTIONS[base](z)
    if epsilon is not None:
        scaled = (1 - epsilon) * alpha
        alpha = torch.cat([scaled[..., :-1], scaled[..., -1:] + epsilon], dim=-1)
    return torch.where(finite, alpha, math.nan).to(_projection_dtypes(logits.dtype)[1])


def project_simplex(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""Exact Euclidean projection of ``mu / tau`` onto the probability simplex.

    .. math::
        \alpha = \arg\min_{a \ge 0,\ \sum a = 1} \tfrac12 \lVert a - \mu/\tau \rVert^2
               = \max(\mu/\tau - \theta, 0)

    The threshold ``theta`` is found by sorting: with ``u`` the scaled logits
    in decreasing order and ``c`` their cumulative sums, the support size is
    ``rho = #{j : 1/j + u_j - c_j / j > 0}`` and
    ``alpha = relu(1/rho + z - c_rho / rho)``. The result has exact zeros.

    The Jacobian is ``diag(s) - s s^T / |s|`` with ``s = (alpha > 0)`` the
    support of the output (scaled by ``1/tau``): slots outside the support get
    no gradient, and a one-hot result has a zero Jacobian.

    The logits are shifted by their (detached) maximum first: the projection
    is shift invariant, and after the shift every value in the support lies in
    ``[-1, 0]``, so scaled logits of 1e7 still give weights summing to 1.

    A row holding a NaN or an infinite ``mu / tau`` (even ``-inf``, whose slot
    the limit would switch off) gives NaN weights across that row; the result
    has the dtype of ``logits`` (module docstring).

    Args:
        logits: ``mu``, shape ``(..., K)``.
        temperature: ``tau > 0``.

    Returns:
        Weights of the same shape and dtype: non-negative, summing to 1 on the
        last dimension (NaN across a row with a non-finite logit).
    """
    check_temperature(temperature)
    return _project(logits, temperature, None, "simplex")


def project_identity_preserving(
    logits: torch.Tensor,
    epsilon: float = 0.1,
    temperature: float = 1.0,
    base: str = "simplex",
) -> torch.Tensor:
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
    logits: torch.Tensor, iterations: int = 20, temperature: float = 1.0
) -> torch.Tensor:
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

    Only the first sweep needs log space: after it every row sums to 1 and
    every column sum lies in ``[1/n, n]``, so the later sweeps divide the
    probabilities ``exp(L_t)`` by their column and row sums directly (two
    small matrix products and two divisions instead of two ``log_softmax``
    calls; the same map, equal to the log-space sweeps to rounding). When
    ``n`` or ``iterations`` is so large that an entry rounded to zero could
    grow back into view (``iterations - 1 > 40 / ln n``), every sweep stays
    in log space.

    **Gradient.** The derivative is that of the ``T`` sweeps as written (the
    truncated loop, not the limit), but the forward pass keeps only ``M / tau``
    for it, never the ``2T`` iterates: the backward pass recomputes the sweeps
    and walks them back. The pullback of ``y = x - logsumexp(x)`` along an
    axis is ``g_x = g_y - exp(y) * sum(g_y)``, so

    .. math::
        \bar L_T = \bar P \odot P, \quad
        \bar C_t = \bar L_t - e^{L_t} \textstyle\sum_j (\bar L_t)_{ij}, \quad
        \bar L_{t-1} = \bar C_t - e^{C_t} \textstyle\sum_i (\bar C_t)_{ij}.

    The iterates live only while one backward pass runs; between the forward
    and the backward pass a layer holds one ``(..., n, n)`` tensor. (Implicit
    differentiation at the fixed point would need no recomputation, but its
    gradient is that of the limit, not of the ``T`` sweeps the forward pass
    computed.) The map is a ``torch.autograd.Function`` with a vmap rule
    (``torch.func.vmap`` and ``grad`` work, forward-mode AD does not, as for
    :func:`project_simplex`).

    **dtype.** bfloat16 and float16 logits are projected in float32 and the
    result rounded once to their dtype; float32 and float64 stay in their own
    precision.

    **Non-finite logits.** A matrix holding a NaN or an infinite ``M / tau``
    (even ``-inf``) gives NaN for every entry of that matrix, never a silent
    zero; other matrices of the batch, and their gradients, are unaffected.

    Args:
        logits: ``M``, shape ``(..., n, n)`` (square in the last two dimensions).
        iterations: number of column-then-row sweeps ``T``, an int ``>= 1``.
        temperature: ``tau > 0``.

    Returns:
        Non-negative matrices of the same shape and dtype (NaN for a matrix
        with a non-finite logit).
    """
    check_temperature(temperature)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(
            "project_doubly_stochastic needs square matrices in the last two "
            f"dimensions, got shape {tuple(logits.shape)}"
        )
    dtype = logits.dtype if logits.dtype.is_floating_point else torch.float32
    # Half precision is projected in float32: a bfloat16 logsumexp loses the
    # small entries that the column sums are made of.
    z = logits.to(torch.promote_types(dtype, torch.float32)) / temperature
    return _Sinkhorn.apply(z, iterations).to(dtype)


def _sinkhorn_sweep(log_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sweep: (columns normalised, then rows normalised), in log space."""
    # log_softmax is L - logsumexp(L) computed as (L - max) - log(sum(exp(L - max))):
    # the exact subtraction comes first, so log-values of order 1e3-1e7 do not
    # lose the small normaliser to rounding.
    log_c = torch.log_softmax(log_p, dim=-2)
    return log_c, torch.log_softmax(log_c, dim=-1)


def _finite_part(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which matrices are finite, and ``z`` with the others zeroed (so no NaN enters the sweeps)."""
    finite = torch.isfinite(z).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
    return finite, torch.where(finite, z, 0)


# Speed (eager torch). A log-space sweep costs two log_softmax calls over tiny
# axes, which are slow kernels; a sweep on probabilities costs two small
# matrix products and two divisions. Both compute the same map: after one
# log-space sweep every row sums to 1 and every column sum lies in
# [1/n, n], and from there each further sweep multiplies an entry by a factor
# in [1/n^2, n^2]. So after the first sweep the probabilities are swept
# directly, as long as an entry that exp() rounds to zero (below e^-103)
# cannot grow past e^-23 (an error far below float32's resolution of 1):
# at most PLAIN_SWEEP_BUDGET / ln(n) further sweeps. Longer runs (large n or
# many iterations) stay in log space throughout.
# (An int: torch.compile treats a global int as a constant but a global float
# as a graph input, and under dynamic shapes one read by the Sinkhorn of two
# layers crashes dynamo, pytorch/pytorch#193194.)
_PLAIN_SWEEP_BUDGET = 40


def _plain_sweeps_allowed(n: int, iterations: int) -> bool:
    return n == 1 or iterations - 1 <= _PLAIN_SWEEP_BUDGET / math.log(n)


def _group_sums(n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 matrices ``S`` such that ``p @ S`` gives, for each entry of a
    row-major flattened ``(n, n)`` matrix ``p``, its column sum and its row sum."""
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    ones = torch.ones(n, n, dtype=like.dtype, device=like.device)
    return torch.kron(ones, eye), torch.kron(eye, ones)


def _sinkhorn_tape(z: torch.Tensor, iterations: int, keep: bool):
    """The sweeps of ``z`` (finite, ``(..., n, n)``): the result ``P`` and, with
    ``keep``, what the backward pass needs (the first sweep in log space, the
    rest on probabilities when :func:`_plain_sweeps_allowed`)."""
    n = z.shape[-1]
    log_c, log_p = _sinkhorn_sweep(z)
    tape = [(torch.exp(log_c), torch.exp(log_p))] if keep else []
    if not _plain_sweeps_allowed(n, iterations):
        for _ in range(iterations - 1):
            log_c, log_p = _sinkhorn_sweep(log_p)
            if keep:
                tape.append((torch.exp(log_c), torch.exp(log_p)))
        return torch.exp(log_p), tape, None
    s_col, s_row = _group_sums(n, z)
    p = torch.exp(log_p).reshape(-1, n * n)
    plain = []
    for _ in range(iterations - 1):
        col_sums = p @ s_col
        c = p / col_sums
        row_sums = c @ s_row
        p = c / row_sums
        if keep:
            plain.append((c, col_sums, p, row_sums))
    return p.reshape(z.shape), tape, (plain, s_col, s_row)


class _Sinkhorn(torch.autograd.Function):
    """``exp`` of ``iterations`` sweeps; the backward pass recomputes the iterates.

    A matrix with a non-finite entry is swept as zeros and comes out as NaN,
    with a zero gradient (the NaN reaches the loss through the output).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: torch.Tensor, iterations: int) -> torch.Tensor:
        finite, z = _finite_part(z)
        return torch.where(finite, _sinkhorn_tape(z, iterations, keep=False)[0], math.nan)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, iterations = inputs
        # The only saved tensor is the input: the iterates (and the finite
        # mask) are recomputed in backward.
        ctx.save_for_backward(z)
        ctx.iterations = iterations

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (z,) = ctx.saved_tensors
        finite, z = _finite_part(z)
        p, tape, plain = _sinkhorn_tape(z, ctx.iterations, keep=True)
        g = torch.where(finite, g, 0)
        if plain is not None:
            # y = x / (x @ S) has the pullback g_x = (g_y - (g_y * y) @ S) / (x @ S).
            iterates, s_col, s_row = plain
            g = g.reshape(-1, z.shape[-1] ** 2)
            for c, col_sums, r, row_sums in reversed(iterates):
                g = (g - (g * r) @ s_row) / row_sums  # through the row step
                g = (g - (g * c) @ s_col) / col_sums  # through the column step
            g = g.reshape(z.shape)
            p = tape[-1][1]  # the probabilities the plain sweeps started from
        g_log = g * p  # through exp
        for c_t, r_t in reversed(tape):
            g_col = g_log - r_t * g_log.sum(dim=-1, keepdim=True)  # through the row step
            g_log = g_col - c_t * g_col.sum(dim=-2, keepdim=True)  # through the column step
        return torch.where(finite, g_log, 0), None

    # No jvp: torch.compile (Dynamo) cannot trace a Function that defines one.
