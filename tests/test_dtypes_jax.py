"""JAX projections keep the input's dtype and are differentiable in every float dtype.

bfloat16, float16 and float32 run here; float64 needs ``jax_enable_x64``,
which is process-global, so it runs in a subprocess (with float32 and the
half types again: with x64 on, a float32 input must still give float32).
Both run under strict dtype promotion and rank-promotion errors, like the
rest of the suite. The reference is the mathematics in numpy float64
(``tests/test_projections.py``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mhc_jax
from tests.test_projections import (
    DTYPE_COTANGENT,
    DTYPE_LOGITS,
    VECTOR_PROJECTION_IDS,
    VECTOR_PROJECTIONS,
    assert_close_in_dtype,
    reference_projection,
)

ROOT = Path(__file__).resolve().parents[1]


def check_projection_dtype(name: str, kwargs: dict, dtype: str) -> None:
    """Weights and ``jax.grad`` (eager and jitted) in ``dtype``, against float64 numpy."""
    dt = jnp.dtype(dtype)
    mu = jnp.asarray(DTYPE_LOGITS, dt)
    g = jnp.asarray(DTYPE_COTANGENT, dt)
    fn = getattr(mhc_jax, name)

    def loss(m):
        return jnp.sum(fn(m, **kwargs) * g)

    out = fn(mu, **kwargs)
    grad = jax.grad(loss)(mu)
    jitted = jax.jit(jax.grad(loss))(mu)
    assert out.dtype == dt, f"{name}: {dtype} logits gave {out.dtype} weights"
    assert grad.dtype == dt and jitted.dtype == dt, f"{name}: {dtype} logits gave a {grad.dtype} gradient"
    alpha, jac = reference_projection(name, kwargs, DTYPE_LOGITS)
    expected = np.einsum("...i,...ij->...j", DTYPE_COTANGENT, jac)
    assert_close_in_dtype(np.asarray(out), alpha, dtype, f"{name} weights")
    assert_close_in_dtype(np.asarray(grad), expected, dtype, f"{name} gradient")
    assert_close_in_dtype(np.asarray(jitted), expected, dtype, f"{name} jitted gradient")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("name, kwargs", VECTOR_PROJECTIONS, ids=VECTOR_PROJECTION_IDS)
def test_projections_keep_the_dtype_and_are_differentiable(name, kwargs, dtype):
    check_projection_dtype(name, kwargs, dtype)


def test_projections_keep_the_dtype_and_are_differentiable_with_x64():
    script = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_numpy_dtype_promotion", "strict")
        jax.config.update("jax_numpy_rank_promotion", "raise")
        from tests.test_dtypes_jax import check_projection_dtype
        from tests.test_projections import VECTOR_PROJECTIONS
        failures = []
        for dtype in ("float64", "float32", "bfloat16", "float16"):
            for name, kwargs in VECTOR_PROJECTIONS:
                try:
                    check_projection_dtype(name, kwargs, dtype)
                except Exception as err:
                    failures.append(f"{name} {kwargs} {dtype}: {type(err).__name__}: {err}")
        print("\\n".join(failures))
        raise SystemExit(1 if failures else 0)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, f"with jax_enable_x64:\n{run.stdout}\n{run.stderr[-3000:]}"
