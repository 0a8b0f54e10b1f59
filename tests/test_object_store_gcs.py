"""Snapshots in Google Cloud Storage: a real GCS server (gcp-storage-emulator, started here on
127.0.0.1) talked to through gcsfs. Nothing of ours is mocked.

The emulator ignores `ifGenerationMatch` (it overwrites whatever is there), so the fixture adds
that one precondition to its upload handler, as GCS documents it: the upload goes ahead only if
the object's live generation is the one named (0: no live object), otherwise HTTP 412."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from http import HTTPStatus

import pytest
import torch
from conftest import FAST, assert_same_weights, latest_snapshot, run_cli, snapshot_state

# gcsfs probes each bucket's type over gRPC (zonal buckets), which the emulator does not speak
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
gcsfs = pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")

from runner.errors import UserError  # noqa: E402
from runner.snapshot import SnapshotError, SnapshotManager  # noqa: E402
from runner.snapshot.object_store import ManifestConflict, NotAsListed, ObjectStore  # noqa: E402
from runner.snapshot.versions import StoredFile  # noqa: E402

BUCKET = "runs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_generation_match(insert):
    """The emulator's upload handler, honouring `ifGenerationMatch` as GCS does."""
    from gcp_storage_emulator.exceptions import NotFound

    def handler(request, response, storage, *args, **kwargs):
        wanted, name = request.query.get("ifGenerationMatch"), request.query.get("name")
        if wanted and name:
            try:
                live = str(storage.get_file_obj(request.params["bucket_name"], name[0])["generation"])
            except NotFound:
                live = "0"
            if live != wanted[0]:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                return None
        return insert(request, response, storage, *args, **kwargs)

    return handler


