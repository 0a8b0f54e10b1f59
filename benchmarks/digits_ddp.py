"""The hand-written DDP script a user would write for `experiment=digits` (the baseline of benchmarks/digits.py).

The same data (`DigitsData(seed=0)`: train/val/test, random-shift augmentation in the training
split's `__getitem__`), the same `DigitsCNN`, AdamW(lr=0.01, weight_decay=0.01), cosine decay over
the epochs (stepped once per epoch), batch 64 per process, a DataLoader with 2 persistent workers
and a DistributedSampler, validation on the val split after every epoch (each rank its shard, the
sums all-reduced), gloo, one thread per process (what the runner sets for 2 workers on 2 cores).
Checkpoints as `experiment=digits` keeps them: rank 0 saves model, optimizer and scheduler when
the val accuracy improves and after the last epoch (written to a temporary file, then renamed, so
a crash never leaves a torn one), into $CHECKPOINT_DIR (default: checkpoints-digits-ddp). No
logging beyond the final line.

    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/digits_ddp.py 20
    EPOCHS=20 python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/digits_ddp.py

Rank 0 prints one JSON line: train samples/s (training time only), train seconds, final val accuracy.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from runner.examples.digits import DigitsCNN, DigitsData

BATCH_SIZE = 64
NUM_WORKERS = 2


def evaluate(model, loader):
    """(loss, accuracy) over the whole split: each rank its shard, sums all-reduced."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            sums[0] += F.cross_entropy(logits, y, reduction="sum").item()
            sums[1] += (logits.argmax(-1) == y).sum().item()
            sums[2] += len(y)
    dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def save_checkpoint(path: str, model, optimizer, scheduler, epoch: int) -> None:
    tmp = f"{path}.tmp"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
        },
        tmp,
    )
    os.replace(tmp, path)


def main(epochs: int) -> None:
    torch.set_num_threads(1)  # 2 processes on 2 cores, as the runner sets (cores // workers)
    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    splits = DigitsData(seed=0)
    train_sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    train_loader = DataLoader(
        splits.train, batch_size=BATCH_SIZE, sampler=train_sampler, num_workers=NUM_WORKERS, persistent_workers=True
    )
    # Validation: rank r takes samples r, r+W, ... (no padding: every sample counts once). A tensor
    # dataset with nothing to augment, read in the training process.
    val_loader = DataLoader(Subset(splits.val, range(rank, len(splits.val), world)), batch_size=BATCH_SIZE)
    model = DDP(DigitsCNN())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)

    checkpoints = os.environ.get("CHECKPOINT_DIR", "checkpoints-digits-ddp")
    os.makedirs(checkpoints, exist_ok=True)
    train_seconds, accuracy, best = 0.0, float("nan"), -1.0
    for epoch in range(epochs):
        started = time.perf_counter()
        train_sampler.set_epoch(epoch)
        for x, y in train_loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        scheduler.step()
        train_seconds += time.perf_counter() - started
        val_loss, accuracy = evaluate(model.module, val_loader)
        if rank == 0 and accuracy > best:
            best = accuracy
            save_checkpoint(os.path.join(checkpoints, "best.pt"), model.module, optimizer, scheduler, epoch + 1)
        if rank == 0 and os.environ.get("VERBOSE"):
            print(
                f"epoch {epoch + 1} loss {loss.item():.4f} val/loss {val_loss:.4f} val/accuracy {accuracy:.4f}",
                flush=True,
            )
    if rank == 0:
        save_checkpoint(os.path.join(checkpoints, "last.pt"), model.module, optimizer, scheduler, epochs)
        samples = epochs * len(splits.train)
        print(
            json.dumps(
                {
                    "samples_per_s": samples / train_seconds,
                    "train_seconds": train_seconds,
                    "val_accuracy": accuracy,
                    "val_loss": val_loss,
                }
            ),
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get("EPOCHS", "20")))
