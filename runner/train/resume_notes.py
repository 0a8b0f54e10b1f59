"""What a resume changed: one line of the config keys that differ from the snapshot's, and a warning
when a schedule restored from the snapshot was planned for another length than the run now has.

A resume restores the scheduler's state, its planned length included (WarmupCosine's total_steps,
CosineAnnealingLR's T_max): raising trainer.max_steps from 40 to 50 keeps a cosine planned for 40,
so the last 10 steps run at the schedule's floor. That is exact resumption, and easy to miss.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from runner.config import Interval
from runner.snapshot import format as snap

log = logging.getLogger(__name__)

# Resolved-config entries that are records, not settings (the driver's runtime, the run directory).
NOISE = ("runtime", "run_dir", "identity", "hydra")
PER_NODE = ("launch.node_rank",)  # differs from node to node of one job: where rank 0 runs, not a change
LENGTH_KEYS = ("total_steps", "T_max", "total_iters")  # a scheduler's planned length, by torch's names
SHOWN = 12  # changes listed on the line; the rest are counted


def resume_noting_changes(loop, state: dict[str, Any], entry: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """`loop.resume(state, entry)`, returning the notes to log after it (the lead's only): what changed in
    the config since the snapshot, and a schedule whose planned length no longer matches the run."""
    scheduler = loop.engine.scheduler
    planned = schedule_lengths(scheduler)  # as built for this run, before the snapshot's state replaces it
    loop.resume(state, entry)
    if not loop.lead:
        return []
    notes = []
    changes = config_changes(state.get(snap.CONFIG_KEY) or {}, config)
    if changes:
        more = f" (and {len(changes) - SHOWN} more)" if len(changes) > SHOWN else ""
        notes.append("changed since the snapshot: " + ", ".join(changes[:SHOWN]) + more)
    note = schedule_note(planned, schedule_lengths(scheduler), scheduler, config)
    if note:
        notes.append(note)
    return notes


def log_notes(notes: list[str]) -> None:
    for note in notes:
        (log.warning if note.startswith("scheduler") else log.info)("%s", note)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key old -> new` for every setting both configs have and that differs, in key order."""
    before, after = _flat(old), _flat(new)
    return [
        f"{k} {_show(before[k])} -> {_show(after[k])}"
        for k in sorted(before.keys() & after.keys())
        if before[k] != after[k] and k.split(".", 1)[0] not in NOISE and k not in PER_NODE
    ]


def schedule_lengths(scheduler: Any) -> dict[str, int]:
    if scheduler is None or not hasattr(scheduler, "state_dict"):
        return {}
    state = scheduler.state_dict()
    return {k: int(state[k]) for k in LENGTH_KEYS if isinstance(state.get(k), (int, float))}


def schedule_note(
    planned: dict[str, int], restored: dict[str, int], scheduler: Any, config: dict[str, Any]
) -> Optional[str]:
    """A warning naming the scheduler's restored length, the run's, and what to do about it."""
    key = next((k for k in LENGTH_KEYS if k in planned and k in restored and planned[k] != restored[k]), None)
    if key is None:
        return None
    node = config.get("scheduler") or {}
    unit = "epochs" if node.get("interval", Interval.epoch) == Interval.epoch else "steps"
    then, now = restored[key], planned[key]
    name = type(scheduler).__name__
    after = (
        f"the rate stays at its floor after {unit[:-1]} {then}"
        if name == "WarmupCosine" and then < now
        else f"from {unit[:-1]} {then} on it runs past its planned end"
        if then < now
        else f"it ends at {unit[:-1]} {then}, before the run does"
    )
    return (
        f"scheduler: {name} was planned for {then} {unit} ({key}) when the run began, and the run now has {now}: "
        f"{after}. A resume keeps the snapshot's schedule; for one planned for {now} {unit} pass "
        f"snapshot.resume=never (start over), or start a new run from this one's weights with "
        f"trainer.init_from=<this run directory> (fresh optimizer and schedule)"
    )


def _flat(node: Any, prefix: str = "", out: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    out = {} if out is None else out
    if isinstance(node, dict) and node:
        for k, v in node.items():
            _flat(v, f"{prefix}{k}.", out)
    else:
        out[prefix[:-1]] = node
    return out


def _show(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