@pytest.fixture(scope="module")
def gcs_env():
    """The server, and the environment a user of the emulator would set (endpoint; anonymous)."""
    port = _free_port()
    env = {
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
        "FSSPEC_GS_TOKEN": "anon",  # read by fsspec in the launched processes
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    with pytest.MonkeyPatch.context() as mp:
        import fsspec.config
        from gcp_storage_emulator import handlers

        for _, methods in emulator.HANDLERS:
            for method, handler in list(methods.items()):
                if handler is handlers.objects.insert:
                    mp.setitem(methods, method, _with_generation_match(handler))
        mp.setattr(handlers.objects, "insert", _with_generation_match(handlers.objects.insert))
        server = emulator.create_server("127.0.0.1", port, in_memory=True)
        server.start()
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setitem(fsspec.config.conf, "gs", {"token": "anon"})
        gcsfs.GCSFileSystem.clear_instance_cache()
        fs = fsspec.filesystem("gs")
        fs.mkdir(BUCKET)
        yield env, fs
        server.stop()
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture
def url(gcs_env, request):
    return f"gs://{BUCKET}/{request.node.name}"


def _manager(url, tmp_path, **kw) -> SnapshotManager:
    return SnapshotManager(None, store=ObjectStore(url, tmp_path / "staging"), **kw)


def _save(manager: SnapshotManager, step: int):
    return manager.save(snapshot_state(w=torch.full((4,), float(step))), step=step, epoch=0)


def _objects(fs, url) -> set[str]:
    return {p.rsplit("/", 1)[1] for p in fs.ls(url.split("://")[1], refresh=True)}


def test_versions_are_listed_verified_and_a_corrupt_one_is_skipped(gcs_env, url, tmp_path, caplog):
    _, fs = gcs_env
    manager = _manager(url, tmp_path, keep_last=2)
    for step in (10, 20, 30):
        _save(manager, step)
    listed = manager.entries()
    assert [v.step for v in listed] == [20, 30]
    assert _objects(fs, url) == {"manifest.json", *(v.object for v in listed)}  # retention removed step 10
    assert all(v.object.startswith(v.file + ".") for v in listed)  # a name no other writer uses
    assert not list((tmp_path / "staging").iterdir())  # staging files are gone once uploaded
    version, state = _manager(url, tmp_path / "reader").load_latest()
    assert version.step == 30 and torch.equal(state["model"]["w"], torch.full((4,), 30.0))

    key = f"{url.split('://')[1]}/{listed[-1].object}"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    with caplog.at_level(logging.WARNING):
        version, state = _manager(url, tmp_path / "reader").load_latest()
    assert version.step == 20 and torch.equal(state["model"]["w"], torch.full((4,), 20.0))
    assert "does not match its sha256" in caplog.text
    fs.rm_file(key)  # a missing object too
    assert _manager(url, tmp_path / "reader").load_latest()[0].step == 20


def test_two_writers_of_one_manifest_one_wins_nothing_torn(gcs_env, url, tmp_path):
    first, second = ObjectStore(url, tmp_path / "a"), ObjectStore(url, tmp_path / "b")
    assert first.read_manifest() is None and second.read_manifest() is None
    first.publish_manifest(b'{"format_version": 1, "snapshots": [], "by": "first"}')
    with pytest.raises(ManifestConflict, match="published by another writer"):
        second.publish_manifest(b'{"format_version": 1, "snapshots": [], "by": "second"}')
    assert json.loads(second.read_manifest())["by"] == "first"
    # Once both have read the same manifest, again only the first publish wins.
    first.read_manifest()
    second.publish_manifest(b'{"format_version": 1, "snapshots": [], "by": "second"}')
    with pytest.raises(ManifestConflict):
        first.publish_manifest(b'{"format_version": 1, "snapshots": [], "by": "first again"}')
    assert json.loads(ObjectStore(url, tmp_path / "c").read_manifest())["by"] == "second"
    # A writer publishes on from its own last publish.
    second.publish_manifest(b'{"format_version": 1, "snapshots": [], "by": "second again"}')
    assert json.loads(ObjectStore(url, tmp_path / "c").read_manifest())["by"] == "second again"


def test_a_writer_that_lost_the_race_lists_nothing(gcs_env, url, tmp_path):
    winner, loser = _manager(url, tmp_path / "w"), _manager(url, tmp_path / "l")
    _save(winner, 10)
    loser.store.read_manifest()
    staged = loser.write(snapshot_state(w=torch.zeros(4)), 20)
    stored = loser.store.commit_file(staged, "snapshot-000000020.pt")
    _save(winner, 30)  # publishes after the loser read the manifest
    with pytest.raises(ManifestConflict):
        loser.store.publish_manifest(b'{"format_version": 1, "snapshots": []}')
    assert [v.step for v in _manager(url, tmp_path / "r").entries()] == [10, 30]
    assert stored.object not in {v.object for v in winner.entries()}


def test_uploads_are_read_back_and_a_changed_file_never_goes_up(gcs_env, url, tmp_path):
    import hashlib

    _, fs = gcs_env
    store = ObjectStore(url, tmp_path / "staging")
    local = tmp_path / "snapshot-000000010.pt"
    local.write_bytes(b"weights" * 1000)
    expected = StoredFile(local.name, local.stat().st_size, hashlib.sha256(local.read_bytes()).hexdigest())
    stored = store.upload_file(local, expected)
    assert fs.cat_file(f"{url.split('://')[1]}/{stored.object}") == local.read_bytes()
    assert local.exists()  # the local copy is left in place
    local.write_bytes(b"rotten" * 1000)  # the cached copy rotted before its upload
    with pytest.raises(NotAsListed):
        store.upload_file(local, expected)
    assert _objects(fs, url) == {stored.object}  # nothing else went up


def _save_sharded(manager: SnapshotManager, step: int, block_size: int):
    from runner import snapshot as snap
    from runner.snapshot.sharded import ShardedSnapshotWriter

    writer = ShardedSnapshotWriter(manager, lead=True)
    writer.block_size = block_size
    loop = {snap.FORMAT_KEY: snap.FORMAT_VERSION, "train_state": {"step": step}, "rng": [], "metrics": []}
    shards = {"model": {"w": torch.arange(3000.0) + step, "b": torch.full((2,), float(step))}, "optimizer": {}}
    writer.save({**loop, "model": None, "optimizer": None}, step, 0, shards=shards, tag=f"t{step}")
    writer.wait()
    writer.close()
    return writer.last_entry


def test_sharded_versions_are_uploaded_checked_and_read_by_ranges(gcs_env, url, tmp_path, caplog):
    from runner import snapshot as snap
    from runner.snapshot.sharded import full_model

    _, fs = gcs_env
    manager = _manager(url, tmp_path, keep_last=2)
    for step in (10, 20, 30):
        newest = _save_sharded(manager, step, block_size=1024)
    assert not list((tmp_path / "staging").iterdir())
    stored = fs.find(url.split("://")[1], refresh=True)
    assert {p.split("/", 2)[2].split("/")[0] for p in stored} == {"manifest.json", "step-000000020", "step-000000030"}
    reader = _manager(url, tmp_path / "reader")
    version, state = reader.load_latest()
    assert version.step == 30 and torch.equal(full_model(state[snap.SHARDED_KEY])["w"], torch.arange(3000.0) + 30)
    shard = next(f for f in newest.files if f.name.endswith(".distcp"))
    key = f"{url.split('://')[1]}/{shard.object}"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    with caplog.at_level(logging.WARNING):
        version, state = reader.load_latest()  # the whole check finds it, and falls back
    assert version.step == 20 and torch.equal(full_model(state[snap.SHARDED_KEY])["b"], torch.full((2,), 20.0))


def test_objects_a_killed_writer_left_unlisted_are_removed_once_old(gcs_env, url, tmp_path):
    import time

    from runner.snapshot import orphans

    _, fs = gcs_env
    manager = _manager(url, tmp_path, keep_last=1)
    version = _save(manager, 10)
    prefix = url.split("://")[1]
    for name in ("snapshot-000000020.pt.0123456789ab", "notes.txt"):  # a killed writer's upload; a user's file
        fs.pipe_file(f"{prefix}/{name}", b"x")
    assert manager.store.remove_orphans() == []  # young: maybe a live writer's
    assert manager.store.remove_orphans(now=time.time() + orphans.ORPHAN_AGE + 60) == [
        "snapshot-000000020.pt.0123456789ab"
    ]
    assert _objects(fs, url) == {"manifest.json", version.object, "notes.txt"}


def test_checks_accept_gs_and_name_a_missing_bucket(gcs_env, tmp_path):
    from omegaconf import OmegaConf

    from runner.driver.checks.store import check_store_config, check_store_reachable

    def cfg(url, **snapshot):
        return OmegaConf.create({"snapshot": {"dir": url, "resume": "auto", "format": "file", **snapshot}})

    check_store_config(cfg(f"gs://{BUCKET}/run"))
    check_store_config(cfg(f"gs://{BUCKET}/run", upload="async"))
    check_store_config(cfg(f"gs://{BUCKET}/run", format="dcp"))
    with pytest.raises(UserError, match="does not exist"):
        check_store_reachable(cfg("gs://no-such-bucket/run"), tmp_path)
    check_store_reachable(cfg(f"gs://{BUCKET}/fresh"), tmp_path)
    with pytest.raises(SnapshotError):
        ObjectStore("gs://no-such-bucket/run", tmp_path).read_verified(
            tmp_path / "x", StoredFile("snapshot-000000010.pt", 1, "0" * 64, "snapshot-000000010.pt.0123456789ab")
        )


RUN = ["model=mlp", "model.dropout=0.1", "dataset.size=4096", "trainer.save_every_steps=20", *FAST]


@pytest.mark.slow
def test_killed_worker_then_empty_outputs_resume_from_the_bucket_bitwise(gcs_env, url, tmp_path):
    env, _ = gcs_env
    for folder in ("ref", "machine"):
        (tmp_path / folder).mkdir()
    ref = run_cli([*RUN, "trainer.total_epochs=4", "name=reference"], tmp_path / "ref")
    assert ref.returncode == 0, ref.output
    reference = latest_snapshot(tmp_path / "ref" / "outputs" / "reference")

    work = tmp_path / "machine"
    on_store = [*RUN, "name=cloud", f"snapshot.dir={url}"]
    first = run_cli(
        [*on_store, "trainer.total_epochs=2", "trainer.crash_at_step=45", "trainer.crash_rank=1"], work, env=env
    )
    assert first.returncode == 0, first.output
    assert "resumed from snapshot-000000040.pt" in first.output
    assert not (work / "outputs" / "cloud" / "snapshots").exists()  # versions live in the bucket only

    shutil.rmtree(work / "outputs")  # a fresh machine: the same command, more epochs
    second = run_cli([*on_store, "trainer.total_epochs=4", "snapshot.keep_last=1"], work, env=env)
    assert second.returncode == 0, second.output
    assert "resumed from snapshot-000000128.pt" in second.output
    listed = [v.file for v in _manager(url, tmp_path / "reader").entries()]
    assert listed == ["snapshot-000000128.pt", "snapshot-000000256.pt"]  # the resumed-from version is kept
    version, state = _manager(url, tmp_path / "reader").load_latest()
    assert version.epoch == 4
    assert_same_weights(state["model"], reference["model"])
