"""docs/clusters.md and its manifests, checked against launch=auto: the sbatch script's environment is
simulated as SLURM would set it on each node, the manifests' pods get the variables their operator
(or Kubernetes) sets, and every node must be placed into one rendezvous with a rank of its own."""

from __future__ import annotations

import re
import shlex
import signal
from pathlib import Path

import pytest
import yaml
from check_helpers import compose_config
from omegaconf import OmegaConf

from runner.launch.schedulers import detect, parse_nodelist, resolve_launch

DOCS = Path(__file__).resolve().parent.parent / "docs"
TEXT = (DOCS / "clusters.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", TEXT, re.S)


def runner_overrides(command: str) -> list[str]:
    """The overrides of a `python -m runner ...` command, which must not type any address."""
    words = shlex.split(command)
    at = words.index("runner")
    assert words[at - 2 : at] == ["python", "-m"], command
    overrides = words[at + 1 :]
    assert not any(w.startswith(("launch=", "launch.rdzv", "launch.node_rank", "hydra.run.dir")) for w in overrides)
    return overrides


def placed(env: dict, overrides: list[str]):
    """The launch section that the command's config resolves to on a node with this environment."""
    cfg = compose_config(overrides)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    line = resolve_launch(cfg, env)
    return cfg.launch, line


def test_the_sbatch_script_places_every_node_and_requeues_on_its_own_signal():
    script = next(b for b in BLOCKS if b.startswith("#!/bin/bash"))
    options = dict(
        re.match(r"--([\w-]+)(?:=(.*))?", line.split(None, 1)[1]).groups()
        for line in script.splitlines()
        if line.startswith("#SBATCH")
    )
    assert options["ntasks-per-node"] == "1" and "requeue" in options
    sig, _, ahead = options["signal"].partition("@")
    assert not sig.startswith("B:"), "the batch shell alone would get it: srun's tasks (the runner) must"
    assert int(ahead) >= 60
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    overrides = runner_overrides(srun)
    assert any(o.startswith("name=") for o in overrides), "a requeued job must find the same run directory"
    exit_check = re.search(r'"\$code" -eq (\d+) \]; then scontrol requeue', script)
    assert exit_check and int(exit_check.group(1)) == 128 + signal.Signals["SIG" + sig]

    nodes = int(options["nodes"])
    hosts = [f"gpu{i:02d}" for i in range(1, nodes + 1)]
    assert parse_nodelist(f"gpu[01-{nodes:02d}]") == hosts
    placements = []
    for restart in (0, 1):
        for node in range(nodes):
            env = {  # what SLURM sets in each srun task of this script
                "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NAME": options["job-name"],
                "SLURM_JOB_NODELIST": f"gpu[01-{nodes:02d}]",
                "SLURM_NNODES": str(nodes),
                "SLURM_NODEID": str(node),
                "SLURM_PROCID": str(node),
                "SLURM_STEP_NUM_NODES": str(nodes),
                "SLURM_STEP_NUM_TASKS": str(nodes * int(options["ntasks-per-node"])),
                "SLURM_GPUS_ON_NODE": options["gpus-per-node"],
                "SLURM_RESTART_COUNT": str(restart),
            }
            launch, line = placed(env, overrides)
            placements.append((restart, launch))
            assert launch.mode == "multinode" and launch.node_rank == node and launch.nnodes == str(nodes)
            assert launch.nproc_per_node == options["gpus-per-node"]
            assert line.startswith("launch=auto: SLURM detected (SLURM_JOB_ID=4242")
    for restart in (0, 1):
        same = {(str(lc.rdzv_endpoint), str(lc.rdzv_id)) for r, lc in placements if r == restart}
        assert len(same) == 1 and next(iter(same))[0].startswith("gpu01:")
    ids = {str(lc.rdzv_id) for _, lc in placements}
    assert ids == {"slurm-4242-0", "slurm-4242-1"}  # a requeued job meets in a fresh rendezvous
    # The documented example line is what the detection prints.
    shown = re.search(r"^launch=auto: SLURM detected .*$", TEXT, re.M).group(0)
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
    }
    assert placed(env, overrides)[1] == shown


