"""User-facing errors: one short paragraph instead of a traceback.

A `UserError` is a mistake the user can fix (a bad key, a missing file); the driver prints it and
exits with code 2. Anything else is a bug or a training failure and exits with code 1.
"""

from __future__ import annotations

import os
import sys

EXIT_TRAINING_FAILED = 1
EXIT_USER_ERROR = 2


def full_errors_requested() -> bool:
    """Tracebacks are shown only when asked for, the same switch Hydra uses."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("RUNNER_DEBUG") == "1"


class UserError(Exception):
    """A mistake in the command line, the config or the run directory.

    `key` and `value` say what is wrong, `allowed` what would be accepted, `fix` how to get there.
    """

    def __init__(self, key: str, value: object, problem: str, allowed: str = "", fix: str = ""):
        self.key, self.value, self.problem, self.allowed, self.fix = key, value, problem, allowed, fix
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"Error: {self.key}={_show(self.value)}: {self.problem}"]
        if self.allowed:
            lines.append(f"  allowed: {self.allowed}")
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)


def _show(value: object) -> str:
    text = str(value)
    return text if len(text) <= 200 else text[:197] + "..."


def report_user_error(err: UserError) -> None:
    print(err.render(), file=sys.stderr)
