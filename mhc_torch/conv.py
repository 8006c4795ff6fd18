r"""Convolutions and ResNet blocks with a hyper-connection skip (PyTorch, NCHW).

Notation: ``y`` the layer's branch output (a convolution, or a block's
conv-norm stack), ``h_1 .. h_K`` the window of earlier states (``h_K`` the
latest), ``D`` the spatial resampling of :func:`resample_state`, ``P`` the
skip's learned channel map (``auto_project``; the identity when the channel
counts agree).

.. math::
    \mathrm{MHCConv2d}: \quad \mathrm{out} = y + \sum_k \alpha_k\, P(D(h_k)), \qquad
    \mathrm{blocks}: \quad \mathrm{out} = \mathrm{relu}\big(y + \sum_k \alpha_k\, P(D(h_k))\big)

The weights ``alpha`` are one :class:`MHCSkip`'s ``H`` window weights: one
scalar per slot, each scaling a whole feature map (every sample, channel and
pixel alike). ``P(D(h))`` is a bias-free 1x1 convolution of stride ``s`` (the
projection shortcut of a ResNet), written as a strided view followed by the
skip's linear map on the channel axis, so that the skip's own ``auto_project``
is the only learned shortcut.

The window. Called as ``layer(x)`` the window is ``[x]``: a convolution with a
shortcut, and a block that is a plain ResNet block (``K = 1`` puts weight 1 on
the input). Called as ``layer(x, history)`` with a :class:`HistoryBuffer`, the
layers share one window across the network: an empty buffer first receives
``x``, the layer mixes the buffer's states and appends its output, so a chain
of blocks computes

.. math::
    x_{l+1} = \mathrm{relu}\big(f_l(x_l) + \sum_k \alpha^{(l)}_k P(D(h_k))\big), \qquad
    [h_1 .. h_K] = \text{the last } H \text{ of } [x_0, x_1, .., x_l].

Nothing is kept between calls: make a fresh buffer per forward (or clear it),
as :class:`MHCSequential` does. Images are NCHW here and NHWC in the twin,
:mod:`mhc_jax.conv`; weights convert with :mod:`mhc_torch.convert`
(convolution kernels OIHW <-> HWIO, batch norm ``weight``/``bias`` <->
``scale``/``bias`` and ``running_mean``/``running_var`` <-> ``batch_stats``).
"""

from __future__ import annotations

from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from .compat import mhc_compatible
from .history import HistoryBuffer
from .skip import MHCSkip, check_bools

__all__ = ["MHCConv2d", "MHCBasicBlock", "MHCBottleneck", "resample_state", "resample_strides"]


