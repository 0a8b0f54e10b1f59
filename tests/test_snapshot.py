"""SnapshotManager: atomic versions, verification, retention, and safety against bad files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from runner import snapshot as snap
from runner.snapshot import SnapshotError, SnapshotManager

# The parts load_bytes requires of a complete runner snapshot, empty: these tests are about files.
REQUIRED_PARTS = {"optimizer": {}, "train_state": {}, "rng": [], "metrics": []}


def make_state(step: int, size: int = 8) -> dict:
    return {
        snap.FORMAT_KEY: snap.FORMAT_VERSION,
        "model": {"w": torch.full((size,), float(step))},
        "step": step,
        **REQUIRED_PARTS,
    }


def test_versions_manifest_and_retention(tmp_path):
    mgr = SnapshotManager(tmp_path, keep_last=2, milestone_every=2)
    for step, epoch in [(10, 1), (20, 2), (30, 3), (40, 4), (50, 5)]:
        mgr.save(make_state(step), step=step, epoch=epoch, config={"x": step}, end_of_epoch=True)
    entries = mgr.entries()
    # The newest 2 versions, plus the milestones (epochs 2 and 4), which are kept forever.
    assert [e["step"] for e in entries] == [20, 40, 50]
    assert [e["step"] for e in entries if e["milestone"]] == [20, 40]
    files = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt")
    assert files == [e["file"] for e in entries]  # the manifest matches the files exactly
    for e in entries:
        assert e["size"] == (tmp_path / e["file"]).stat().st_size and len(e["sha256"]) == 64
    assert mgr.stored_config() == {"x": 50}
    entry, state = mgr.load_latest()
    assert entry["step"] == 50 and torch.equal(state["model"]["w"], torch.full((8,), 50.0))
    assert not list(tmp_path.glob(".*tmp*"))


def test_keep_last_exactly(tmp_path):
    mgr = SnapshotManager(tmp_path, keep_last=3)
    for step in range(1, 8):
        mgr.save(make_state(step), step=step, epoch=0)
    assert [e["step"] for e in mgr.entries()] == [5, 6, 7]
    assert len(list(tmp_path.glob("snapshot-*.pt"))) == 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_newest_version_is_skipped_for_the_previous(tmp_path, damage, caplog):
    mgr = SnapshotManager(tmp_path, keep_last=3)
    mgr.save(make_state(1), step=1, epoch=0)
    newest = mgr.save(make_state(2), step=2, epoch=0)
    path = tmp_path / newest["file"]
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()
    with caplog.at_level(logging.WARNING):
        entry, state = mgr.load_latest()
    assert entry["step"] == 1 and state["step"] == 1
    assert newest["file"] in caplog.text  # the warning names the skipped version


def test_every_version_invalid_is_an_error_not_a_fresh_start(tmp_path):
    mgr = SnapshotManager(tmp_path)
    entry = mgr.save(make_state(1), step=1, epoch=0)
    (tmp_path / entry["file"]).write_bytes(b"garbage")
    with pytest.raises(SnapshotError, match=entry["file"]):
        mgr.load_latest()
    assert SnapshotManager(tmp_path / "empty").load_latest() is None


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_never_executed(tmp_path):
    mgr = SnapshotManager(tmp_path)
    entry = mgr.save(make_state(1), step=1, epoch=0)
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    # An attacker who can write the run directory replaces the file and fixes up the manifest.
    payload = pickle.dumps({"format_version": 1, "x": exploit})
    (tmp_path / entry["file"]).write_bytes(payload)
    manifest = json.loads(mgr.manifest_path.read_text())
    manifest["snapshots"][0].update(size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    mgr.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="cannot be loaded safely"):
        mgr.load_latest()
    with pytest.raises(SnapshotError):
        snap.load_path(tmp_path / entry["file"])
    assert not marker.exists()
    pickle.loads(payload)  # the payload is real: a plain unpickler runs it
    assert marker.exists()


WRITER = textwrap.dedent("""
    import os, sys, time, torch
    from runner import snapshot as snap
    directory, pause_at = sys.argv[1], int(sys.argv[2])
    mgr = snap.SnapshotManager(directory, keep_last=2)

    def state(step):
        return {snap.FORMAT_KEY: snap.FORMAT_VERSION, "w": torch.full((2_000_000,), float(step)),
                "model": {}, "optimizer": {}, "train_state": {}, "rng": [], "metrics": []}

    step = len(mgr.entries()) and mgr.entries()[-1]["step"]
    while len(mgr.entries()) < 2:  # a version to fall back on and one that retention prunes
        step += 1
        mgr.save(state(step), step=step, epoch=0)
    moments = 0

    def moment(what):  # the pause_at-th moment of the save below: say so, then wait to be killed
        global moments
        moments += 1
        if moments == pause_at:
            print("paused at", what, "saving", step, flush=True)
            time.sleep(3600)

    def pausing(name, call):
        def run(*args, **kwargs):
            moment(f"{name} {args[0]}")
            return call(*args, **kwargs)
        return run

    for name in ("fsync", "replace", "unlink", "rmdir"):  # every call of a save that changes what is on disk
        setattr(os, name, pausing(name, getattr(os, name)))

    class HalfWritten:  # the snapshot's temporary file, paused after its first write: torn
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 2:
                moment("write")
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    whole_save = torch.save

    def save(obj, path):
        with open(path, "wb") as f:
            whole_save(obj, HalfWritten(f))

    torch.save = save
    step += 1
    mgr.save(state(step), step=step, epoch=0)
    print("saved", step, flush=True)
