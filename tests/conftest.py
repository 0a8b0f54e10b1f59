"""Helpers to run the real CLI in a subprocess and read what it leaves in the run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# What the end-to-end tests assert on is pinned, so they pass on any machine (1 core, many cores,
# a GPU): 2 CPU workers on gloo, no progress bar. None of these keys names the run directory.
WORKERS = ["launch.nproc_per_node=2", "launch.backend=gloo"]
QUIET = ["trainer.progress=false"]  # for launch=local, which always runs one process
FAST = [*QUIET, *WORKERS]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli_env() -> dict:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("RUNNER_DEBUG", None)
    for name in [n for n in env if n.startswith(("SLURM_", "PET_"))] + ["MASTER_ADDR", "MASTER_PORT", "NNODES"]:
        env.pop(name, None)  # launch=auto: a test placed by a CI scheduler would otherwise go multi-node
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 180, env: dict | None = None) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        env={**cli_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def start_cli(args: list[str], cwd: Path, env: dict | None = None, new_session: bool = False) -> subprocess.Popen:
    """The command started, output piped; `new_session`: in a process group of its own, as a shell
    starts it, so that the test can signal the whole group (os.killpg) as a terminal's Ctrl-C does."""
    return subprocess.Popen(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        env={**cli_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def stop_when(proc: subprocess.Popen, condition, sig: int = signal.SIGTERM, timeout: float = 60) -> tuple[str, str]:
    """Send `sig` to a started command once `condition()` holds (or `timeout` passed, or the command
    ended on its own); returns its (stdout, stderr)."""
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc.communicate(timeout=timeout)


def _no_constants(name: str):
    raise ValueError(f"metrics.jsonl holds {name}, which is not JSON")


def metrics(run_dir: Path, steps: bool = False) -> list[dict]:
    """metrics.jsonl, parsed strictly (NaN or Infinity would fail): the epoch and validation records, or
    with `steps` the training rows written every trainer.log_every steps (`"scope": "step"`)."""
    path = run_dir / "metrics.jsonl"
    rows = (
        [json.loads(line, parse_constant=_no_constants) for line in path.read_text().splitlines()]
        if path.exists()
        else []
    )
    return [r for r in rows if (r.get("scope") == "step") == steps]


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "snapshots" / "manifest.json").read_text())


def latest_snapshot(run_dir: Path) -> dict:
    entry = manifest(run_dir)["snapshots"][-1]
    return torch.load(run_dir / "snapshots" / entry["file"], map_location="cpu", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def snapshot_state(**model) -> dict:
    """The smallest complete snapshot (the parts every runner snapshot has) around `model`'s tensors."""
    from runner.snapshot import make_state

    return make_state(
        model=model,
        optimizer={},
        scheduler=None,
        train_state={},
        rng=[],
        config={},
        world_size=1,
        allreduce="gloo",
        metrics=[],
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def _proc_stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of a process, from /proc (Linux); None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), fields[19]


def process_tree(root: int) -> dict[tuple[int, str], str]:
    """The processes below `root` (its children, theirs, ...) as {(pid, start time): command line}:
    a test's own processes, never another test's or the machine's. Start times tell a pid reused later."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        stat = _proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
    found: dict[tuple[int, str], str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        stat = _proc_stat(pid)
        if stat is None:
            continue
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[(pid, stat[2])] = command
        todo += children.get(pid, [])
    return found


def running(processes) -> list[tuple[int, str]]:
    """Those of `processes` ((pid, start time) pairs, as process_tree gives them) still running; a
    zombie has ended."""
    return [
        (pid, start)
        for pid, start in processes
        if (stat := _proc_stat(pid)) is not None and stat[2] == start and stat[0] not in "ZX"
    ]
