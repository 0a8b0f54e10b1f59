"""Fault injection (`trainer.crash_at_step`, `trainer.crash_rank`), to rehearse recovery for real.

The chosen rank kills itself with SIGKILL (no cleanup, like an OOM kill) at the chosen global
step, on the first attempt only, so the workers the agent restarts go on and finish.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Optional

log = logging.getLogger(__name__)


def crash_step(trainer_cfg) -> Optional[int]:
    """The step at which this process must die, or None. `crash_rank` is the process's RANK."""
    if (trainer_cfg.crash_at_step and int(os.environ.get("RANK", "0")) == trainer_cfg.crash_rank
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        return int(trainer_cfg.crash_at_step)
    return None


def crash_now(step: int) -> None:
    log.warning("crash_at_step=%d: killing rank %s with SIGKILL (fault injection)", step, os.environ.get("RANK", "0"))
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
