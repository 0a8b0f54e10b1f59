"""Shard digests computed while writing and checked per block while reading: the lead commits a
sharded version from what the writers hashed, and a reader verifies exactly the blocks it reads.
Written here by the sharded writer in one process."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch

from runner import snapshot as snap
from runner.snapshot import SnapshotError, SnapshotManager
from runner.snapshot.sharded import ShardedSnapshotWriter, full_model

BLOCK = 4096  # small blocks, so one tensor spans several


def loop_state(step: int) -> dict:
    return {
        snap.FORMAT_KEY: snap.FORMAT_VERSION,
        "model": None,
        "optimizer": None,
        "train_state": {"step": step},
        "rng": [],
        "metrics": [],
    }


def shards(step: int) -> dict:
    big = torch.arange(20_000, dtype=torch.float32) + step  # 80 kB: about 20 blocks
    return {"model": {"big": big, "small": torch.full((3,), float(step))}, "optimizer": {"lr": 0.1 * step}}


def save(mgr: SnapshotManager, step: int):
    writer = ShardedSnapshotWriter(mgr, lead=True)
    writer.block_size = BLOCK
    writer.save(loop_state(step), step, 0, shards=shards(step), tag=f"t{step}")
    writer.wait()
    writer.close()
    return writer.last_entry


def block_hashes(data: bytes) -> list[str]:
    return [hashlib.sha256(data[i : i + BLOCK]).hexdigest() for i in range(0, len(data), BLOCK)]


def test_the_lead_lists_what_the_writers_hashed(tmp_path):
    mgr = SnapshotManager(tmp_path, keep_last=3)
    entry = save(mgr, 10)
    listed = json.loads(mgr.manifest_path.read_text())["snapshots"][0]["files"]
    assert {f["name"] for f in listed} == {".metadata", "__0_0.distcp", "loop.pt"}
    for item in listed:  # the digests computed while writing are those of the bytes on disk
        data = (tmp_path / entry.file / item["name"]).read_bytes()
        assert item["size"] == len(data) and item["sha256"] == hashlib.sha256(data).hexdigest()
        assert item["block_size"] == BLOCK and item["blocks"] == block_hashes(data)
    shard = next(f for f in listed if f["name"].endswith(".distcp"))
    assert len(shard["blocks"]) > 10
    # What DCP wrote in .metadata is DCP's alone: the digests travelled beside it, not in it.
    _, state = mgr.load_latest()
    weights = full_model(state[snap.SHARDED_KEY])
    assert set(weights) == {"big", "small"} and torch.equal(weights["big"], shards(10)["model"]["big"])


def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_reader_verifies_the_blocks_it_reads_and_only_those(tmp_path):
    import torch.distributed.checkpoint as dcp

    from runner.snapshot.dcp_reading import SafeLoadPlanner
    from runner.snapshot.sharded import reading

    mgr = SnapshotManager(tmp_path)
    entry = save(mgr, 10)
    shard = tmp_path / entry.file / "__0_0.distcp"
    flip(shard, shard.stat().st_size // 2)  # inside the big tensor
    version, problems = mgr.newest_valid_entry()  # sizes only: nobody read the shard yet
    assert version.step == 10 and problems == []
    state = mgr.load_entry(version, whole=False)
    small = {"model": {"small": torch.zeros(3)}}  # reads only the blocks of the small tensor
    with reading(state[snap.SHARDED_KEY]) as reader:
        dcp.load(small, storage_reader=reader, planner=SafeLoadPlanner(allow_partial_load=True), no_dist=True)
    assert torch.equal(small["model"]["small"], torch.full((3,), 10.0))
    with pytest.raises(SnapshotError, match=r"__0_0.distcp does not match its sha256 in block [0-9]+ \(corrupted\)"):
        full_model(state[snap.SHARDED_KEY])
    with pytest.raises(SnapshotError, match="corrupted"):  # the whole check still finds it
        mgr.load_entry(version)


def test_a_version_listed_without_block_digests_is_checked_whole_when_read(tmp_path, caplog):
    mgr = SnapshotManager(tmp_path, keep_last=3)
    save(mgr, 10)
    entry = save(mgr, 20)
    manifest = json.loads(mgr.manifest_path.read_text())
    for item in manifest["snapshots"]:  # as a runner before block digests wrote them
        item["files"] = [{k: f[k] for k in ("name", "size", "sha256")} for f in item["files"]]
    mgr.manifest_path.write_text(json.dumps(manifest))
    _, state = mgr.load_latest()
    assert torch.equal(full_model(state[snap.SHARDED_KEY])["small"], torch.full((3,), 20.0))
    shard = tmp_path / entry.file / "__0_0.distcp"
    flip(shard, 100)
    state = mgr.load_entry(mgr.entries()[-1], whole=False)
    with pytest.raises(SnapshotError, match="__0_0.distcp does not match its sha256"):
        full_model(state[snap.SHARDED_KEY])
    with caplog.at_level(logging.WARNING):
        entry, state = mgr.load_latest()
    assert entry.step == 10 and "skipping snapshot step-000000020" in caplog.text


@pytest.mark.parametrize(
    "change",
    [
        {"blocks": ["0" * 64]},  # not one per block
        {"block_size": 0},
        {"blocks": "x"},
        {"object": 3},
    ],
)
def test_entries_with_bad_block_digests_are_refused(tmp_path, change, caplog):
    mgr = SnapshotManager(tmp_path)
    save(mgr, 10)
    manifest = json.loads(mgr.manifest_path.read_text())
    manifest["snapshots"][0]["files"][1].update(change)
    mgr.manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        assert mgr.entries() == []
    assert "ignoring entry 0" in caplog.text