def resample_strides(state_size: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, ...] | None:
    r"""Per spatial axis, the stride ``s`` that takes a state of size ``S`` to size ``T``.

    .. math:: s = \lceil S / T \rceil, \quad \text{valid when } \lceil S / s \rceil = T

    ``ceil(S / s)`` is the number of pixels a stride-``s`` view (or a 1x1
    convolution of stride ``s``) keeps, and also the output size of a
    convolution that keeps the size up to its stride (odd kernel, padding
    ``dilation * (kernel_size - 1) / 2``), so ResNet's strided blocks always
    fit, however many of them lie between a state and the output. Returns
    None when no stride fits (upsampling, or a convolution that shrinks the
    image by its border).
    """
    strides = []
    for s_in, s_out in zip(state_size, size, strict=True):
        if s_out < 1 or s_in < s_out:
            return None
        stride = -(-s_in // s_out)
        if -(-s_in // stride) != s_out:
            return None
        strides.append(stride)
    return tuple(strides)


def resample_state(h: torch.Tensor, size: tuple[int, int], *, index: int | None = None) -> torch.Tensor:
    r"""A state ``(N, C, S_1, S_2)`` brought to spatial size ``size = (T_1, T_2)``.

    .. math:: D(h)[n, c, i, j] = h[n, c, s_1 i, s_2 j]

    with the strides of :func:`resample_strides`: every ``s``-th pixel from the
    top-left, the pixels a 1x1 convolution of stride ``s`` reads. A state of
    the right size is returned as it is. ``ValueError`` names both shapes
    when no stride fits (``index``: the state's place in the window).
    """
    size = tuple(size)
    if tuple(h.shape[2:]) == size:
        return h
    strides = resample_strides(tuple(h.shape[2:]), size) if h.dim() == 2 + len(size) else None
    if strides is None:
        which = "a history state" if index is None else f"history state {index}"
        raise ValueError(
            f"{which} has shape {tuple(h.shape)}, which cannot be subsampled to the spatial size "
            f"{size} of the output: earlier states are read with a stride s (a 1x1 convolution's "
            "view, the ResNet shortcut), which needs ceil(S / s) = T per axis; convolutions that "
            "keep the size up to their stride (padding = dilation * (kernel_size - 1) // 2, odd "
            "kernel_size) always fit"
        )
    return h[:, :, :: strides[0], :: strides[1]]


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    """``value`` (an int or a pair of ints) as a pair, each ``>= minimum``; else ``ValueError``."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or not all(isinstance(v, Integral) and not isinstance(v, bool) and v >= minimum for v in items):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(items[0]), int(items[1])


def _count(name: str, value) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def check_conv_options(in_channels, out_channels, kernel_size, stride, padding, dilation, groups) -> dict:
    """Validate the convolution's options at construction (``ValueError`` names
    the bad one) and return them with every size as a pair."""
    in_channels, out_channels, groups = (
        _count("in_channels", in_channels),
        _count("out_channels", out_channels),
        _count("groups", groups),
    )
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups must divide in_channels and out_channels, got groups={groups} with "
            f"in_channels={in_channels}, out_channels={out_channels}"
        )
    return dict(
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=_pair("kernel_size", kernel_size, 1),
        stride=_pair("stride", stride, 1),
        padding=_pair("padding", padding, 0),
        dilation=_pair("dilation", dilation, 1),
        groups=groups,
    )


class _WindowedLayer(nn.Module):
    """What the three layers share: the input check, the window, and the skip.

    Subclasses set ``in_channels``, ``skip`` and ``detach_history`` and call
    :meth:`_mix` with their branch output.
    """

    in_channels: int
    skip: MHCSkip
    detach_history: bool

    def _make_skip(self, in_channels: int, out_channels: int, **skip_options) -> MHCSkip:
        skip = MHCSkip(auto_project=True, **skip_options)
        if in_channels != out_channels:
            # Create the input's channel map now (auto_project would make it on
            # the first forward), so an optimizer built right after
            # construction sees it: the shortcut of a width-changing layer.
            skip._projection(in_channels, torch.empty(0, out_channels, 0, 0))
        return skip

    def _check_call(self, x: torch.Tensor, history) -> None:
        """The input and the window's container, checked before any work."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} takes NCHW images with in_channels={self.in_channels} "
                f"channels, shape (N, {self.in_channels}, H, W); got {shape}"
            )
        if history is not None and not isinstance(history, HistoryBuffer):
            raise TypeError(
                "history must be a HistoryBuffer shared by the layers of one forward pass, or None "
                f"(the window is then the input alone); got {type(history).__name__}"
            )

    def _mix(self, x: torch.Tensor, y: torch.Tensor, history: HistoryBuffer | None, relu: bool) -> torch.Tensor:
        """``y + sum_k alpha_k P(D(h_k))`` over the window (then ReLU if asked); the
        output joins ``history`` when one is given."""
        if history is None:
            window = [x]
        else:
            if len(history) == 0:
                history.append(x)  # the window starts with the first layer's input
            window = history.get()
        window = window[-1:] if self.skip.mode == "residual" else window[-self.skip.max_history :]
        offset = 0 if history is None else len(history) - len(window)
        states = [
            resample_state(h.detach() if self.detach_history else h, y.shape[2:], index=offset + i)
            for i, h in enumerate(window)
        ]
        out = self.skip(y, states)
        if relu:
            out = F.relu(out)
        if history is not None:
            history.append(out)
        return out


