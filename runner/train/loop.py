"""The training loop, one for every launch mode: epochs of steps, validation, metrics, snapshots
(scheduled, best-by-metric, on stop, final), early stopping, stop, resume.

Everything that must survive a restart besides the trained objects (position, each rank's partial
sums, the best value so far, metrics so far) is in the snapshot this loop writes; `resume()` puts
it back so that a resumed run continues with the very next batch, bit for bit. A step is one
optimizer step: a window of `trainer.accumulate` micro-batches, so a snapshot is only ever taken
on an optimizer-step boundary. How a step runs and how the model and optimizer are captured is
the engine's business (runner.train.engine); what a batch means is the task's (runner.tasks).
"""

from __future__ import annotations

import logging
import math
import sys
import time
import uuid
from typing import Any, Optional

import torch
from tqdm import tqdm

from runner.config import OnNonFinite
from runner.snapshot import format as snap
from runner.snapshot.checkpointer import Checkpointer
from runner.system import peak_rss_mb
from runner.train import faults, rng
from runner.train.batches import DataSource
from runner.train.engine import Engine
from runner.train.evaluation import Monitor, evaluate
from runner.train.metrics import MetricsWriter, train_loss
from runner.train.observer import Observer
from runner.train.stop import Diverged, Stopped, StopRequest

log = logging.getLogger(__name__)


def planned_steps(trainer_cfg, batches_per_epoch: Optional[int]) -> Optional[int]:
    """The run's optimizer steps: trainer.max_steps, or every epoch's windows of `accumulate` batches
    (None for a stream without max_steps: its length is not known)."""
    if int(trainer_cfg.max_steps):
        return int(trainer_cfg.max_steps)
    if batches_per_epoch is None:
        return None
    return int(trainer_cfg.total_epochs) * math.ceil(batches_per_epoch / int(trainer_cfg.accumulate))


