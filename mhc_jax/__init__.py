"""mhc_jax: manifold-constrained hyper-connections for JAX/Flax.

History is explicit carried state (:class:`History`), so every call starts
fresh unless it is handed a history. The PyTorch twin is ``mhc_torch``; the
two packages compute the same projections, mixes and gradients.
"""

from .history import History, HistoryShapeError, HistoryTypeError, ensure_list, get_last_k
from .projections import (
    project_doubly_stochastic,
    project_identity_preserving,
    project_simplex,
    project_softmax,
)
from . import convert
from .conv import MHCBasicBlock, MHCBottleneck, MHCConv2d
from .dashboard import (
    create_training_dashboard,
    gradient_norms,
    history_contributions,
    plot_gradient_flow,
    plot_history_contribution,
)
from .matrix_skip import MatrixMHCSkip, matrix_mix, matrix_weights
from .monitoring import MixingWarning, diagnose, extract_mixing_weights, mixing_metrics, plot_mixing_heatmap
from .presets import ConfigError, MHCConfig, get_default_config, get_preset, load_config_from_toml, set_default_config
from .runtime import set_seed
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
    "History",
    "HistoryShapeError",
    "HistoryTypeError",
    "ConfigError",
    "HyperConnection",
    "MHCBasicBlock",
    "MHCBottleneck",
    "MHCConfig",
    "MHCConv2d",
    "MHCSequential",
    "MHCSkip",
    "MatrixMHCSkip",
    "MixingWarning",
    "StreamSequential",
    "StreamWarning",
    "convert",
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
    "matrix_mix",
    "matrix_weights",
    "mhc_coefficients",
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
