"""Every `python -m runner ...` command that README.md and the headers of conf/experiment/ and
conf/hparams_search/ show, run as written, in that order, in a terminal.

The rest of the suite runs the configurations its authors chose (progress bar off, worker counts
pinned, models written for the tests); users copy these lines. So each one runs here as printed:
in a pseudo-terminal (stdout is a tty, so the progress bar is on, as in the user's shell), from a
fresh folder (outputs/ starts empty), in the order the files show them (report, export and sample
read the runs before them). Only size limits are appended: `trainer.max_steps`, the worker count,
`hydra.sweeper.n_trials`. A command that cannot run on one machine is skipped by SKIPPED below,
with the reason; any other command that does not exit 0 (or what EXIT_CODES says) fails the test.
Commands that are not the runner's (`pip install`, `mlflow ui`, `tensorboard`, `wandb sync`) are
not collected.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import select
import shlex
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import cli_env

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    ROOT / "README.md",
    *sorted((ROOT / "conf" / "experiment").glob("*.yaml")),
    *sorted((ROOT / "conf" / "hparams_search").glob("*.yaml")),
]
COMMAND = re.compile(r"^python -m runner(\.\w+)?(\s|$)")
INLINE_CODE = re.compile(r"`([^`]+)`")
PLACEHOLDER = re.compile(r"(^|\s)\.\.\.(\s|$)|<[^>]+>|\bRUN_DIR\b")

# Size limits appended to every training command (none of them names the run directory).
# 60 steps: past the first progress-bar log point (trainer.log_every=50) and several validations
# of experiment=digits, where users met the crashes this test exists for.
MAX_STEPS = 60
WORKERS = 2  # what launch.nproc_per_node=auto gives on the 2-core CI machine, pinned for bigger ones
TRIALS = 2
TIMEOUT_S = 150  # one command

# Commands that need what one machine does not have. Each entry: (text in the command, why).
SKIPPED = [
    (
        "launch.rdzv_endpoint=node0:",
        "needs a second machine reachable as node0 (tests/test_multinode.py runs two nodes on one machine)",
    ),
    ("hydra/launcher=slurm", "needs a SLURM cluster (tests/test_slurm.py runs the recipe with submitit_local)"),
    ("snapshot.dir=s3://", "needs an S3 bucket (tests/test_object_store.py runs it against moto's S3 server)"),
    (
        "--config-dir myconf",
        "needs the reader's own package (mypackage.models, mypackage.tasks), which the README only sketches",
    ),
]
PLACEHOLDER_REASON = "a placeholder (`...`, `<run directory>`, RUN_DIR) that the reader fills in"
EXIT_CODES: dict[str, int] = {}  # command text -> the exit code the README states, where it is not 0


@dataclass
class Command:
    where: str  # file:line
    text: str

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text, comments=True)

    @property
    def module(self) -> str:
        return self.argv[2]

    def skip_reason(self) -> str | None:
        if PLACEHOLDER.search(" ".join(self.argv)):
            return PLACEHOLDER_REASON
        return next((why for text, why in SKIPPED if text in self.text), None)


def _logical_lines(lines: list[str]) -> list[tuple[int, str]]:
    """(first line number, text) with backslash continuations joined."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, line in enumerate(lines, 1):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def _commands_in(text: str) -> list[str]:
    """The runner commands of one shell line: each `&&`-joined part that starts `python -m runner`."""
    return [part.strip() for part in text.split("&&") if COMMAND.match(part.strip())]


def _inline_commands(text: str) -> list[str]:
    """`python -m runner ...` in backticks, with at least one argument (a bare module name is a mention)."""
    return [
        span.strip()
        for span in INLINE_CODE.findall(text)
        if COMMAND.match(span.strip()) and len(shlex.split(span, comments=True)) > 3
    ]


def collect(path: Path) -> list[Command]:
    lines = path.read_text().splitlines()
    name = path.relative_to(ROOT)
    found: list[Command] = []
    if path.suffix == ".md":
        in_fence = False
        for number, line in _logical_lines(lines):
            if line.lstrip().startswith("```"):
                in_fence = not in_fence
                continue
            texts = _commands_in(line.strip()) if in_fence else _inline_commands(line)
            found += [Command(f"{name}:{number}", t) for t in texts]
    else:  # a YAML file's header comment
        for number, line in enumerate(lines, 1):
            if not line.startswith("#"):
                break
            body = line.lstrip("#").strip()
            texts = [body] if COMMAND.match(body) else _inline_commands(body)
            found += [Command(f"{name}:{number}", t) for t in texts]
    return found


