"""SnapshotWriter: a background write that fails is raised on the training thread, never lost."""

from __future__ import annotations

import errno
import threading

import pytest
import torch
from conftest import snapshot_state

from runner.snapshot import SnapshotManager
from runner.snapshot.writer import SnapshotWriter


class FailingManager(SnapshotManager):
    def commit(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.dir / "manifest.json"))


@pytest.mark.parametrize("asynchronous", [False, True])
def test_failed_background_write_surfaces_at_the_next_check(tmp_path, asynchronous):
    writer = SnapshotWriter(FailingManager(tmp_path), asynchronous=asynchronous)
    writer.save(snapshot_state(w=torch.ones(3)), step=1, epoch=0)
    with pytest.raises(OSError, match=r"No space left on device \(writing a snapshot\)") as caught:
        writer.wait()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename.endswith("manifest.json")
    assert not list(tmp_path.glob("snapshot-*.pt"))  # nothing counts as written
    writer.wait()  # reported once


class HeldManager(SnapshotManager):
    """Its writes wait until the test lets them go."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def write(self, *args, **kwargs):
        assert self.release.wait(timeout=60), "the write was never let go"
        return super().write(*args, **kwargs)


def test_async_snapshot_is_a_copy_taken_at_save_time(tmp_path):
    manager = HeldManager(tmp_path)
    writer = SnapshotWriter(manager, asynchronous=True)
    weights = torch.zeros(1000)
    for step in (1, 2):
        manager.release.clear()
        weights.fill_(step)
        writer.save(snapshot_state(w=weights), step=step, epoch=0)
        waiting = threading.Thread(target=writer.wait_staged)  # the engine's call before the optimizer step
        waiting.start()
        waiting.join(timeout=30)  # returns after the copy, while the write is still held
        assert not waiting.is_alive(), "wait_staged waited for the write (or forever)"
        weights.fill_(-1)  # training goes on and changes the live tensor
        manager.release.set()
    writer.wait()
    entries = SnapshotManager(tmp_path).entries()
    for entry in entries:
        state = SnapshotManager(tmp_path).load_entry(entry)
        assert torch.equal(state["model"]["w"], torch.full((1000,), float(entry["step"])))
    assert [e["step"] for e in entries] == [1, 2]
