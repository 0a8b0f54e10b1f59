"""How worker processes start: forked from a server that imported torch while the driver composed
the config, instead of each worker importing torch again after `spawn` (~5 s here, most of a
short run's wall time).

- forkserver (the default on Linux): Python's multiprocessing fork server, started at the top of
  the driver with torch, torch._dynamo (which every optimizer imports on construction) and the
  worker code preloaded. It never touches CUDA, so its children may; it lives as long as the
  driver, so every job of a sweep and every restarted worker forks from it as well.
- fork: the workers are forked from the driver itself and inherit everything it imported,
  including the dataset's and model's own modules. CPU only: a process that has touched CUDA
  cannot be forked safely, so the driver refuses it when the workers use GPUs.
- spawn: a fresh interpreter per worker (torchrun's way; the default on macOS and Windows).

A server started before the driver knew the job has the environment of that moment; each worker
adopts the driver's environment as it is at launch (`settle_in`), so variables set per job
(CUDA_VISIBLE_DEVICES of a sweep slot, hydra.job.env_set) reach it as with spawn; variables that
torch or numpy read while being imported restart the server when they changed
(`ensure_forkserver`). Workers die with the driver, and the server ignores the signals sent to the
driver's process group (runner.launch.server), so a group-wide SIGTERM still gets the workers'
stop snapshot written.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import select
import signal
import sys
import threading
from typing import Any, Mapping, Optional, Sequence

# The environment this process started with (in a fork server's child: the server's).
INHERITED_ENV = dict(os.environ)

PRELOAD = ("runner.launch.server", "torch", "torch._dynamo", "runner.train.worker")
# Signals the server ignores (it shares the driver's process group); its children restore them.
SERVER_IGNORES = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
FORKED_FROM_SERVER = False  # set in the server (runner.launch.server), so in every worker it forks
# Variables read while torch and numpy are imported (logging, compiler and thread-pool settings):
# a server that imported them under other values would hand workers the wrong ones, so a launch
# whose values differ from the server's starts a new server. The two the driver sets itself at
# launch are left out: the agent reads the first, torch.set_num_threads applies the second.
IMPORT_TIME = ("TORCH", "PYTORCH", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_")
CPP_LOG_LEVEL = "TORCH_CPP_LOG_LEVEL"
SET_AT_LAUNCH = ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "OMP_NUM_THREADS", CPP_LOG_LEVEL)
_quiet_cpp = False  # the driver set CPP_LOG_LEVEL for itself (not for its workers)
_server_env: Optional[dict[str, str]] = None  # the environment the server this driver started began with
# Command lines whose driver starts no workers of its own, or not by forkserver.
NO_WARM_UP = re.compile(
    r"^(launch=local|launch\.mode=local|launch\.start_method=(spawn|fork)|hydra/launcher=.*"
    r"|-h|--help|--hydra-help|-c|--cfg|--info|--shell-completion|-sc)$"
)


def forkserver_by_default() -> bool:
    """Linux only: on macOS fork servers meet system frameworks that are not fork-safe."""
    return sys.platform == "linux" and "forkserver" in multiprocessing.get_all_start_methods()


def default_start_method() -> str:
    return "forkserver" if forkserver_by_default() else "spawn"


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (one helper process per driver) unless it runs.

    When a worker is killed (SIGKILL, the OOM killer, a restart), the tracker removes the semaphores
    it left and, at the driver's exit, warns that it did ("There appear to be 1 leaked semaphore
    objects"): noise, since it did the clean-up. It takes its warning filters from sys.warnoptions
    when it starts, so it is started here with that warning ignored, and sys.warnoptions is put back."""
    from multiprocessing import resource_tracker

    saved = list(sys.warnoptions)
    sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions[:] = saved


def start_forkserver() -> None:
    """Start (once per driver) the fork server, preloading torch and the worker code; returns at
    once: the server imports in its own process while this one goes on."""
    global _server_env
    from multiprocessing import forkserver

    start_resource_tracker()  # before the server, which would start it with the warning on
    multiprocessing.set_forkserver_preload(list(PRELOAD))
    forkserver.ensure_running()
    if _server_env is None:
        _server_env = dict(os.environ)


def _import_time_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME) and k not in SET_AT_LAUNCH}


def ensure_forkserver() -> None:
    """At launch: the running server if it imported under the driver's current settings, else a
    new one (e.g. hydra.job.env_set gave TORCH_LOGS after the server had started)."""
    if _server_env is not None and _import_time_env(_server_env) != _import_time_env(os.environ):
        stop_forkserver()
    start_forkserver()


def stop_forkserver(at_exit: bool = False) -> None:
    """Stop the server now (at the driver's exit: a server still importing, after a command that
    failed its checks, would otherwise go on for seconds), reaping it and removing its socket
    and, `at_exit`, the socket's folder."""
    global _server_env
    _server_env = None
    _stop_multiprocessing_fork_server(run_exit_clean_up=at_exit)


