r"""Residual streams: hyper-connections (Zhu et al.) and DeepSeek's mHC (PyTorch).

Notation: ``n`` streams of width ``C``; ``x`` the streams of one token,
``(..., n, C)``, ``x[j]`` stream ``j``; ``F`` the branch (an attention or MLP
block, any map ``(..., C) -> (..., C)``); ``h_pre``, ``h_post`` in ``R^n`` and
``h_res`` in ``R^{n x n}`` the layer's coefficients (one set per token when
``dynamic``).

One layer (mHC paper, Eq. 3):

.. math::
    u = \sum_j h^{pre}_j x_j, \qquad
    \mathrm{out}_i = \sum_j h^{res}_{ij} x_j + h^{post}_i F(u)

``h_res`` multiplies the streams from the left exactly as written. A stack
starts with :func:`expand_streams` (``n`` copies of the input) and ends with
:func:`reduce_streams` (the sum of the streams).

The math is in plain functions: :func:`mhc_coefficients` and
:func:`hc_coefficients` (the two modes' equations), :func:`branch_input` and
:func:`merge_streams` (the layer equation), :func:`initial_parameters` (the
documented init). :class:`HyperConnection` owns the parameters and calls them.
The twin is :mod:`mhc_jax.streams`; the parity tests hold the two together.

**Parameters** (the same names in both packages): ``phi``, the paper's fused
``(n*C, n*n + 2n)`` matrix, its columns ``[pre (n) | post (n) | res (n*n,
row-major)]``; the gating factors ``a_pre``, ``a_post``, ``a_res``, each of
shape ``(1,)`` (1-d so that FSDP2 can shard them); the biases ``b_pre``,
``b_post`` ``(n,)`` and ``b_res`` ``(n, n)``. With ``dynamic=False`` only the
biases exist. ``phi`` is used as ``v' @ phi`` in both packages (it is not an
``nn.Linear`` weight), so it converts without a transpose.

**dtype.** The coefficients are computed in float32 whatever the streams'
dtype (float64 streams: in float64), the Sinkhorn included. The branch input
and the layer's output are computed in that precision too and rounded once to
the streams' dtype, which the branch sees and the output keeps.
"""

from __future__ import annotations

import math
from numbers import Integral

import numpy as np
import torch
from torch import nn

from .projections import project_doubly_stochastic

__all__ = [
    "HyperConnection",
    "expand_streams",
    "reduce_streams",
    "mhc_coefficients",
    "hc_coefficients",
    "branch_input",
    "merge_streams",
    "initial_parameters",
    "STREAM_MODES",
    "RMS_EPSILON",
    "ALPHA_INIT",
    "RES_INIT_DIAGONAL",
    "PRE_INIT_MAX",
]

#: The two coefficient maps: DeepSeek's constrained one and Zhu et al.'s original.
STREAM_MODES = ("mhc", "hc")
#: ``eps_norm`` of the RMS normalisation of the flattened streams.
RMS_EPSILON = 1e-6
#: Initial gating factors ``a_pre``, ``a_post``, ``a_res`` (the paper's 0.01).
ALPHA_INIT = 0.01
#: ``mode="mhc"``: the diagonal of ``h_res`` at init; the rest of each row is
#: spread evenly over the other streams.
RES_INIT_DIAGONAL = 0.9
#: ``mode="mhc"``: the largest initial ``h_pre`` entry (only ``n = 1`` reaches
#: it: a sigmoid cannot equal 1, and one near it would barely learn).
PRE_INIT_MAX = 0.9


# --- argument checks ---------------------------------------------------------------


def check_count(name: str, value, minimum: int = 1) -> None:
    """``TypeError`` unless ``value`` is an int (not a bool), ``ValueError`` if below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_stream_options(num_streams, mode, dynamic, sinkhorn_iterations, layer_index) -> None:
    """Validate a hyper-connection's options; the error names the bad one."""
    check_count("num_streams", num_streams)
    if not isinstance(mode, str) or mode not in STREAM_MODES:
        raise ValueError(f"mode must be one of {STREAM_MODES}, got {mode!r}")
    if not isinstance(dynamic, bool):
        raise TypeError(f"dynamic must be a bool, got {dynamic!r} ({type(dynamic).__name__})")
    check_count("sinkhorn_iterations", sinkhorn_iterations)
    if layer_index is not None:
        check_count("layer_index", layer_index, minimum=0)


