"""launch=auto: where this node stands, read from the scheduler's environment, so that the same
command runs on every node of a SLURM allocation or a Kubernetes job with no address typed.

`detect(env)` is pure (a mapping in, a `Placement` or None out) and raises UserError for variables
that contradict each other or are only half set, before anything starts. Checked in this order:

- SLURM (`srun python -m runner ...`, submitit's multi-node jobs): the nodes from
  SLURM_JOB_NODELIST (bracket syntax, the head node first), this node from SLURM_NODEID, the
  rendezvous id from SLURM_JOB_ID and SLURM_RESTART_COUNT (a requeued job meets in a fresh
  rendezvous, and resumes from its run directory, which the config names, not the job);
- Kubeflow's PyTorchJob: the PET_* variables torchrun would read (PET_NNODES, PET_NODE_RANK,
  PET_RDZV_ENDPOINT, ...), else MASTER_ADDR/MASTER_PORT, WORLD_SIZE (the pods) and RANK (this pod);
- a torchrun-style environment (MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK), as a JobSet
  manifest sets it (the node rank may come from an Indexed Job's JOB_COMPLETION_INDEX).

`resolve_launch(cfg, env)` turns launch=auto into launch=standalone or launch=multinode with the
rendezvous filled in; what the user set explicitly (launch.rdzv_endpoint, rdzv_id, nnodes=MIN:MAX)
wins over what the scheduler says.
"""

from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass, field
from typing import Mapping, Optional

from omegaconf import DictConfig, open_dict

from runner.config import LaunchMode, parse_nnodes
from runner.errors import UserError

log = logging.getLogger("runner")
PORT_BASE, PORT_SPAN = 20000, 10000  # SLURM: a port per job id, below Linux's ephemeral range (32768+)
TORCHRUN_VARS = ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK")
FIX = "set by the scheduler: run inside the job as it set it up, or pass launch=standalone to ignore the environment"


@dataclass(frozen=True)
class Placement:
    """This node's place in a multi-node job, as a scheduler's environment describes it."""

    scheduler: str  # "SLURM", "Kubeflow PyTorchJob", "JobSet", "torchrun-style environment"
    why: tuple[str, ...]  # the variables it was read from, NAME=value
    nnodes: str  # N or MIN:MAX
    node_rank: int
    host: str  # the rendezvous host (the head node)
    port: int
    rdzv_id: str
    nproc_per_node: Optional[str] = None  # what the scheduler allocated per node (GPUs), if it says
    hosts: tuple[str, ...] = field(default_factory=tuple)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def max_nodes(self) -> int:
        return (parse_nnodes(self.nnodes) or (1, 1))[1]


def parse_nodelist(text: str) -> list[str]:
    """SLURM's compact host list, in order: "gpu[01-04,07],cpu1" -> gpu01..gpu04, gpu07, cpu1.
    Zero padding is kept; several bracket groups in one name multiply ("r[1-2]n[1-2]")."""
    hosts: list[str] = []
    for item in _split_top_level(text):
        hosts.extend(_expand(item, text))
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth not in (0, 1):
            raise _bad_nodelist(text, "unbalanced brackets")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise _bad_nodelist(text, "unbalanced brackets")
    items.append(text[start:])
    if any(not item.strip() for item in items):
        raise _bad_nodelist(text, "an empty host name")
    return [item.strip() for item in items]


