"""Start the workers: torch's elastic agent (torchrun's engine) called from Python, or in-process.

The driver hands `runner.launch.start.ddp_worker` (or `rpc_worker`) to `elastic_launch`
with the runtime decided in `runner.launch.runtime`. The agent sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT, restarts the worker group when a worker dies, and forwards SIGTERM/SIGINT to the
workers, which snapshot and exit.

Restarts: torch's agent restarts a failed group up to `launch.max_restarts` times, whatever the
failure. Ours (`RestartPolicyAgent`) also ends the job when an attempt fails exactly like the one
before (runner.train.faults: same exception, message and step), since a restart replays the same
steps into the same bug; killed processes and lost peers are restarted as before. Under launch=multinode it also says what
the rendezvous waits for and which node left or joined (runner.launch.membership).

What a launch sets in the driver's process (environment, warning options, the agent's log levels,
the start method, signal handlers) holds for that launch only (`launch_settings`): a sweep runs
its jobs one after another in one driver.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig

from runner.config import LaunchMode, Runtime, parse_nnodes
from runner.errors import full_errors_requested
from runner.launch.hangs import Hang, HangWatch, kill_all
from runner.launch.membership import Members, Rendezvous, waiting_reported
from runner.launch.start import ddp_worker, driver_environment, ensure_forkserver, rpc_worker, start_resource_tracker
from runner.train import faults

log = logging.getLogger(__name__)
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def launch(cfg: DictConfig, run_dir: Path, runtime: Runtime) -> Optional[dict[str, Any]]:
    """Run the job to completion; returns rank 0's summary. Raises the agent's errors."""
    if cfg.launch.mode == LaunchMode.local:
        return _launch_in_process(run_dir)
    return _launch_elastic(cfg, run_dir, runtime)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_in_process(run_dir: Path) -> dict[str, Any]:
    """launch=local: this very process is rank 0 of 1, so breakpoints and debuggers just work."""
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    from runner.train import worker

    with environment(env):
        return worker.main(str(run_dir), in_driver=True)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ while the block runs; each variable as it was before afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def elastic_config(cfg: DictConfig, run_dir: Path, nproc: int, log_dir: str, start_method: str = "spawn"):
    """torchrun's settings. `log_dir` receives the workers' error reports: kept off the run
    directory, so that a full disk there cannot also truncate the report of what went wrong."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig

    launch = cfg.launch
    if launch.mode == LaunchMode.multinode:
        min_nodes, max_nodes = parse_nnodes(launch.nnodes)
        endpoint = launch.rdzv_endpoint
        run_id = launch.rdzv_id or run_dir.name
        # c10d reads join_timeout ("timeout" is the other backends' name); last_call_timeout: how long
        # a rendezvous that has MIN nodes waits for more before it starts
        rdzv_configs: dict[str, Any] = {
            "timeout": launch.rdzv_timeout,
            "join_timeout": launch.rdzv_timeout,
            "last_call_timeout": launch.get("rdzv_last_call_timeout", 30),
        }
        if launch.node_rank is not None:  # node 0 hosts the rendezvous store, whatever its host names resolve to
            rdzv_configs["rank"] = launch.node_rank
            rdzv_configs["is_host"] = launch.node_rank == 0
    else:  # standalone: torchrun --standalone, a private rendezvous on a free local port
        min_nodes = max_nodes = 1
        endpoint = "localhost:0"
        run_id = str(uuid.uuid4())
        rdzv_configs = {"timeout": launch.rdzv_timeout}
    return LaunchConfig(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=nproc,
        run_id=run_id,
        rdzv_backend=launch.rdzv_backend,
        rdzv_endpoint=endpoint,
        rdzv_configs=rdzv_configs,
        max_restarts=launch.max_restarts,
        monitor_interval=launch.monitor_interval,
        start_method=start_method,
        shutdown_timeout=launch.stop_timeout,
        signals_to_handle=",".join(s.name for s in FORWARDED_SIGNALS),  # forwarded to the workers
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
    )


