"""Data-parallel training of mhc_torch with DistributedDataParallel (gloo, 2 processes).

Each rank trains the same ``MHCSequential`` on its half of every batch (loss:
the mean over its half); DDP averages the gradients. After a few SGD steps
both ranks must hold identical parameters, equal to single-process training on
the full batch (mean loss over the full batch).
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mhc_torch import MHCSequential

WORLD, STEPS, BATCH, WIDTH, LEARNING_RATE = 2, 3, 8, 8, 0.2
TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def _model() -> MHCSequential:
    torch.manual_seed(0)
    model = MHCSequential(
        [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(3)],
        max_history=3,
        use_gating=True,
        init="uniform",
    )
    with torch.no_grad():  # every window state matters, and every slot is in the simplex support
        for skip in model.skip_layers:
            for p in skip.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return model


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, WIDTH, generator=generator) for _ in range(STEPS)]


def _train(model: nn.Module, batches: list[torch.Tensor]) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for x in batches:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        _train(ddp, [x.chunk(WORLD)[rank] for x in _batches()])
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_agree_with_single_process_training(tmp_path):
    context = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} DDP processes did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    reference = _model()
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    _train(reference, _batches())
    expected = reference.state_dict()

    assert ranks[0].keys() == expected.keys()
    for name in expected:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"the ranks disagree on {name}"
        torch.testing.assert_close(ranks[0][name], expected[name], rtol=1e-6, atol=1e-6, msg=f"parameter {name}")
    # Training moved the parameters, so the comparison above is not between
    # untouched models. (Layer 0 mixes a window of one state, x_0, with weight
    # 1 whatever its logits: they alone get no gradient.)
    unchanged = [k for k in expected if torch.equal(expected[k], initial[k])]
    assert unchanged == ["skip_layers.0.mixing_logits"]