def _expand(item: str, text: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if not match:
        if "[" in item or "]" in item:
            raise _bad_nodelist(text, "unbalanced brackets")
        return [item]
    prefix, rest = item[: match.start()], _expand(item[match.end() :], text) if item[match.end() :] else [""]
    names = []
    for part in match.group(1).split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
            raise _bad_nodelist(text, f"'{part}' is not a number or a range LO-HI")
        for number in range(int(lo), int(hi if dash else lo) + 1):
            names.extend(prefix + str(number).zfill(len(lo)) + tail for tail in rest)
    return names


def _bad_nodelist(text: str, problem: str) -> UserError:
    return UserError(
        "SLURM_JOB_NODELIST",
        text,
        f"cannot be read as a SLURM host list: {problem}",
        "host names and bracket ranges, e.g. gpu[01-04,07],cpu1",
        "run inside an allocation (srun/sbatch) that set it, or pass launch=multinode with launch.rdzv_endpoint",
    )


def _int(env: Mapping[str, str], name: str, at_least: int = 0) -> int:
    value = env[name]
    if not value.strip().isdigit() or int(value) < at_least:
        raise UserError(
            name,
            value,
            "is not a count or rank this launch can use",
            f"an integer >= {at_least}",
            f"unset {name} or set it to what the scheduler meant; or pass launch=standalone to ignore the environment",
        )
    return int(value)


def _half_set(present: list[str], missing: list[str], where: str) -> UserError:
    return UserError(
        missing[0],
        "(unset)",
        f"{where}: {', '.join(present)} set but {', '.join(missing)} not, so the nodes cannot meet",
        f"all of {', '.join(present + missing)}, or none",
        "set the missing variables on every node (docs/clusters.md), or pass launch=standalone to ignore them",
    )


def _shown(env: Mapping[str, str], *names: str) -> tuple[str, ...]:
    return tuple(f"{n}={env[n]}" for n in names if n in env)


def detect(env: Mapping[str, str]) -> Optional[Placement]:
    """The placement the environment describes, or None when no scheduler is recognised."""
    inside = [n for n in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK") if n in env]
    if inside:
        raise UserError(
            inside[0],
            env[inside[0]],
            "the command runs inside a torchrun/elastic worker; the runner starts the workers itself",
            "python -m runner started once per node, by the scheduler or by hand",
            "run `python -m runner ...` directly (srun / the pod's command), not under torchrun",
        )
    slurm = "SLURM_JOB_ID" in env
    kubeflow = any(n.startswith("PET_") for n in env)
    if slurm and kubeflow:
        raise UserError(
            "SLURM_JOB_ID",
            env["SLURM_JOB_ID"],
            "both SLURM and Kubeflow (PET_*) variables are set: which one places this node is ambiguous",
            "the variables of one scheduler",
            "unset the PET_* variables inside SLURM jobs (or SLURM_* in pods), or pass launch=multinode explicitly",
        )
    if slurm:
        return _slurm(env)
    if kubeflow:
        return _pytorchjob(env)
    if "WORLD_SIZE" in env and "RANK" in env and "MASTER_ADDR" in env and "NNODES" not in env:
        return _pytorchjob(env)  # a PyTorchJob without torchrun's PET_* variables (older operators)
    if any(n in env for n in TORCHRUN_VARS):
        return _torchrun_style(env)
    return None


def _slurm(env: Mapping[str, str]) -> Placement:
    nodelist_var = next((n for n in ("SLURM_JOB_NODELIST", "SLURM_NODELIST") if n in env), None)
    if nodelist_var is None:
        raise _half_set(["SLURM_JOB_ID"], ["SLURM_JOB_NODELIST"], "SLURM")
    hosts = parse_nodelist(env[nodelist_var])
    nnodes_var = next((n for n in ("SLURM_NNODES", "SLURM_JOB_NUM_NODES") if n in env), None)
    nnodes = _int(env, nnodes_var, 1) if nnodes_var else len(hosts)
    if nnodes != len(hosts):
        raise UserError(
            nnodes_var or "SLURM_NNODES",
            nnodes,
            f"disagrees with {nodelist_var}={env[nodelist_var]} ({len(hosts)} hosts)",
            "the node count of the host list",
            "run inside the allocation as SLURM set it up, without changing these variables",
        )
    if "SLURM_NODEID" not in env and nnodes > 1:
        raise _half_set(["SLURM_JOB_ID", nodelist_var], ["SLURM_NODEID"], "SLURM, several nodes")
    node_rank = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    if node_rank >= nnodes:
        raise UserError("SLURM_NODEID", node_rank, f"is not a node of the {nnodes} listed", f"0 to {nnodes - 1}", FIX)
    tasks, nodes = env.get("SLURM_STEP_NUM_TASKS"), env.get("SLURM_STEP_NUM_NODES")
    if tasks and nodes and tasks.isdigit() and nodes.isdigit() and int(tasks) != int(nodes):
        raise UserError(
            "SLURM_STEP_NUM_TASKS",
            tasks,
            f"srun started {tasks} tasks on {nodes} nodes; the runner starts a node's workers itself",
            "one task per node",
            "srun --ntasks-per-node=1 (sbatch: #SBATCH --ntasks-per-node=1), see docs/clusters.md",
        )
    if "NNODES" in env and env["NNODES"] != str(nnodes):
        raise UserError(
            "NNODES",
            env["NNODES"],
            f"disagrees with the SLURM allocation ({nnodes} nodes in {nodelist_var})",
            f"unset, or {nnodes}",
            "unset NNODES inside SLURM jobs: the allocation says how many nodes there are",
        )
    job, restart = env["SLURM_JOB_ID"], env.get("SLURM_RESTART_COUNT", "0")
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT", "").isdigit() else _job_port(job)
    gpus_var = next((n for n in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE") if n in env), None)
    gpus = env[gpus_var].rpartition(":")[2] if gpus_var else ""  # --gpus-per-node=a100:8 gives "a100:8"
    why = _shown(env, "SLURM_JOB_ID", nodelist_var, "SLURM_NODEID", "SLURM_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT")
    return Placement(
        scheduler="SLURM",
        why=why + _shown(env, gpus_var) if gpus.isdigit() and int(gpus) > 0 else why,
        nnodes=str(nnodes),
        node_rank=node_rank,
        host=env.get("MASTER_ADDR") or hosts[0],
        port=port,
        rdzv_id=f"slurm-{job}-{restart}",
        nproc_per_node=gpus if gpus.isdigit() and int(gpus) > 0 else None,
        hosts=tuple(hosts),
    )


def _job_port(job: str) -> int:
    """A port per job, the same on every node: two jobs sharing a head node do not collide."""
    number = int(job) if job.isdigit() else zlib.crc32(job.encode())
    return PORT_BASE + number % PORT_SPAN


def _pytorchjob(env: Mapping[str, str]) -> Placement:
    nnodes_var = "PET_NNODES" if "PET_NNODES" in env else "WORLD_SIZE"
    rank_var = "PET_NODE_RANK" if "PET_NODE_RANK" in env else "RANK"
    addr_var = "PET_MASTER_ADDR" if "PET_MASTER_ADDR" in env else "MASTER_ADDR"
    port_var = "PET_MASTER_PORT" if "PET_MASTER_PORT" in env else "MASTER_PORT"
    if "PET_RDZV_ENDPOINT" in env:
        host, _, port_text = env["PET_RDZV_ENDPOINT"].rpartition(":")
        where = ("PET_RDZV_ENDPOINT",)
    else:
        host, port_text, where = env.get(addr_var, ""), env.get(port_var, ""), (addr_var, port_var)
    needed = {nnodes_var, rank_var, *where}
    missing = sorted(n for n in needed if not env.get(n))
    if missing:
        raise _half_set(sorted(n for n in env if n.startswith("PET_") or n in needed), missing, "Kubeflow PyTorchJob")
    if not host or not port_text.isdigit():
        raise UserError(
            where[0],
            env[where[0]],
            "is not a rendezvous address",
            "host:port (PET_RDZV_ENDPOINT) or MASTER_ADDR with a numeric MASTER_PORT",
            "set by the training operator; check the PyTorchJob's elasticPolicy or env (docs/clusters.md)",
        )
    nnodes = env[nnodes_var]
    if parse_nnodes(nnodes) is None:
        raise UserError(nnodes_var, nnodes, "is not a node count", "N or MIN:MAX with 1 <= MIN <= MAX", FIX)
    lo, hi = parse_nnodes(nnodes)
    node_rank = _int(env, rank_var)
    if node_rank >= hi:
        raise UserError(
            rank_var, node_rank, f"is not a node of the {hi} in {nnodes_var}={nnodes}", f"0 to {hi - 1}", FIX
        )
    nproc = env.get("PET_NPROC_PER_NODE")
    rdzv_id = env.get("PET_RDZV_ID") or f"pytorchjob-{host}"
    return Placement(
        scheduler="Kubeflow PyTorchJob",
        why=_shown(env, nnodes_var, rank_var, *where, "PET_RDZV_ID", "PET_NPROC_PER_NODE"),
        nnodes=f"{lo}:{hi}" if lo != hi else str(hi),
        node_rank=node_rank,
        host=host,
        port=int(port_text),
        rdzv_id=rdzv_id,
        nproc_per_node=nproc or None,
    )


def _torchrun_style(env: Mapping[str, str]) -> Placement:
    indexed = "JOB_COMPLETION_INDEX" in env  # a Kubernetes Indexed Job, as JobSet runs them
    rank_var = "NODE_RANK" if "NODE_RANK" in env or not indexed else "JOB_COMPLETION_INDEX"
    needed = ["MASTER_ADDR", "MASTER_PORT", "NNODES", rank_var]
    missing = [n for n in needed if not env.get(n)]
    if missing:
        raise _half_set([n for n in needed if n not in missing], missing, "torchrun-style environment")
    if indexed and env.get("NODE_RANK", env["JOB_COMPLETION_INDEX"]) != env["JOB_COMPLETION_INDEX"]:
        raise UserError(
            "NODE_RANK",
            env["NODE_RANK"],
            f"disagrees with JOB_COMPLETION_INDEX={env['JOB_COMPLETION_INDEX']} (this pod's index in its Job)",
            "the same value, or NODE_RANK unset",
            "leave NODE_RANK out of the manifest: the pod's index is its node rank",
        )
    nnodes = env["NNODES"]
    if parse_nnodes(nnodes) is None:
        raise UserError("NNODES", nnodes, "is not a node count", "N or MIN:MAX with 1 <= MIN <= MAX", FIX)
    hi = parse_nnodes(nnodes)[1]
    node_rank = _int(env, rank_var)
    if node_rank >= hi:
        raise UserError(rank_var, node_rank, f"is not a node of the {hi} in NNODES={nnodes}", f"0 to {hi - 1}", FIX)
    port = _int(env, "MASTER_PORT", 1)
    jobset = env.get("JOBSET_NAME")
    return Placement(
        scheduler="JobSet" if jobset or indexed else "torchrun-style environment",
        why=_shown(env, "MASTER_ADDR", "MASTER_PORT", "NNODES", rank_var, "JOBSET_NAME"),
        nnodes=nnodes,
        node_rank=node_rank,
        host=env["MASTER_ADDR"],
        port=port,
        rdzv_id=env.get("RDZV_ID") or (f"jobset-{jobset}" if jobset else f"{env['MASTER_ADDR']}-{port}"),
    )


def describe(placement: Placement, launch: DictConfig) -> str:
    """The console's first line under launch=auto: what was detected, from which variables, and what it means."""
    head = f"launch=auto: {placement.scheduler} detected ({', '.join(placement.why)}): "
    if launch.mode == LaunchMode.standalone:
        return head + "a single node, launch=standalone"
    return head + (
        f"node {launch.node_rank} of {launch.nnodes}, rendezvous {launch.rdzv_endpoint} "
        f"(id {launch.rdzv_id}), launch=multinode"
    )


def resolve_launch(cfg: DictConfig, env: Mapping[str, str]) -> Optional[str]:
    """launch=auto made concrete in `cfg` (in place); returns the line that says which scheduler was
    detected and why, or None (not auto, or no scheduler: launch=standalone, which the driver's
    first line names anyway). Raises UserError before anything starts."""
    launch = cfg.launch
    if launch.mode != LaunchMode.auto:
        return None
    placement = detect(env)
    nnodes = str(launch.nnodes)
    wanted = parse_nnodes(nnodes) if nnodes != "auto" else None
    if nnodes != "auto" and wanted is None:
        raise UserError(
            "launch.nnodes",
            nnodes,
            "is not a node count",
            "auto, N or MIN:MAX with 1 <= MIN <= MAX",
            "e.g. launch.nnodes=1:4",
        )
    with open_dict(cfg):
        if placement is None:  # nothing to place this node: one machine, unless an endpoint was given
            if (wanted not in (None, (1, 1)) or launch.rdzv_endpoint) and (wanted is None or not launch.rdzv_endpoint):
                raise UserError(
                    "launch.nnodes",
                    nnodes,
                    "launch=auto found no scheduler to place several nodes (no SLURM_JOB_ID, PET_*, MASTER_ADDR)",
                    "auto or 1 outside a scheduler; N or MIN:MAX together with launch.rdzv_endpoint",
                    "pass launch=multinode launch.nnodes=N launch.rdzv_endpoint=<host:port> on every node",
                )
            launch.mode = LaunchMode.multinode if launch.rdzv_endpoint else LaunchMode.standalone
            launch.nnodes = nnodes if launch.rdzv_endpoint else "1"
            return None
        if wanted is not None and wanted[0] > placement.max_nodes:
            raise UserError(
                "launch.nnodes",
                nnodes,
                f"asks for at least {wanted[0]} nodes; {placement.scheduler} placed {placement.nnodes}",
                f"auto, or MIN:MAX with MIN <= {placement.max_nodes}",
                f"e.g. launch.nnodes=1:{placement.max_nodes} to continue on fewer nodes after a loss",
            )
        launch.nnodes = nnodes if wanted is not None else placement.nnodes
        if placement.nproc_per_node and str(launch.nproc_per_node) == "auto":
            launch.nproc_per_node = placement.nproc_per_node
        if (parse_nnodes(launch.nnodes) or (1, 1))[1] == 1 and not launch.rdzv_endpoint:
            launch.mode = LaunchMode.standalone
            return describe(placement, launch)
        launch.mode = LaunchMode.multinode
        launch.rdzv_endpoint = launch.rdzv_endpoint or placement.endpoint
        launch.rdzv_id = launch.rdzv_id or placement.rdzv_id
        if launch.node_rank is None:
            launch.node_rank = placement.node_rank
        return describe(placement, launch)
