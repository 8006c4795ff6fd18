r"""Projections of mixing logits onto stable manifolds (PyTorch).

Notation: ``mu`` logits on the last dimension (any leading batch dimensions),
``tau`` the temperature, ``eps`` the identity floor, ``K`` the size of the last
dimension.

Plain differentiable functions; autograd gives the exact derivatives of the
maps (SPEC.md). The twin module :mod:`mhc_jax.projections` computes the same
numbers; the parity tests hold the two to 1e-6.
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


def project_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""Softmax of temperature-scaled logits on the last dimension.

    .. math:: \alpha = \mathrm{softmax}(\mu / \tau)

    Args:
        logits: ``mu``, shape ``(..., K)``.
        temperature: ``tau > 0``; small values sharpen, large values flatten.

    Returns:
        Weights of the same shape: positive, summing to 1 on the last dimension.
    """
    check_temperature(temperature)
    return torch.softmax(logits / temperature, dim=-1)


def _simplex_threshold(z: torch.Tensor) -> torch.Tensor:
    # Sort and threshold (the same arithmetic as optax's projection_simplex):
    # rho = #{j : 1/j + u_j - c_j / j > 0}, alpha = relu(1/rho + z - c_rho / rho).
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

    Args:
        logits: ``mu``, shape ``(..., K)``.
        temperature: ``tau > 0``.

    Returns:
        Weights of the same shape: non-negative, summing to 1 on the last dimension.
    """
    check_temperature(temperature)
    z = logits / temperature
    z = z - z.detach().amax(dim=-1, keepdim=True)
    return _SimplexProjection.apply(z)


def project_identity_preserving(
    logits: torch.Tensor,
    epsilon: float = 0.1,
    temperature: float = 1.0,
    base: str = "simplex",
) -> torch.Tensor:
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
    scaled = (1 - epsilon) * project(logits, temperature)
    return torch.cat([scaled[..., :-1], scaled[..., -1:] + epsilon], dim=-1)


def project_doubly_stochastic(
    logits: torch.Tensor, iterations: int = 20, temperature: float = 1.0
) -> torch.Tensor:
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
        logits: ``M``, shape ``(..., n, n)`` (square in the last two dimensions).
        iterations: number of column-then-row sweeps, ``>= 1``.
        temperature: ``tau > 0``.

    Returns:
        Non-negative matrices of the same shape.
    """
    check_temperature(temperature)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(
            "project_doubly_stochastic needs square matrices in the last two "
            f"dimensions, got shape {tuple(logits.shape)}"
        )
    log_p = logits / temperature
    for _ in range(iterations):
        # log_softmax is L - logsumexp(L) computed as (L - max) - log(sum(exp(L - max))):
        # the exact subtraction comes first, so log-values of order 1e3-1e7 do
        # not lose the small normaliser to rounding.
        log_p = torch.log_softmax(log_p, dim=-2)
        log_p = torch.log_softmax(log_p, dim=-1)
    return torch.exp(log_p)