def _quiet_agent_logs() -> dict[str, int]:
    """Silence the agent's own records ("Received 2 death signal, shutting down workers",
    "Terminating process ... via signal SIGTERM" at a restart). torch gives each of its elastic
    loggers a level of its own, so setting the parent's would not reach them; they exist once the
    agent's modules are imported. Returns the levels they had."""
    importlib.import_module("torch.distributed.launcher.api")  # the agent's modules, and so their loggers

    quiet = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")
    levels = {}
    for name in [*quiet, *logging.root.manager.loggerDict]:
        if name.startswith(quiet) and name not in levels:
            levels[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(logging.CRITICAL)
    return levels


@contextmanager
def launch_settings(runtime: Runtime) -> Iterator[None]:
    """The process-wide settings a launch needs (environment, warning options, the agent's log
    levels, the start method, signal handlers), for the launch only: a sweep runs several jobs in
    one driver, and each starts from the driver's own settings (job 2 must not inherit job 1's
    CUDA_VISIBLE_DEVICES). While it holds, the agent reads its variables, and the workers get the
    environment as it is (runner.launch.start.driver_environment, taken when the launch starts;
    a spawned worker also inherits it), restarted workers included."""
    # Restarted gloo workers often fail to connect when they share the agent's rendezvous store
    # (a known upstream problem); a store of their own makes restarts reliable.
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if runtime.cuda_visible_devices is not None:  # this job's share of the GPUs, read by its workers
        env["CUDA_VISIBLE_DEVICES"] = runtime.cuda_visible_devices
    if runtime.omp_num_threads:
        env["OMP_NUM_THREADS"] = str(runtime.omp_num_threads)
    start_resource_tracker()  # quiet about the semaphores of killed workers, which it cleans up
    # the driver reports failures and stops itself, in a few lines
    levels = _quiet_agent_logs() if not full_errors_requested() else {}
    start_method = multiprocessing.get_start_method(allow_none=True)
    if start_method not in (None, "spawn", "fork", "forkserver"):
        # Inside a joblib (loky) sweep worker: a spawned child takes its parent's start method
        # ("loky") and fails to set it.
        multiprocessing.set_start_method("spawn", force=True)
    handlers = {sig: signal.getsignal(sig) for sig in FORWARDED_SIGNALS}
    try:
        with environment(env):
            yield
    finally:  # the agent leaves its handlers installed; between jobs of a sweep, signals act as usual
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if multiprocessing.get_start_method(allow_none=True) != start_method:
            multiprocessing.set_start_method(start_method, force=True)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _launch_elastic(cfg: DictConfig, run_dir: Path, runtime: Runtime) -> Optional[dict[str, Any]]:
    with launch_settings(runtime), tempfile.TemporaryDirectory(prefix="runner-elastic-") as error_reports:
        results = _run_agent(cfg, run_dir, runtime, Path(error_reports))
    return next((r for _, r in sorted(results.items()) if r), None) if results else None


def _run_agent(cfg: DictConfig, run_dir: Path, runtime: Runtime, error_reports: Path) -> dict[int, Any]:
    """The elastic agent's run of the job: {rank: what its worker returned}."""
    from torch.distributed.launcher.api import elastic_launch

    config = elastic_config(cfg, run_dir, int(runtime.nproc_per_node), str(error_reports), runtime.start_method)
    rdzv = None
    if cfg.launch.mode == LaunchMode.multinode:  # the rendezvous may wait long for the other nodes: say for what
        rdzv = Rendezvous(
            config.rdzv_endpoint,
            config.run_id,
            int(cfg.launch.rdzv_timeout),
            config.min_nodes,
            config.max_nodes,
            cfg.launch.node_rank,
        )
    entrypoint = rpc_worker if cfg.launch.mode == LaunchMode.rpc else ddp_worker
    if runtime.start_method == "forkserver":
        ensure_forkserver()  # running already, unless the command line kept the driver from warming it up
    records = error_reports / "failures"
    records.mkdir()
    watch = None
    if cfg.launch.get("hang_timeout") and cfg.launch.mode != LaunchMode.rpc:
        watch = HangWatch(records, run_dir, cfg.launch.hang_timeout, cfg.launch.collective_timeout)
    with restart_policy(records, rdzv, watch) as agents:
        try:
            return elastic_launch(config, entrypoint)(
                str(run_dir), {**driver_environment(), faults.FAILURE_RECORDS: str(records)}
            )
        except Exception as err:  # what the driver's report says about restarts
            if agents:
                err.restarts_done, err.repeated_failure = agents[-1].restarts_done, agents[-1].repeated
                err.recorded_failures = faults.recorded_failures(records, agents[-1].restarts_done)
                err.stop_request = agents[-1].stopped
                err.hang = agents[-1].hang.summary() if agents[-1].hang else None
            raise


def _agent_class():
    from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import SignalException

    class RestartPolicyAgent(LocalElasticAgent):
        """torch's LocalElasticAgent that does not restart what a restart cannot help.

        Workers that stopped on request (their snapshot is written; on a node whose workers got no
        signal, the stop came from another node) end the agent as a signal to the agent would:
        SignalException, which also keeps launch_agent from closing the rendezvous (whose store may
        have gone with the node that was stopped). A failure that a restart replays (no failed
        worker of attempt N was killed by a signal, and one recorded the failure signature of
        attempt N-1) leaves no restarts; torch's own agent does the same (`_remaining_restarts = 0`)
        when a worker is stuck."""

        def __init__(
            self,
            *args,
            failure_records: Path,
            rendezvous: Optional[Rendezvous] = None,
            hangs: Optional[HangWatch] = None,
            **kwargs,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.failure_records = failure_records
            self.rendezvous = rendezvous
            self.members = Members(rendezvous) if rendezvous is not None else None
            self.lost_step: Optional[int] = None
            self.hangs = hangs
            self.hang: Optional[Hang] = None  # the last attempt that hung: where each rank was
            self.restarts_done = 0  # of the attempt that failed last: 0 = the first attempt
            self.repeated: Optional[dict] = None
            self.stopped: Optional[dict] = None  # {"signal", "step"}: the workers stopped on request

        def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
            result = super()._monitor_workers(worker_group)
            if result.state == WorkerState.HEALTHY and self.hangs is not None:
                result = self._end_if_hung(worker_group, result)
            if result.state == WorkerState.FAILED:
                self.restarts_done = worker_group.spec.max_restarts - self._remaining_restarts
                killed = any(failure.exitcode < 0 for failure in result.failures.values())
                self.stopped = faults.stop_request(self.failure_records, self.restarts_done)
                if self.stopped is not None:  # a stop asked for (here, or on another node): end as on a signal
                    raise SignalException(
                        "the workers stopped on request", signal.Signals(self.stopped.get("signal") or signal.SIGTERM)
                    )
                self.lost_step = faults.lost_at_step(self.failure_records, self.restarts_done)
                if self._remaining_restarts > 0 and not killed:
                    self.repeated = faults.repeated_failure(self.failure_records, self.restarts_done)
                    if self.repeated is not None:
                        self._remaining_restarts = 0
            return result

        def _restart_workers(self, worker_group: WorkerGroup) -> None:
            # torch restarts healthy workers when a node waits to join (a failed group: after a failure)
            if worker_group.state == WorkerState.HEALTHY:
                log.info("a node waits to join: the workers stop at the next step with a snapshot, then go on with it")
            super()._restart_workers(worker_group)

        def _rendezvous(self, worker_group: WorkerGroup) -> None:
            """torch's rendezvous, saying what it waits for; then who left or joined since the last round.
            Workers this agent stopped to let a node join left stop records: not a stop of the job."""
            faults.clear_stops(self.failure_records, worker_group.spec.max_restarts - self._remaining_restarts)
            if self.rendezvous is None:
                return super()._rendezvous(worker_group)
            with waiting_reported(self.rendezvous, worker_group.spec.rdzv_handler):
                super()._rendezvous(worker_group)
            self.members.new_round(
                worker_group.store, worker_group.group_rank, worker_group.group_world_size, self.lost_step
            )
            self.lost_step = None

        def _end_if_hung(self, worker_group: WorkerGroup, result: RunResult) -> RunResult:
            """No worker moved for the limit: stacks to the logs, one table, then kill them (a failed attempt)."""
            found = self.hangs.check(worker_group.workers)
            if found is None:
                return result
            self.hang = self.hangs.report(worker_group.workers, found)
            log.error("%s", self.hang.table(self.hangs.run_dir))
            kill_all(worker_group.workers)
            deadline = time.monotonic() + 30
            while result.state == WorkerState.HEALTHY and time.monotonic() < deadline:
                time.sleep(0.05)
                result = super()._monitor_workers(worker_group)
            return result

    return RestartPolicyAgent


@contextmanager
def restart_policy(
    failure_records: Path, rendezvous: Optional[Rendezvous] = None, hangs: Optional[HangWatch] = None
) -> Iterator[list]:
    """While the job runs, `elastic_launch` builds a RestartPolicyAgent where it builds torch's
    LocalElasticAgent; yields the agents built (one per launch), for their restart counts.

    launch_agent (torch.distributed.launcher.api) takes no agent class, so its module's name for
    the class is swapped for the duration of the call and restored after; the driver runs one
    launch at a time. Without that name (another torch), jobs restart as torch decides."""
    import torch.distributed.launcher.api as launcher_api

    built: list = []
    original = getattr(launcher_api, "LocalElasticAgent", None)
    if original is None:
        yield built
        return
    policy_agent = _agent_class()

    def build(*args, **kwargs):
        agent = policy_agent(*args, failure_records=failure_records, rendezvous=rendezvous, hangs=hangs, **kwargs)
        built.append(agent)
        return agent

    launcher_api.LocalElasticAgent = build
    try:
        yield built
    finally:
        launcher_api.LocalElasticAgent = original
