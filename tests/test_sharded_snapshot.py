"""Sharded versions (snapshot.format=dcp) in the snapshot manager: a folder per version, every file
verified, retention, and the same refusals as single files. Written here by DCP in one process."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from runner import snapshot as snap
from runner.snapshot import SnapshotError, SnapshotManager
from runner.snapshot.sharded import full_model

REQUIRED_PARTS = {"optimizer": None, "model": None, "train_state": {"step": 0}, "rng": [], "metrics": []}


def write_version(mgr: SnapshotManager, step: int, epoch: int = 0, **marks) -> dict:
    """What the sharded writer leaves for the lead to commit: DCP's files in a temporary folder, and loop.pt."""
    import torch.distributed.checkpoint as dcp

    tmp = mgr.dir / f".step-{step:09d}.tmp-test"
    model = {"w": torch.full((4, 3), float(step)), "b": torch.arange(3.0) + step}
    dcp.save(
        {"model": model, "optimizer": {"state": {"w": {"exp_avg": torch.ones(4, 3) * step}}}},
        checkpoint_id=str(tmp),
        no_dist=True,
    )
    torch.save({snap.FORMAT_KEY: snap.FORMAT_VERSION, **REQUIRED_PARTS, "train_state": {"step": step}}, tmp / "loop.pt")
    return mgr.commit_folder(tmp, step, epoch, **marks)


def test_a_version_is_a_folder_listed_file_by_file(tmp_path):
    mgr = SnapshotManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        entry = write_version(mgr, step)
    assert entry["file"] == "step-000000030" and entry["kind"] == "dcp"
    names = [f["name"] for f in entry["files"]]
    assert names[0] == ".metadata" and "loop.pt" in names and any(n.endswith(".distcp") for n in names)
    for f in entry["files"]:
        assert (tmp_path / entry["file"] / f["name"]).stat().st_size == f["size"] and len(f["sha256"]) == 64
    # Retention removed the oldest folder with its files; no temporary folder is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "step-000000020", "step-000000030"]
    loaded_entry, state = mgr.load_latest()
    assert loaded_entry["step"] == 30 and state["train_state"] == {"step": 30}
    version = state[snap.SHARDED_KEY]
    assert version.folder == tmp_path / "step-000000030" and set(version.files) == {f["name"] for f in entry["files"]}
    weights = full_model(version)  # no process group: what an export reads
    assert torch.equal(weights["w"], torch.full((4, 3), 30.0)) and torch.equal(weights["b"], torch.arange(3.0) + 30)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "metadata"])
def test_one_damaged_shard_invalidates_the_version_and_the_previous_is_used(tmp_path, damage, caplog):
    mgr = SnapshotManager(tmp_path, keep_last=3)
    write_version(mgr, 10)
    newest = write_version(mgr, 20)
    shard = next(tmp_path / newest["file"] / f["name"] for f in newest["files"] if f["name"].endswith(".distcp"))
    if damage == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "delete":
        shard.unlink()
    else:
        (tmp_path / newest["file"] / ".metadata").write_bytes(b"not dcp")
    with caplog.at_level(logging.WARNING):
        entry, state = mgr.load_latest()
    assert entry["step"] == 10 and state["train_state"] == {"step": 10}
    assert "skipping snapshot step-000000020" in caplog.text


def test_entries_naming_paths_or_foreign_files_are_refused(tmp_path, caplog):
    mgr = SnapshotManager(tmp_path, keep_last=3)
    good = write_version(mgr, 10)
    manifest = json.loads(mgr.manifest_path.read_text())
    bad_names = ["../step-000000010", "step-1/..", "snapshot-000000010.pt"]
    bad_files = [
        [{"name": "../../etc/passwd", "size": 1, "sha256": "0" * 64}],
        [],
        "x",
        [f for f in good["files"] if f["name"] != ".metadata"],
    ]
    for name in bad_names:
        manifest["snapshots"].append(dict(good, file=name, step=11))
    for i, files in enumerate(bad_files):
        manifest["snapshots"].append(dict(good, file=f"step-{20 + i:09d}", step=20 + i, files=files))
    mgr.manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        assert [e["step"] for e in mgr.entries()] == [10]
    assert caplog.text.count("ignoring entry") == len(bad_names) + len(bad_files)


def test_a_symlinked_version_folder_is_neither_followed_nor_deleted(tmp_path):
    outside = tmp_path / "outside"
    mgr = SnapshotManager(tmp_path / "snaps", keep_last=1)
    entry = write_version(mgr, 10)
    (tmp_path / "snaps" / entry["file"]).rename(outside)
    (tmp_path / "snaps" / entry["file"]).symlink_to(outside, target_is_directory=True)
    with pytest.raises(SnapshotError, match="symlink"):
        mgr.load_latest()
    write_version(mgr, 20)  # retention drops step 10 from the manifest without touching the link's target
    assert outside.is_dir() and (outside / ".metadata").is_file()


def test_a_folder_with_a_foreign_file_is_not_committed(tmp_path):
    import torch.distributed.checkpoint as dcp

    mgr = SnapshotManager(tmp_path)
    tmp = tmp_path / ".step-000000010.tmp-test"
    dcp.save({"model": {"w": torch.ones(2)}}, checkpoint_id=str(tmp), no_dist=True)
    (tmp / "loop.pt").write_bytes(b"x")
    (tmp / "notes.txt").write_text("?")
    with pytest.raises(SnapshotError, match="notes.txt"):
        mgr.commit_folder(tmp, 10, 0)
    assert mgr.entries() == []