def _stop_multiprocessing_fork_server(run_exit_clean_up: bool) -> None:
    """Kill and reap multiprocessing's fork server and unlink its socket; `run_exit_clean_up`: run
    multiprocessing's own exit clean-up too (it removes the socket's temporary folder; the driver
    ends with os._exit, which skips it).

    The one place that touches private multiprocessing names, as there is no public way to stop its
    server: `forkserver._forkserver` is the server the "forkserver" start method (so the elastic
    agent) forks from, which a server of our own could not replace; a server still importing torch
    answers only to a signal, hence its pid (`_forkserver_pid`); `_stop_unlocked` is what
    multiprocessing's own tests stop it with; `util._run_finalizers` is what its exit hook runs.
    Without them (another Python), the server ends with the driver, as it would anyway."""
    from multiprocessing import forkserver, util

    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:  # gone already
        pass
    try:
        server._stop_unlocked()  # closes the alive pipe, reaps the server, unlinks its socket
    except (AttributeError, OSError):
        pass
    if run_exit_clean_up:
        try:
            util._run_finalizers()
        except Exception:  # clean-up only: never the reason a command fails
            pass


def warm_up(argv: Sequence[str]) -> None:
    """At the top of the driver: start the fork server now, so that its imports overlap with
    composing and checking the config, unless the command line rules it out."""
    if not forkserver_by_default() or any(NO_WARM_UP.match(arg) for arg in argv):
        return
    try:
        start_forkserver()
    except OSError:  # no room for another process: the launch will say so, or fall back to spawn
        pass


def die_with_driver(driver_pid: int) -> None:
    """In a worker: be killed as soon as the driver dies, so that a driver killed outright
    (SIGKILL, the OOM killer) leaves no workers training on into a run directory whose lock is
    gone. The driver is not always the parent (a fork server's children outlive it: they keep the
    server alive), so a thread waits on the driver's pidfd (Linux); elsewhere this does nothing."""
    try:
        fd = os.pidfd_open(driver_pid)
    except ProcessLookupError:  # gone already
        os.kill(os.getpid(), signal.SIGKILL)
        return
    except (AttributeError, OSError):  # no pidfds here (not Linux, or a kernel before 5.3)
        return

    def watch() -> None:
        select.select([fd], [], [])  # readable once the driver has exited
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="runner-driver-watch", daemon=True).start()


DRIVER_PID = "RUNNER_DRIVER_PID"  # in the environment handed to the workers (not the driver's own)


def driver_environment() -> dict[str, str]:
    """What the driver hands its workers at launch: its environment and its pid."""
    env = {**os.environ, DRIVER_PID: str(os.getpid())}
    if _quiet_cpp:
        env.pop(CPP_LOG_LEVEL, None)
    return env


def quiet_driver_cpp_warnings() -> None:
    """Before the driver imports torch: its C++ side logs errors only. When a node that hosted the
    rendezvous store goes, every store call of the elastic agent would print a C++ warning with its
    stack (`frame #0 ...`); the driver says what happened itself. Workers keep torch's level."""
    global _quiet_cpp
    if CPP_LOG_LEVEL not in os.environ and "torch" not in sys.modules:
        os.environ[CPP_LOG_LEVEL] = "ERROR"
        _quiet_cpp = True


def settle_in(driver_env: Mapping[str, str]) -> None:
    """First thing in a worker the agent started: the default signal actions (a fork server's
    child inherits the server's ignored ones), the driver's environment, and death with the driver."""
    if FORKED_FROM_SERVER:
        for sig in SERVER_IGNORES:
            signal.signal(sig, signal.SIG_DFL)
    adopt_driver_environment(driver_env)


def ddp_worker(run_dir: str, driver_env: Mapping[str, str]) -> Optional[dict[str, Any]]:
    """The elastic agent's entry point for a training worker: settle in, then train (runner.train.worker)."""
    settle_in(driver_env)
    from runner.train.worker import main

    return main(run_dir)


def rpc_worker(run_dir: str, driver_env: Mapping[str, str]) -> Optional[dict[str, Any]]:
    """The entry point for one role of a launch=rpc job (runner.train.engines.rpc.worker)."""
    settle_in(driver_env)
    from runner.train.engines.rpc.worker import main

    return main(run_dir)


def adopt_driver_environment(driver_env: Mapping[str, str]) -> None:
    """In a worker: take the driver's environment as it was at launch, keeping what the elastic
    agent set for this rank (RANK, MASTER_PORT, ...: whatever differs from what this process
    started with), and die with the driver."""
    if DRIVER_PID in driver_env:
        die_with_driver(int(driver_env[DRIVER_PID]))
        driver_env = {k: v for k, v in driver_env.items() if k != DRIVER_PID}
    set_for_rank = {k: v for k, v in os.environ.items() if INHERITED_ENV.get(k) != v}
    for key in list(os.environ):
        if key not in driver_env and key not in set_for_rank:
            del os.environ[key]
    for key, value in driver_env.items():
        if key not in set_for_rank and os.environ.get(key) != value:
            os.environ[key] = value
