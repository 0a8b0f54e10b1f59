"""launch=auto: which scheduler placed this node, from simulated environments (no cluster needed)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from runner.config import LaunchConfig
from runner.errors import UserError
from runner.launch.schedulers import detect, parse_nodelist, resolve_launch


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
        ("node7", ["node7"]),
        ("a[9-11],b1", ["a9", "a10", "a11", "b1"]),
        ("gpu[008-010],cpu[1,3]", ["gpu008", "gpu009", "gpu010", "cpu1", "cpu3"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("head,gpu[2-3]-ib", ["head", "gpu2-ib", "gpu3-ib"]),
    ],
)
def test_slurm_host_lists_expand_in_order_with_padding(text, hosts):
    assert parse_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["gpu[01-04", "gpu01]", "gpu[04-01]", "gpu[a-b]", "gpu[1,,2]", "a,,b", ""])
def test_malformed_host_lists_are_user_errors(text):
    with pytest.raises(UserError) as err:
        parse_nodelist(text)
    assert "SLURM_JOB_NODELIST" in str(err.value) and "bracket ranges" in str(err.value)


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-04,07]", "SLURM_NNODES": "5", "SLURM_NODEID": "3"}


def test_slurm_places_the_node_with_the_head_node_first_and_the_requeue_count_in_the_id():
    p = detect({**SLURM, "SLURM_RESTART_COUNT": "2", "SLURM_GPUS_ON_NODE": "8"})
    assert p.scheduler == "SLURM" and p.hosts[0] == "gpu01" and len(p.hosts) == 5
    assert (p.nnodes, p.node_rank, p.host, p.rdzv_id, p.nproc_per_node) == ("5", 3, "gpu01", "slurm-4242-2", "8")
    assert p.port == detect(SLURM).port and 20000 <= p.port < 30000  # the same on every node, not ephemeral
    assert detect({**SLURM, "SLURM_JOB_ID": "4243"}).port != p.port  # jobs sharing a head node do not collide
    assert detect(SLURM).rdzv_id == "slurm-4242-0"
    assert "SLURM_JOB_NODELIST=gpu[01-04,07]" in p.why and "SLURM_RESTART_COUNT=2" in p.why
    assert detect({**SLURM, "SLURM_GPUS_PER_NODE": "a100:4"}).nproc_per_node == "4"  # sbatch --gpus-per-node
    assert detect({**SLURM, "SLURM_GPUS_ON_NODE": "0"}).nproc_per_node is None
    mine = detect({**SLURM, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})  # sbatch scripts often export them
    assert (mine.host, mine.port) == ("10.0.0.1", 29500)


@pytest.mark.parametrize(
    "env, key, words",
    [
        ({"SLURM_JOB_ID": "1"}, "SLURM_JOB_NODELIST", "cannot meet"),
        ({**SLURM, "SLURM_NODEID": None}, "SLURM_NODEID", "cannot meet"),
        ({**SLURM, "SLURM_NNODES": "4"}, "SLURM_NNODES", "disagrees"),
        ({**SLURM, "SLURM_NODEID": "5"}, "SLURM_NODEID", "not a node"),
        ({**SLURM, "SLURM_STEP_NUM_TASKS": "20", "SLURM_STEP_NUM_NODES": "5"}, "SLURM_STEP_NUM_TASKS", "one task"),
        ({**SLURM, "NNODES": "2"}, "NNODES", "disagrees"),
        ({**SLURM, "PET_NNODES": "2"}, "SLURM_JOB_ID", "ambiguous"),
        ({"MASTER_ADDR": "h", "NNODES": "2"}, "MASTER_PORT", "cannot meet"),
        ({"MASTER_ADDR": "h", "MASTER_PORT": "x", "NNODES": "2", "NODE_RANK": "0"}, "MASTER_PORT", "integer"),
        ({"MASTER_ADDR": "h", "MASTER_PORT": "1", "NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK", "not a node"),
        ({"PET_NNODES": "2", "PET_NODE_RANK": "0"}, "MASTER_ADDR", "cannot meet"),
        ({"PET_NNODES": "3:1", "PET_NODE_RANK": "0", "PET_RDZV_ENDPOINT": "m:1"}, "PET_NNODES", "node count"),
        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "LOCAL_RANK", "torchrun"),
        (
            {"MASTER_ADDR": "h", "MASTER_PORT": "1", "NNODES": "2", "NODE_RANK": "1", "JOB_COMPLETION_INDEX": "0"},
            "NODE_RANK",
            "disagrees",
        ),
    ],
)
def test_conflicting_or_half_set_variables_are_user_errors(env, key, words):
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(UserError) as err:
        detect(env)
    assert err.value.key == key and words in str(err.value), str(err.value)
    assert err.value.fix  # and says how to get out of it


def test_a_pytorchjob_is_read_from_the_operators_variables():
    pet = {
        "PET_NNODES": "1:3",
        "PET_NODE_RANK": "2",
        "PET_RDZV_ENDPOINT": "train-master-0:23456",
        "PET_RDZV_ID": "train",
        "PET_NPROC_PER_NODE": "4",
        "MASTER_ADDR": "train-master-0",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "12",  # replicas x nproc_per_node: not the node count
        "RANK": "2",
    }
    p = detect(pet)
    assert p.scheduler == "Kubeflow PyTorchJob" and (p.nnodes, p.node_rank) == ("1:3", 2)
    assert (p.endpoint, p.rdzv_id, p.nproc_per_node) == ("train-master-0:23456", "train", "4")
    old = detect({"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1"})
    assert (old.scheduler, old.nnodes, old.node_rank, old.endpoint) == (
        "Kubeflow PyTorchJob",
        "2",
        1,
        "job-master-0:23456",
    )
    assert old.rdzv_id == "pytorchjob-job-master-0"  # the master's service name: the same on every pod


def test_torchrun_style_and_jobset_environments():
    plain = detect({"MASTER_ADDR": "head", "MASTER_PORT": "29400", "NNODES": "2", "NODE_RANK": "1"})
    assert (plain.scheduler, plain.endpoint, plain.node_rank, plain.nnodes) == (
        "torchrun-style environment",
        "head:29400",
        1,
        "2",
    )
    jobset = detect(
        {"MASTER_ADDR": "js-node-0-0.js", "MASTER_PORT": "3389", "NNODES": "2", "JOB_COMPLETION_INDEX": "1"}
    )
    assert (jobset.scheduler, jobset.node_rank) == ("JobSet", 1)
    assert "JOB_COMPLETION_INDEX=1" in jobset.why
    assert detect({"PATH": "/bin", "HOME": "/root"}) is None


def launch_cfg(**values):
    cfg = OmegaConf.create({"launch": {**OmegaConf.to_container(OmegaConf.structured(LaunchConfig)), **values}})
    cfg.launch.nnodes = values.get("nnodes", "auto")
    return cfg


def test_resolve_fills_the_rendezvous_and_says_why_and_what_the_user_set_wins():
    cfg = launch_cfg()
    line = resolve_launch(cfg, SLURM)
    assert (cfg.launch.mode, cfg.launch.nnodes, cfg.launch.node_rank, cfg.launch.rdzv_id) == (
        "multinode",
        "5",
        3,
        "slurm-4242-0",
    )
    assert cfg.launch.rdzv_endpoint.startswith("gpu01:")
    assert line.startswith("launch=auto: SLURM detected (SLURM_JOB_ID=4242, SLURM_JOB_NODELIST=gpu[01-04,07]")
    assert "node 3 of 5, rendezvous gpu01:" in line and "launch=multinode" in line
    assert resolve_launch(cfg, SLURM) is None  # resolved once: launch is no longer auto

    cfg = launch_cfg(nnodes="2:5", rdzv_endpoint="login:1234")
    resolve_launch(cfg, SLURM)
    assert (cfg.launch.nnodes, cfg.launch.rdzv_endpoint) == ("2:5", "login:1234")

    cfg = launch_cfg()
    assert resolve_launch(cfg, {}) is None  # nothing detected: one machine, no extra line
    assert (cfg.launch.mode, cfg.launch.nnodes) == ("standalone", "1")
    cfg = launch_cfg()
    line = resolve_launch(cfg, {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "4"})
    assert (cfg.launch.mode, cfg.launch.nproc_per_node) == ("standalone", "4") and "a single node" in line

    with pytest.raises(UserError, match="found no scheduler"):
        resolve_launch(launch_cfg(nnodes="2"), {})
    with pytest.raises(UserError, match="at least 6 nodes"):
        resolve_launch(launch_cfg(nnodes="6:8"), SLURM)
    explicit = launch_cfg(mode="standalone")
    assert resolve_launch(explicit, SLURM) is None and explicit.launch.mode == "standalone"  # only auto looks


class FakeStore:
    def __init__(self):
        self.kv = {}

    def set(self, key, value):
        self.kv[key] = value

    def get(self, key):
        return self.kv[key].encode()


def test_members_name_the_node_that_left_and_the_one_that_joined(caplog):
    from runner.launch.membership import Members, Rendezvous

    rdzv = Rendezvous("h:1", "job", 900, 1, 3, node=0)
    me = Members(rdzv)
    first = FakeStore()
    first.set("runner/node/1", '{"node": 2, "host": "gpu03", "id": "gpu03:7"}')
    first.set("runner/node/2", '{"node": 1, "host": "gpu02", "id": "gpu02:9"}')
    with caplog.at_level("INFO", logger="runner"):
        me.new_round(first, 0, 3, None)
        assert not caplog.records  # the first round: nothing to compare with
        second = FakeStore()
        second.set("runner/node/0", '{"node": 2, "host": "gpu03", "id": "gpu03:7"}')
        me.new_round(second, 1, 2, 38)
        third = FakeStore()
        third.set("runner/node/1", '{"node": 2, "host": "gpu03", "id": "gpu03:7"}')
        third.set("runner/node/2", '{"node": 1, "host": "gpu02", "id": "gpu02:11"}')
        me.new_round(third, 0, 3, None)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "node 1 (gpu02) left at step 38: continuing on 2 nodes, from the last snapshot",
        "node 1 (gpu02) joined: continuing on 3 nodes, from the snapshot written for it",
    ]


def test_a_peer_lost_by_gloo_is_told_from_a_bug():
    from runner.train.faults import lost_peer, restart_may_fix

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:3509: Connection reset by peer")
    assert lost_peer(gloo) and restart_may_fix(gloo)
    assert not lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not lost_peer(ValueError("Connection reset by peer in my own code: gloo"))


@pytest.mark.slow
def test_half_set_variables_stop_the_command_before_anything_starts(workdir):
    from conftest import run_cli

    res = run_cli(["name=half"], workdir, env={"MASTER_ADDR": "10.0.0.7", "NNODES": "2"})
    assert res.returncode == 2, res.output
    assert "Error: MASTER_PORT=(unset): torchrun-style environment: MASTER_ADDR, NNODES set but" in res.stderr
    assert "fix: set the missing variables on every node (docs/clusters.md)" in res.stderr
    assert not (workdir / "outputs").exists()  # refused before the run directory was made
