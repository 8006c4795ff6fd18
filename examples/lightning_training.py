"""Train with PyTorch Lightning and MHCLightningCallback.

    python examples/lightning_training.py        # needs: pip install 'mhc-jax-torch[lightning]'

The callback clears every history buffer before each train / validation /
test batch (no temporal bleeding, even though this model keeps its window
across calls) and logs each skip's latest-state weight and mixing entropy
every ``log_interval`` steps. Metrics go to a CSV file under examples/out/.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mhc_torch import MHCLightningCallback, MHCSequential

OUT = Path(__file__).resolve().parent / "out"


class Classifier(L.LightningModule):
    def __init__(self, depth: int = 6, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(2, width)
        blocks = [nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(depth)]
        # Keeps its window across calls, as a stateful model might: the callback clears it per batch.
        self.stack = MHCSequential(blocks, max_history=4, init="uniform", clear_history_each_forward=False)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.stack(self.embed(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def spirals(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    r = torch.rand(n, generator=g)
    angle = 4.0 * r + labels * (torch.pi / 2) + 0.2 * torch.randn(n, generator=g)
    return TensorDataset(torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1), labels)


def main(epochs: int = 4, log_interval: int = 20, seed: int = 0) -> dict:
    L.seed_everything(seed, verbose=False)
    callback = MHCLightningCallback(log_interval=log_interval, prefix="mhc")
    logger = CSVLogger(OUT, name="lightning")
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        callbacks=[callback],
        logger=logger,
        log_every_n_steps=log_interval,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Classifier()
    trainer.fit(model, DataLoader(spirals(4096, seed), batch_size=128, shuffle=True),
                DataLoader(spirals(1024, seed + 1), batch_size=256))
    logger.finalize("success")

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    mhc_columns = sorted(c for c in rows[0] if c.startswith("mhc/"))
    logged_steps = sorted({int(r["step"]) for r in rows if any(r[c] for c in mhc_columns)})
    accuracy = float(trainer.callback_metrics["val_acc"])
    print(f"validation accuracy {accuracy:.3f}; mixing metrics logged at steps {logged_steps}")
    print(f"{len(mhc_columns)} mixing columns in {Path(logger.log_dir) / 'metrics.csv'}, e.g.:")
    for key in mhc_columns[-4:]:
        print(f"  {key} = {callback.latest_metrics[key]:.3f}")
    return dict(accuracy=accuracy, columns=mhc_columns, steps=logged_steps, latest=callback.latest_metrics)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    main(**vars(parser.parse_args()))
