"""mhc_jax: manifold-constrained hyper-connections for JAX/Flax.

History is explicit carried state (:class:`History`), so every call starts
fresh unless it is handed a history. The PyTorch twin is ``mhc_torch``; the
two packages compute the same projections, mixes and gradients.
"""

from .history import History
from .projections import (
    project_doubly_stochastic,
    project_identity_preserving,
    project_simplex,
    project_softmax,
)
from . import convert
from .sequential import MHCSequential
from .skip import MHCSkip, identity_init_logits, mixing_weights, perturb_weights, window_weights

__all__ = [
    "History",
    "MHCSequential",
    "MHCSkip",
    "convert",
    "identity_init_logits",
    "mixing_weights",
    "perturb_weights",
    "project_doubly_stochastic",
    "project_identity_preserving",
    "project_simplex",
    "project_softmax",
    "window_weights",
]