@mhc_compatible
class MHCConv2d(_WindowedLayer):
    r"""A 2D convolution whose output goes through an mHC skip: ``out = conv(x) + sum_k alpha_k P(D(h_k))``.

    ``forward(x)`` mixes the input itself (``K = 1``: a convolution with a
    shortcut, resampled and channel-mapped when the shape changes);
    ``forward(x, history)`` mixes the window of a :class:`HistoryBuffer`
    shared with other layers and appends the output to it (see the module
    docstring). Images are NCHW.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
            groups, bias: as for ``nn.Conv2d`` (sizes an int or a pair; padding
            a number of pixels). A shape-changing convolution must keep the
            size up to its stride for its window to fit (see
            :func:`resample_strides`).
        max_history, mode, constraint, epsilon, temperature, init: the skip's
            options (:class:`MHCSkip`); ``auto_project`` is always on.
        detach_history: mix the window's states detached, so gradient
            reaches earlier layers only through the main path (the seed
            library's default was True; here, as everywhere in this library,
            False).

    Parameters: ``conv.weight``, ``conv.bias``, ``skip.mixing_logits`` and
    ``skip.projection_from_{n}.weight`` (the channel map of states with
    ``n`` channels; the one for ``in_channels`` exists from construction).
    Unlike the seed library's ``MHCConv2d``, no state is kept from one call to
    the next (there, each call mixed the previous batches' outputs).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        max_history: int = 4,
        mode: str = "mhc",
        constraint: str = "simplex",
        epsilon: float = 0.1,
        temperature: float = 1.0,
        detach_history: bool = False,
        init: str = "identity",
    ) -> None:
        super().__init__()
        conv = check_conv_options(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        check_bools(bias=bias, detach_history=detach_history)
        self.in_channels, self.out_channels = conv["in_channels"], conv["out_channels"]
        self.detach_history = bool(detach_history)
        self.conv = nn.Conv2d(**conv, bias=bool(bias))
        self.skip = self._make_skip(
            self.in_channels,
            self.out_channels,
            max_history=max_history,
            mode=mode,
            constraint=constraint,
            epsilon=epsilon,
            temperature=temperature,
            init=init,
        )

    def forward(self, x: torch.Tensor, history: HistoryBuffer | None = None) -> torch.Tensor:
        """``conv(x)`` plus the mixed window (``[x]``, or ``history``'s states)."""
        self._check_call(x, history)
        return self._mix(x, self.conv(x), history, relu=False)


class _ResidualBlock(_WindowedLayer):
    """A ResNet block: the branch of a subclass (:meth:`_build`, :meth:`_branch`),
    then ``relu(y + sum_k alpha_k P(D(h_k)))``. ``out_channels`` is the
    argument given; the output has ``out_channels * expansion`` channels."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int | tuple[int, int] = 1,
        max_history: int = 4,
        mode: str = "mhc",
        constraint: str = "simplex",
        epsilon: float = 0.1,
        temperature: float = 1.0,
        detach_history: bool = False,
        init: str = "identity",
    ) -> None:
        super().__init__()
        conv = check_conv_options(in_channels, out_channels, 3, stride, 1, 1, 1)
        check_bools(detach_history=detach_history)
        self.in_channels, self.out_channels = conv["in_channels"], conv["out_channels"]
        self.detach_history = bool(detach_history)
        self._build(self.out_channels, conv["stride"])
        self.skip = self._make_skip(
            self.in_channels,
            self.out_channels * self.expansion,
            max_history=max_history,
            mode=mode,
            constraint=constraint,
            epsilon=epsilon,
            temperature=temperature,
            init=init,
        )

    def _build(self, width: int, stride: tuple[int, int]) -> None:
        raise NotImplementedError

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, history: HistoryBuffer | None = None) -> torch.Tensor:
        """``relu(branch(x) + ...)`` over the window (``[x]``, or ``history``'s states)."""
        self._check_call(x, history)
        return self._mix(x, self._branch(x), history, relu=True)


@mhc_compatible
class MHCBasicBlock(_ResidualBlock):
    r"""ResNet's basic block with an mHC skip across blocks.

    .. math::
        y = \mathrm{bn_2}(\mathrm{conv_2}(\mathrm{relu}(\mathrm{bn_1}(\mathrm{conv_1}(x))))), \qquad
        \mathrm{out} = \mathrm{relu}\big(y + \sum_k \alpha_k P(D(h_k))\big)

    ``conv_1`` is 3x3 with ``stride``, ``conv_2`` 3x3; both bias-free, each
    followed by ``nn.BatchNorm2d``. ``forward(x)`` is a plain ResNet block
    (the window ``[x]``, strided and channel-mapped when the block
    downsamples); ``forward(x, history)`` mixes the window shared across
    blocks and appends the output (after the ReLU: the state the next block
    reads). Images are NCHW.

    Args:
        in_channels, out_channels: channels in and out.
        stride: of the first convolution (2 halves the image).
        max_history, mode, constraint, epsilon, temperature, init,
            detach_history: as for :class:`MHCConv2d`.

    Unlike the seed library's block, the shortcut of a downsampling block is
    the skip's channel map of the strided input, with no batch norm of its
    own, and nothing is kept from one call to the next.
    """

    expansion = 1

    def _build(self, width: int, stride: tuple[int, int]) -> None:
        self.conv1 = nn.Conv2d(self.in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


@mhc_compatible
class MHCBottleneck(_ResidualBlock):
    r"""ResNet's bottleneck block (ResNet-50 and deeper) with an mHC skip across blocks.

    .. math::
        y = \mathrm{bn_3}(\mathrm{conv_3}(\mathrm{relu}(\mathrm{bn_2}(\mathrm{conv_2}(
            \mathrm{relu}(\mathrm{bn_1}(\mathrm{conv_1}(x)))))))), \qquad
        \mathrm{out} = \mathrm{relu}\big(y + \sum_k \alpha_k P(D(h_k))\big)

    ``conv_1`` 1x1 to ``out_channels``, ``conv_2`` 3x3 with ``stride``,
    ``conv_3`` 1x1 to ``out_channels * expansion`` (4), each bias-free and
    followed by ``nn.BatchNorm2d``. The output has ``out_channels * 4``
    channels (as in the seed library and torchvision). Windows as for
    :class:`MHCBasicBlock`; NCHW.

    Args:
        in_channels: channels in.
        out_channels: the bottleneck width; the block outputs ``4 *`` that.
        stride: of the 3x3 convolution.
        max_history, mode, constraint, epsilon, temperature, init,
            detach_history: as for :class:`MHCConv2d`.
    """

    expansion = 4

    def _build(self, width: int, stride: tuple[int, int]) -> None:
        self.conv1 = nn.Conv2d(self.in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
