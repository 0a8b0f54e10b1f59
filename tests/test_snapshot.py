"""SnapshotManager: atomic versions, verification, retention, and safety against bad files."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from runner import snapshot as snap
from runner.snapshot import SnapshotError, SnapshotManager


def make_state(step: int, size: int = 8) -> dict:
    return {snap.FORMAT_KEY: snap.FORMAT_VERSION, "model": {"w": torch.full((size,), float(step))}, "step": step}


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
    import hashlib

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
    import sys, torch
    from runner import snapshot as snap
    mgr = snap.SnapshotManager(sys.argv[1], keep_last=2)
    step = len(mgr.entries()) and mgr.entries()[-1]["step"]
    while True:
        step += 1
        mgr.save({snap.FORMAT_KEY: snap.FORMAT_VERSION, "w": torch.full((2_000_000,), float(step))}, step=step, epoch=0)
        print(step, flush=True)
""")


def test_killing_the_writer_mid_write_never_leaves_a_bad_version(tmp_path):
    """SIGKILL a process that writes 8 MB snapshots in a loop at many moments; every time, the
    newest listed version loads and holds exactly the tensor of its step."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    snaps = tmp_path / "snaps"
    seen_steps = set()
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(snaps)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one version written
        time.sleep(0.013 * (attempt + 1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        entry, state = SnapshotManager(snaps).load_latest()
        assert torch.equal(state["w"], torch.full((2_000_000,), float(entry["step"])))
        seen_steps.add(entry["step"])
        SnapshotManager(snaps).remove_stale_temporaries()
    assert len(seen_steps) > 1
