"""Helpers a training script calls around the model (JAX).

:func:`set_seed`, with the name and arguments of the ``mhc`` package's, twin
of :func:`mhc_torch.set_seed`. JAX has no global random state: the key it
returns is what a Flax model's ``init`` and ``apply`` take. The PyTorch
twin's other helpers have no JAX counterpart: ``jax.jit`` compiles, dtypes
are chosen explicitly rather than by an autocast context, and XLA fuses
modules, so a per-module time under ``jit`` has no meaning (use
``jax.profiler`` for a trace).
"""

from __future__ import annotations

import logging
import os
import random
from numbers import Integral

import jax
import numpy as np

from .skip import check_bools

__all__ = ["set_seed", "check_seed"]

_log = logging.getLogger(__name__)


def check_seed(seed) -> None:
    """``TypeError`` unless ``seed`` is an integer, ``ValueError`` unless it lies in ``[0, 2**32)``
    (NumPy's range, which both packages keep)."""
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"seed must be an int in [0, 2**32), got {seed!r} of type {type(seed).__name__}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")


def set_seed(seed: int = 42, verbose: bool = True) -> jax.Array:
    """Seed Python's ``random`` and NumPy's global generator; return ``jax.random.key(seed)``.

    Args:
      seed: an int in ``[0, 2**32)``.
      verbose: log the seed (logger ``mhc_jax.runtime``, level INFO).

    ``PYTHONHASHSEED`` is set for subprocesses started afterwards (this
    process's string hashing was fixed when it started).
    """
    check_seed(seed)
    check_bools(verbose=verbose)
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if verbose:
        _log.info("random seed set to %d", seed)
    return jax.random.key(seed)
