"""Nodes that come and go: "nodes" are driver processes on 127.0.0.1 placed by a simulated SLURM
allocation (launch=auto, no address typed), one worker each (the machine has 2 shared cores)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_same_weights, cli_env, run_cli

pytestmark = pytest.mark.slow
TASK = [
    "name=elastic",
    "model=mlp",
    "dataset.size=4096",
    "trainer.total_epochs=100000",  # never reached: every phase ends with a stop
    "trainer.save_every_steps=20",
    "trainer.progress=false",
    "launch.backend=gloo",
    "launch.nproc_per_node=1",
]
ELASTIC = ["launch.nnodes=1:2", "launch.rdzv_last_call_timeout=2"]


class Node:
    """One node's `python -m runner` (its own process group, output in files: it runs long)."""

    def __init__(self, workdir: Path, rank: int, tag: str, restart: int = 0, env=None, args=ELASTIC, task=TASK) -> None:
        env = {
            **cli_env(),
            **(
                env
                or {
                    "SLURM_JOB_ID": "31337",
                    "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1",
                    "SLURM_NNODES": "2",
                    "SLURM_NODEID": str(rank),
                    "SLURM_RESTART_COUNT": str(restart),
                }
            ),
        }
        self.out = workdir / f"node-{tag}.err"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner", *task, *args],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.out.open("w"),
            start_new_session=True,
        )

    def text(self) -> str:
        return self.out.read_text()

    def wait(self, timeout: float = 180) -> int:
        return self.proc.wait(timeout=timeout)


def wait_until(condition, what: str, timeout: float = 180, nodes: tuple = ()) -> None:
    deadline = time.time() + timeout
    while not condition():
        ended = [n for n in nodes if n.proc.poll() is not None]
        assert time.time() < deadline and not ended, f"{what}: " + "\n".join(n.text()[-3000:] for n in nodes)
        time.sleep(0.1)


def snapshots_written(log: Path) -> list[int]:
    return [int(s) for s in re.findall(r"snapshot snapshot-(\d+)\.pt written", log.read_text())] if log.exists() else []


