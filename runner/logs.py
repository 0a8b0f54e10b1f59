"""Logging for the driver and the workers: stdlib `logging`, rank in every record.

Every rank writes `logs/rank-N.log`; all ranks also append to the run's `train.log`. Rank 0 logs
to the console at INFO, the other ranks only warnings, so the terminal stays readable.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from runner.layout import LOG_DIR, TRAIN_LOG, rank_log_path

FORMAT = "[%(asctime)s][rank %(rank)s][%(name)s][%(levelname)s] %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


class _TqdmConsoleHandler(logging.StreamHandler):
    """Console lines printed above rank 0's progress bar instead of through it.

    Records logged with `extra={"console": False}` (per-epoch metrics, which the bar already
    shows) go to the files only."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _console_wanted(record):
            return
        try:
            from tqdm import tqdm

            # One write per line (tqdm.write's default writes the newline apart): the ranks share
            # the terminal, and two ranks failing at once would otherwise run their lines together.
            tqdm.write(self.format(record) + "\n", file=self.stream, end="")
        except Exception:
            self.handleError(record)


class _LogFile(logging.FileHandler):
    """A log file that cannot be written (full disk, lost permission) says so once, in one line,
    instead of printing a traceback for every record; the real error surfaces on its own."""

    _reported = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self._reported:
            self._reported = True
            err = sys.exc_info()[1]
            sys.stderr.write(
                f"cannot write the log file {self.baseFilename} ({err}); its further records are dropped\n"
            )


class _RankFilter(logging.Filter):
    def __init__(self, rank: str) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def _console_wanted(record: logging.LogRecord) -> bool:
    return getattr(record, "console", True) is not False


def _not_console_only(record: logging.LogRecord) -> bool:
    """Records logged with `extra={"file": False}` (short console notes) skip the log files."""
    return getattr(record, "file", True) is not False


def setup_worker_logging(run_dir: Path, rank: int, in_driver: bool = False) -> list[logging.Handler]:
    """Files for this rank and the shared train.log; console for rank 0 (unless the driver has one).

    Returns the handlers added, which an in-driver worker (launch=local) removes when it is done,
    so that the next job of a sweep does not log into this run's files."""
    (Path(run_dir) / LOG_DIR).mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    rank_filter = _RankFilter(str(rank))
    formatter = logging.Formatter(FORMAT, DATEFMT)
    handlers: list[logging.Handler] = [
        _LogFile(rank_log_path(run_dir, rank), mode="a"),
        _LogFile(Path(run_dir) / TRAIN_LOG, mode="a"),
    ]
    if in_driver:  # launch=local: the driver's console handler stays; it skips file-only records too
        for old in list(root.handlers):
            if not isinstance(old, logging.FileHandler):
                old.addFilter(_console_wanted)
            elif Path(old.baseFilename) == (Path(run_dir) / TRAIN_LOG).absolute():
                root.removeHandler(old)  # the driver's own train.log handler: this rank's replaces it
    else:
        for old in list(root.handlers):
            root.removeHandler(old)
        console = _TqdmConsoleHandler(sys.stderr)
        console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        console.setFormatter(logging.Formatter("[rank %(rank)s] %(message)s"))
        handlers.append(console)
    for handler in handlers:
        handler.addFilter(rank_filter)
        if isinstance(handler, logging.FileHandler):
            handler.setFormatter(formatter)
            handler.addFilter(_not_console_only)
        root.addHandler(handler)
    logging.getLogger("torch.distributed").setLevel(logging.WARNING)
    return handlers


def add_driver_log_file(run_dir: Path) -> logging.Handler:
    handler = _LogFile(Path(run_dir) / TRAIN_LOG, mode="a")
    handler.addFilter(_RankFilter("driver"))
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    logging.getLogger().addHandler(handler)
    return handler


def tail(path: Path, lines: int = 10) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return []
