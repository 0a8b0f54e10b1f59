"""Imported first by the fork server (see runner.launch.start), and nowhere else.

The server lives in the driver's process group, so a signal sent to the whole group (`timeout`,
SLURM's preemption notice, a terminal hang-up) reaches it too; it must survive, or the agent would
read every worker as failed while they write their stop snapshot. Its children put the default
actions back (`runner.launch.start.settle_in`). Thread pools that numpy's BLAS sizes when it is
loaded get one thread, as torchrun gives every worker (OMP_NUM_THREADS=1); torch's own pool is set
per worker from the runtime record.
"""

import os
import signal

from runner.launch import start

for _sig in start.SERVER_IGNORES:
    signal.signal(_sig, signal.SIG_IGN)
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
start.FORKED_FROM_SERVER = True  # inherited by every worker forked from here