def test_the_srun_command_is_the_sbatch_command():
    srun = [line for block in BLOCKS for line in block.splitlines() if line.startswith("srun ")]
    assert len(srun) == 2 and runner_overrides(srun[0])[0] == runner_overrides(srun[1])[0]


def pod_env(container: dict, extra: dict, labels: dict) -> dict:
    env = dict(extra)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
            assert label, path
            env[item["name"]] = labels[label.group(1)]
    return env


def check_pod(spec: dict, workdir_root: str) -> dict:
    """The pod template's container: the runner's command, and the run directory on the shared volume."""
    (container,) = spec["containers"]
    claims = {v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    shared = [path for path, name in mounts.items() if name in claims]
    assert shared and container["workingDir"].startswith(shared[0] + "/") and shared[0] == workdir_root
    assert mounts.get("/dev/shm")
    runner_overrides(" ".join(container["command"]))
    return container


def test_the_pytorchjob_manifest_gives_every_pod_its_place():
    job = yaml.safe_load((DOCS / "pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    nproc = job["spec"]["nprocPerNode"]
    total = sum(r["replicas"] for r in replicas.values())
    name = job["metadata"]["name"]
    pods, commands = [], set()
    for kind in ("Master", "Worker"):
        for index in range(replicas[kind]["replicas"]):
            container = check_pod(replicas[kind]["template"]["spec"], "/shared")
            assert container["name"] == "pytorch"  # where the operator puts its variables
            commands.add(tuple(container["command"]))
            rank = index + (1 if kind == "Worker" else 0)
            operator = {  # training-operator v1: master env, then torchrun's PET_* variables
                "MASTER_ADDR": f"{name}-master-0",
                "MASTER_PORT": "23456",
                "PET_MASTER_ADDR": f"{name}-master-0",
                "PET_MASTER_PORT": "23456",
                "WORLD_SIZE": str(total * int(nproc)),
                "RANK": str(rank),
                "PET_NNODES": str(total),
                "PET_NODE_RANK": str(rank),
                "PET_NPROC_PER_NODE": nproc,
            }
            pods.append(detect(pod_env(container, operator, {})))
    assert len(commands) == 1, "every pod runs the same command"
    assert sorted(p.node_rank for p in pods) == list(range(total))
    assert {(p.scheduler, p.endpoint, p.rdzv_id, p.nnodes, p.nproc_per_node) for p in pods} == {
        ("Kubeflow PyTorchJob", f"{name}-master-0:23456", f"pytorchjob-{name}-master-0", str(total), nproc)
    }


def test_the_jobset_manifest_gives_every_pod_its_place():
    js = yaml.safe_load((DOCS / "jobset.yaml").read_text())
    assert (js["apiVersion"], js["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    assert js["spec"]["network"]["enableDNSHostnames"] is True
    (rjob,) = js["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 1
    spec = rjob["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
    container = check_pod(spec["template"]["spec"], "/shared")
    name = js["metadata"]["name"]
    labels = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": rjob["name"]}
    pods = [detect(pod_env(container, {"JOB_COMPLETION_INDEX": str(i)}, labels)) for i in range(spec["completions"])]
    head = f"{name}-{rjob['name']}-0-0.{name}"  # pod 0 of job 0, under the JobSet's headless service
    assert {(p.scheduler, p.host, p.nnodes, p.rdzv_id) for p in pods} == {
        ("JobSet", head, str(spec["completions"]), f"jobset-{name}")
    }
    assert [p.node_rank for p in pods] == list(range(spec["completions"]))


@pytest.mark.parametrize("name", ["pytorchjob.yaml", "jobset.yaml"])
def test_the_manifests_are_linked_from_the_page(name):
    assert f"]({name})" in TEXT
