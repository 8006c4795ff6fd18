r"""Convolutions and ResNet blocks with a hyper-connection skip (JAX/Flax, NHWC).

Notation: ``y`` the layer's branch output (a convolution, or a block's
conv-norm stack), ``h_1 .. h_K`` the window of earlier states (``h_K`` the
latest), ``D`` the spatial resampling of :func:`resample_state`, ``P`` the
skip's learned channel map (``auto_project``; the identity when the channel
counts agree).

.. math::
    \mathrm{MHCConv2d}: \quad \mathrm{out} = y + \sum_k \alpha_k\, P(D(h_k)), \qquad
    \mathrm{blocks}: \quad \mathrm{out} = \mathrm{relu}\big(y + \sum_k \alpha_k\, P(D(h_k))\big)

The weights ``alpha`` are one :class:`MHCSkip`'s ``H`` window weights: one
scalar per slot, each scaling a whole feature map (every sample, pixel and
channel alike). ``P(D(h))`` is a bias-free 1x1 convolution of stride ``s`` (the
projection shortcut of a ResNet), written as a strided slice followed by the
skip's linear map on the channel (last) axis, so that the skip's own
``auto_project`` is the only learned shortcut.

The window. ``layer.apply(variables, x)`` uses the window ``[x]``: a
convolution with a shortcut, and a block that is a plain ResNet block
(``K = 1`` puts weight 1 on the input). ``layer.apply(variables, x, history)``
with a list of arrays (oldest first; an empty list starts with ``x``) mixes
that window and returns ``(out, history + [out])``, so a chain of blocks
computes

.. math::
    x_{l+1} = \mathrm{relu}\big(f_l(x_l) + \sum_k \alpha^{(l)}_k P(D(h_k))\big), \qquad
    [h_1 .. h_K] = \text{the last } H \text{ of } [x_0, x_1, .., x_l].

The window is a list, not a :class:`History`: its states change shape from
block to block. Images are NHWC here and NCHW in the twin,
:mod:`mhc_torch.conv`; weights convert with :mod:`mhc_jax.convert`
(convolution kernels HWIO <-> OIHW, batch norm ``scale``/``bias`` and
``batch_stats`` ``mean``/``var`` <-> torch's ``weight``/``bias`` and
``running_mean``/``running_var``).

Batch norm is Flax's ``BatchNorm`` set up as torch's ``BatchNorm2d``
(``epsilon=1e-5``, ``momentum=0.9`` for torch's 0.1, two-pass variance), so a
converted model computes what torch computes in training and in evaluation.
One difference remains in the running statistics a training step writes:
torch updates ``running_var`` with the unbiased batch variance (times
``m / (m - 1)`` for ``m = N H W`` values per channel), Flax with the biased
one.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import flax.linen as nn
import jax
import jax.numpy as jnp

from .history import History
from .skip import MHCSkip, check_bools, check_skip_options

__all__ = ["MHCConv2d", "MHCBasicBlock", "MHCBottleneck", "resample_state", "resample_strides"]

#: torch's BatchNorm2d defaults in Flax terms (Flax's momentum is torch's 1 - momentum).
BATCH_NORM = dict(momentum=0.9, epsilon=1e-5, use_fast_variance=False)


def resample_strides(state_size: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, ...] | None:
    r"""Per spatial axis, the stride ``s`` that takes a state of size ``S`` to size ``T``.

    .. math:: s = \lceil S / T \rceil, \quad \text{valid when } \lceil S / s \rceil = T

    ``ceil(S / s)`` is the number of pixels a stride-``s`` slice (or a 1x1
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


def resample_state(h: jax.Array, size: tuple[int, int], *, index: int | None = None) -> jax.Array:
    r"""A state ``(N, S_1, S_2, C)`` brought to spatial size ``size = (T_1, T_2)``.

    .. math:: D(h)[n, i, j, c] = h[n, s_1 i, s_2 j, c]

    with the strides of :func:`resample_strides`: every ``s``-th pixel from the
    top-left, the pixels a 1x1 convolution of stride ``s`` reads. A state of
    the right size is returned as it is. ``ValueError`` names both shapes
    when no stride fits (``index``: the state's place in the window).
    """
    size = tuple(size)
    if tuple(h.shape[1:3]) == size and h.ndim == 4:
        return h
    strides = resample_strides(tuple(h.shape[1:3]), size) if h.ndim == 4 else None
    if strides is None:
        which = "a history state" if index is None else f"history state {index}"
        raise ValueError(
            f"{which} has shape {tuple(h.shape)}, which cannot be subsampled to the spatial size "
            f"{size} of the output: earlier states are read with a stride s (a 1x1 convolution's "
            "view, the ResNet shortcut), which needs ceil(S / s) = T per axis; convolutions that "
            "keep the size up to their stride (padding = dilation * (kernel_size - 1) // 2, odd "
            "kernel_size) always fit"
        )
    return h[:, :: strides[0], :: strides[1], :]


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


def _torch_bias_init(fan_in: int):
    # torch's Conv2d bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); Flax would start at 0.
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv(features: int, kernel_size, *, stride=1, padding=0, dilation=1, groups=1, bias=False, in_channels=1):
    """A Flax ``Conv`` computing torch's ``Conv2d`` with these options (explicit
    symmetric padding), initialised from torch's distributions: kernel and
    bias uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``, ``fan_in = in / groups * kh * kw``."""
    kh, kw = _pair("kernel_size", kernel_size, 1)
    ph, pw = _pair("padding", padding, 0)
    return nn.Conv(
        features,
        (kh, kw),
        strides=_pair("stride", stride, 1),
        padding=((ph, ph), (pw, pw)),
        kernel_dilation=_pair("dilation", dilation, 1),
        feature_group_count=groups,
        use_bias=bias,
        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        bias_init=_torch_bias_init(in_channels // groups * kh * kw),
    )


class _WindowedLayer(nn.Module):
    """What the three layers share: the option checks, the input check, the window and the skip.

    Subclasses declare the fields and call :meth:`_mix` with their branch output.
    """

    def _check_skip_fields(self) -> None:
        check_bools(detach_history=self.detach_history)
        check_skip_options(
            self.mode,
            self.max_history,
            self.constraint,
            self.epsilon,
            self.temperature,
            self.mixing_init,
            0.0,
            init_name="mixing_init",
        )

    def _make_skip(self) -> MHCSkip:
        return MHCSkip(
            mode=self.mode,
            max_history=self.max_history,
            constraint=self.constraint,
            epsilon=self.epsilon,
            temperature=self.temperature,
            mixing_init=self.mixing_init,
            auto_project=True,
        )

    def _check_call(self, x: jax.Array, history) -> None:
        """The input and the window's container, checked before any work."""
        if not hasattr(x, "shape") or x.ndim != 4 or x.shape[-1] != self.in_channels:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} takes NHWC images with in_channels={self.in_channels} "
                f"channels, shape (N, H, W, {self.in_channels}); got {shape}"
            )
        if isinstance(history, History):
            raise TypeError(
                f"{type(self).__name__} takes its window as a list of arrays (oldest first), not a "
                "History: the states of a convolutional network change shape from block to block"
            )
        if history is not None and not isinstance(history, (list, tuple)):
            raise TypeError(
                "history must be a list of arrays (oldest first) shared by the layers of one call, "
                f"or None (the window is then the input alone); got {type(history).__name__}"
            )

    def _mix(self, x: jax.Array, y: jax.Array, history: Sequence[jax.Array] | None, relu: bool):
        """``y + sum_k alpha_k P(D(h_k))`` over the window (then ReLU if asked);
        with a ``history`` list, also the list with the output appended."""
        full = [x] if history is None else list(history) or [x]  # a window starts with the first input
        # Residual mode adds the latest state alone: map no other (no unused channel maps).
        window = full[-1:] if self.mode == "residual" else full[-self.max_history :]
        offset = len(full) - len(window)
        states = [
            resample_state(jax.lax.stop_gradient(h) if self.detach_history else h, y.shape[1:3], index=offset + i)
            for i, h in enumerate(window)
        ]
        out = self.skip(y, states)
        if relu:
            out = nn.relu(out)
        return out if history is None else (out, [*full, out])