""")


@pytest.mark.slow
def test_killing_the_writer_at_any_moment_of_a_save_never_leaves_a_bad_version(tmp_path):
    """SIGKILL a process saving an 8 MB snapshot at each moment of the save that changes the disk
    in turn (mid-write of the temporary, each fsync, rename and delete); every time, the newest
    listed version loads and holds exactly the tensor of its step."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    snaps = tmp_path / "snaps"
    paused_at, newest_after = [], set()
    for pause_at in range(1, 40):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(snaps), str(pause_at)], stdout=subprocess.PIPE, text=True
        )
        line = proc.stdout.readline()  # the writer waits there until it is killed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if line.startswith("saved"):  # a save has fewer moments: every one was tried
            break
        assert line.startswith("paused at"), line
        paused_at.append(line.split()[2])
        entry, state = SnapshotManager(snaps).load_latest()
        assert torch.equal(state["w"], torch.full((2_000_000,), float(entry["step"])))
        newest_after.add("new" if entry["step"] == int(line.split()[-1]) else "previous")
        SnapshotManager(snaps).remove_stale_temporaries()
    else:
        pytest.fail("the save never ended")
    assert paused_at[0] == "write" and {"fsync", "replace", "unlink"} <= set(paused_at), paused_at
    assert newest_after == {"previous", "new"}  # killed before the manifest listed the new version, and after


# ---- a tampered or malformed manifest ----------------------------------------------------------
def fake_entry(file: str, data: bytes, step: int = 10**6, epoch: int = 99) -> dict:
    """An entry that names `file` with its real size and sha256, and claims to be the newest and final."""
    return {
        "file": file,
        "step": step,
        "epoch": epoch,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "created": "2020-01-01T00:00:00+0000",
        "milestone": False,
        "commit_seconds": 0.1,
    }


def add_entries(mgr: SnapshotManager, *entries: dict) -> None:
    manifest = json.loads(mgr.manifest_path.read_text())
    manifest["snapshots"].extend(entries)
    mgr.manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("step", [0, 10**6], ids=["older-so-retention-prunes-it", "newest-and-final"])
def test_entries_naming_files_outside_the_directory_are_never_deleted_or_loaded(tmp_path, step, caplog):
    run = tmp_path / "run"
    mgr = SnapshotManager(run, keep_last=1)
    mgr.save(make_state(1), step=1, epoch=0)
    relative_victim, absolute_victim = tmp_path / "victim.txt", tmp_path / "elsewhere" / "victim.bin"
    absolute_victim.parent.mkdir()
    relative_victim.write_bytes(b"precious")
    absolute_victim.write_bytes(b"also precious")
    add_entries(
        mgr,
        fake_entry("../victim.txt", b"precious", step=step),
        fake_entry(str(absolute_victim), b"also precious", step=step),
    )
    with caplog.at_level(logging.WARNING):
        entry, state = mgr.load_latest()
        valid, loadable = mgr.newest_valid_entry()[0], mgr.newest_loadable_entry()[0]
    for step_ in (2, 3, 4):
        mgr.save(make_state(step_), step=step_, epoch=0)
    assert relative_victim.read_bytes() == b"precious"
    assert absolute_victim.read_bytes() == b"also precious"
    assert entry["step"] == valid["step"] == loadable["step"] == 1 and state["step"] == 1  # never "already complete"
    assert "../victim.txt" in caplog.text and str(absolute_victim) in caplog.text  # the warning names them
    assert [e["file"] for e in json.loads(mgr.manifest_path.read_text())["snapshots"]] == ["snapshot-000000004.pt"]
    assert mgr.load_latest()[0]["step"] == 4


