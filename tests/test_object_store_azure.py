"""Snapshots in Azure Blob Storage: a real Azure Storage server (Azurite, started here on
127.0.0.1: `npm install -g azurite`, or its folder in AZURITE_BIN) talked to through adlfs.
Nothing of ours is mocked: the conditional manifest write is refused by the server itself."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time

import pytest
import torch
from conftest import FAST, assert_same_weights, latest_snapshot, run_cli, snapshot_state

pytest.importorskip("adlfs")
AZURITE = shutil.which("azurite-blob", path=os.environ.get("AZURITE_BIN") or None)
if AZURITE is None:
    pytest.skip("Azurite (azurite-blob) is not installed", allow_module_level=True)

from runner.errors import UserError  # noqa: E402
from runner.snapshot import SnapshotManager  # noqa: E402
from runner.snapshot.object_store import ManifestConflict, NotAsListed, ObjectStore  # noqa: E402
from runner.snapshot.versions import StoredFile  # noqa: E402

CONTAINER = "runs"
# Azurite's documented development account (a well-known key, not a secret)
ACCOUNT = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def az_env():
    port = _free_port()
    server = subprocess.Popen(
        [
            AZURITE,
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
            "--inMemoryPersistence",
            "--silent",
            "--skipApiVersionCheck",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("Azurite did not start")
            time.sleep(0.2)
    env = {"AZURE_STORAGE_CONNECTION_STRING": ACCOUNT.format(port=port)}
    try:
        with pytest.MonkeyPatch.context() as mp:
            import adlfs
            import fsspec

            for key, value in env.items():
                mp.setenv(key, value)
            adlfs.AzureBlobFileSystem.clear_instance_cache()
            fs = fsspec.filesystem("az")
            fs.mkdir(CONTAINER)
            yield env, fs
            adlfs.AzureBlobFileSystem.clear_instance_cache()
    finally:
        server.kill()  # in memory: nothing to flush (a terminated Azurite waits for idle connections)
        server.wait()


@pytest.fixture
def url(az_env, request):
    return f"az://{CONTAINER}/{request.node.name}"


def _manager(url, tmp_path, **kw) -> SnapshotManager:
    return SnapshotManager(None, store=ObjectStore(url, tmp_path / "staging"), **kw)


def _save(manager: SnapshotManager, step: int):
    return manager.save(snapshot_state(w=torch.full((4,), float(step))), step=step, epoch=0)


def _objects(fs, url) -> set[str]:
    return {p.rsplit("/", 1)[1] for p in fs.ls(url.split("://")[1], refresh=True)}


def test_versions_are_listed_verified_and_a_corrupt_one_is_skipped(az_env, url, tmp_path, caplog):
    _, fs = az_env
    manager = _manager(url, tmp_path, keep_last=2)
    for step in (10, 20, 30):
        _save(manager, step)
    listed = manager.entries()
    assert [v.step for v in listed] == [20, 30]
    assert _objects(fs, url) == {"manifest.json", *(v.object for v in listed)}  # retention removed step 10
    assert not list((tmp_path / "staging").iterdir())
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


def test_two_writers_of_one_manifest_one_wins_nothing_torn(az_env, url, tmp_path):
    first, second = ObjectStore(url, tmp_path / "a"), ObjectStore(url, tmp_path / "b")
    assert first.read_manifest() is None and second.read_manifest() is None
    first.publish_manifest(b'{"format_version": 1, "snapshots": [], "by": "first"}')
    with pytest.raises(ManifestConflict, match="published by another writer"):
        second.publish_manifest(b'{"format_version": 1, "snapshots": [], "by": "second"}')
    assert json.loads(second.read_manifest())["by"] == "first"
    first.read_manifest()
    second.publish_manifest(b'{"format_version": 1, "snapshots": [], "by": "second"}')
    with pytest.raises(ManifestConflict):
        first.publish_manifest(b'{"format_version": 1, "snapshots": [], "by": "first again"}')
    second.publish_manifest(b'{"format_version": 1, "snapshots": [], "by": "second again"}')
    assert json.loads(ObjectStore(url, tmp_path / "c").read_manifest())["by"] == "second again"


def test_uploads_are_read_back_and_a_changed_file_never_goes_up(az_env, url, tmp_path):
    import hashlib

    _, fs = az_env
    store = ObjectStore(url, tmp_path / "staging")
    local = tmp_path / "snapshot-000000010.pt"
    local.write_bytes(b"weights" * 1000)
    expected = StoredFile(local.name, local.stat().st_size, hashlib.sha256(local.read_bytes()).hexdigest())
    stored = store.upload_file(local, expected)
    assert fs.cat_file(f"{url.split('://')[1]}/{stored.object}") == local.read_bytes()
    local.write_bytes(b"rotten" * 1000)
    with pytest.raises(NotAsListed):
        store.upload_file(local, expected)
    assert _objects(fs, url) == {stored.object}


def test_checks_accept_az_and_name_a_missing_container(az_env, tmp_path):
    from omegaconf import OmegaConf

    from runner.driver.checks.store import check_store_config, check_store_reachable

    def cfg(url, **snapshot):
        return OmegaConf.create({"snapshot": {"dir": url, "resume": "auto", "format": "file", **snapshot}})

    check_store_config(cfg(f"az://{CONTAINER}/run", upload="async"))
    with pytest.raises(UserError, match="does not exist"):
        check_store_reachable(cfg("az://no-such-container/run"), tmp_path)
    check_store_reachable(cfg(f"az://{CONTAINER}/fresh"), tmp_path)


RUN = ["model=mlp", "model.dropout=0.1", "dataset.size=4096", "trainer.save_every_steps=20", *FAST]


@pytest.mark.slow
def test_killed_worker_then_empty_outputs_resume_from_the_container_bitwise(az_env, url, tmp_path):
    env, _ = az_env
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
    assert "AccountKey" not in (work / "outputs" / "cloud" / "config.yaml").read_text()
    shutil.rmtree(work / "outputs")  # a fresh machine: the same command, more epochs
    second = run_cli([*on_store, "trainer.total_epochs=4", "snapshot.keep_last=1"], work, env=env)
    assert second.returncode == 0, second.output
    assert "resumed from snapshot-000000128.pt" in second.output
    version, state = _manager(url, tmp_path / "reader").load_latest()
    assert version.epoch == 4
    assert_same_weights(state["model"], reference["model"])
