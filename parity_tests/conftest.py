"""Each parity test runs on every device present: CPU always, GPU when both
frameworks see one (skipped otherwise, with the reason)."""

from __future__ import annotations

import jax
import pytest
import torch

from parity_tests.parity import WORST
from tests.backends import JaxBackend, TorchBackend, gpu_unavailable_reason

# Float32 parity on GPU needs full-precision matmuls: both frameworks may
# otherwise run them in TF32 on Ampere and later (harmless on CPU).
jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

_GPU_REASON = gpu_unavailable_reason()


@pytest.fixture(
    scope="session",
    params=[
        "cpu",
        pytest.param(
            "gpu",
            marks=pytest.mark.skipif(
                _GPU_REASON is not None, reason=f"GPU parity not run: {_GPU_REASON}"
            ),
        ),
    ],
)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def jx(device) -> JaxBackend:
    return JaxBackend(device)


@pytest.fixture(scope="session")
def pt(device) -> TorchBackend:
    return TorchBackend(device)


def pytest_terminal_summary(terminalreporter):
    if not WORST:
        return
    terminalreporter.section("parity: worst jax-torch difference seen (normalised as in docs/parity.md)")
    for (kind, device, what), worst in sorted(WORST.items()):
        terminalreporter.write_line(f"{device:>4} {kind:<10} {what:<40} {worst:.2e}")
