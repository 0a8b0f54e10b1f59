"""The training loop, one for every launch mode: epochs of steps, metrics, snapshots, stop, resume.

Everything that must survive a restart besides the trained objects (position, each rank's partial
loss, metrics so far) is in the snapshot this loop writes; `resume()` puts it back so that a resumed
run continues with the very next batch, bit for bit. How a step runs and how the model and
optimizer are captured is the engine's business (runner.train.engine).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

import torch
from tqdm import tqdm

from runner.config import OnNonFinite
from runner.snapshot import format as snap
from runner.system import peak_rss_mb
from runner.train import faults, rng
from runner.train.batches import BatchSource
from runner.train.engine import Engine
from runner.train.metrics import MetricsWriter
from runner.train.sampler import ResumableDistributedSampler
from runner.train.stop import Diverged, StopRequest, Stopped

log = logging.getLogger(__name__)


class TrainLoop:
    """`lead` (data-parallel rank 0) writes snapshots, metrics.jsonl and the extra logger."""

    def __init__(self, trainer_cfg, config: dict, engine: Engine, data: BatchSource, writer, stop: StopRequest,
                 metrics: Optional[MetricsWriter] = None, logger=None) -> None:
        self.t, self.config, self.engine, self.data = trainer_cfg, config, engine, data
        self.writer, self.stop, self.metrics_file, self.logger = writer, stop, metrics, logger
        c = engine.collectives
        self.rank, self.world_size, self.lead = c.rank, c.world_size, c.rank == 0
        self.sampler = ResumableDistributedSampler(data.dataset, self.world_size, self.rank, shuffle=self.t.shuffle, seed=self.t.seed)
        self.on_nonfinite = OnNonFinite(str(self.t.on_nonfinite))
        # Training position: epochs completed, steps done, samples of the current epoch consumed.
        self.epoch = self.global_step = self.samples_in_epoch = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)  # this epoch, this rank
        self.loss_count = 0
        self.skipped_steps = 0
        self.history: list[dict[str, Any]] = []
        self.resumed_from: Optional[dict[str, Any]] = None
        self.last_saved_step = -1
        self._rng_to_restore: Optional[list[dict]] = None

    # ---- resume -------------------------------------------------------------------------------
    def resume(self, state: dict[str, Any], entry: dict[str, Any]) -> None:
        if self.lead or not self.engine.shared_state:
            self.engine.load_state_dict(state)
        if self.engine.shared_state:  # one model for every rank: nobody steps it before the lead has loaded it
            self.engine.collectives.sum_(torch.zeros(1, dtype=torch.float64))
        ts = state[snap.TRAIN_STATE_KEY]
        self.epoch, self.global_step, self.samples_in_epoch = ts["epoch"], ts["global_step"], ts["samples_in_epoch"]
        # Each rank's partial loss sum of the epoch; with another world size rank 0 carries the total.
        partial = ts["epoch_loss_per_rank"]
        if len(partial) == self.world_size:
            loss_sum, self.loss_count = partial[self.rank]
        else:
            loss_sum, self.loss_count = [sum(col) for col in zip(*partial)] if self.rank == 0 else (0.0, 0)
        self.loss_sum.fill_(loss_sum)
        self.history = list(state[snap.METRICS_KEY])
        self.skipped_steps = int(ts.get("skipped_steps", 0))
        self.last_saved_step = self.global_step
        self._rng_to_restore = self._own_rng_states(state)
        self._check_allreduce(state.get(snap.ALLREDUCE_KEY))
        self.resumed_from = {"file": entry.get("file"), "epoch": self.epoch, "step": self.global_step,
                             "samples_in_epoch": self.samples_in_epoch}

    def _own_rng_states(self, state: dict[str, Any]) -> Optional[list[dict]]:
        """This rank's slice of the saved RNG states, or None (reseeded, with a warning) when the
        snapshot was written by another number of processes."""
        states, saved = state[snap.RNG_KEY], state[snap.WORLD_SIZE_KEY]
        per_rank = len(self.engine.capture_rng())
        if saved == self.engine.processes and len(states) == per_rank * self.world_size:
            return states[self.rank * per_rank: (self.rank + 1) * per_rank]
        if saved == self.engine.processes and len(states) == per_rank:  # only the lead's were gathered (parameter server)
            if self.lead:
                return states
            rng.seed_everything(self.t.seed + 1000 * self.global_step + self.rank)
            return None
        log.warning("snapshot was written by %d processes, this run has %d: the data order continues exactly, "
                    "random streams are reseeded (results will not be bitwise equal to an uninterrupted run)",
                    saved, self.engine.processes)
        rng.seed_everything(self.t.seed + 1000 * self.global_step + self.rank)
        return None

    def _check_allreduce(self, saved: Optional[str]) -> None:
        """The gradient all-reduce fixes the summation order; another one can round differently
        (with a world size that is not a power of two, where averaging before or after the sum differs)."""
        if saved is None or saved == self.engine.allreduce or not self.lead:
            return
        world = self.world_size
        if world & (world - 1):
            log.warning("the snapshot's gradients were averaged by %s, this run uses %s: with %d workers the two round "
                        "differently, so results will not be bitwise equal to an uninterrupted run (pass "
                        "launch.cpu_allreduce=%s to keep it)", saved, self.engine.allreduce, world,
                        saved if saved in ("shm", "gloo") else "auto")
        else:
            log.info("gradients averaged by %s (the snapshot's run used %s; with %d workers both give the same bits)",
                     self.engine.allreduce, saved, world, extra={"console": False})

    # ---- loop ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t = self.t
        if self._rng_to_restore is not None:
            self.engine.restore_rng(self._rng_to_restore)  # last, so nothing after it consumes random numbers
        if self.lead and self.metrics_file is not None:
            self.metrics_file.rewrite(self.history)  # epochs after the snapshot will be redone
        steps_per_epoch = math.ceil(self.sampler.epoch_length() / self.world_size / t.batch_size)
        total_steps = t.total_epochs * steps_per_epoch
        bar = tqdm(total=total_steps, initial=min(self.global_step, total_steps), disable=not (t.progress and self.lead),
                   unit="step", dynamic_ncols=True, mininterval=0.5, desc="resumed" if self.resumed_from else "training")
        started = time.perf_counter()
        samples_trained = 0
        try:
            while self.epoch < t.total_epochs:
                samples_trained += self._run_epoch(bar)
        finally:
            bar.close()
        if self.last_saved_step != self.global_step:  # the same decision on every rank
            self.save_snapshot(end_of_epoch=True)
        self.writer.wait()
        wall = time.perf_counter() - started
        final = self.history[-1] if self.history else {}
        return {"status": "finished", "epochs": self.epoch, "steps": self.global_step, "final_loss": final.get("loss"),
                "samples_per_s": samples_trained / wall if wall > 0 else None, "train_seconds": wall,
                "resumed_from": self.resumed_from, "world_size": self.engine.processes, "allreduce": self.engine.allreduce,
                "skipped_steps": self.skipped_steps,
                "snapshot": self.writer.last_entry["file"] if self.writer.last_entry else None,
                "snapshot_stall_seconds": self.writer.stall_seconds, "peak_rss_mb": peak_rss_mb()}

    def _run_epoch(self, bar: tqdm) -> int:
        t = self.t
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.samples_in_epoch)
        indices = self.sampler.local_indices().to(self.data.index_device())
        epoch_started = time.perf_counter()
        epoch_samples = 0
        bar.set_postfix(epoch=f"{self.epoch + 1}/{t.total_epochs}", refresh=False)
        crash_here = faults.crash_step(t)
        log_every = t.log_every if t.progress else 0
        for begin in range(0, len(indices), t.batch_size):
            idx = indices[begin: begin + t.batch_size]
            loss = self.engine.train_step(self.data.batch(idx))
            n = len(idx)
            if loss is None:
                self.skipped_steps += 1
            else:
                self.loss_sum.add_(loss, alpha=n)  # no host sync: read at log points and at the epoch's end
                self.loss_count += n
            self.global_step += 1
            self.samples_in_epoch += n * self.world_size
            epoch_samples += n * self.world_size
            bar.update()
            if self.global_step == crash_here:
                faults.crash_now(self.global_step)
            if log_every and self.global_step % log_every == 0:  # collective: every rank
                mean = self._epoch_mean_loss()
                self._check_finite(mean, "the loss")
                bar.set_postfix(epoch=f"{self.epoch + 1}/{t.total_epochs}", loss=f"{mean:.4g}", refresh=False)
            self._after_step(mid_epoch=begin + t.batch_size < len(indices))
        self._end_epoch(epoch_samples, time.perf_counter() - epoch_started)
        return epoch_samples

    def _after_step(self, mid_epoch: bool) -> None:
        """The snapshot points after every step: surface a failed background write, stop (snapshot,
        wait, raise) when asked, and snapshot every `save_every_steps` inside an epoch (the end of an
        epoch has its own rule)."""
        self.writer.check()
        if self.stop.should_stop(self.global_step):
            written = self.save_snapshot()
            self.writer.wait()
            raise Stopped(self.stop.signal, self.writer.last_entry if written else None, self.global_step, self.lead)
        every = self.t.save_every_steps
        if every and self.global_step % every == 0 and mid_epoch:
            self.save_snapshot()

    def _epoch_mean_loss(self) -> float:
        total = torch.stack([self.loss_sum, torch.tensor(float(self.loss_count), dtype=torch.float64, device=self.loss_sum.device)])
        self.engine.collectives.sum_(total)
        loss_total, count = total.tolist()  # one host sync for both
        return loss_total / count if count else math.nan  # every step skipped: there is no loss to show

    def _end_epoch(self, samples: int, seconds: float) -> None:
        t = self.t
        loss = self._epoch_mean_loss()
        lr = self.engine.learning_rate()
        self.epoch += 1
        self.samples_in_epoch = 0
        self.loss_sum.zero_()
        self.loss_count = 0
        self.engine.end_epoch()
        record = {"epoch": self.epoch, "step": self.global_step, "loss": loss, "lr": lr,
                  "samples_per_s": samples / seconds if seconds > 0 else None, "epoch_seconds": seconds,
                  "time": time.time()}
        if self.skipped_steps:
            record["skipped_steps"] = self.skipped_steps
        self.history.append(record)
        if self.lead:
            if self.metrics_file is not None:
                self.metrics_file.append(record)
            if self.logger is not None:
                self.logger.log(record)
            log.info("epoch %d/%d step %d loss %.6g lr %.4g %.0f samples/s", self.epoch, t.total_epochs,
                     self.global_step, loss, lr, record["samples_per_s"] or 0, extra={"console": not t.progress})
        self._check_finite(loss, f"the loss of epoch {self.epoch}")
        if t.save_every and self.epoch % t.save_every == 0 and self.epoch < t.total_epochs:
            self.save_snapshot(end_of_epoch=True)

    def _check_finite(self, value: float, what: str) -> bool:
        """Every rank sees the same (reduced or gathered) value, so every rank decides the same."""
        if math.isfinite(value):
            return True
        if self.on_nonfinite == OnNonFinite.stop:
            self.writer.wait()  # the last (finite) snapshot is committed before the run ends
            raise Diverged(self.global_step, what, self.writer.last_entry)
        if self.lead:
            log.warning("%s is not finite (%s) at step %d; trainer.on_nonfinite=%s: going on", what, value,
                        self.global_step, self.on_nonfinite)
        return False

    # ---- snapshots ----------------------------------------------------------------------------
    def save_snapshot(self, end_of_epoch: bool = False) -> bool:
        """Collective: every rank contributes its RNG state and partial loss; the lead writes.
        A snapshot of non-finite weights is never written. Returns whether one was written."""
        self.last_saved_step = self.global_step
        # Decided on reduced values, so every rank decides the same (gather may only hold this rank's).
        health = torch.tensor([0.0 if self.engine.parameters_finite() else 1.0, self.loss_sum.item()], dtype=torch.float64)
        self.engine.collectives.sum_(health)
        finite = health[0].item() == 0
        if not self._check_finite(health[1].item() if finite else math.nan,
                                  "the loss so far in this epoch" if finite else "a weight of the model"):
            log.warning("snapshot of step %d not written: it would hold non-finite values", self.global_step)
            return False
        per_rank = self.engine.collectives.gather((self.engine.capture_rng(), [self.loss_sum.item(), self.loss_count]))
        if self.lead:
            state = snap.make_state(
                **self.engine.state_dict(),
                train_state={"epoch": self.epoch, "global_step": self.global_step, "samples_in_epoch": self.samples_in_epoch,
                             "epoch_loss_per_rank": [r[1] for r in per_rank], "skipped_steps": self.skipped_steps},
                rng=[s for r in per_rank for s in r[0]], config=self.config, world_size=self.engine.processes,
                allreduce=self.engine.allreduce, metrics=self.history)
            self.writer.save(state, step=self.global_step, epoch=self.epoch, end_of_epoch=end_of_epoch)
        return True
