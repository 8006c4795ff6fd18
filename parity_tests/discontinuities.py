"""Examples that sit on an edge of the maps are rejected, not compared.

The simplex projection's Jacobian jumps where a weight leaves the support
(weight 0), and pruning jumps where a weight crosses ``prune_threshold``. When
float rounding puts the two packages on different sides of such an edge there
is no common value to compare, so the example is rejected. If they differ by
more than rounding could explain, that is a real disagreement and fails.

The Gumbel perturbation ``softmax((log alpha + G) / tau)`` is continuous but its
derivative in ``alpha`` grows like ``1 / alpha`` near the support edge; there a
comparison measures float32 conditioning, not the two implementations, so
:func:`reject_ill_conditioned` skips such examples too.
"""

from __future__ import annotations

import numpy as np
from hypothesis import reject

#: The largest distance from an edge that float32 rounding can explain here.
ROUNDING = 1e-5


def same_side_or_reject(a, b, edge: float, *, what: str, inclusive: bool = False) -> None:
    """Reject unless ``a`` and ``b`` lie on the same side of ``edge`` everywhere.

    The side is ``value > edge`` (``>=`` with ``inclusive``).
    """
    a, b = np.asarray(a), np.asarray(b)
    side_a = a >= edge if inclusive else a > edge
    side_b = b >= edge if inclusive else b > edge
    differ = side_a != side_b
    if not differ.any():
        return
    gap = np.maximum(np.abs(a - edge), np.abs(b - edge))[differ].max()
    assert gap <= ROUNDING, (
        f"{what}: jax and torch disagree about which side of {edge} a weight is on, "
        f"by {gap:.3g} (more than rounding): jax {a}, torch {b}"
    )
    reject()


#: Smallest positive weight at which the Gumbel perturbation's gradient is compared.
GUMBEL_MIN_WEIGHT = 1e-3


def reject_ill_conditioned(alpha) -> None:
    """Reject when a positive weight is small enough that ``1/alpha`` dominates."""
    alpha = np.asarray(alpha)
    if np.any((alpha > 0) & (alpha < GUMBEL_MIN_WEIGHT)):
        reject()