def check_streams(streams: torch.Tensor, num_streams: int, width: int | None = None) -> None:
    """``ValueError`` naming both shapes unless ``streams`` is ``(..., n, C)``."""
    shape = tuple(streams.shape)
    expected = f"(..., {num_streams}, {'C' if width is None else width})"
    if len(shape) < 2 or shape[-2] != num_streams or (width is not None and shape[-1] != width):
        raise ValueError(
            f"streams must have shape {expected} (num_streams={num_streams}), got shape {shape}"
        )


# --- expand and reduce ---------------------------------------------------------------


def expand_streams(x: torch.Tensor, num_streams: int) -> torch.Tensor:
    r"""``n`` copies of ``x`` as the streams: ``(..., C) -> (..., n, C)``, ``x_j = x``.

    The result is a broadcast view of ``x`` (no copy); every operation of a
    :class:`HyperConnection` makes a new tensor, so it is never written to.
    """
    check_count("num_streams", num_streams)
    if x.dim() < 1:
        raise ValueError(f"expand_streams needs x of shape (..., C), got shape {tuple(x.shape)}")
    return x.unsqueeze(-2).expand(*x.shape[:-1], num_streams, x.shape[-1])


def reduce_streams(streams: torch.Tensor) -> torch.Tensor:
    r"""The sum of the streams: ``(..., n, C) -> (..., C)``, :math:`\sum_j x_j`."""
    if streams.dim() < 2:
        raise ValueError(f"reduce_streams needs streams of shape (..., n, C), got shape {tuple(streams.shape)}")
    return streams.sum(dim=-2)


# --- coefficients ------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision (and non-floats), the dtype itself otherwise."""
    if not dtype.is_floating_point:
        return torch.float32
    return torch.promote_types(dtype, torch.float32)


# torch.compile reads a Python float from a global or a default argument as a
# graph input; with dynamic shapes, one first read inside a checkpointed layer
# and then inside another crashes dynamo (pytorch/pytorch#193194), which a
# checkpointed StreamSequential did. So the floats on a layer's path are
# constants to the compiler: RMS_EPSILON through this function, the
# Sinkhorn's temperature as a literal.
@torch.compiler.assume_constant_result
def _rms_epsilon() -> float:
    return RMS_EPSILON