def test_a_lost_node_is_named_the_job_shrinks_grows_back_stops_everywhere_and_requeues(workdir):
    run_dir = workdir / "outputs" / "elastic"
    log = run_dir / "train.log"
    head, other = Node(workdir, 0, "0"), Node(workdir, 1, "1")
    wait_until(lambda: any(s >= 40 for s in snapshots_written(log)), "a snapshot at step 40", nodes=(head, other))
    assert "global batch 32 (32 per worker x 1 worker) on 1 node, up to 2 (launch.nnodes=1:2)" in head.text()
    waiting = "waiting for up to 1 more node at 127.0.0.1:21337, rendezvous id slurm-31337-0, timeout 900 s"
    assert waiting in head.text(), head.text()
    os.killpg(other.proc.pid, signal.SIGKILL)  # the node is gone: its driver, agent and workers at once
    other.wait()
    wait_until(lambda: " left at step " in head.text(), "node 0 says that node 1 left", nodes=(head,))
    left = re.search(r"node 1 \((.+)\) left at step (\d+): continuing on 1 node, from the last snapshot", head.text())
    assert left, head.text()
    assert "frame #" not in head.text() and "GLHF" not in head.text()  # no C++ stack, no gloo chatter
    assert re.search(r"still waiting for up to 1 more node at .*: \d+ s waited", head.text()), head.text()
    wait_until(lambda: "resumed from" in log.read_text().split(left.group(0))[-1], "training on 1 node", nodes=(head,))

    rejoined = Node(workdir, 1, "1b")
    wait_until(lambda: "node 1 (" in head.text() and " joined: continuing on 2 nodes" in head.text(), "the rejoin")
    after_join = len(snapshots_written(log))
    wait_until(
        lambda: len(snapshots_written(log)) > after_join + 1, "training on 2 nodes again", nodes=(head, rejoined)
    )

    rejoined.proc.send_signal(signal.SIGTERM)  # a stop of any node is a stop for all
    codes = head.wait(), rejoined.wait()
    assert codes == (128 + signal.SIGTERM,) * 2, head.text()[-3000:] + rejoined.text()[-3000:]
    for node in (head, rejoined):
        text = node.text()
        assert "Stopped by SIGTERM: a snapshot of the last step" in text, text[-3000:]
        assert "training failed" not in text and "frame #" not in text, text[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped" and status["exit_code"] == 128 + signal.SIGTERM
    stop = json.loads((run_dir / "stopped.json").read_text()) if (run_dir / "stopped.json").exists() else None
    manifest = json.loads((run_dir / "snapshots" / "manifest.json").read_text())
    stop_step = manifest["snapshots"][-1]["step"]
    assert stop is None or stop["step"] == stop_step

    # SLURM requeues the job: the same command, SLURM_RESTART_COUNT one higher, resumes the stop snapshot.
    requeued = [Node(workdir, rank, f"r{rank}", restart=1) for rank in (0, 1)]
    resumed = f"resumed from snapshot-{stop_step:09d}.pt"
    wait_until(lambda: resumed in log.read_text(), "the requeued job resumes", nodes=tuple(requeued))
    assert "rendezvous id slurm-31337-1" in requeued[0].text()
    first = len(snapshots_written(log))
    wait_until(lambda: len(snapshots_written(log)) > first + 1, "the requeued job trains", nodes=tuple(requeued))
    for node in requeued:  # sbatch --signal=USR1@120: SLURM signals every task
        node.proc.send_signal(signal.SIGUSR1)
    assert [n.wait() for n in requeued] == [128 + signal.SIGUSR1] * 2, requeued[0].text()[-3000:]
    final = json.loads((run_dir / "snapshots" / "manifest.json").read_text())["snapshots"][-1]
    assert final["step"] > stop_step
    for node in requeued:
        assert "Stopped by SIGUSR1: a snapshot of the last step" in node.text(), node.text()[-3000:]
    stop = re.findall(r"stopped by SIGUSR1 at step (\d+)", log.read_text())
    assert stop and {int(s) for s in stop} == {final["step"]}  # both nodes stopped at one step: one stop snapshot

    # Exact: one node of two workers, resumed from the same stop snapshot, ends on the same weights.
    ref_dir = workdir / "outputs" / "reference"
    shutil.copytree(run_dir, ref_dir, ignore=shutil.ignore_patterns(".lock"))
    res = run_cli(
        [
            *TASK,
            "hydra.run.dir=outputs/reference",
            "launch=standalone",
            "launch.nproc_per_node=2",
            f"snapshot.resume={ref_dir / 'snapshots' / f'snapshot-{stop_step:09d}.pt'}",
            f"trainer.max_steps={final['step']}",
        ],
        workdir,
    )
    assert res.returncode == 0, res.output
    import torch

    ours = torch.load(run_dir / "snapshots" / final["file"], map_location="cpu", weights_only=True)
    theirs = torch.load(ref_dir / "snapshots" / final["file"], map_location="cpu", weights_only=True)
    assert_same_weights(ours["model"], theirs["model"])


def test_pytorchjob_pods_meet_and_the_loss_of_the_head_pod_is_said_and_resumed(workdir):
    from runner.launch.elastic import _free_port

    port = str(_free_port())

    def pod(rank: int, tag: str) -> Node:
        operator = {  # what the training operator sets in each pod
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "PET_NNODES": "2",
            "PET_NODE_RANK": str(rank),
            "PET_NPROC_PER_NODE": "1",
        }
        return Node(workdir, rank, tag, env=operator, args=[])

    run_dir = workdir / "outputs" / "elastic"
    log = run_dir / "train.log"
    master, worker = pod(0, "m"), pod(1, "w")
    wait_until(lambda: any(s >= 40 for s in snapshots_written(log)), "a snapshot at step 40", nodes=(master, worker))
    assert "launch=auto: Kubeflow PyTorchJob detected (PET_NNODES=2, PET_NODE_RANK=1" in worker.text()
    assert "starting from scratch: 2 processes" in log.read_text()
    os.killpg(master.proc.pid, signal.SIGKILL)  # the pod that hosts the rendezvous is evicted
    master.wait()
    assert worker.wait() == 1
    text = worker.text()
    assert f"Error: the rendezvous at 127.0.0.1:{port} is gone: the node that hosted it (node 0) left" in text, text
    assert "frame #" not in text and "Traceback" not in text and "GLHF" not in text, text
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    newest = json.loads((run_dir / "snapshots" / "manifest.json").read_text())["snapshots"][-1]["file"]
    assert f"resumes from {newest}" in text

    # The operator restarts the pods (restartPolicy: OnFailure): the same command resumes the run.
    again = [pod(0, "m2"), pod(1, "w2")]
    wait_until(lambda: f"resumed from {newest}" in log.read_text(), "the restarted pods resume", nodes=tuple(again))
    again[1].proc.send_signal(signal.SIGTERM)
    assert [p.wait() for p in again] == [128 + signal.SIGTERM] * 2


def test_three_nodes_of_a_slurm_host_list_meet_and_train_like_one_node_of_three(workdir):
    """127.0.0.1-3 are all this machine (loopback): the host list's head node, 127.0.0.1, hosts."""
    short = ["name=three", "model=mlp", "trainer.total_epochs=2", "trainer.progress=false", "launch.backend=gloo"]
    short += ["launch.nproc_per_node=1"]  # one worker per node
    env = {"SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "127.0.0.[1-3]", "SLURM_NNODES": "3"}
    nodes = []
    for rank in range(3):
        nodes.append(Node(workdir, rank, f"3-{rank}", env={**env, "SLURM_NODEID": str(rank)}, args=[], task=short))
    codes = [n.wait(timeout=240) for n in nodes]
    assert codes == [0, 0, 0], "\n".join(n.text()[-2000:] for n in nodes)
    for rank, node in enumerate(nodes):
        assert (
            f"SLURM detected (SLURM_JOB_ID=777, SLURM_JOB_NODELIST=127.0.0.[1-3], SLURM_NODEID={rank})" in node.text()
        )
        assert "rendezvous 127.0.0.1:20777 (id slurm-777-0)" in node.text()
        assert "waiting for 2 of 3 nodes at 127.0.0.1:20777, rendezvous id slurm-777-0, timeout 900 s" in node.text()
    ref = run_cli([*short, "name=one", "launch.nproc_per_node=3"], workdir)
    assert ref.returncode == 0, ref.output
    import torch

    def final(name: str) -> dict:
        snapshots = workdir / "outputs" / name / "snapshots"
        entry = json.loads((snapshots / "manifest.json").read_text())["snapshots"][-1]
        return torch.load(snapshots / entry["file"], map_location="cpu", weights_only=True)["model"]

    assert "starting from scratch: 3 processes" in (workdir / "outputs" / "three" / "train.log").read_text()
    assert_same_weights(final("three"), final("one"))
