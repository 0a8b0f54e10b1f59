"""`experiment=digits` written for PyTorch Lightning (a baseline of benchmarks/digits.py).

The same data (`DigitsData(seed=0)`), `DigitsCNN`, AdamW(lr=0.01, weight_decay=0.01) with cosine
decay stepped per epoch, batch 64 per process, a training DataLoader with 2 persistent workers
(Lightning inserts its own DistributedSampler), validation after every epoch on the val split
(loss and accuracy, synced over the ranks), `Trainer(accelerator="cpu", devices=2, strategy="ddp")`
(Lightning starts the second process itself), one thread per process, checkpoints as
`experiment=digits` keeps them (`ModelCheckpoint`: the best by val accuracy and the last, into
$CHECKPOINT_DIR, default checkpoints-digits-lightning), no logger, no progress bar, no sanity
validation.

    pip install lightning
    python benchmarks/digits_lightning.py 20          # or EPOCHS=20

Rank 0 prints one JSON line: train samples/s (time in the training epochs, validation excluded), seconds,
final val accuracy.
"""

import json
import os
import sys
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from runner.examples.digits import DigitsCNN, DigitsData

BATCH_SIZE = 64
NUM_WORKERS = 2


class DigitsModule(L.LightningModule):
    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs
        self.model = DigitsCNN()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        # Means weighted by batch size, averaged over the ranks (equal shards: 135 + 135).
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True, batch_size=len(y))
        self.log("val/accuracy", (logits.argmax(-1) == y).float().mean(), sync_dist=True, batch_size=len(y))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class DigitsDataModule(L.LightningDataModule):
    def setup(self, stage=None):
        self.splits = DigitsData(seed=0)

    def train_dataloader(self):
        return DataLoader(
            self.splits.train, batch_size=BATCH_SIZE, shuffle=True, num_workers=NUM_WORKERS, persistent_workers=True
        )

    def val_dataloader(self):
        # A tensor dataset with nothing to augment, read in the training process (as the DDP script does).
        return DataLoader(self.splits.val, batch_size=BATCH_SIZE)


class TrainTimer(L.Callback):
    """Seconds in the training epochs, less the validation that runs inside them (Lightning validates
    at the end of an epoch's batch loop, before on_train_epoch_end): the DDP script's measure."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self.seconds -= time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds += time.perf_counter()

    def on_validation_start(self, trainer, pl_module):
        self.seconds += time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        self.seconds -= time.perf_counter()


def main(epochs: int) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores, as the runner sets (cores // workers)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.manual_seed(0)
    module = DigitsModule(epochs)
    timer = TrainTimer()
    best = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=os.environ.get("CHECKPOINT_DIR", "checkpoints-digits-lightning"),
        monitor="val/accuracy",
        mode="max",
        save_top_k=1,
        save_last=True,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer, best],
    )
    data = DigitsDataModule()
    trainer.fit(module, datamodule=data)
    if trainer.global_rank == 0:
        train_seconds = timer.seconds
        samples = epochs * len(data.splits.train)
        metrics = trainer.callback_metrics
        print(
            json.dumps(
                {
                    "samples_per_s": samples / train_seconds,
                    "train_seconds": train_seconds,
                    "val_accuracy": float(metrics["val/accuracy"]),
                    "val_loss": float(metrics["val/loss"]),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("EPOCHS", "20")))