def test_stale_temporary_folders_are_removed(tmp_path):
    mgr = SnapshotManager(tmp_path)
    write_version(mgr, 10)
    stale = tmp_path / ".step-000000020.tmp-abc"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half")
    mgr.remove_stale_temporaries()
    assert not stale.exists() and (tmp_path / "step-000000010").is_dir()


def test_rewriting_a_step_replaces_its_folder(tmp_path):
    mgr = SnapshotManager(tmp_path)
    write_version(mgr, 10)
    write_version(mgr, 20)
    os.truncate(next((tmp_path / "step-000000020").glob("*.distcp")), 1)  # torn: a resume falls back to 10...
    write_version(mgr, 20)  # ...and training writes step 20 again
    entry, _ = mgr.load_latest()
    assert entry["step"] == 20 and sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "step-000000010",
        "step-000000020",
    ]


class Payload:
    """Unpickling this runs code (it writes a marker file): what a tampered snapshot would carry."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def relisted(mgr: SnapshotManager, entry: dict, **changes) -> None:
    """Rewrite the manifest's entry as someone who can write the run directory could."""
    manifest = json.loads(mgr.manifest_path.read_text())
    manifest["snapshots"] = [dict(entry, **changes)]
    mgr.manifest_path.write_text(json.dumps(manifest))


def test_a_tampered_metadata_pickle_never_runs(tmp_path):
    import hashlib
    import pickle

    mgr = SnapshotManager(tmp_path / "snaps")
    entry = write_version(mgr, 10)
    Payload.marker = tmp_path / "pwned"
    metadata = tmp_path / "snaps" / entry["file"] / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload()))
    data = metadata.read_bytes()
    files = [
        dict(f, size=len(data), sha256=hashlib.sha256(data).hexdigest()) if f["name"] == ".metadata" else f
        for f in entry["files"]
    ]
    relisted(mgr, entry, files=files)
    _, state = mgr.load_latest()  # the bytes match the (rewritten) manifest...
    with pytest.raises(SnapshotError, match="cannot be read safely"):
        full_model(state[snap.SHARDED_KEY])  # ...but nothing in them is executed
    assert not Payload.marker.exists()


def test_a_shard_the_entry_does_not_list_is_never_opened(tmp_path):
    mgr = SnapshotManager(tmp_path / "snaps")
    entry = write_version(mgr, 10)
    folder = tmp_path / "snaps" / entry["file"]
    shard = next(folder.glob("*.distcp"))
    outside = tmp_path / "outside.distcp"
    shard.rename(outside)
    shard.symlink_to(outside)  # unlisted, so never verified: a link to anywhere
    relisted(mgr, entry, files=[f for f in entry["files"] if not f["name"].endswith(".distcp")])
    _, state = mgr.load_latest()
    with pytest.raises(SnapshotError, match="not a shard file its manifest entry lists"):
        full_model(state[snap.SHARDED_KEY])


def test_non_tensor_values_load_weights_only(tmp_path):
    import torch.distributed.checkpoint as dcp

    Payload.marker = tmp_path / "pwned"
    mgr = SnapshotManager(tmp_path / "snaps")
    tmp = mgr.dir / ".step-000000010.tmp-test"
    dcp.save({"model": {"w": torch.ones(2), "extra": Payload()}}, checkpoint_id=str(tmp), no_dist=True)
    Payload.marker.unlink(missing_ok=True)  # (saving pickles it; only loading would call it)
    torch.save({snap.FORMAT_KEY: snap.FORMAT_VERSION, **REQUIRED_PARTS}, tmp / "loop.pt")
    mgr.commit_folder(tmp, 10, 0)
    _, state = mgr.load_latest()
    with pytest.raises(SnapshotError, match="cannot be loaded safely"):
        full_model(state[snap.SHARDED_KEY])
    assert not Payload.marker.exists()


@pytest.mark.parametrize(
    "prefix",
    [
        b"cpathlib\nPosixPath\n(N}V_str\nV/etc\nstb0",  # BUILD on a class: every Path of the process would be /etc
        b"ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n(I0\ntR(N}V_value_\nI7\nstb0",  # BUILD on an enum member
    ],
)
def test_metadata_cannot_change_anything_outside_what_it_builds(tmp_path, prefix):
    import hashlib
    from pathlib import Path

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    mgr = SnapshotManager(tmp_path / "snaps")
    entry = write_version(mgr, 10)
    metadata = tmp_path / "snaps" / entry["file"] / ".metadata"
    data = prefix + metadata.read_bytes()  # then the real metadata, which alone loads
    metadata.write_bytes(data)
    files = [
        dict(f, size=len(data), sha256=hashlib.sha256(data).hexdigest()) if f["name"] == ".metadata" else f
        for f in entry["files"]
    ]
    relisted(mgr, entry, files=files)
    _, state = mgr.load_latest()
    with pytest.raises(SnapshotError, match="refusing .*state"):
        full_model(state[snap.SHARDED_KEY])
    assert str(Path("/x")) == "/x" and _MEM_FORMAT_ENCODING(0).value == 0
