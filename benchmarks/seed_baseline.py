"""The hand-written torchrun script this runner replaces, as in the seed document (tqdm version).

Kept faithful on purpose: a Dataset of per-sample tuples, a DataLoader with DistributedSampler,
`loss.item()` every step, rank 0 saving `{"MODEL_STATE", "EPOCHS_RUN"}` with torch.save. Only
what CPU needs changed: gloo instead of NCCL, no `torch.cuda.set_device`, no hard-coded
MASTER_PORT (torchrun --standalone provides it). Extra flags select the larger benchmark task.

    torchrun --standalone --nproc_per_node=2 benchmarks/seed_baseline.py --total-epochs 20
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
    init_process_group(backend="gloo")


class Trainer:
    def __init__(self, model, train_data, optimizer, save_every, snapshot_path):
        self.gpu_id = int(os.environ["LOCAL_RANK"])
        self.model = model
        self.train_data = train_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.epochs_run = 0
        self.snapshot_path = snapshot_path
        if os.path.exists(snapshot_path):
            snapshot = torch.load(snapshot_path, map_location="cpu")
            self.model.load_state_dict(snapshot["MODEL_STATE"])
            self.epochs_run = snapshot["EPOCHS_RUN"]
        self.model = DDP(self.model)

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
            epoch_losses.append(self._run_batch(source, targets))
        return np.mean(epoch_losses)

    def _save_snapshot(self, epoch):
        torch.save({"MODEL_STATE": self.model.module.state_dict(), "EPOCHS_RUN": epoch}, self.snapshot_path)

    def train(self, max_epochs):
        with tqdm(
            total=max_epochs,
            desc=f"[GPU{self.gpu_id}] Training",
            position=self.gpu_id,
            initial=self.epochs_run,
            disable=self.gpu_id != 0,
        ) as pbar:
            for epoch in range(self.epochs_run + 1, max_epochs + 1):
                epoch_loss = self._run_epoch(epoch)
                if self.gpu_id == 0 and epoch % self.save_every == 0:
                    self._save_snapshot(epoch)
                pbar.set_postfix({"epoch": epoch, "loss": "{:.2f}".format(epoch_loss)})
                pbar.update()
        return epoch_loss


class MyTrainDataset(Dataset):
    def __init__(self, size, input_dim):
        self.size = size
        if input_dim == 2:
            true_w = torch.Tensor([-2, 3.4]).view(input_dim, 1)
        else:
            true_w = torch.randn(input_dim, 1)
        true_b = 4.2
        features = torch.randn(size=(size, input_dim), dtype=torch.float32)
        labels = torch.mm(features, true_w) + true_b
        labels += torch.tensor(np.random.normal(0, 0.01, size=labels.size()), dtype=torch.float32)
        self.data = [(features[i], labels[i]) for i in range(size)]

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return self.data[index]


def load_train_objs(args):
    train_set = MyTrainDataset(args.size, args.input_dim)
    if args.model == "mlp":
        layers, width = [], args.input_dim
        for _ in range(2):
            layers += [torch.nn.Linear(width, args.hidden), torch.nn.ReLU()]
            width = args.hidden
        model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))
    else:
        model = torch.nn.Linear(args.input_dim, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    return train_set, model, optimizer


def prepare_dataloader(dataset, batch_size):
    return DataLoader(
        dataset,
        batch_size=batch_size,
        pin_memory=torch.cuda.is_available(),
        shuffle=False,
        sampler=DistributedSampler(dataset),
    )


def main(args):
    ddp_setup()
    dataset, model, optimizer = load_train_objs(args)
    train_data = prepare_dataloader(dataset, args.batch_size)
    trainer = Trainer(model, train_data, optimizer, args.save_every, args.snapshot_path)
    started = time.perf_counter()
    loss = trainer.train(args.total_epochs)
    seconds = time.perf_counter() - started
    if int(os.environ["RANK"]) == 0:
        samples = (args.total_epochs - trainer.epochs_run) * args.size
        print(
            json.dumps({"samples_per_s": samples / seconds, "train_seconds": seconds, "final_loss": float(loss)}),
            flush=True,
        )
    destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="simple distributed training job")
    parser.add_argument("--total-epochs", type=int, default=20)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--input-dim", type=int, default=2)
    parser.add_argument("--model", choices=["linear", "mlp"], default="linear")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--snapshot-path", default="snapshot.pt")
    main(parser.parse_args())
