"""mhc_torch: manifold-constrained hyper-connections for PyTorch.

The documented, stateful API: :class:`MHCSkip` mixes a window of earlier
states into a layer's output, :class:`HistoryBuffer` keeps that window,
:class:`MHCSequential` wires both around a list of layers. The ecosystem:
``@mhc_compatible``, :func:`clear_history`, :func:`inject_mhc`,
:class:`MHCLightningCallback` (needs ``lightning``) and the monitoring
functions. The JAX/Flax twin is ``mhc_jax``; the two packages compute the same
projections, mixes and gradients.
"""

from .compat import clear_history, is_mhc_compatible, mhc_compatible
from .conv import MHCBasicBlock, MHCBottleneck, MHCConv2d
from .dashboard import (
    create_training_dashboard,
    gradient_norms,
    history_contributions,
    plot_gradient_flow,
    plot_history_contribution,
)
from .history import HistoryBuffer, HistoryShapeError, HistoryTypeError, ensure_list, get_last_k
from .inject import MHCInjected, inject_mhc, inject_mhc_default
from .matrix_skip import MatrixMHCSkip, matrix_mix, matrix_weights
from .monitoring import MixingWarning, diagnose, extract_mixing_weights, mixing_metrics, plot_mixing_heatmap
from .presets import ConfigError, MHCConfig, get_default_config, get_preset, load_config_from_toml, set_default_config
from .projections import (
    project_doubly_stochastic,
    project_identity_preserving,
    project_simplex,
    project_softmax,
)
from .runtime import ForwardProfiler, autocast_context, compile_model, set_seed
from .sequential import MHCSequential
from .skip import MHCSkip, identity_init_logits, mixing_weights, perturb_weights, window_weights
from .stream_monitoring import (
    StreamWarning,
    diagnose_streams,
    extract_h_res,
    h_res_gains,
    plot_h_res_heatmap,
    sinkhorn_residual,
    stream_metrics,
    stream_monitor,
)
from .stream_sequential import StreamSequential
from .streams import HyperConnection, expand_streams, hc_coefficients, mhc_coefficients, reduce_streams

__all__ = [
    "ForwardProfiler",
    "HistoryBuffer",
    "HistoryShapeError",
    "HistoryTypeError",
    "ConfigError",
    "HyperConnection",
    "MHCBasicBlock",
    "MHCBottleneck",
    "MHCConfig",
    "MHCConv2d",
    "MHCInjected",
    "MHCLightningCallback",
    "MHCSequential",
    "MHCSkip",
    "MatrixMHCSkip",
    "MixingWarning",
    "StreamSequential",
    "StreamWarning",
    "autocast_context",
    "clear_history",
    "compile_model",
    "create_training_dashboard",
    "diagnose",
    "diagnose_streams",
    "ensure_list",
    "expand_streams",
    "extract_h_res",
    "extract_mixing_weights",
    "get_default_config",
    "get_last_k",
    "get_preset",
    "gradient_norms",
    "h_res_gains",
    "hc_coefficients",
    "history_contributions",
    "identity_init_logits",
    "load_config_from_toml",
    "inject_mhc",
    "inject_mhc_default",
    "is_mhc_compatible",
    "matrix_mix",
    "matrix_weights",
    "mhc_coefficients",
    "mhc_compatible",
    "mixing_metrics",
    "mixing_weights",
    "perturb_weights",
    "plot_gradient_flow",
    "plot_h_res_heatmap",
    "plot_history_contribution",
    "plot_mixing_heatmap",
    "project_doubly_stochastic",
    "project_identity_preserving",
    "project_simplex",
    "project_softmax",
    "reduce_streams",
    "set_default_config",
    "set_seed",
    "sinkhorn_residual",
    "stream_metrics",
    "stream_monitor",
    "window_weights",
]


def __getattr__(name: str):
    # The Lightning callback imports `lightning`, an optional extra: only on use.
    if name == "MHCLightningCallback":
        from .lightning import MHCLightningCallback

        return MHCLightningCallback
    raise AttributeError(f"module 'mhc_torch' has no attribute {name!r}")