def test_symlinked_snapshot_is_neither_followed_nor_deleted(tmp_path):
    run = tmp_path / "run"
    mgr = SnapshotManager(run, keep_last=1)
    mgr.save(make_state(1), step=1, epoch=0)
    target = tmp_path / "outside.pt"
    torch.save(make_state(99), str(target))  # even a real snapshot is not read through a link
    (run / "snapshot-000000099.pt").symlink_to(target)
    add_entries(mgr, fake_entry("snapshot-000000099.pt", target.read_bytes(), step=99))
    assert mgr.load_latest()[0]["step"] == 1
    entry, problems = mgr.newest_valid_entry()
    assert entry["step"] == 1 and any("symlink" in p for p in problems)
    assert mgr.newest_loadable_entry()[0]["step"] == 1
    (run / "snapshot-000000001.pt").unlink()
    with pytest.raises(SnapshotError, match="symlink"):
        mgr.load_latest()
    for step in (2, 3):
        mgr.save(make_state(step), step=step, epoch=0)
    assert target.exists() and (run / "snapshot-000000099.pt").is_symlink()
    assert [e["step"] for e in mgr.entries()] == [3]  # the link, though listed with step 99, did not evict step 3
    assert mgr.load_latest()[0]["step"] == 3


GOOD = {"file": "snapshot-000000001.pt", "step": 1, "epoch": 0, "size": 3, "sha256": "ab" * 32}


@pytest.mark.parametrize(
    "manifest", [[], None, 5, "text", {}, {"snapshots": 5}, {"snapshots": None}, {"snapshots": {}}], ids=repr
)
def test_wrong_top_level_is_a_snapshot_error(tmp_path, manifest):
    mgr = SnapshotManager(tmp_path)
    mgr.manifest_path.write_text(json.dumps(manifest))
    for call in (
        mgr.entries,
        mgr.load_latest,
        mgr.newest_valid_entry,
        mgr.newest_loadable_entry,
        lambda: mgr.save(make_state(1), step=1, epoch=0),
        lambda: snap.load_path(tmp_path / GOOD["file"]),
    ):
        with pytest.raises(SnapshotError, match="manifest.json is not a valid manifest") as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["", "{", "not json", "[" * 100_000, "\xff\xfe\x00garbage"], ids=repr)
def test_unparsable_manifest_is_a_snapshot_error(tmp_path, text):
    mgr = SnapshotManager(tmp_path)
    mgr.manifest_path.write_bytes(text.encode("latin-1"))
    with pytest.raises(SnapshotError, match="manifest.json is not a valid manifest \\(not JSON"):
        mgr.entries()