class MHCConv2d(_WindowedLayer):
    r"""A 2D convolution whose output goes through an mHC skip: ``out = conv(x) + sum_k alpha_k P(D(h_k))``.

    ``apply(variables, x)`` mixes the input itself (``K = 1``: a convolution
    with a shortcut, resampled and channel-mapped when the shape changes) and
    returns ``out``; ``apply(variables, x, history)`` mixes the window of a
    list shared with other layers and returns ``(out, history + [out])`` (see
    the module docstring). Images are NHWC.

    Attributes:
      in_channels, out_channels, kernel_size, stride, padding, dilation,
        groups, bias: as for torch's ``nn.Conv2d`` (sizes an int or a pair;
        padding a number of pixels on each side). A shape-changing
        convolution must keep the size up to its stride for its window to
        fit (see :func:`resample_strides`).
      max_history, mode, constraint, epsilon, temperature, mixing_init: the
        skip's options (:class:`MHCSkip`); ``auto_project`` is always on.
      detach_history: mix the window's states under ``stop_gradient``, so
        gradient reaches earlier layers only through the main path.

    Parameters: ``conv/kernel``, ``conv/bias``, ``skip/mixing_logits`` and
    ``skip/projection_from_{n}/kernel`` (the channel map of states with ``n``
    channels), initialised from the distributions torch uses.
    """

    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    bias: bool = True
    max_history: int = 4
    mode: str = "mhc"
    constraint: str = "simplex"
    epsilon: float = 0.1
    temperature: float = 1.0
    detach_history: bool = False
    mixing_init: str = "identity"

    def __post_init__(self):
        check_conv_options(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation, self.groups
        )
        check_bools(bias=self.bias)
        self._check_skip_fields()
        super().__post_init__()

    def setup(self):
        self.conv = conv(
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
            in_channels=self.in_channels,
        )
        self.skip = self._make_skip()

    def __call__(self, x: jax.Array, history: Sequence[jax.Array] | None = None):
        """``conv(x)`` plus the mixed window (``[x]``, or ``history``'s states)."""
        self._check_call(x, history)
        return self._mix(x, self.conv(x), history, relu=False)


