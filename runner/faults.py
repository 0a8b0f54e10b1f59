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


def crash_step(trainer_cfg, rank: int) -> Optional[int]:
    """The step at which this rank must die, or None."""
    if (trainer_cfg.crash_at_step and rank == trainer_cfg.crash_rank
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        return int(trainer_cfg.crash_at_step)
    return None


def crash_now(step: int, rank: int) -> None:
    log.warning("crash_at_step=%d: killing rank %d with SIGKILL (fault injection)", step, rank)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
