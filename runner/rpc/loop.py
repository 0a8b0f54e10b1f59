"""The training loop shared by the RPC topologies: epochs, batches, metrics, snapshots, resume.

A topology supplies `step(x, y) -> loss`, `model_state()`, `optimizer_state()` and the matching
loaders; this class keeps the position (epoch, step, samples into the epoch), writes
metrics.jsonl and snapshots in the same format as DDP mode, and resumes from them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from runner import faults, rng
from runner import snapshot as snap
from runner.loggers import build_logger
from runner.logs import MetricsWriter
from runner.sampler import ResumableDistributedSampler
from runner.snapshot import SnapshotManager, load_path
from runner.stop import StopRequest
from runner.trainer import after_step
from runner.writer import SnapshotWriter
from runner.worker import peak_rss_mb

log = logging.getLogger(__name__)


class RpcTrainLoop:
    def __init__(self, cfg, run_dir: Path, dataset, shard_rank: int, num_shards: int, lead: bool,
                 step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 model_state: Callable[[], dict], optimizer_state: Callable[[], Any],
                 load_model: Callable[[dict], None], load_optimizer: Callable[[Any], None],
                 extra_rng: Callable[[], list] = lambda: [], load_extra_rng: Callable[[list], None] = lambda s: None,
                 epoch_end: Optional[Callable[[float, int], tuple[float, int]]] = None) -> None:
        self.cfg, self.t, self.run_dir, self.lead = cfg, cfg.trainer, run_dir, lead
        self.dataset = dataset
        self.inputs, self.targets = dataset.tensors[:2]
        self.sampler = ResumableDistributedSampler(dataset, num_shards, shard_rank, shuffle=self.t.shuffle, seed=self.t.seed)
        self.num_shards = num_shards
        self.step_fn, self.model_state, self.optimizer_state = step, model_state, optimizer_state
        self.load_model, self.load_optimizer = load_model, load_optimizer
        self.extra_rng, self.load_extra_rng = extra_rng, load_extra_rng
        self.epoch_end = epoch_end
        self.manager = SnapshotManager(run_dir / cfg.snapshot.dir, cfg.snapshot.keep_last, cfg.snapshot.milestone_every)
        self.writer = SnapshotWriter(self.manager, OmegaConf.to_container(cfg, resolve=True), getattr(cfg.snapshot, "async"))
        self.metrics = MetricsWriter(run_dir / "metrics.jsonl")
        self.logger = build_logger(cfg, run_dir) if lead else None
        self.stop = StopRequest()
        self.epoch = self.global_step = self.samples_in_epoch = 0
        self.loss_sum, self.loss_count = 0.0, 0
        self.history: list[dict] = []
        self.resumed_from: Optional[dict] = None
        self.last_saved_step = -1

    # ---- snapshots ----------------------------------------------------------------------------
    def save(self, end_of_epoch: bool = False) -> None:
        if not self.lead:
            return
        state = snap.make_state(
            model=self.model_state(), optimizer=self.optimizer_state(), scheduler=None,
            train_state={"epoch": self.epoch, "global_step": self.global_step, "samples_in_epoch": self.samples_in_epoch,
                         "epoch_loss_per_rank": [[self.loss_sum, self.loss_count]]},
            sampler={"epoch": self.epoch, "start": self.samples_in_epoch, "seed": self.sampler.seed, "shuffle": self.sampler.shuffle},
            rng=[rng.capture(), *self.extra_rng()], config=OmegaConf.to_container(self.cfg, resolve=True),
            world_size=int(os.environ.get("WORLD_SIZE", "1")), metrics=self.history)
        self.writer.save(state, step=self.global_step, epoch=self.epoch, end_of_epoch=end_of_epoch)
        self.last_saved_step = self.global_step

    def resume(self) -> None:
        loaded = self.manager.load_latest()
        if loaded is None and str(self.cfg.snapshot.resume) not in ("auto", "never", "must"):
            loaded = ({"file": str(self.cfg.snapshot.resume)}, load_path(self.cfg.snapshot.resume))
        if loaded is None:
            return
        entry, state = loaded
        if self.lead:
            self.load_model(state[snap.MODEL_KEY])
            self.load_optimizer(state[snap.OPTIMIZER_KEY])
            rng_states = state[snap.RNG_KEY]
            self.load_extra_rng(rng_states[1:])
            self._rng = rng_states[0]
        ts = state[snap.TRAIN_STATE_KEY]
        self.epoch, self.global_step, self.samples_in_epoch = ts["epoch"], ts["global_step"], ts["samples_in_epoch"]
        if self.lead:
            self.loss_sum, self.loss_count = ts["epoch_loss_per_rank"][0]
        self.history = list(state[snap.METRICS_KEY])
        self.last_saved_step = self.global_step
        self.resumed_from = {"file": entry.get("file"), "epoch": self.epoch, "step": self.global_step}
        log.info("resumed from %s: epoch %d, step %d, %d samples into the epoch", entry.get("file"), self.epoch,
                 self.global_step, self.samples_in_epoch)

    # ---- loop ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.t
        if getattr(self, "_rng", None) is not None:
            rng.restore(self._rng)
        if self.lead:
            self.metrics.rewrite(self.history)
        steps_per_epoch = math.ceil(self.sampler.epoch_length() / self.num_shards / t.batch_size)
        bar = tqdm(total=t.total_epochs * steps_per_epoch, initial=min(self.global_step, t.total_epochs * steps_per_epoch),
                   disable=not (t.progress and self.lead), unit="step", mininterval=0.5, desc="rpc")
        rank = int(os.environ.get("RANK", "0"))
        crash = faults.crash_step(t, rank)
        started, trained = time.perf_counter(), 0
        try:
            while self.epoch < t.total_epochs:
                self.sampler.set_epoch(self.epoch)
                self.sampler.set_start(self.samples_in_epoch)
                indices = self.sampler.local_indices()
                epoch_started, epoch_samples = time.perf_counter(), 0
                for begin in range(0, len(indices), t.batch_size):
                    idx = indices[begin: begin + t.batch_size]
                    loss = self.step_fn(self.inputs[idx], self.targets[idx])
                    n = len(idx)
                    self.loss_sum += float(loss) * n
                    self.loss_count += n
                    self.global_step += 1
                    self.samples_in_epoch += n * self.num_shards
                    epoch_samples += n * self.num_shards
                    bar.update()
                    if self.global_step == crash:
                        faults.crash_now(crash, rank)
                    after_step(self.global_step, self.stop, self.writer, self.save, t.save_every_steps,
                               mid_epoch=begin + t.batch_size < len(indices))
                trained += epoch_samples
                self._end_epoch(epoch_samples, time.perf_counter() - epoch_started)
        finally:
            bar.close()
            self.stop.restore()
            if self.logger is not None:
                self.logger.close()
        if self.last_saved_step != self.global_step:
            self.save(end_of_epoch=True)
        self.writer.wait()
        wall = time.perf_counter() - started
        final = self.history[-1] if self.history else {}
        return {"status": "finished", "epochs": self.epoch, "steps": self.global_step, "final_loss": final.get("loss"),
                "samples_per_s": trained / wall if wall > 0 else None, "train_seconds": wall,
                "resumed_from": self.resumed_from, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
                "peak_rss_mb": peak_rss_mb(),
                "snapshot": self.writer.last_entry["file"] if self.writer.last_entry else None}

    def _end_epoch(self, samples: int, seconds: float) -> None:
        total, count = self.loss_sum, self.loss_count
        if self.epoch_end is not None:  # several trainers: the epoch's loss over all of them
            total, count = self.epoch_end(total, count)
        loss = total / max(count, 1)
        self.epoch += 1
        self.samples_in_epoch = 0
        self.loss_sum, self.loss_count = 0.0, 0
        record = {"epoch": self.epoch, "step": self.global_step, "loss": loss, "lr": float(self.cfg.optimizer.get("lr", 0.0)),
                  "samples_per_s": samples / seconds if seconds > 0 else None, "epoch_seconds": seconds, "time": time.time()}
        self.history.append(record)
        if self.lead:
            self.metrics.append(record)
            if self.logger is not None:
                self.logger.log(record)
            log.info("epoch %d/%d step %d loss %.6g", self.epoch, self.t.total_epochs, self.global_step, loss,
                     extra={"console": not self.t.progress})
        if self.t.save_every and self.epoch % self.t.save_every == 0 and self.epoch < self.t.total_epochs:
            self.save(end_of_epoch=True)