class TrainLoop:
    """`lead` (data-parallel rank 0) writes snapshots, metrics.jsonl and the extra logger."""

    def __init__(
        self,
        cfg,
        config: dict,
        engine: Engine,
        data: DataSource,
        task,
        checkpointer: Checkpointer,
        stop: StopRequest,
        metrics: Optional[MetricsWriter] = None,
        logger=None,
        observer: Optional[Observer] = None,
    ) -> None:
        self.t, self.config, self.engine, self.data, self.task = cfg.trainer, config, engine, data, task
        self.checkpointer, self.stop, self.metrics_file, self.logger = checkpointer, stop, metrics, logger
        c = engine.collectives
        self.rank, self.world_size, self.lead = c.rank, c.world_size, c.rank == 0
        self.on_nonfinite = OnNonFinite(str(self.t.on_nonfinite))
        self.accumulate = int(self.t.accumulate)
        self.max_steps = int(self.t.max_steps)
        self.watch = Monitor(
            cfg.snapshot.monitor, cfg.snapshot.mode, self.t.early_stop.patience, self.t.early_stop.min_delta
        )
        # Training position: epochs completed, optimizer steps done, samples of the current epoch consumed.
        self.epoch = self.global_step = self.samples_in_epoch = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)  # this epoch, this rank
        self.loss_count = 0
        self.log_sums: dict[str, torch.Tensor] = {}  # the task's extra training logs, weighted like the loss
        # The same sums since the last training row (every `trainer.log_every` steps), across epochs.
        self.row_sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), dtype=torch.float64, device=engine.device)}
        self.row_count = 0
        self.skipped_steps = 0
        self.history: list[dict[str, Any]] = []
        self.resumed_from: Optional[dict[str, Any]] = None
        self.last_saved_step = -1
        self.written_step = -1  # the step whose version this process has written (or handed to the checkpointer)
        self.validated: tuple[int, dict[str, float]] = (-1, {})  # (step, metrics) of the last validation
        self.bar = tqdm(disable=True)
        self.val_seconds = 0.0
        self.observe = (observer or Observer.from_config(self.t, engine.device)).bind(self)  # runner.train.observer
        self._start_row()  # the row's clock, and the samples and units trained in it
        self._rng_to_restore: Optional[list[dict]] = None
        if hasattr(data.train, "bind"):  # a stream: the ranks agree on where its epoch ends
            data.train.bind(c)

    # ---- resume -------------------------------------------------------------------------------
    def resume(self, state: dict[str, Any], entry: dict[str, Any]) -> None:
        if self.lead or not self.engine.shared_state:
            self.engine.load_state_dict(state)
        if self.engine.shared_state:  # one model for every rank: nobody steps it before the lead has loaded it
            self.engine.collectives.sum_(torch.zeros(1, dtype=torch.float64))
        ts = state[snap.TRAIN_STATE_KEY]
        self.epoch, self.global_step, self.samples_in_epoch = ts["epoch"], ts["global_step"], ts["samples_in_epoch"]
        # Each rank's partial sums of the epoch; with another world size rank 0 carries the totals.
        partial = ts["epoch_loss_per_rank"]
        if len(partial) == self.world_size:
            mine = partial[self.rank]
        else:
            mine = [sum(col) for col in zip(*partial)] if self.rank == 0 else [0.0, 0]
        loss_sum, self.loss_count = mine[0], int(mine[1])
        self.loss_sum.fill_(loss_sum)
        names = ts.get("log_names", [])
        for name, value in zip(names, mine[2:] if len(mine) > 2 else [0.0] * len(names)):
            self.log_sums[name] = torch.tensor(float(value), dtype=torch.float64, device=self.engine.device)
        window = ts.get("row_sums_per_rank")  # snapshots of older versions: the row starts afresh
        if window:
            mine = (
                window[self.rank]
                if len(window) == self.world_size
                else ([sum(col) for col in zip(*window)] if self.rank == 0 else [0.0, 0] + [0.0] * len(names))
            )
            self.row_sums["loss"].fill_(mine[0])
            self.row_count = int(mine[1])
            for name, value in zip(names, mine[2:]):
                self.row_sums[name] = torch.tensor(float(value), dtype=torch.float64, device=self.engine.device)
        self.history = list(state[snap.METRICS_KEY])
        self.skipped_steps = int(ts.get("skipped_steps", 0))
        self.watch.load(ts)
        if hasattr(self.data.train, "load_state"):  # a stream: each rank's and loader worker's position
            self.data.train.load_state(ts.get("data_per_rank"), self.epoch)
        self.last_saved_step = self.global_step
        self._rng_to_restore = self._own_rng_states(state)
        self._check_allreduce(state.get(snap.ALLREDUCE_KEY))
        self._note_global_batch(int(state[snap.WORLD_SIZE_KEY]))
        self.resumed_from = {
            "file": entry.get("file"),
            "epoch": self.epoch,
            "step": self.global_step,
            "samples_in_epoch": self.samples_in_epoch,
        }

    def _note_global_batch(self, saved_processes: int) -> None:
        """Another number of workers changes the samples per optimizer step: say so, with both numbers."""
        if not self.lead or saved_processes == self.engine.processes or self.engine.processes != self.world_size:
            return
        per_step = int(self.t.batch_size) * self.accumulate
        log.warning(
            "the global batch changes from %d to %d samples per optimizer step (trainer.batch_size %d x "
            "accumulate %d x %d workers, the snapshot's run had %d workers)",
            per_step * saved_processes,
            per_step * self.world_size,
            int(self.t.batch_size),
            self.accumulate,
            self.world_size,
            saved_processes,
        )

    def _own_rng_states(self, state: dict[str, Any]) -> Optional[list[dict]]:
        """This rank's slice of the saved RNG states, or None (reseeded, with a warning) when the
        snapshot was written by another number of processes."""
        states, saved = state[snap.RNG_KEY], state[snap.WORLD_SIZE_KEY]
        per_rank = len(self.engine.capture_rng())
        if saved == self.engine.processes and len(states) == per_rank * self.world_size:
            return states[self.rank * per_rank : (self.rank + 1) * per_rank]
        if (
            saved == self.engine.processes and len(states) == per_rank
        ):  # only the lead's were gathered (parameter server)
            if self.lead:
                return states
            rng.seed_everything(self.t.seed + 1000 * self.global_step + self.rank)
            return None
        if self.lead:
            log.warning(
                "snapshot was written by %d processes, this run has %d: the data order continues exactly, "
                "random streams are reseeded (results will not be bitwise equal to an uninterrupted run)",
                saved,
                self.engine.processes,
            )
        rng.seed_everything(self.t.seed + 1000 * self.global_step + self.rank)
        return None

    def _check_allreduce(self, saved: Optional[str]) -> None:
        """The gradient all-reduce fixes the summation order; another one can round differently
        (with a world size that is not a power of two, where averaging before or after the sum differs)."""
        if saved is None or saved == self.engine.allreduce or not self.lead:
            return
        world = self.world_size
        if world & (world - 1):
            log.warning(
                "the snapshot's gradients were averaged by %s, this run uses %s: with %d workers the two round "
                "differently, so results will not be bitwise equal to an uninterrupted run (pass "
                "launch.cpu_allreduce=%s to keep it)",
                saved,
                self.engine.allreduce,
                world,
                saved if saved in ("shm", "gloo") else "auto",
            )
        else:
            log.info(
                "gradients averaged by %s (the snapshot's run used %s; with %d workers both give the same bits)",
                self.engine.allreduce,
                saved,
                world,
                extra={"console": False},
            )

    # ---- loop ---------------------------------------------------------------------------------
    def shows_bar(self) -> bool:
        """The progress bar is drawn by the lead on a terminal; elsewhere every row is a log line."""
        return bool(self.t.progress) and self.lead and sys.stderr.isatty()

    def total_steps(self) -> int:
        return planned_steps(self.t, self.data.train.batches_per_epoch())

    def done(self) -> bool:
        if self.watch.ended is not None:
            return True
        return self.global_step >= self.max_steps if self.max_steps else self.epoch >= self.t.total_epochs

    def fit(self) -> dict[str, Any]:
        if self._rng_to_restore is not None:
            self.engine.restore_rng(self._rng_to_restore)  # last, so nothing after it consumes random numbers
        if self.lead and self.metrics_file is not None:
            self.metrics_file.rewrite(self.history)  # records after the snapshot will be redone
        total_steps = self.total_steps()
        bar = tqdm(
            total=total_steps,
            initial=min(self.global_step, total_steps or self.global_step),
            disable=not self.shows_bar(),
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5,
            desc="resumed" if self.resumed_from else "training",
        )
        self.bar = bar
        started = time.perf_counter()
        self._start_row()
        samples_trained = units_trained = 0
        try:
            while not self.done():
                samples, units = self._run_epoch(bar)
                samples_trained += samples
                units_trained += units
        finally:
            bar.close()
        if self.data.val is not None and self.validated[0] != self.global_step and self.watch.ended is None:
            self._validate_and_record(final=True)  # the finished model is always validated
        if self.last_saved_step != self.global_step:  # the same decision on every rank
            self.save_snapshot(end_of_epoch=self.samples_in_epoch == 0)
        self.checkpointer.wait()
        self.observe.close()
        wall = time.perf_counter() - started
        peaks = self.engine.collectives.gather(peak_rss_mb())  # each rank's peak (collective: every rank)
        train_wall = wall - self.val_seconds
        final = next((r for r in reversed(self.history) if train_loss(r) is not None and r.get("scope") != "step"), {})
        summary = {
            "status": "finished",
            "epochs": self.epoch,
            "steps": self.global_step,
            "final_loss": train_loss(final),
            "samples_per_s": samples_trained / train_wall if train_wall > 0 else None,
            "train_seconds": wall,
            "val_seconds": self.val_seconds,
            "resumed_from": self.resumed_from,
            "world_size": self.engine.processes,
            "allreduce": self.engine.allreduce,
            "skipped_steps": self.skipped_steps,
            "snapshot": self.checkpointer.last_entry["file"] if self.checkpointer.last_entry else None,
            "snapshot_stall_seconds": self.checkpointer.stall_seconds,
            "peak_rss_mb": peaks[0],
            "peak_rss_mb_per_rank": peaks,
            "val": self.validated[1],
            "ended": self.watch.ended,
            "monitor": self.watch.name,
            "best": self.watch.best,
            "best_step": self.watch.best_step,
            **self.observe.summary(),
        }
        if self.task.unit and train_wall > 0:
            summary[f"{self.task.unit}_per_s"] = units_trained / train_wall
        return summary

    def _run_epoch(self, bar: tqdm) -> tuple[int, int]:
        t = self.t
        batches = self.data.train.epoch(self.epoch, self.samples_in_epoch)
        epoch_started = time.perf_counter()
        val_before = self.val_seconds
        epoch_samples = epoch_units = 0
        self._show_postfix()
        crash_here = faults.crash_step(t)
        log_every = int(t.log_every)
        window: list = []
        iterator = iter(batches)
        batch = next(iterator, None)
        while batch is not None:
            window.append(batch)
            batch = next(iterator, None)
            if len(window) < self.accumulate and batch is not None:
                continue
            n = sum(self.task.batch_size(b) for b in window)
            units = sum(self.task.units(b) for b in window) * self.world_size if self.task.unit else 0
            epoch_units += units
            out = self.observe.train_step(self.engine, window, n, self.checkpointer.wait_for_staging)
            window = []
            if out is None:
                self.skipped_steps += 1
            else:
                loss, logs = out
                self.loss_sum.add_(loss, alpha=n)  # no host sync: read at log points and at the epoch's end
                self.row_sums["loss"].add_(loss, alpha=n)
                self.loss_count += n
                self.row_count += n
                for name, value in logs.items():
                    acc = self.log_sums.get(name)
                    if acc is None:
                        acc = self.log_sums[name] = torch.zeros((), dtype=torch.float64, device=self.loss_sum.device)
                        self.row_sums[name] = torch.zeros((), dtype=torch.float64, device=self.loss_sum.device)
                    acc.add_(value, alpha=n)
                    self.row_sums[name].add_(value, alpha=n)
            self.global_step += 1
            faults.note_step(self.global_step)
            self.observe.step_done(self.global_step)
            self.samples_in_epoch += n * self.world_size
            epoch_samples += n * self.world_size
            self.row_samples += n * self.world_size
            self.row_units += units
            bar.update()
            if self.global_step == crash_here:
                faults.crash_now(self.global_step)
            if log_every and self.global_step % log_every == 0:  # collective: every rank
                self._record_row()
            mid_epoch = batch is not None
            reached = bool(self.max_steps) and self.global_step >= self.max_steps
            if mid_epoch and not reached and t.val_every_steps and self.global_step % t.val_every_steps == 0:
                self._validate_and_record()
            self._after_step(mid_epoch=mid_epoch and not reached)
            if reached or self.watch.ended is not None:
                if mid_epoch:
                    self._record_partial_epoch(
                        epoch_samples, epoch_units, self._seconds_since(epoch_started) - (self.val_seconds - val_before)
                    )
                    return epoch_samples, epoch_units
                break
        with self.observe.phase("epoch_end"):
            self._end_epoch(
                epoch_samples, epoch_units, self._seconds_since(epoch_started) - (self.val_seconds - val_before)
            )
        return epoch_samples, epoch_units

    def _seconds_since(self, started: float) -> float:
        """Wall time of the work queued since `started` (on a GPU, once its kernels have run: the
        epoch's means are read right after, so this wait costs nothing extra)."""
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)
        return time.perf_counter() - started

    def _epoch_label(self) -> str:
        current = min(self.epoch + 1, self.t.total_epochs) if not self.max_steps else self.epoch + 1
        return f"{current}/{self.t.total_epochs}" if not self.max_steps else f"{current}"

    def _show_postfix(self) -> None:
        """The bar's postfix: epoch, the latest train/loss row and the latest monitored (or val/loss) value,
        each under its own name, so training and validation values never clash."""
        if self.bar.disable:
            return
        shown = {"epoch": self._epoch_label()}
        row = next((r for r in reversed(self.history) if r.get("scope") == "step"), None)
        if row is not None and train_loss(row) is not None:
            shown["train/loss"] = f"{train_loss(row):.4g}"
        _, metrics = self.validated
        key = self.watch.name if self.watch.name in metrics else ("val/loss" if "val/loss" in metrics else None)
        if key:
            shown[key] = f"{metrics[key]:.4g}"
        self.bar.set_postfix(ordered_dict=shown, refresh=False)

    def _start_row(self) -> None:
        """A new row's throughput clock: its wall time excludes the validations run during it."""
        self.row_started, self.row_val_seconds = time.perf_counter(), self.val_seconds
        self.row_samples = self.row_units = 0
        self.observe.start_row()

    def _record_row(self) -> None:
        """One training row every `trainer.log_every` steps: the means since the last row over every rank
        (one collective, one host sync), the rate the last step used and the throughput since the last row."""
        names = sorted(k for k in self.row_sums if k != "loss")
        count = torch.tensor(float(self.row_count), dtype=torch.float64, device=self.loss_sum.device)
        total = torch.stack([self.row_sums["loss"], count, *(self.row_sums[k] for k in names)])
        total = torch.cat([total, self.observe.row_tensor(self.rank, self.world_size, total.device)])
        self.engine.collectives.sum_(total)
        values = total.tolist()
        values, observed = values[: len(names) + 2], values[len(names) + 2 :]
        seconds = time.perf_counter() - self.row_started - (self.val_seconds - self.row_val_seconds)
        record: dict[str, Any] = {
            "scope": "step",
            "epoch": self.epoch,
            "step": self.global_step,
            "train/loss": values[0] / values[1] if values[1] else math.nan,
        }
        record.update({f"train/{k}": v / values[1] if values[1] else math.nan for k, v in zip(names, values[2:])})
        record["lr"] = self.engine.learning_rate()
        record["samples_per_s"] = self.row_samples / seconds if seconds > 0 else None
        if self.task.unit:
            record[f"{self.task.unit}_per_s"] = self.row_units / seconds if seconds > 0 else None
        record.update(self.observe.row_fields(observed, self.world_size, self.row_samples, seconds))
        for value in self.row_sums.values():
            value.zero_()
        self.row_count = 0
        self._start_row()
        self._append(record)
        self._log_record(record)
        if values[1]:  # every step of the row skipped (on_nonfinite=skip): nothing to check
            self._check_finite(record["train/loss"], "the loss")

    def _after_step(self, mid_epoch: bool) -> None:
        """The snapshot points after every step: surface a failed background write, stop (snapshot,
        wait, raise) when asked, and snapshot every `save_every_steps` inside an epoch (the end of an
        epoch has its own rule)."""
        self.checkpointer.check()
        if self.stop.should_stop(self.global_step):
            written = self.save_snapshot()
            self.checkpointer.wait(since=self.stop.signal_time)  # within launch.stop_timeout of the signal
            raise Stopped(
                self.stop.signal, self.checkpointer.last_entry if written else None, self.global_step, self.lead
            )
        every = self.t.save_every_steps
        if every and self.global_step % every == 0 and mid_epoch:
            self.save_snapshot()

    def _epoch_means(self) -> dict[str, float]:
        """Means over this epoch so far, over every rank: one collective, one host sync."""
        names = sorted(self.log_sums)
        count = torch.tensor(float(self.loss_count), dtype=torch.float64, device=self.loss_sum.device)
        total = torch.stack([self.loss_sum, count, *(self.log_sums[k] for k in names)])
        self.engine.collectives.sum_(total)
        values = total.tolist()
        loss_total, count = values[0], values[1]
        means = {"loss": loss_total / count if count else math.nan}  # every step skipped: there is no loss to show
        means.update({k: v / count if count else math.nan for k, v in zip(names, values[2:])})
        return means

    def _reset_epoch_sums(self) -> None:
        self.samples_in_epoch = 0
        self.loss_sum.zero_()
        self.loss_count = 0
        for value in self.log_sums.values():
            value.zero_()

    def _train_record(self, samples: int, units: int, seconds: float) -> dict[str, Any]:
        means = self._epoch_means()
        record = {
            "epoch": self.epoch,
            "step": self.global_step,
            **{f"train/{k}": v for k, v in means.items()},
            "lr": self.engine.learning_rate(),
            "samples_per_s": samples / seconds if seconds > 0 else None,
            "epoch_seconds": seconds,
        }
        if self.task.unit:
            record[f"{self.task.unit}_per_s"] = units / seconds if seconds > 0 else None
        return record

    def _end_epoch(self, samples: int, units: int, seconds: float) -> None:
        t = self.t
        record = self._train_record(samples, units, seconds)
        self.epoch += 1
        record["epoch"] = self.epoch
        self._reset_epoch_sums()
        self.checkpointer.wait_for_staging()  # a per-epoch scheduler may change tensors of the snapshot in flight
        self.engine.end_epoch()
        if self.skipped_steps:
            record["skipped_steps"] = self.skipped_steps
        last = self.epoch >= t.total_epochs and not self.max_steps
        improved = False
        if not math.isfinite(record["train/loss"]):  # recorded first: the file shows where it diverged
            self._append(record)
            self._log_record(record)
            self._check_finite(record["train/loss"], f"the loss of epoch {self.epoch}")
        else:
            if self.data.val is not None and (last or (t.val_every and self.epoch % t.val_every == 0)):
                improved = self._validate(record)
            self._append(record)
            self._log_record(record)
        scheduled = bool(t.save_every) and self.epoch % t.save_every == 0 and not self.done()
        if (scheduled or improved) and not self.done():
            self.save_snapshot(end_of_epoch=True)

    def _record_partial_epoch(self, samples: int, units: int, seconds: float) -> None:
        """Training ended inside an epoch (max_steps, early stop): its numbers so far."""
        record = self._train_record(samples, units, seconds)
        record["partial_epoch"] = True
        self._append(record)
        self._log_record(record)

    def _validate_and_record(self, final: bool = False) -> None:
        record = {"epoch": self.epoch, "step": self.global_step}
        improved = self._validate(record)
        self._append(record)
        self._log_record(record)
        if improved and not final and not self.done():
            self.save_snapshot()

    def _append(self, record: dict[str, Any]) -> None:
        record["time"] = time.time()
        self.history.append(record)
        if self.lead:
            if self.metrics_file is not None:
                self.metrics_file.append(record)
            if self.logger is not None:
                self.logger.log(record, len(self.history) - 1)

    def _log_record(self, record: dict[str, Any]) -> None:
        """A record as one log line (on the console unless the bar shows it), and the bar's postfix."""
        if not self.lead:
            return
        shown = " ".join(
            f"{k} {v:.6g}"
            for k, v in record.items()
            if "/" in k and isinstance(v, float) and not k.startswith(("time/", "memory/"))  # in the file, not here
        )
        lr = f" lr {record['lr']:.4g}" if "lr" in record else ""
        rate = (
            next(
                (
                    f" {record[k]:,.0f} {k[:-6]}/s"
                    for k in reversed(record)
                    if k.endswith("_per_s") and isinstance(record[k], float)
                ),
                "",
            )
            if record.get("scope") == "step"
            else ""
        )
        log.info(
            "epoch %d step %d %s%s%s",
            record["epoch"],
            record["step"],
            shown,
            lr,
            rate,
            extra={"console": self.bar.disable},
        )
        self._show_postfix()

    # ---- evaluation ---------------------------------------------------------------------------
    def _validate(self, record: dict[str, Any]) -> bool:
        """Validate, put val/<name> into `record`, update the best value and early stopping.
        Returns whether the monitored metric improved (a best snapshot is due)."""
        started = time.perf_counter()
        with self.observe.phase("eval"):
            metrics = {f"val/{k}": v for k, v in evaluate(self.engine, self.task, self.data.val).items()}
        self.val_seconds += time.perf_counter() - started
        record.update(metrics)
        self.validated = (self.global_step, metrics)
        improved = self.watch.update(metrics, self.global_step)
        if self.watch.ended is not None:  # no validation follows: training ends here
            record["early_stop"] = True
            if self.lead:
                log.warning("%s", self.watch.ended)
        return improved

    def test(self, model_state: Optional[dict[str, Any]]) -> dict[str, float]:
        """test/<name> over the test split, with `model_state`'s weights (the best snapshot's) if given."""
        if model_state is not None:
            self.engine.load_model_state(model_state)
        return {f"test/{k}": v for k, v in evaluate(self.engine, self.task, self.data.test).items()}

    def _check_finite(self, value: float, what: str) -> bool:
        """Every rank sees the same (reduced or gathered) value, so every rank decides the same."""
        if math.isfinite(value):
            return True
        if self.on_nonfinite == OnNonFinite.stop:
            self.checkpointer.wait()  # the last (finite) snapshot is committed before the run ends
            raise Diverged(self.global_step, what, self.checkpointer.last_entry)
        if self.lead:
            log.warning(
                "%s is not finite (%s) at step %d; trainer.on_nonfinite=%s: going on",
                what,
                value,
                self.global_step,
                self.on_nonfinite,
            )
        return False

    # ---- snapshots ----------------------------------------------------------------------------
    def save_snapshot(self, end_of_epoch: bool = False) -> bool:
        """Collective: every rank contributes its RNG state and partial sums; the lead writes.
        A snapshot of non-finite weights is never written. Returns whether one was written."""
        if self.written_step == self.global_step:  # one version per step: an improving validation saved it already
            return True
        self.last_saved_step = self.global_step
        # Decided on reduced values, so every rank decides the same (gather may only hold this rank's).
        health = torch.tensor(
            [0.0 if self.engine.parameters_finite() else 1.0, self.loss_sum.item()], dtype=torch.float64
        )
        self.engine.collectives.sum_(health)
        finite = health[0].item() == 0
        if not self._check_finite(
            health[1].item() if finite else math.nan,
            "the loss so far in this epoch" if finite else "a weight of the model",
        ):
            log.warning("snapshot of step %d not written: it would hold non-finite values", self.global_step)
            return False
        names = sorted(self.log_sums)
        sums = [self.loss_sum.item(), self.loss_count, *(self.log_sums[k].item() for k in names)]
        row = [self.row_sums["loss"].item(), self.row_count, *(self.row_sums[k].item() for k in names)]
        tag = uuid.uuid4().hex[:12] if self.lead else None  # the lead's name for this write, on every rank
        stream = self.data.train.state_dict() if hasattr(self.data.train, "state_dict") else None
        per_rank = self.engine.collectives.gather((self.engine.capture_rng(), sums, tag, row, stream))
        loop_parts = None
        if self.lead:
            loop_parts = dict(
                train_state={
                    "epoch": self.epoch,
                    "global_step": self.global_step,
                    "samples_in_epoch": self.samples_in_epoch,
                    "epoch_loss_per_rank": [r[1] for r in per_rank],
                    "log_names": names,
                    "row_sums_per_rank": [r[3] for r in per_rank],
                    "skipped_steps": self.skipped_steps,
                    **({"data_per_rank": [r[4] for r in per_rank]} if stream is not None else {}),
                    **self.watch.state(),
                },
                rng=[s for r in per_rank for s in r[0]],
                config=self.config,
                world_size=self.engine.processes,
                allreduce=self.engine.allreduce,
                metrics=self.history,
            )
        step, metrics = self.validated
        monitored = metrics.get(self.watch.name) if self.watch.name and step == self.global_step else None
        marks = dict(
            monitor=None if monitored is None else {"name": self.watch.name, "value": monitored}, ended=self.watch.ended
        )
        self.checkpointer.save(
            self.engine, loop_parts, self.global_step, self.epoch, end_of_epoch, tag=per_rank[0][2], **marks
        )
        self.written_step = self.global_step
        return True
