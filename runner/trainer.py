"""The DDP training loop: epochs of steps over tensor batches, metrics, snapshots, stop requests.

Everything that must survive a restart is in `state_dict()`; `load_state_dict()` puts it back so
that a resumed run continues with the very next batch, bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.utils.data import default_collate
from tqdm import tqdm

from runner import faults, rng
from runner import snapshot as snap
from runner.logs import MetricsWriter
from runner.sampler import ResumableDistributedSampler
from runner.stop import StopRequest, Stopped

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg, model, ddp_model, optimizer, scheduler, dataset, loss_fn, device,
                 snapshotter, metrics: MetricsWriter, stop: StopRequest, rank: int, world_size: int) -> None:
        self.cfg, self.t = cfg, cfg.trainer
        self.model, self.ddp_model = model, ddp_model  # bare module (saved) and its DDP wrapper (trained)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.dataset, self.loss_fn, self.device = dataset, loss_fn, device
        self.snapshotter, self.metrics_file, self.stop = snapshotter, metrics, stop
        self.rank, self.world_size = rank, world_size
        self.sampler = ResumableDistributedSampler(dataset, world_size, rank, shuffle=self.t.shuffle, seed=self.t.seed)
        self.tensors = self._device_tensors(dataset)
        # Training position: epochs completed, steps done, samples of the current epoch consumed.
        self.epoch = 0
        self.global_step = 0
        self.samples_in_epoch = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # this epoch, this rank
        self.loss_count = 0
        self.history: list[dict[str, Any]] = []
        self.resumed_from: Optional[dict[str, Any]] = None
        self.logger = None  # optional extra metrics logger (rank 0), see runner.loggers
        self.shared_memory = None  # optional runner.shm_allreduce.SharedMemoryAllreduce for small collectives
        self.last_saved_step = -1

    def _device_tensors(self, dataset) -> Optional[tuple[torch.Tensor, ...]]:
        """The dataset's tensors on the training device, so a batch is one index_select."""
        tensors = getattr(dataset, "tensors", None)
        return None if tensors is None else tuple(t.to(self.device) for t in tensors)

    # ---- state --------------------------------------------------------------------------------
    def train_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "global_step": self.global_step, "samples_in_epoch": self.samples_in_epoch,
                "steps_in_epoch": self._steps_done_in_epoch()}

    def _steps_done_in_epoch(self) -> int:
        return math.ceil(self.samples_in_epoch / (self.t.batch_size * self.world_size))

    def snapshot_state(self, rng_states: list[dict], partial_losses: list[list[float]]) -> dict[str, Any]:
        return snap.make_state(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            train_state={**self.train_state(), "epoch_loss_per_rank": partial_losses},
            sampler={"epoch": self.epoch, "start": self.samples_in_epoch, "seed": self.sampler.seed, "shuffle": self.sampler.shuffle},
            rng=rng_states, config=OmegaConf.to_container(self.cfg, resolve=True), world_size=self.world_size,
            metrics=self.history)

    def load_snapshot(self, state: dict[str, Any], entry: dict[str, Any]) -> None:
        self.model.load_state_dict(state[snap.MODEL_KEY])
        self.optimizer.load_state_dict(state[snap.OPTIMIZER_KEY])
        if self.scheduler is not None and state[snap.SCHEDULER_KEY] is not None:
            self.scheduler.load_state_dict(state[snap.SCHEDULER_KEY])
        ts = state[snap.TRAIN_STATE_KEY]
        self.epoch, self.global_step = ts["epoch"], ts["global_step"]
        self.samples_in_epoch = ts["samples_in_epoch"]
        # Each rank's partial loss sum of the epoch; with another world size rank 0 carries the total.
        partial = ts["epoch_loss_per_rank"]
        if len(partial) == self.world_size:
            loss_sum, self.loss_count = partial[self.rank]
        else:
            loss_sum, self.loss_count = [sum(col) for col in zip(*partial)] if self.rank == 0 else (0.0, 0)
        self.loss_sum.fill_(loss_sum)
        self.history = list(state[snap.METRICS_KEY])
        self.last_saved_step = self.global_step
        saved_world = state[snap.WORLD_SIZE_KEY]
        rng_states = state[snap.RNG_KEY]
        if saved_world == self.world_size and len(rng_states) == self.world_size:
            self._rng_to_restore = rng_states[self.rank]
        else:
            log.warning("snapshot was written by %d workers, this run has %d: the data order continues exactly, "
                        "random streams are reseeded (results will not be bitwise equal to an uninterrupted run)",
                        saved_world, self.world_size)
            self._rng_to_restore = None
            rng.seed_everything(self.t.seed + 1000 * self.global_step + self.rank)
        self.resumed_from = {"file": entry.get("file"), "epoch": self.epoch, "step": self.global_step,
                             "samples_in_epoch": self.samples_in_epoch}

    # ---- loop ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.t
        if getattr(self, "_rng_to_restore", None) is not None:
            rng.restore(self._rng_to_restore)  # last, so nothing after it consumes random numbers
        if self.rank == 0:
            self.metrics_file.rewrite(self.history)  # epochs after the snapshot will be redone
        steps_per_epoch = math.ceil(self.sampler.epoch_length() / self.world_size / t.batch_size)
        bar = tqdm(total=t.total_epochs * steps_per_epoch, initial=min(self.global_step, t.total_epochs * steps_per_epoch),
                   disable=not (t.progress and self.rank == 0), unit="step", dynamic_ncols=True, mininterval=0.5,
                   desc="resumed" if self.resumed_from else "training")
        started = time.perf_counter()
        samples_trained = 0
        try:
            while self.epoch < t.total_epochs:
                samples_trained += self._run_epoch(bar)
        finally:
            bar.close()
        if self.last_saved_step != self.global_step:  # collective: the same decision on every rank
            self.save_snapshot(end_of_epoch=True)
        self.snapshotter.wait()
        wall = time.perf_counter() - started
        final = self.history[-1] if self.history else {}
        return {"epochs": self.epoch, "steps": self.global_step, "final_loss": final.get("loss"),
                "samples_per_s": samples_trained / wall if wall > 0 else None, "train_seconds": wall,
                "resumed_from": self.resumed_from}

    def _run_epoch(self, bar: tqdm) -> int:
        t = self.t
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.samples_in_epoch)
        indices = self.sampler.local_indices().to(self.device)
        epoch_started = time.perf_counter()
        epoch_samples = 0
        bar.set_postfix(epoch=f"{self.epoch + 1}/{t.total_epochs}", refresh=False)
        crash_here = faults.crash_step(t, self.rank)
        log_every = t.log_every if t.progress else 0
        for begin in range(0, len(indices), t.batch_size):
            idx = indices[begin: begin + t.batch_size]
            loss = self._step(idx)
            n = len(idx)
            self.loss_sum.add_(loss.detach(), alpha=n)  # no host sync: read once per epoch
            self.loss_count += n
            self.global_step += 1
            self.samples_in_epoch += n * self.world_size
            epoch_samples += n * self.world_size
            bar.update()
            if self.global_step == crash_here:
                faults.crash_now(self.global_step, self.rank)
            if log_every and self.global_step % log_every == 0:  # collective: every rank
                bar.set_postfix(epoch=f"{self.epoch + 1}/{t.total_epochs}", loss=f"{self._epoch_mean_loss():.4g}", refresh=False)
            after_step(self.global_step, self.stop, self.snapshotter, self.save_snapshot, t.save_every_steps,
                       mid_epoch=begin + t.batch_size < len(indices))
        self._end_epoch(epoch_samples, time.perf_counter() - epoch_started)
        return epoch_samples

    def _step(self, idx: torch.Tensor) -> torch.Tensor:
        if self.tensors is not None:
            inputs, targets = (t.index_select(0, idx) for t in self.tensors[:2])
        else:
            inputs, targets = default_collate([self.dataset[i] for i in idx.tolist()])[:2]
            inputs, targets = inputs.to(self.device), targets.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.ddp_model(inputs), targets)
        loss.backward()
        self.optimizer.step()
        return loss

    def _global_loss(self) -> torch.Tensor:
        total = torch.stack([self.loss_sum, torch.tensor(float(self.loss_count), dtype=torch.float64, device=self.device)])
        if self.shared_memory is not None and self.shared_memory.fits(total):
            self.shared_memory.all_reduce_(total)
        elif dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(total)
        return total

    def _epoch_mean_loss(self) -> float:
        total = self._global_loss()
        return (total[0] / total[1].clamp(min=1)).item()

    def _end_epoch(self, samples: int, seconds: float) -> None:
        t = self.t
        loss = self._epoch_mean_loss()
        lr = self.optimizer.param_groups[0]["lr"]
        self.epoch += 1
        self.samples_in_epoch = 0
        self.loss_sum.zero_()
        self.loss_count = 0
        if self.scheduler is not None:
            self.scheduler.step()
        record = {"epoch": self.epoch, "step": self.global_step, "loss": loss, "lr": lr,
                  "samples_per_s": samples / seconds if seconds > 0 else None, "epoch_seconds": seconds,
                  "time": time.time()}
        self.history.append(record)
        if self.rank == 0:
            self.metrics_file.append(record)
            if self.logger is not None:
                self.logger.log(record)
            log.info("epoch %d/%d step %d loss %.6g lr %.4g %.0f samples/s", self.epoch, t.total_epochs,
                     self.global_step, loss, lr, record["samples_per_s"] or 0, extra={"console": not t.progress})
        if t.save_every and self.epoch % t.save_every == 0 and self.epoch < t.total_epochs:
            self.save_snapshot(end_of_epoch=True)

    # ---- snapshots ----------------------------------------------------------------------------
    def save_snapshot(self, end_of_epoch: bool = False) -> None:
        """Collective: every rank contributes its RNG state and partial loss; rank 0 writes."""
        per_rank = _gather_objects((rng.capture(), [self.loss_sum.item(), self.loss_count]), self.world_size)
        if self.rank == 0:
            state = self.snapshot_state([p[0] for p in per_rank], [p[1] for p in per_rank])
            self.snapshotter.save(state, step=self.global_step, epoch=self.epoch, end_of_epoch=end_of_epoch)
        self.last_saved_step = self.global_step


def after_step(step: int, stop: StopRequest, writer, save, save_every_steps: int, mid_epoch: bool) -> None:
    """The snapshot points after every step, shared by the DDP and RPC loops: surface a failed
    background write, stop (snapshot, wait, raise) when asked, and snapshot every
    `save_every_steps` inside an epoch (the end of an epoch has its own snapshot rule)."""
    writer.check()
    if stop.should_stop(step):
        save()
        writer.wait()
        raise Stopped(stop.signal)
    if save_every_steps and step % save_every_steps == 0 and mid_epoch:
        save()


def _gather_objects(obj: Any, world_size: int) -> list[Any]:
    if not dist.is_initialized() or world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
