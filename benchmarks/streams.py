"""Streaming data: tokens/s of the runner's stream against the in-memory path and a hand-written
DataLoader over the same shards, and the time to resume deep in a stream.

    python benchmarks/streams.py            # ~1 minute on 2 cores; prints a table

One process (rank 0 of 1), loader workers as given. "train" rows run a small GPT's forward and
backward on every batch (the cost a stream must hide); "data" rows only read the batches.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, get_worker_info

from runner.examples.charlm import TinyGPT
from runner.streams.sources import TextShards, TokenShards
from runner.train.batches import TrainBatches
from runner.train.streams import StreamBatches

SEQ, BATCH = 64, 32


def data_cfg(workers: int):
    return OmegaConf.create(
        dict(
            loader="auto",
            val_fraction=0.0,
            num_workers=workers,
            pin_memory=None,
            persistent_workers=True,
            prefetch_factor=None,
            collate_fn=None,
            drop_last=True,
            eval_batch_size=None,
        )
    )


class HandWritten(IterableDataset):
    """What a user writes without the runner: files split over workers, windows from np.load(mmap)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        for path in self.paths[w::n]:
            tokens = np.load(path, mmap_mode="r")
            for i in range((len(tokens) - 1) // SEQ):
                yield torch.from_numpy(tokens[i * SEQ : i * SEQ + SEQ + 1].astype(np.int64))


def first(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def run(batches, model, steps: int) -> float:
    """tokens/s over `steps` batches (after 3 warm-up batches); model None: reading only."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01) if model is not None else None
    it = iter(batches)
    for _ in range(3):
        next(it)
    started, tokens = time.perf_counter(), 0
    for _ in range(steps):
        x = first(next(it))
        if model is not None:
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        tokens += x.shape[0] * (x.shape[1] - 1)
    return tokens / (time.perf_counter() - started)


def throughput(folder: Path, workers: int, reps: int) -> list[tuple[str, float, float, float]]:
    paths = sorted(str(p) for p in folder.glob("train-*.npy"))
    all_windows = torch.stack(list(TokenShards(paths, seq_len=SEQ)))
    cpu = torch.device("cpu")
    rows = []
    for label, model_of, steps in (("train", lambda: TinyGPT(128, SEQ, 2, 4, 128), 60), ("data", lambda: None, 600)):
        figures: dict[str, list[float]] = {"memory": [], "stream": [], "hand": []}
        for _ in range(reps):
            memory = TrainBatches(TensorDataset(all_windows), data_cfg(0), BATCH, 0, 1, 0, True, cpu)
            figures["memory"].append(run(memory.epoch(0, 0), model_of(), steps))
            stream = StreamBatches(TokenShards(paths, seq_len=SEQ), data_cfg(workers), BATCH, 0, 1, 0, True, cpu)
            figures["stream"].append(run(stream.epoch(0, 0), model_of(), steps))
            hand = DataLoader(HandWritten(paths), batch_size=BATCH, num_workers=workers, drop_last=True)
            figures["hand"].append(run(hand, model_of(), steps))
        m, s, h = (statistics.median(figures[k]) for k in ("memory", "stream", "hand"))
        rows.append((label, m, s, h))
    return rows


def resume_seconds(folder: Path, workers: int) -> list[tuple[str, float]]:
    """Seconds from a new loader with a saved position 1e6 samples deep to its first batch."""
    cpu = torch.device("cpu")
    out = []
    tokens = folder / "deep.bin"
    np.zeros((1_100_000 * SEQ + 1,), dtype=np.uint8).tofile(tokens)  # one shard of 1.1e6 windows
    text = folder / "deep.txt"
    with open(text, "w") as f:
        f.writelines(f"line {i} of a long stream\n" for i in range(1_100_000))
    offset = sum(len(f"line {i} of a long stream\n") for i in range(1_000_000))
    for label, dataset, piece in (
        ("token_shards", TokenShards(str(tokens), seq_len=SEQ, dtype="uint8"), [0, 1_000_000, 1, 0]),
        ("text_shards (pack)", TextShards(str(text), seq_len=SEQ, pack=True), [0, 1_000_000, 1, offset]),
    ):
        state = {"epoch": 0, "pieces": [piece], "carry": []}
        started = time.perf_counter()
        batches = StreamBatches(dataset, data_cfg(0), BATCH, 0, 1, 0, False, cpu)
        batches.dataset.load_state_dict(state)
        batch = next(iter(batches.epoch(0, 0)))
        seconds = time.perf_counter() - started
        if label.startswith("text"):
            assert bytes(batch[0, :6].tolist()) == b"line 1", "resumed at line 1,000,000"
        out.append((label, seconds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        for s in range(8):
            np.save(folder / f"train-{s:05d}.npy", rng.integers(0, 128, size=200_000, dtype=np.uint8))
        rows = throughput(folder, args.workers, args.reps)
        deep = resume_seconds(folder, args.workers)
    print(f"| measure ({args.workers} loader workers, batch {BATCH} x {SEQ + 1}) | in-memory | stream | hand-written |")
    print("|---|---|---|---|")
    for label, m, s, h in rows:
        print(f"| {label} tokens/s | {m:,.0f} | {s:,.0f} ({s / m:.2f}x) | {h:,.0f} (stream {s / h:.2f}x) |")
    for label, seconds in deep:
        print(f"| resume 1e6 samples deep, {label}: to the first batch | | {seconds:.3f} s | |")


if __name__ == "__main__":
    main()
