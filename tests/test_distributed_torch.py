"""Data-parallel training of mhc_torch with torch.distributed (gloo, 2 processes).

Each rank trains the same model on its half of every batch (loss: the mean
over its half); the wrapper averages the gradients. After a few SGD steps
both ranks must hold identical parameters, equal to single-process training on
the full batch (mean loss over the full batch). Checked for

* ``DistributedDataParallel`` around the history-window ``MHCSequential`` and
  the residual-stream ``StreamSequential`` (docs/streams.md), and
* FSDP2 ``fully_shard`` of a ``StreamSequential`` (each hyper-connection and
  the whole stack), every parameter sharded along dim 0 over the two ranks
  (the gating factors ``a_*`` of shape ``(1,)`` leave one rank an empty shard).

One pair of processes runs every case (starting them costs more than training).
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

from mhc_torch import MHCSequential, StreamSequential

WORLD, STEPS, BATCH, WIDTH, LEARNING_RATE = 2, 3, 8, 8, 0.2
NUM_STREAMS = 3
TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def _history_model() -> MHCSequential:
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


def _streams_model() -> StreamSequential:
    torch.manual_seed(0)
    model = StreamSequential(
        [nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(3)],
        num_streams=NUM_STREAMS,
        dim=WIDTH,
    )
    with torch.no_grad():  # away from the symmetric init: the streams differ, every coefficient matters
        for name, p in model.named_parameters():
            if ".branch." not in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


MODELS = {"history": _history_model, "streams": _streams_model}
#: (model, wrapper) pairs the processes train.
CASES = [("history", "ddp"), ("streams", "ddp"), ("streams", "fully_shard")]
#: The parameters that get no gradient (see the test).
UNTRAINED = {"history": ["skip_layers.0.mixing_logits"], "streams": ["layers.0.a_res", "layers.0.b_res"]}


def _fsdp2():
    """``(fully_shard, init_device_mesh)``, or None when this torch has no FSDP2."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return None
    return fully_shard, init_device_mesh


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, WIDTH, generator=generator) for _ in range(STEPS)]


def _train(model: nn.Module, batches: list[torch.Tensor]) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for x in batches:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def _distributed_state(name: str, wrapper: str, rank: int) -> dict[str, torch.Tensor]:
    """Train ``MODELS[name]`` under ``wrapper`` on this rank's half of each batch;
    its full (unsharded) state afterwards."""
    model = MODELS[name]()
    batches = [x.chunk(WORLD)[rank] for x in _batches()]
    if wrapper == "ddp":
        _train(nn.parallel.DistributedDataParallel(model), batches)
        return model.state_dict()
    fully_shard, init_device_mesh = _fsdp2()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local_rows = sum(p.to_local().shape[0] for p in model.parameters())
    assert local_rows < sum(p.shape[0] for p in model.parameters()), "fully_shard left every parameter whole"
    _train(model, batches)
    # full_tensor() gathers the shards (a collective: both ranks call it).
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}


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
        for name, wrapper in CASES:
            if wrapper == "fully_shard" and _fsdp2() is None:
                continue
            state = _distributed_state(name, wrapper, rank)
            torch.save(state, os.path.join(out_dir, f"{name}-{wrapper}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The directory where the two ranks saved their state after each case."""
    out_dir = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        _worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} processes did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return out_dir


def test_every_stream_parameter_is_at_least_1d_so_fsdp2_can_shard_it():
    shapes = {n: tuple(p.shape) for n, p in _streams_model().named_parameters()}
    assert {n: s for n, s in shapes.items() if len(s) < 1} == {}
    assert {shapes[f"layers.0.{a}"] for a in ("a_pre", "a_post", "a_res")} == {(1,)}


@pytest.mark.parametrize("name, wrapper", CASES)
def test_ranks_agree_with_single_process_training(trained, name, wrapper):
    if wrapper == "fully_shard" and _fsdp2() is None:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    ranks = [torch.load(trained / f"{name}-{wrapper}-rank{r}.pt") for r in range(WORLD)]

    reference = MODELS[name]()
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    _train(reference, _batches())
    expected = reference.state_dict()

    assert ranks[0].keys() == expected.keys()
    for key in expected:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"the ranks disagree on {key}"
        torch.testing.assert_close(ranks[0][key], expected[key], rtol=1e-6, atol=1e-6, msg=f"parameter {key}")
    # Training moved the parameters, so the comparison above is not between
    # untouched models. Only these get no gradient: history, layer 0 mixes a
    # window of one state, x_0, with weight 1 whatever its logits; streams,
    # layer 0 sees n equal streams, which a matrix with rows summing to 1
    # (Sinkhorn ends on the rows) maps to themselves whatever h_res is.
    unchanged = [k for k in expected if torch.equal(expected[k], initial[k])]
    assert sorted(unchanged) == UNTRAINED[name]