class _ResidualBlock(_WindowedLayer):
    """A ResNet block: the branch of a subclass (:meth:`_build` in setup,
    :meth:`_branch`), then ``relu(y + sum_k alpha_k P(D(h_k)))``. ``out_channels``
    is the field given; the output has ``out_channels * expansion`` channels."""

    in_channels: int
    out_channels: int
    stride: int | tuple[int, int] = 1
    max_history: int = 4
    mode: str = "mhc"
    constraint: str = "simplex"
    epsilon: float = 0.1
    temperature: float = 1.0
    detach_history: bool = False
    mixing_init: str = "identity"
    use_running_average: bool | None = None

    expansion = 1

    def __post_init__(self):
        check_conv_options(self.in_channels, self.out_channels, 3, self.stride, 1, 1, 1)
        self._check_skip_fields()
        super().__post_init__()

    def setup(self):
        self._build(self.out_channels)
        self.skip = self._make_skip()

    def _build(self, width: int) -> None:
        raise NotImplementedError

    def _branch(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        raise NotImplementedError

    def _batch_norm_mode(self, use_running_average: bool | None) -> bool:
        value = self.use_running_average if use_running_average is None else use_running_average
        if value is None:
            raise ValueError(
                f"{type(self).__name__} needs use_running_average (a field or a call argument): False "
                "to train (normalise by the batch, update batch_stats; apply with "
                "mutable=['batch_stats']), True to evaluate with the running statistics"
            )
        check_bools(use_running_average=value)
        return bool(value)

    def __call__(
        self, x: jax.Array, history: Sequence[jax.Array] | None = None, *, use_running_average: bool | None = None
    ):
        """``relu(branch(x) + ...)`` over the window (``[x]``, or ``history``'s states)."""
        self._check_call(x, history)
        y = self._branch(x, self._batch_norm_mode(use_running_average))
        return self._mix(x, y, history, relu=True)


class MHCBasicBlock(_ResidualBlock):
    r"""ResNet's basic block with an mHC skip across blocks.

    .. math::
        y = \mathrm{bn_2}(\mathrm{conv_2}(\mathrm{relu}(\mathrm{bn_1}(\mathrm{conv_1}(x))))), \qquad
        \mathrm{out} = \mathrm{relu}\big(y + \sum_k \alpha_k P(D(h_k))\big)

    ``conv_1`` is 3x3 with ``stride``, ``conv_2`` 3x3; both bias-free, each
    followed by batch norm (torch's ``BatchNorm2d`` settings). Without
    ``history`` it is a plain ResNet block (the window ``[x]``, strided and
    channel-mapped when the block downsamples); with a ``history`` list it
    mixes that window and returns ``(out, history + [out])`` (the output
    after the ReLU: the state the next block reads). Images are NHWC.

    Train with ``use_running_average=False`` and ``mutable=["batch_stats"]``;
    evaluate with ``use_running_average=True``.

    Attributes:
      in_channels, out_channels: channels in and out.
      stride: of the first convolution (2 halves the image).
      max_history, mode, constraint, epsilon, temperature, mixing_init,
        detach_history: as for :class:`MHCConv2d`.
      use_running_average: default for the call argument of the same name.
    """

    expansion = 1

    def _build(self, width: int) -> None:
        self.conv1 = conv(width, 3, stride=self.stride, padding=1, in_channels=self.in_channels)
        self.bn1 = nn.BatchNorm(**BATCH_NORM)
        self.conv2 = conv(width, 3, padding=1, in_channels=width)
        self.bn2 = nn.BatchNorm(**BATCH_NORM)

    def _branch(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        y = nn.relu(self.bn1(self.conv1(x), use_running_average=use_running_average))
        return self.bn2(self.conv2(y), use_running_average=use_running_average)


class MHCBottleneck(_ResidualBlock):
    r"""ResNet's bottleneck block (ResNet-50 and deeper) with an mHC skip across blocks.

    .. math::
        y = \mathrm{bn_3}(\mathrm{conv_3}(\mathrm{relu}(\mathrm{bn_2}(\mathrm{conv_2}(
            \mathrm{relu}(\mathrm{bn_1}(\mathrm{conv_1}(x)))))))), \qquad
        \mathrm{out} = \mathrm{relu}\big(y + \sum_k \alpha_k P(D(h_k))\big)

    ``conv_1`` 1x1 to ``out_channels``, ``conv_2`` 3x3 with ``stride``,
    ``conv_3`` 1x1 to ``out_channels * expansion`` (4), each bias-free and
    followed by batch norm. The output has ``4 * out_channels`` channels.
    Windows and batch norm as for :class:`MHCBasicBlock`; NHWC.

    Attributes:
      in_channels: channels in.
      out_channels: the bottleneck width; the block outputs ``4 *`` that.
      stride: of the 3x3 convolution.
      max_history, mode, constraint, epsilon, temperature, mixing_init,
        detach_history, use_running_average: as for :class:`MHCBasicBlock`.
    """

    expansion = 4

    def _build(self, width: int) -> None:
        self.conv1 = conv(width, 1, in_channels=self.in_channels)
        self.bn1 = nn.BatchNorm(**BATCH_NORM)
        self.conv2 = conv(width, 3, stride=self.stride, padding=1, in_channels=width)
        self.bn2 = nn.BatchNorm(**BATCH_NORM)
        self.conv3 = conv(width * self.expansion, 1, in_channels=width)
        self.bn3 = nn.BatchNorm(**BATCH_NORM)

    def _branch(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        y = nn.relu(self.bn1(self.conv1(x), use_running_average=use_running_average))
        y = nn.relu(self.bn2(self.conv2(y), use_running_average=use_running_average))
        return self.bn3(self.conv3(y), use_running_average=use_running_average)
