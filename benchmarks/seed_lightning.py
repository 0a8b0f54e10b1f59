"""The seed task written for PyTorch Lightning (a baseline of benchmarks/startup.py).

The seed script's task: 2,048 samples of y = x . [-2, 3.4] + 4.2 + noise (2 features), a Linear
model, SGD(lr=1e-3), MSE, batch 32 per process (Lightning inserts its DistributedSampler), rank 0
saving a checkpoint every 10 epochs (`ModelCheckpoint(every_n_epochs=10)`), and
`Trainer(accelerator="cpu", devices=2, strategy="ddp")`: Lightning starts the second process
itself. One thread per process, no logger, no progress bar.

    pip install lightning
    python benchmarks/seed_lightning.py 20            # epochs

Rank 0 prints one JSON line: samples/s in the training epochs, seconds, final loss.
"""

import json
import os
import sys
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def seed_data(size: int = 2048) -> TensorDataset:
    true_w = torch.tensor([-2.0, 3.4]).view(2, 1)
    x = torch.randn(size, 2)
    y = x @ true_w + 4.2 + 0.01 * torch.randn(size, 1)
    return TensorDataset(x, y)


class SeedModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.model(x), y)
        self.last_loss = loss.detach()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Timer(L.Callback):
    def __init__(self) -> None:
        self.seconds = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self.seconds -= time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds += time.perf_counter()


def main(epochs: int) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    torch.manual_seed(0)
    data = seed_data()
    module, timer = SeedModule(), Timer()
    every = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=os.environ.get("CHECKPOINT_DIR", "checkpoints-seed-lightning"), every_n_epochs=10, save_top_k=-1
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, every],
    )
    trainer.fit(module, DataLoader(data, batch_size=32, shuffle=False))
    if trainer.global_rank == 0:
        print(
            json.dumps(
                {
                    "samples_per_s": epochs * len(data) / timer.seconds,
                    "train_seconds": timer.seconds,
                    "final_loss": float(module.last_loss),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
