"""``MHCLightningCallback``: history hygiene, mixing weights and residual-stream gains for Lightning.

Needs the ``lightning`` package (``pip install 'mhc-jax-torch[lightning]'``);
``import mhc_torch`` alone does not import it.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from .compat import clear_history
from .monitoring import extract_mixing_weights, mixing_metrics
from .stream_monitoring import _Recorder, _stack_metrics

__all__ = ["MHCLightningCallback"]


class MHCLightningCallback(Callback):
    """Clear history before every batch and log the mixing weights as training runs.

    * At the start of every train, validation, test and predict batch it clears
      every :class:`HistoryBuffer` in the LightningModule, so no batch sees
      another's states ("temporal bleeding").
    * Every ``log_interval`` optimizer steps it logs to the trainer's loggers
      (at that step only), for each skip inside an
      ``@mhc_compatible`` module (found by recursive search; ``MHCSkip`` and
      ``MHCSequential`` count), ``{prefix}/{path}/latest_weight`` and
      ``{prefix}/{path}/entropy``, computed with that skip's own projection
      (see :func:`mhc_torch.extract_mixing_weights`).
    * If the module holds :class:`~mhc_torch.HyperConnection` layers (residual
      streams), it logs at the same steps, for every stack (a
      ``StreamSequential``'s path, or the common path of a chain of
      hyper-connections), the ``h_res`` gains of that step's last training
      batch: ``{prefix}/{stack}/composite_forward_gain``,
      ``composite_backward_gain``, ``max_layer_forward_gain``,
      ``max_layer_backward_gain``, ``max_sinkhorn_residual`` and per layer
      ``{prefix}/{stack}/layer_{l}/forward_gain``, ``backward_gain``,
      ``composite_forward_gain``, ``composite_backward_gain``,
      ``sinkhorn_residual`` (see :func:`mhc_torch.stream_metrics`). Forward
      pre-hooks added at ``on_fit_start`` read ``h_res`` from each layer's
      input, on the batches that end with a logging step only (one flag test
      per layer and call otherwise). ``torch.compile`` traces them if the
      model is first run after ``on_fit_start`` (e.g. compiled in
      ``configure_model``), and compiles a second graph, once, for the
      recording batches; a model compiled and
      run before ``fit`` does not call hooks added later, and the callback
      then warns that it logs no stream metrics.

    Args:
        log_mixing_weights: log the metrics (the clearing happens regardless).
        log_interval: log every this many optimizer steps (``>= 1``).
        prefix: the first part of every logged key.
    """

    def __init__(self, log_mixing_weights: bool = True, log_interval: int = 50, prefix: str = "mhc") -> None:
        super().__init__()
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 1:
            raise ValueError(f"log_interval must be an int >= 1, got {log_interval!r}")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self.log_mixing_weights = bool(log_mixing_weights)
        self.log_interval = log_interval
        self.prefix = prefix
        #: The metrics most recently logged (empty before the first).
        self.latest_metrics: dict[str, float] = {}
        self._recorder: _Recorder | None = None
        self._warned = False

    def on_fit_start(self, trainer, pl_module) -> None:
        # After configure_model (where layers may be built or compiled) and
        # before the first forward pass (where torch.compile traces).
        if self.log_mixing_weights and self._recorder is None:
            recorder = _Recorder(pl_module)
            if recorder.hooked:  # the module has residual streams
                self._recorder = recorder

    def on_fit_end(self, trainer, pl_module) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        clear_history(pl_module)
        # The optimizer step this batch (or the last of its accumulated
        # batches) ends with is global_step + 1: record h_res if it is logged.
        if self._recorder is not None and (trainer.global_step + 1) % self.log_interval == 0:
            self._recorder.start()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        clear_history(pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        clear_history(pl_module)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        clear_history(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stacks = self._recorder.stacks() if self._recorder is not None and self._recorder.active else None
        if not self.log_mixing_weights or trainer.global_step % self.log_interval:
            return
        self.latest_metrics = mixing_metrics(extract_mixing_weights(pl_module), self.prefix)
        if stacks:
            h_res = {name: h for name, (_, h) in stacks.items()}
            self.latest_metrics.update(_stack_metrics(h_res, self.prefix, per_layer=True))
        elif stacks is not None and not self._warned:
            self._warned = True
            rank_zero_warn(
                "MHCLightningCallback: no HyperConnection layer ran its forward hooks on this batch, so no "
                "residual-stream metrics are logged XX"
            )
        # Straight to the loggers, at this step only (as LearningRateMonitor
        # does): self.log from a hook would repeat the value at every step.
        for logger in trainer.loggers:
            logger.log_metrics(self.latest_metrics, step=trainer.global_step)
