"""mhc_torch: manifold-constrained hyper-connections for PyTorch.

The documented, stateful API: :class:`MHCSkip` mixes a window of earlier
states into a layer's output, :class:`HistoryBuffer` keeps that window. The
JAX/Flax twin is ``mhc_jax``; the two packages compute the same projections,
mixes and gradients.
"""

from .history import HistoryBuffer
from .projections import (
    project_doubly_stochastic,
    project_identity_preserving,
    project_simplex,
    project_softmax,
)
from .sequential import MHCSequential
from .skip import MHCSkip, identity_init_logits, mixing_weights, perturb_weights, window_weights

__all__ = [
    "HistoryBuffer",
    "MHCSequential",
    "MHCSkip",
    "identity_init_logits",
    "mixing_weights",
    "perturb_weights",
    "project_doubly_stochastic",
    "project_identity_preserving",
    "project_simplex",
    "project_softmax",
    "window_weights",
]