def all_commands() -> list[Command]:
    return [c for path in SOURCES for c in collect(path)]


def with_limits(command: Command) -> list[str]:
    """The command's argv with `python` the interpreter running the tests, and the size limits appended."""
    argv = [sys.executable, *command.argv[1:]]
    args = argv[3:]
    if command.module != "runner" or any(a in ("--cfg", "-c", "--help", "-h", "--info", "-sc") for a in args):
        return argv
    argv.append(f"trainer.max_steps={MAX_STEPS}")
    if not any(a.startswith(("launch=", "launch.nproc_per_node=")) for a in args):
        argv.append(f"launch.nproc_per_node={WORKERS}")
    if any(a.startswith(("hparams_search=", "hydra/sweeper=")) for a in args):
        argv.append(f"hydra.sweeper.n_trials={TRIALS}")
    return argv


def run_in_terminal(argv: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run `argv` with stdin, stdout and stderr on a pseudo-terminal (120 columns), as a user's shell
    would; returns (exit code, everything it printed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {**cli_env(), "TERM": "xterm", "COLUMNS": "120"}
    env.pop("PYTHONUNBUFFERED", None)  # as in a shell: a tty makes stdout line-buffered anyway
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                chunks.append(f"\n[killed after {timeout:.0f} s]".encode())
                break
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:  # exited, and nothing more came: a leftover child may hold the tty
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError as err:  # EIO: every holder of the terminal has closed it
                if err.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    code = proc.wait(timeout=30)
    return code, b"".join(chunks).decode(errors="replace")


def test_every_command_is_collected_and_every_skip_is_used():
    """Cheap: the collector sees the commands a reader sees, and no skip outlives its command."""
    commands = all_commands()
    texts = [c.text for c in commands]
    assert "python -m runner model=linear trainer.save_every=10" in texts  # the first fenced block
    assert "python -m runner experiment=digits" in texts and "python -m runner launch=rpc model=mlp" in texts
    assert any(t.startswith("python -m runner.export outputs/digits") for t in texts)
    assert any(
        t.startswith("python -m runner --config-dir myconf dataset=cityscapes") and t.endswith("trainer.test=true")
        for t in texts
    )  # a continued line, joined
    assert any(c.where.startswith("conf/hparams_search/lr.yaml") for c in commands)
    assert not any(t.startswith("python -m runner.sample") and len(shlex.split(t)) == 3 for t in texts)  # a mention
    for text, _ in SKIPPED:
        assert any(text in c for c in texts), f"SKIPPED names {text!r}, which no command holds any more"
    skipped = [c for c in commands if c.skip_reason()]
    assert len(skipped) <= len(commands) // 4, [c.text for c in skipped]  # the list stays short
    argv = with_limits(Command("x", "python -m runner hparams_search=lr hydra.sweeper.n_trials=40"))
    assert argv[0] == sys.executable and argv[-1] == f"hydra.sweeper.n_trials={TRIALS}"  # the last value wins in Hydra


@pytest.mark.slow
def test_readme_and_config_header_commands_run_as_written(tmp_path):
    failures, ran = [], []
    for command in all_commands():
        if command.skip_reason():
            continue
        argv = with_limits(command)
        started = time.monotonic()
        code, output = run_in_terminal(argv, tmp_path, TIMEOUT_S)
        ran.append(f"{time.monotonic() - started:5.1f} s  exit {code}  {command.where}  {command.text}")
        expected = EXIT_CODES.get(command.text, 0)
        if code != expected or "Traceback (most recent call last)" in output:
            tail = "\n    ".join(output.replace("\r", "\n").splitlines()[-15:])
            failures.append(
                f"{command.where}: {command.text}\n  ran {shlex.join(argv[1:])}\n  exit {code}, "
                f"expected {expected}; last lines:\n    {tail}"
            )
        elif (
            command.module == "runner" and "--cfg" not in command.argv and not re.search(r"\r|already complete", output)
        ):
            failures.append(f"{command.where}: {command.text}\n  showed no progress bar in a terminal")
    print("\n".join(ran))
    assert not failures, f"{len(failures)} of {len(ran)} commands failed:\n\n" + "\n\n".join(failures)
