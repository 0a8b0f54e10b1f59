"""The hand-written torchrun script this runner replaces, as in the seed document, for GPUs.

The seed document's GPU version, kept faithful on purpose: NCCL, `torch.cuda.set_device(LOCAL_RANK)`,
the model moved with `.to(gpu_id)` and wrapped in `DDP(device_ids=[gpu_id])`, a Dataset of
per-sample tuples, a DataLoader with DistributedSampler (pinned memory), every batch moved with
`.to(gpu_id)`, `loss.item()` every step (as in benchmarks/seed_baseline.py), rank 0 saving
`{"MODEL_STATE", "EPOCHS_RUN"}` with torch.save every `--save-every` epochs (0 = never).

Only the size of the job is parameterised, so that it trains the same MLP the runner trains with
`model=mlp model.hidden_size=H model.depth=D dataset=random dataset.input_dim=I dataset.size=N`:
`depth` hidden Linear+ReLU layers of `hidden` units and a Linear head, on uniform random inputs
and targets, SGD (lr 1e-3), MSE loss.

    torchrun --standalone --nproc_per_node=1 benchmarks/gpu_seed.py --input-dim 1024 --hidden 4096 --depth 3 \
        --size 65536 --batch-size 512 --total-epochs 5

Rank 0 prints one JSON line: {"samples_per_s", "train_seconds", "final_loss", "parameters"}.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm


def ddp_setup():
    init_process_group(backend="nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


class Trainer:
    def __init__(self, model, train_data, optimizer, save_every, snapshot_path):
        self.gpu_id = int(os.environ["LOCAL_RANK"])
        self.model = model.to(self.gpu_id)
        self.train_data = train_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.epochs_run = 0
        self.snapshot_path = snapshot_path
        if os.path.exists(snapshot_path):
            print("Loading snapshot")
            self._load_snapshot(snapshot_path)
        self.model = DDP(self.model, device_ids=[self.gpu_id])

    def _load_snapshot(self, snapshot_path):
        loc = f"cuda:{self.gpu_id}"
        snapshot = torch.load(snapshot_path, map_location=loc)
        self.model.load_state_dict(snapshot["MODEL_STATE"])
        self.epochs_run = snapshot["EPOCHS_RUN"]
        print(f"Resuming training from snapshot at Epoch {self.epochs_run}")

    def _run_batch(self, source, targets):
        self.optimizer.zero_grad()
        output = self.model(source)
        loss = torch.mean(F.mse_loss(output, targets))
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def _run_epoch(self, epoch):
        epoch_losses = []
        self.train_data.sampler.set_epoch(epoch)
        for source, targets in self.train_data:
            source = source.to(self.gpu_id)
            targets = targets.to(self.gpu_id)
            epoch_losses.append(self._run_batch(source, targets))
        return np.mean(epoch_losses)

    def _save_snapshot(self, epoch):
        snapshot = {"MODEL_STATE": self.model.module.state_dict(), "EPOCHS_RUN": epoch}
        torch.save(snapshot, self.snapshot_path)
        print(f"Epoch {epoch} | Training snapshot saved at {self.snapshot_path}")

    def train(self, max_epochs):
        epoch_loss = float("nan")
        with tqdm(
            total=max_epochs,
            desc=f"[GPU{self.gpu_id}] Training",
            position=self.gpu_id,
            initial=self.epochs_run,
            disable=self.gpu_id != 0,
        ) as pbar:
            for epoch in range(self.epochs_run + 1, max_epochs + 1):
                epoch_loss = self._run_epoch(epoch)
                if self.gpu_id == 0 and self.save_every and epoch % self.save_every == 0:
                    self._save_snapshot(epoch)
                pbar.set_postfix({"epoch": epoch, "loss": "{:.2f}".format(epoch_loss)})
                pbar.update()
        return epoch_loss


class MyTrainDataset(Dataset):
    """The seed's random dataset: a list of (input, target) samples."""

    def __init__(self, size, input_dim):
        self.size = size
        features = torch.rand(size, input_dim)
        targets = torch.rand(size, 1)
        self.data = [(features[i], targets[i]) for i in range(size)]

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return self.data[index]


def load_train_objs(args):
    train_set = MyTrainDataset(args.size, args.input_dim)
    layers, width = [], args.input_dim
    for _ in range(args.depth):
        layers += [torch.nn.Linear(width, args.hidden), torch.nn.ReLU()]
        width = args.hidden
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    return train_set, model, optimizer


def prepare_dataloader(dataset, batch_size):
    return DataLoader(
        dataset, batch_size=batch_size, pin_memory=True, shuffle=False, sampler=DistributedSampler(dataset)
    )


def main(args):
    ddp_setup()
    dataset, model, optimizer = load_train_objs(args)
    parameters = sum(p.numel() for p in model.parameters())
    train_data = prepare_dataloader(dataset, args.batch_size)
    trainer = Trainer(model, train_data, optimizer, args.save_every, args.snapshot_path)
    started = time.perf_counter()
    loss = trainer.train(args.total_epochs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if int(os.environ["RANK"]) == 0:
        samples = (args.total_epochs - trainer.epochs_run) * args.size
        print(
            json.dumps(
                {
                    "samples_per_s": samples / seconds if seconds > 0 else None,
                    "train_seconds": seconds,
                    "final_loss": float(loss),
                    "parameters": parameters,
                }
            ),
            flush=True,
        )
    destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="simple distributed training job (GPU, NCCL)")
    parser.add_argument("--total-epochs", type=int, default=5)
    parser.add_argument("--save-every", type=int, default=0, help="epochs between snapshots; 0 = never")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--size", type=int, default=65536, help="samples in the dataset")
    parser.add_argument("--input-dim", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=3, help="hidden layers")
    parser.add_argument("--snapshot-path", default="snapshot.pt")
    main(parser.parse_args())
