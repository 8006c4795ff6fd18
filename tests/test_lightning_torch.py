"""MHCLightningCallback under a real lightning Trainer.fit on CPU."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mhc_torch import (
    HyperConnection,
    MHCLightningCallback,
    MHCSequential,
    MHCSkip,
    StreamSequential,
    expand_streams,
    mhc_compatible,
    project_simplex,
    reduce_streams,
)


@mhc_compatible
class MySuperLayer(nn.Module):
    """The custom-layers document's decorated layer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.skip = MHCSkip(max_history=4, mode="mhc", temperature=0.5)
        self.layer = nn.Linear(dim, dim)

    def forward(self, x, history=None):
        return self.skip(self.layer(x), history or [])


class RawMixer(nn.Module):
    """An undecorated custom layer holding raw mixing logits: the callback must ignore it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mixing_logits = nn.Parameter(torch.zeros(4))
        self.layer = nn.Linear(dim, dim)

    def forward(self, x):
        return self.layer(x) + torch.softmax(self.mixing_logits, 0)[-1] * x


class Module(L.LightningModule):
    def __init__(self, detach_history: bool = False) -> None:
        super().__init__()
        # History kept across calls on purpose: only the callback clears it.
        self.stack = MHCSequential(
            [nn.Linear(8, 8) for _ in range(3)], clear_history_each_forward=False, detach_history=detach_history
        )
        self.custom = MySuperLayer(8)
        self.raw = RawMixer(8)
        self.head = nn.Linear(8, 2)
        self.window_at_batch_start: list[int] = []

    def forward(self, x):
        x = self.stack(x)
        x = self.custom(x, self.stack.history_buffer.get())
        return self.head(self.raw(x))

    def training_step(self, batch, batch_idx):
        self.window_at_batch_start.append(len(self.stack.history_buffer))
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.window_at_batch_start.append(len(self.stack.history_buffer))
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class MemoryLogger(Logger):
    """Keeps what the trainer logs, step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


def _fit(callback, steps=8, **module_options):
    module, logger = Module(**module_options), MemoryLogger()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=logger,
        callbacks=[callback],
        log_every_n_steps=1,
        limit_val_batches=2,
        val_check_interval=4,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, _data(), _data(16))
    return module, logger, trainer


def test_fit_clears_history_before_every_batch_and_logs_the_dashboard():
    module, logger, trainer = _fit(MHCLightningCallback(log_interval=2))
    # Without the callback the window would carry the previous batch's states.
    assert module.window_at_batch_start and all(n == 0 for n in module.window_at_batch_start)

    logged = [(step, m) for step, m in logger.records if any(k.startswith("mhc/") for k in m)]
    keys = set().union(*(m for _, m in logged))
    expected = {f"mhc/stack.skip_layers.{i}/{what}" for i in range(3) for what in ("latest_weight", "entropy")}
    expected |= {"mhc/custom.skip/latest_weight", "mhc/custom.skip/entropy"}
    assert expected <= keys
    assert not any("raw" in k for k in keys)  # undecorated layers are not inspected
    assert [s for s, _ in logged] == [2, 4, 6, 8]  # every log_interval optimizer steps, only then

    # Values come from the skip's own projection (simplex at temperature 0.5).
    skip = module.custom.skip
    k = skip.last_num_states
    expected_latest = project_simplex(skip.mixing_logits.detach()[4 - k :], 0.5)[-1].item()
    assert logged[-1][1]["mhc/custom.skip/latest_weight"] == pytest.approx(expected_latest, abs=1e-6)
    softmax_latest = torch.softmax(skip.mixing_logits.detach()[4 - k :] / 0.5, 0)[-1].item()
    assert abs(softmax_latest - expected_latest) > 1e-3  # a stand-in softmax would differ


def test_logging_can_be_switched_off_but_clearing_stays():
    module, logger, _ = _fit(MHCLightningCallback(log_mixing_weights=False, log_interval=1), steps=4)
    assert all(n == 0 for n in module.window_at_batch_start)
    assert not any(k.startswith("mhc/") for _, m in logger.records for k in m)


def test_without_the_callback_batches_bleed_into_each_other():
    # Undetached, the carried states belong to the previous batch's freed graph,
    # and torch refuses to backward through them: loud, at least.
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _fit(L.Callback(), steps=4)
    # Detached, nothing fails: batches silently see each other's features.
    module, _, _ = _fit(L.Callback(), steps=4, detach_history=True)
    assert max(module.window_at_batch_start) > 0


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_interval_is_named(bad):
    with pytest.raises(ValueError, match=f"log_interval must be an int >= 1, got {bad!r}"):
        MHCLightningCallback(log_interval=bad)


def test_entropy_and_latest_weight_are_consistent():
    callback = MHCLightningCallback(log_interval=1)
    _fit(callback, steps=2)
    latest = callback.latest_metrics["mhc/stack.skip_layers.2/latest_weight"]
    entropy = callback.latest_metrics["mhc/stack.skip_layers.2/entropy"]
    assert 0 < latest <= 1 and 0 <= entropy <= np.log(3) + 1e-6


class StreamModule(L.LightningModule):
    """Residual streams: a StreamSequential and a chain of two hyper-connections."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = StreamSequential([nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(3)], dim=8, num_streams=2)
        self.chain = nn.ModuleList(HyperConnection(8, nn.Linear(8, 8), num_streams=2, mode="hc") for _ in range(2))
        self.head = nn.Linear(8, 2)
        self.h_res_by_step: dict[int, torch.Tensor] = {}

    def forward(self, x):
        streams = expand_streams(self.stack(x), 2)
        for layer in self.chain:
            streams = layer(streams)
        return self.head(reduce_streams(streams))

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():  # what the stack computes on the batch of the step that ends here
            self.h_res_by_step[self.global_step + 1] = self.stack.coefficients(x)[2]
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_fit_logs_the_stream_gains_of_the_logging_batch():
    module, logger, callback = StreamModule(), MemoryLogger(), MHCLightningCallback(log_interval=2)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=logger, callbacks=[callback], log_every_n_steps=1,
                        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, _data(32))
    logged = {step: m for step, m in logger.records if any(k.startswith("mhc/stack/") for k in m)}
    assert sorted(logged) == [2, 4]
    per_layer = ("forward_gain", "backward_gain", "composite_forward_gain", "composite_backward_gain", "sinkhorn_residual")
    for stack, depth in (("stack", 3), ("chain", 2)):
        assert {f"mhc/{stack}/layer_{i}/{what}" for i in range(depth) for what in per_layer} <= set(logged[4])
    for step, metrics in logged.items():
        h = module.h_res_by_step[step].double()
        product = h[2] @ h[1] @ h[0]
        # The infinity norm is the largest absolute row sum, the 1-norm the largest column sum.
        forward = torch.linalg.matrix_norm(product, ord=float("inf")).max().item()
        backward = torch.linalg.matrix_norm(product, ord=1).max().item()
        assert metrics["mhc/stack/composite_forward_gain"] == pytest.approx(forward, rel=1e-9)
        assert metrics["mhc/stack/composite_backward_gain"] == pytest.approx(backward, rel=1e-9)
        assert metrics["mhc/stack/max_sinkhorn_residual"] < 1e-3
    # The hooks are gone after fit.
    assert not any(m._forward_pre_hooks for m in module.modules())