@pytest.mark.parametrize(
    "bad",
    [
        {},
        None,
        [],
        "snapshot-000000001.pt",
        {**GOOD, "step": "x"},
        {**GOOD, "step": -1},
        {**GOOD, "step": True},
        {**GOOD, "step": 1.0},
        {**GOOD, "epoch": None},
        {**GOOD, "epoch": False},
        {**GOOD, "size": "3"},
        {**GOOD, "size": -3},
        {**GOOD, "sha256": "AB" * 32},
        {**GOOD, "sha256": "ab"},
        {**GOOD, "sha256": 7},
        {**GOOD, "milestone": "yes"},
        {**GOOD, "created": 5},
        {**GOOD, "commit_seconds": "1"},
        {**GOOD, "file": None},
        {**GOOD, "file": ".."},
        {**GOOD, "file": "."},
        {**GOOD, "file": "/etc/passwd"},
        {**GOOD, "file": "sub/snapshot-000000001.pt"},
        {**GOOD, "file": "..\\snapshot-000000001.pt"},
        {**GOOD, "file": "snapshot-000000001.pt\x00"},
        {**GOOD, "file": "manifest.json"},
        {**GOOD, "file": "snapshot-000000001.pt\n"},
        {**GOOD, "file": "snapshot-\u0661.pt"},
    ],
    ids=repr,
)
def test_bad_entries_are_dropped_and_good_ones_kept(tmp_path, bad, caplog):
    mgr = SnapshotManager(tmp_path, keep_last=1)
    good = mgr.save(make_state(2), step=2, epoch=0)
    add_entries(mgr, bad)
    with caplog.at_level(logging.WARNING):
        assert mgr.entries() == [good]
    assert "ignoring entry 1" in caplog.text
    assert mgr.load_latest()[0] == good
    for entry, problems in (mgr.newest_valid_entry(), mgr.newest_loadable_entry()):
        assert entry == good and len(problems) == 1 and "ignoring entry 1" in problems[0]
    mgr.save(make_state(3), step=3, epoch=0)  # retention neither crashes on nor keeps the bad entry
    assert [e["step"] for e in json.loads(mgr.manifest_path.read_text())["snapshots"]] == [3]


def test_only_bad_entries_is_an_error_not_a_fresh_start(tmp_path):
    mgr = SnapshotManager(tmp_path)
    mgr.dir.mkdir(exist_ok=True)
    mgr.manifest_path.write_text(json.dumps({"snapshots": [{}]}))
    assert mgr.entries() == []
    with pytest.raises(SnapshotError, match="ignoring entry 0"):
        mgr.load_latest()
    assert mgr.newest_valid_entry()[0] is None


def test_a_second_entry_for_the_same_file_is_dropped(tmp_path):
    mgr = SnapshotManager(tmp_path, keep_last=1)
    entry = mgr.save(make_state(1), step=1, epoch=0)
    add_entries(mgr, {**entry, "step": 7, "milestone": True})
    assert mgr.entries() == [entry]


def test_verify_refuses_an_entry_that_breaks_the_schema(tmp_path):
    mgr = SnapshotManager(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_bytes(b"x")
    with pytest.raises(SnapshotError, match="invalid"):
        mgr.verify(fake_entry(f"../{outside.name}", b"x"))
    with pytest.raises(SnapshotError, match="invalid"):
        mgr.load_entry({"file": "snapshot-000000001.pt"})


@pytest.mark.parametrize("special", ["directory", "fifo"])
def test_a_listed_name_that_is_not_a_regular_file_is_refused_and_kept(tmp_path, special):
    mgr = SnapshotManager(tmp_path, keep_last=1)
    mgr.save(make_state(1), step=1, epoch=0)
    path = tmp_path / "snapshot-000000050.pt"
    path.mkdir() if special == "directory" else os.mkfifo(path)
    add_entries(mgr, fake_entry(path.name, b"", step=50))
    assert mgr.load_latest()[0]["step"] == 1  # a FIFO would hang a plain read
    mgr.save(make_state(2), step=2, epoch=0)
    assert path.exists() and [e["step"] for e in mgr.entries()] == [2]


def test_newest_loadable_entry_skips_bytes_that_verify_but_are_no_snapshot(tmp_path):
    mgr = SnapshotManager(tmp_path, keep_last=3)
    real = mgr.save(make_state(1), step=1, epoch=0)
    mgr.save(make_state(2), step=2, epoch=5)
    plain = tmp_path / "snapshot-000000002.pt"
    torch.save(torch.zeros(4), str(plain))
    manifest = json.loads(mgr.manifest_path.read_text())
    manifest["snapshots"][1].update(size=plain.stat().st_size, sha256=hashlib.sha256(plain.read_bytes()).hexdigest())
    mgr.manifest_path.write_text(json.dumps(manifest))
    assert mgr.newest_valid_entry()[0]["step"] == 2  # bytes match: verify alone is fooled
    entry, problems = mgr.newest_loadable_entry()
    assert entry == real
    assert len(problems) == 1 and "snapshot-000000002.pt is not a runner snapshot" in problems[0]


def test_newest_loadable_entry_of_an_empty_directory(tmp_path):
    assert SnapshotManager(tmp_path / "none").newest_loadable_entry() == (None, [])