def _dynamic_logits(streams: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``v' @ phi`` split into its pre ``(..., n)``, post ``(..., n)`` and res ``(..., n, n)`` parts."""
    n = streams.shape[-2]
    v = streams.reshape(*streams.shape[:-2], -1)
    v = v * torch.rsqrt(v.square().mean(dim=-1, keepdim=True) + _rms_epsilon())
    d = v @ phi
    return d[..., :n], d[..., n : 2 * n], d[..., 2 * n :].reshape(*d.shape[:-1], n, n)


def _check_parameters(n: int, b_pre, b_post, b_res, phi, alphas) -> None:
    for name, b, shape in (("b_pre", b_pre, (n,)), ("b_post", b_post, (n,)), ("b_res", b_res, (n, n))):
        if tuple(b.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for {n} streams, got shape {tuple(b.shape)}")
    if phi is None:
        if any(a is not None for a in alphas):
            raise ValueError("a_pre, a_post and a_res need phi (they scale its terms)")
        return
    if phi.dim() != 2 or phi.shape[1] != n * n + 2 * n:
        raise ValueError(f"phi must have shape (n*C, {n * n + 2 * n}) for {n} streams, got shape {tuple(phi.shape)}")
    if any(a is None for a in alphas):
        raise ValueError("phi needs the gating factors a_pre, a_post and a_res")


def _coefficient_logits(streams, b_pre, b_post, b_res, phi, alphas, squash):
    """``a * squash(v' @ phi) + b`` for pre, post and res (the biases alone without ``phi``)."""
    n = streams.shape[-2]
    _check_parameters(n, b_pre, b_post, b_res, phi, alphas)
    dtype = _compute_dtype(streams.dtype)
    biases = [b.to(dtype) for b in (b_pre, b_post, b_res)]
    if phi is None:
        return biases
    x = streams.to(dtype)
    if phi.shape[0] != n * x.shape[-1]:
        raise ValueError(
            f"phi must have shape ({n * x.shape[-1]}, {n * n + 2 * n}) for streams of shape "
            f"{tuple(x.shape)}, got shape {tuple(phi.shape)}"
        )
    dynamic = _dynamic_logits(x, phi.to(dtype))
    return [
        a.to(dtype) * squash(d) + b
        for a, d, b in zip(alphas, dynamic, biases, strict=True)
    ]


def mhc_coefficients(
    streams: torch.Tensor,
    b_pre: torch.Tensor,
    b_post: torch.Tensor,
    b_res: torch.Tensor,
    phi: torch.Tensor | None = None,
    a_pre: torch.Tensor | None = None,
    a_post: torch.Tensor | None = None,
    a_res: torch.Tensor | None = None,
    *,
    sinkhorn_iterations: int = 20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""DeepSeek mHC's coefficients (paper, Eqs. 7-9).

    .. math::
        v = \mathrm{flatten}(x) \in \mathbb{R}^{nC}, \qquad
        v' = v / \sqrt{\mathrm{mean}(v^2) + \epsilon}

        \tilde h^{pre} = a_{pre} (v' \phi_{pre}) + b_{pre}, \quad
        \tilde h^{post} = a_{post} (v' \phi_{post}) + b_{post}, \quad
        \tilde h^{res} = a_{res}\, \mathrm{mat}(v' \phi_{res}) + b_{res}

        h^{pre} = \sigma(\tilde h^{pre}), \quad
        h^{post} = 2 \sigma(\tilde h^{post}), \quad
        h^{res} = \mathrm{Sinkhorn}(\tilde h^{res})

    with ``eps = RMS_EPSILON`` (the RMS norm's weight is absorbed into
    ``phi``), ``phi = [phi_pre | phi_post | phi_res]`` the fused
    ``(n*C, n*n + 2n)`` matrix, ``mat`` the row-major ``(n, n)`` reshape and
    Sinkhorn :func:`~mhc_torch.project_doubly_stochastic` with
    ``sinkhorn_iterations`` column-then-row sweeps. Without ``phi`` (a static
    layer, ``dynamic=False``) the coefficients are the maps of the biases alone.

    Computed in float32 (float64 for float64 streams), whatever the dtype of
    the streams and parameters.

    Args:
        streams: ``x``, shape ``(..., n, C)``.
        b_pre, b_post, b_res: biases, shapes ``(n,)``, ``(n,)``, ``(n, n)``.
        phi: ``(n*C, n*n + 2n)``, or None for static coefficients.
        a_pre, a_post, a_res: gating factors (shape ``(1,)`` or 0-d), with ``phi``.
        sinkhorn_iterations: Sinkhorn sweeps, ``>= 1``.

    Returns:
        ``(h_pre, h_post, h_res)``: shapes ``(..., n)``, ``(..., n)``,
        ``(..., n, n)``; ``(n,)``, ``(n,)``, ``(n, n)`` without ``phi``.
    """
    check_count("sinkhorn_iterations", sinkhorn_iterations)
    pre, post, res = _coefficient_logits(streams, b_pre, b_post, b_res, phi, (a_pre, a_post, a_res), lambda d: d)
    # temperature 1.0 as a literal (a constant to torch.compile): see _rms_epsilon.
    return torch.sigmoid(pre), 2 * torch.sigmoid(post), project_doubly_stochastic(res, sinkhorn_iterations, 1.0)


def hc_coefficients(
    streams: torch.Tensor,
    b_pre: torch.Tensor,
    b_post: torch.Tensor,
    b_res: torch.Tensor,
    phi: torch.Tensor | None = None,
    a_pre: torch.Tensor | None = None,
    a_post: torch.Tensor | None = None,
    a_res: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Zhu et al.'s dynamic hyper-connection coefficients (unconstrained).

    With ``v'`` the RMS-normalised flattened streams as in :func:`mhc_coefficients`:

    .. math::
        h^{pre} = a_{pre} \tanh(v' \phi_{pre}) + b_{pre}, \quad
        h^{post} = a_{post} \tanh(v' \phi_{post}) + b_{post}, \quad
        h^{res} = a_{res} \tanh(\mathrm{mat}(v' \phi_{res})) + b_{res}

    No sigmoid and no Sinkhorn: nothing bounds the gain of a product of
    ``h_res`` over many layers (the instability mHC removes). Without ``phi``
    the coefficients are the biases. Arguments and results as for
    :func:`mhc_coefficients`.
    """
    pre, post, res = _coefficient_logits(streams, b_pre, b_post, b_res, phi, (a_pre, a_post, a_res), torch.tanh)
    return pre, post, res


# --- the layer equation ----------------------------------------------------------------


def branch_input(streams: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
    r"""The branch input :math:`u = \sum_j h^{pre}_j x_j`, ``(..., n, C) -> (..., C)``.

    ``h_pre`` is ``(..., n)`` or ``(n,)``. Summed in ``h_pre``'s precision
    (float32 for half-precision streams), rounded once to the streams' dtype.
    """
    x = streams.to(h_pre.dtype)
    return (h_pre.unsqueeze(-1) * x).sum(dim=-2).to(streams.dtype)


def merge_streams(streams: torch.Tensor, y: torch.Tensor, h_post: torch.Tensor, h_res: torch.Tensor) -> torch.Tensor:
    r"""The layer's output :math:`\mathrm{out}_i = \sum_j h^{res}_{ij} x_j + h^{post}_i y`.

    ``streams`` ``(..., n, C)``, ``y = F(u)`` ``(..., C)``, ``h_post``
    ``(..., n)`` or ``(n,)``, ``h_res`` ``(..., n, n)`` or ``(n, n)``. Computed
    in the coefficients' precision, rounded once to the streams' dtype.
    """
    dtype = h_res.dtype
    x, y = streams.to(dtype), y.to(dtype)
    return (h_res @ x + h_post.unsqueeze(-1) * y.unsqueeze(-2)).to(streams.dtype)


# --- initialisation ---------------------------------------------------------------------


def initial_parameters(num_streams: int, mode: str = "mhc", layer_index: int | None = None) -> dict[str, np.ndarray]:
    r"""The initial biases (float32 numpy), the same in both packages.

    ``phi`` starts as ``N(0, 1/(n C))`` (so ``v' phi`` has unit variance per
    entry) and the gating factors at ``ALPHA_INIT = 0.01``, so the dynamic
    terms move the coefficients by about 1% at init and break the symmetry
    between the streams. The biases make a fresh stack a pre-norm residual
    network run ``n`` times over: every stream carries the same residual
    ``r_l = x_0 + sum_{k<l} y_k``, the branch reads ``u = r_l`` and every stream
    receives ``y_l`` with weight 1 (so ``reduce_streams`` gives ``n r_L``).

    * ``mode="mhc"``: ``h_pre = 1/n`` (``b_pre = logit(1/n)``; the weights sum
      to 1, so ``u = r``); ``h_post = 1`` (``b_post = 0``);
      ``h_res = d I + (1 - d)/(n - 1) (J - I)`` with ``d = RES_INIT_DIAGONAL``
      (``b_res = log(d (n - 1)/(1 - d)) I``; Sinkhorn returns it exactly, the
      matrix being symmetric with equal row sums). Any doubly stochastic
      ``h_res`` keeps identical streams identical, so the forward pass does
      not depend on ``d``; near-identity rather than uniform (``J / n``) lets
      the streams stay distinct once they diverge (a uniform ``h_res``
      averages them away at every layer) while every entry stays far from 0
      and so keeps its Sinkhorn gradient. ``n = 1``: ``h_pre = PRE_INIT_MAX``.
    * ``mode="hc"`` (Zhu et al.): ``h_pre`` one-hot on stream
      ``layer_index mod n`` (stream 0 without a ``layer_index``), ``h_res = I``,
      ``h_post = 1``.

    Returns:
        ``{"b_pre": (n,), "b_post": (n,), "b_res": (n, n)}``.
    """
    check_stream_options(num_streams, mode, True, 1, layer_index)
    n = num_streams
    if mode == "hc":
        b_pre = np.zeros(n, np.float32)
        b_pre[(layer_index or 0) % n] = 1.0
        return {"b_pre": b_pre, "b_post": np.ones(n, np.float32), "b_res": np.eye(n, dtype=np.float32)}
    p = min(1.0 / n, PRE_INIT_MAX)
    d = RES_INIT_DIAGONAL
    diagonal = math.log(d * (n - 1) / (1 - d)) if n > 1 else 0.0
    return {
        "b_pre": np.full(n, math.log(p / (1 - p)), np.float32),
        "b_post": np.zeros(n, np.float32),
        "b_res": (diagonal * np.eye(n)).astype(np.float32),
    }


# --- the module ---------------------------------------------------------------------------


class HyperConnection(nn.Module):
    r"""One layer of ``n`` residual streams around a branch (Zhu et al.; DeepSeek mHC).

    .. math::
        u = \sum_j h^{pre}_j x_j, \qquad
        \mathrm{out}_i = \sum_j h^{res}_{ij} x_j + h^{post}_i F(u)

    with the coefficients of :func:`mhc_coefficients` (``mode="mhc"``:
    sigmoid gates and a Sinkhorn-projected, doubly stochastic ``h_res``) or
    :func:`hc_coefficients` (``mode="hc"``: unconstrained). Parameters and
    their init: module docstring and :func:`initial_parameters`
    (:meth:`reset_parameters` applies it; the branch keeps its own init).

    Args:
        dim: the width ``C`` of every stream.
        branch: ``F``, a module mapping ``(..., C)`` to ``(..., C)``; extra
            ``forward`` arguments are passed to it.
        num_streams: ``n >= 1``.
        mode: ``"mhc"`` or ``"hc"``.
        dynamic: token-dependent coefficients (``phi`` and the gating
            factors); False keeps the biases alone.
        sinkhorn_iterations: Sinkhorn sweeps for ``h_res`` (``mode="mhc"``), ``>= 1``.
        layer_index: this layer's depth in a stack; ``mode="hc"`` initialises
            ``h_pre`` one-hot on stream ``layer_index mod n``.
    """

    def __init__(
        self,
        dim: int,
        branch: nn.Module,
        num_streams: int = 4,
        mode: str = "mhc",
        dynamic: bool = True,
        sinkhorn_iterations: int = 20,
        layer_index: int | None = None,
    ) -> None:
        super().__init__()
        check_count("dim", dim)
        check_stream_options(num_streams, mode, dynamic, sinkhorn_iterations, layer_index)
        if not callable(branch):
            raise TypeError(f"branch must be a module or a callable, got {branch!r} ({type(branch).__name__})")
        self.dim, self.num_streams, self.mode = dim, num_streams, mode
        self.dynamic, self.sinkhorn_iterations, self.layer_index = dynamic, sinkhorn_iterations, layer_index
        self.branch = branch
        n = num_streams
        self.b_pre = nn.Parameter(torch.empty(n))
        self.b_post = nn.Parameter(torch.empty(n))
        self.b_res = nn.Parameter(torch.empty(n, n))
        if dynamic:
            self.phi = nn.Parameter(torch.empty(n * dim, n * n + 2 * n))
            self.a_pre = nn.Parameter(torch.empty(1))
            self.a_post = nn.Parameter(torch.empty(1))
            self.a_res = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The documented init (:func:`initial_parameters`) of this layer's own parameters."""
        for name, value in initial_parameters(self.num_streams, self.mode, self.layer_index).items():
            getattr(self, name).copy_(torch.from_numpy(value))
        if self.dynamic:
            nn.init.normal_(self.phi, std=1 / math.sqrt(self.phi.shape[0]))
            for a in (self.a_pre, self.a_post, self.a_res):
                a.fill_(ALPHA_INIT)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_streams={self.num_streams}, mode={self.mode!r}, dynamic={self.dynamic}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}, layer_index={self.layer_index}"
        )

    def _coefficients(self, streams: torch.Tensor):
        check_streams(streams, self.num_streams, self.dim)
        params = dict(b_pre=self.b_pre, b_post=self.b_post, b_res=self.b_res)
        if self.dynamic:
            params.update(phi=self.phi, a_pre=self.a_pre, a_post=self.a_post, a_res=self.a_res)
        if self.mode == "mhc":
            return mhc_coefficients(streams, **params, sinkhorn_iterations=self.sinkhorn_iterations)
        return hc_coefficients(streams, **params)

    def coefficients(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h_pre, h_post, h_res)`` of shapes ``(..., n)``, ``(..., n)``, ``(..., n, n)``
        (float32, or float64 for float64 streams)."""
        h = self._coefficients(streams)
        if not self.dynamic:
            lead = tuple(streams.shape[:-2])
            h = tuple(c.expand(*lead, *c.shape) for c in h)
        return h

    def forward(self, streams: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Streams ``(..., n, C)`` in, streams out; ``args``/``kwargs`` go to the branch."""
        h_pre, h_post, h_res = self._coefficients(streams)
        u = branch_input(streams, h_pre)
        y = self.branch(u, *args, **kwargs)
        if y.shape != u.shape:
            raise ValueError(
                f"the branch must keep the width: it maps the branch input of shape "
                f"{tuple(u.shape)} to shape {tuple(y.shape)}"
            )
        return merge_streams(streams, y, h_post, h_res)
