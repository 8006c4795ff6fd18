"""``MHCLightningCallback``: history hygiene and a mixing-weight dashboard for Lightning.

Needs the ``lightning`` package (``pip install 'mhc-jax-torch[lightning]'``);
``import mhc_torch`` alone does not import it.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from .compat import clear_history
from .monitoring import extract_mixing_weights, mixing_metrics

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

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        clear_history(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        clear_history(pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        clear_history(pl_module)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        clear_history(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.log_mixing_weights or trainer.global_step % self.log_interval:
            return
        self.latest_metrics = mixing_metrics(extract_mixing_weights(pl_module), self.prefix)
        # Straight to the loggers, at this step only (as LearningRateMonitor
        # does): self.log from a hook would repeat the value at every step.
        for logger in trainer.loggers:
            logger.log_metrics(self.latest_metrics, step=trainer.global_step)
