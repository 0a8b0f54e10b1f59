"""Snapshots in an object store: a real S3-compatible server (moto's, started here on 127.0.0.1)
talked to through s3fs. Nothing of ours is mocked: the conditional manifest write is refused by
the server itself."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import signal
import socket
import time

import pytest
import torch
from conftest import FAST, assert_same_weights, latest_snapshot, run_cli, snapshot_state, start_cli, stop_when

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from runner.errors import UserError  # noqa: E402
from runner.snapshot import SnapshotError, SnapshotManager  # noqa: E402
from runner.snapshot.object_store import ManifestConflict, ObjectStore  # noqa: E402

BUCKET = "runs"
SERVER: dict = {}  # the running moto server and its port: a test stops it and starts a new one there


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """The server, and the environment a user of a real bucket would set (credentials, endpoint)."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    SERVER.update(server=server, port=port)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        if not fs.exists(BUCKET):  # moto keeps its buckets in-process, across servers of one session
            fs.mkdir(BUCKET)
        yield env, fs
    SERVER["server"].stop()


def _stop_server() -> None:
    SERVER["server"].stop()


def _start_server() -> None:
    """A new server on the same port: moto keeps the buckets and objects in this process."""
    SERVER["server"] = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=SERVER["port"], verbose=False)
    SERVER["server"].start()


@pytest.fixture
def url(s3_env, request):
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}"


def _manager(url, tmp_path, **kw) -> SnapshotManager:
    return SnapshotManager(None, store=ObjectStore(url, tmp_path / "staging"), **kw)


def _save(manager: SnapshotManager, step: int):
    return manager.save(snapshot_state(w=torch.full((4,), float(step))), step=step, epoch=0)


def _objects(fs, url) -> set[str]:
    return {p.rsplit("/", 1)[1] for p in fs.ls(url.split("://")[1])}


def test_versions_are_listed_only_after_their_objects_verify(s3_env, url, tmp_path):
    _, fs = s3_env
    manager = _manager(url, tmp_path, keep_last=2)
    for step in (10, 20, 30):
        _save(manager, step)
    listed = manager.entries()
    assert [v.step for v in listed] == [20, 30]
    assert _objects(fs, url) == {"manifest.json", *(v.object for v in listed)}  # retention removed step 10
    assert all(v.object.startswith(v.file + ".") for v in listed)  # a name no other writer uses
    version, state = _manager(url, tmp_path / "reader").load_latest()
    assert version.step == 30 and torch.equal(state["model"]["w"], torch.full((4,), 30.0))
    raw = fs.cat_file(f"{url.split('://')[1]}/manifest.json").decode()
    assert "testing" not in raw and "AWS" not in raw  # no credentials in the manifest
    assert not list((tmp_path / "staging").iterdir())  # staging files are gone once uploaded


def test_a_corrupted_object_falls_back_to_the_previous_version(s3_env, url, tmp_path, caplog):
    _, fs = s3_env
    manager = _manager(url, tmp_path)
    _save(manager, 10)
    newest = _save(manager, 20)
    key = f"{url.split('://')[1]}/{newest.object}"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    with caplog.at_level(logging.WARNING):
        version, state = _manager(url, tmp_path / "reader").load_latest()
    assert version.step == 10 and torch.equal(state["model"]["w"], torch.full((4,), 10.0))
    assert "does not match its sha256" in caplog.text
    fs.rm_file(key)  # a missing object too
    assert _manager(url, tmp_path / "reader").load_latest()[0].step == 10


def test_two_writers_of_one_manifest_one_wins_nothing_torn(s3_env, url, tmp_path):
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


def test_a_writer_that_lost_the_race_lists_nothing(s3_env, url, tmp_path):
    """Through the catalogue: the loser's version is not listed, the winner's manifest is intact."""
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


def test_retention_never_deletes_the_resumed_from_version(s3_env, url, tmp_path):
    _, fs = s3_env
    first = _manager(url, tmp_path, keep_last=1)
    _save(first, 10)
    older = first.entries()[0]
    # keep_last=1 keeps only the newest; make it corrupt so that a resume falls back to step 10...
    resumed = _manager(url, tmp_path, keep_last=2)
    _save(resumed, 20)
    newest = resumed.entries()[-1]
    fs.pipe_file(f"{url.split('://')[1]}/{newest.object}", b"garbage")
    run = _manager(url, tmp_path, keep_last=1)
    loaded, _ = run.load_latest()
    assert loaded.step == 10
    run.pin(loaded)  # what the training session does with the version it resumed from
    for step in (30, 40, 50):  # ...then the resumed run writes on with keep_last=1
        _save(run, step)
    assert [v.step for v in run.entries()] == [10, 50]
    assert older.object in _objects(fs, url)


def test_checks_name_the_missing_package_and_the_missing_bucket(s3_env, tmp_path):
    from omegaconf import OmegaConf

    from runner.driver.checks.store import check_store_config, check_store_reachable

    def cfg(url, **snapshot):
        return OmegaConf.create({"snapshot": {"dir": url, "resume": "auto", "format": "file", **snapshot}})

    if importlib.util.find_spec("adlfs") is None:  # each backend's package is an extra of its own
        with pytest.raises(UserError, match="pip install adlfs"):
            check_store_config(cfg("az://container/run"))
    with pytest.raises(UserError, match="credentials"):
        check_store_config(cfg("s3://key:secret@bucket/run"))
    check_store_config(cfg(f"s3://{BUCKET}/run", format="dcp"))  # sharded versions are kept in stores too
    check_store_config(cfg(f"s3://{BUCKET}/run"))
    with pytest.raises(UserError, match="does not exist"):
        check_store_reachable(cfg("s3://no-such-bucket/run"), tmp_path)
    check_store_reachable(cfg(f"s3://{BUCKET}/fresh"), tmp_path)


def test_an_unreachable_store_is_a_clear_error(tmp_path):
    from omegaconf import OmegaConf

    from runner.driver.checks.store import check_store_reachable

    cfg = OmegaConf.create({"snapshot": {"dir": "s3://bucket/run"}})
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}",
            "AWS_MAX_ATTEMPTS": "1",
        }.items():
            mp.setenv(key, value)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(UserError, match="cannot be reached"):
            check_store_reachable(cfg, tmp_path)
    s3fs.S3FileSystem.clear_instance_cache()


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


def test_sharded_versions_are_uploaded_checked_and_read_by_ranges(s3_env, url, tmp_path, caplog):
    from runner import snapshot as snap
    from runner.snapshot.sharded import full_model

    _, fs = s3_env
    manager = _manager(url, tmp_path, keep_last=2)
    for step in (10, 20, 30):
        newest = _save_sharded(manager, step, block_size=1024)
    assert not list((tmp_path / "staging").iterdir())  # the staging folders are gone once uploaded
    stored = fs.find(url.split("://")[1])
    assert {p.split("/", 2)[2].split("/")[0] for p in stored} == {"manifest.json", "step-000000020", "step-000000030"}
    assert {f.object for f in newest.files} == {p.split("/", 2)[2] for p in stored if "step-000000030" in p}
    reader = _manager(url, tmp_path / "reader")
    version, state = reader.load_latest()
    weights = full_model(state[snap.SHARDED_KEY])  # ranged reads of the objects, each block checked
    assert version.step == 30 and torch.equal(weights["w"], torch.arange(3000.0) + 30)
    assert not (tmp_path / "reader" / "step-000000030").exists()  # nothing downloaded whole to disk
    shard = next(f for f in newest.files if f.name.endswith(".distcp"))
    key = f"{url.split('://')[1]}/{shard.object}"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(data))  # the same size: only the blocks read show it
    version, state = reader.newest_valid_entry()[0], reader.load_entry(reader.entries()[-1], whole=False)
    assert version.step == 30
    with pytest.raises(snap.SnapshotError, match=r"does not match its sha256 in block [0-9]+"):
        full_model(state[snap.SHARDED_KEY])
    with caplog.at_level(logging.WARNING):
        version, state = reader.load_latest()  # the whole check finds it too, and falls back
    assert version.step == 20 and torch.equal(full_model(state[snap.SHARDED_KEY])["b"], torch.full((2,), 20.0))


def test_large_shards_go_up_one_checked_part_per_block(s3_env, url, tmp_path):
    import os

    from runner.snapshot.digests import digest_of_bytes

    _, fs = s3_env
    store = ObjectStore(url, tmp_path / "staging")
    data = {"__0_0.distcp": os.urandom(11 * 2**20), ".metadata": b"m", "loop.pt": b"l"}
    digests = {name: digest_of_bytes(name, body, block_size=5 * 2**20) for name, body in data.items()}

    def staged(tag):
        folder = store.staging_folder("step-000000001", tag)
        folder.mkdir(parents=True)
        for name, body in data.items():
            (folder / name).write_bytes(body)
        return folder

    files = store.commit_folder(staged("a"), "step-000000001", digests)
    big = next(f for f in files if f.name == "__0_0.distcp")
    assert len(big.blocks) == 3 and fs.cat_file(f"{url.split('://')[1]}/{big.object}") == data["__0_0.distcp"]
    folder = staged("b")
    with open(folder / "__0_0.distcp", "r+b") as f:  # changed on disk after its writer hashed it
        f.seek(6 * 2**20)
        f.write(b"\0")
    with pytest.raises(SnapshotError, match="changed since it was written"):
        store.commit_folder(folder, "step-000000001", digests)
    assert len(fs.find(url.split("://")[1])) == 3  # only the first commit's objects


def test_objects_a_killed_writer_left_unlisted_are_removed_once_old(s3_env, url, tmp_path, monkeypatch, caplog):
    import time

    from runner.snapshot import orphans
    from runner.snapshot.conditional import s3_call

    _, fs = s3_env
    manager = _manager(url, tmp_path, keep_last=1)
    for step in (10, 20):
        _save(manager, step)
    prefix = url.split("://")[1]
    bucket, key = prefix.split("/", 1)
    left = ["snapshot-000000030.pt.0123456789ab", "step-000000040/__1_0.distcp.0123456789ab"]
    foreign = ["notes.txt", "snapshot-000000030.pt", "step-000000040/__1_0.distcp"]  # not names our uploads take
    for name in left + foreign:
        fs.pipe_file(f"{prefix}/{name}", b"x")
    store = manager.store
    before = set(fs.find(prefix))
    assert store.remove_orphans() == [] and set(fs.find(prefix)) == before  # young: maybe a live writer's
    # An upload killed midway (moto dates every incomplete upload 2010: it is created after the check above)
    upload = s3_call(fs, "create_multipart_upload", Bucket=bucket, Key=f"{key}/snapshot-000000050.pt.aaaaaaaaaaaa")
    s3_call(fs, "upload_part", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"], PartNumber=1, Body=b"x")

    monkeypatch.setattr(orphans, "ORPHAN_AGE", -60.0)  # as if a day had passed
    with caplog.at_level(logging.INFO):
        manager.remove_stale_temporaries()  # what the lead does when a run starts
    assert "removed 3 object(s)" in caplog.text, caplog.text
    assert set(fs.find(prefix)) == before - {f"{prefix}/{name}" for name in left}
    assert s3_call(fs, "list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", []) == []
    version, state = manager.load_latest()  # the listed version is untouched
    assert version.step == 20 and torch.equal(state["model"]["w"], torch.full((4,), 20.0))

    fs.rm_file(f"{prefix}/manifest.json")  # a lost manifest: its objects are still someone's data
    assert store.remove_orphans(now=time.time()) == [] and fs.exists(f"{prefix}/{version.object}")


# ---- end to end: 2 DDP workers, a SIGKILLed worker, a fresh machine ------------------------------
RUN = ["model=mlp", "model.dropout=0.1", "dataset.size=4096", "trainer.save_every_steps=20", *FAST]


@pytest.mark.slow
def test_killed_worker_then_empty_outputs_resume_from_the_store_bitwise(s3_env, url, tmp_path):
    env, _ = s3_env
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
    assert not (work / "outputs" / "cloud" / "snapshots").exists()  # versions live in the store only
    assert "testing" not in (work / "outputs" / "cloud" / "config.yaml").read_text()

    shutil.rmtree(work / "outputs")  # a fresh machine: the same command, more epochs
    second = run_cli([*on_store, "trainer.total_epochs=4", "snapshot.keep_last=1"], work, env=env)
    assert second.returncode == 0, second.output
    assert "resumed from snapshot-000000128.pt" in second.output
    listed = [v.file for v in _manager(url, tmp_path / "reader").entries()]
    assert listed == ["snapshot-000000128.pt", "snapshot-000000256.pt"]  # the resumed-from version is kept
    version, state = _manager(url, tmp_path / "reader").load_latest()
    assert version.epoch == 4
    assert_same_weights(state["model"], reference["model"])
    for a, b in zip(state["optimizer"]["state"].values(), reference["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)

    shutil.rmtree(work / "outputs")  # the same command once more: the store says it is done
    again = run_cli([*on_store, "trainer.total_epochs=4", "snapshot.keep_last=1"], work, env=env)
    assert again.returncode == 0, again.output
    assert _manager(url, tmp_path / "reader").load_latest()[0].step == version.step


def test_file_urls_and_folder_names_are_local_stores(tmp_path):
    from runner.snapshot import LocalStore
    from runner.snapshot.location import open_store

    elsewhere = open_store(f"file://{tmp_path}/shared/run", tmp_path / "run")
    assert isinstance(elsewhere, LocalStore) and elsewhere.location == tmp_path / "shared" / "run"
    inside = open_store("snapshots", tmp_path / "run")
    assert isinstance(inside, LocalStore) and inside.location == tmp_path / "run" / "snapshots"
    manager = SnapshotManager(None, store=elsewhere)
    _save(manager, 10)
    assert manager.load_latest()[0].step == 10 and (tmp_path / "shared" / "run" / "manifest.json").is_file()


@pytest.mark.slow
def test_fsdp_shards_in_the_store_resume_on_another_worker_count_past_a_corrupt_shard(s3_env, url, tmp_path):
    from runner import snapshot as snap
    from runner.snapshot.sharded import full_model

    env, fs = s3_env
    on_store = [*RUN, "trainer.strategy=fsdp", "name=sharded", f"snapshot.dir={url}"]
    first = run_cli(
        [*on_store, "trainer.total_epochs=2", "trainer.crash_at_step=45", "trainer.crash_rank=1"], tmp_path, env=env
    )
    assert first.returncode == 0, first.output
    # the SIGKILLed worker's restart read the store (step 20 when step 40's shards were still in flight)
    assert re.search(r"resumed from step-0000000[24]0", first.output), first.output
    assert not (tmp_path / "outputs" / "sharded" / "snapshots").exists()
    staging = tmp_path / "outputs" / "sharded" / ".snapshot-staging"
    assert not staging.exists() or not any(staging.iterdir())  # every version went up and left no copy
    listed = _manager(url, tmp_path / "reader").entries()
    newest, previous = listed[-1], listed[-2]
    assert newest.file == "step-000000128" and {f.name for f in newest.files} == {
        ".metadata",
        "loop.pt",
        "__0_0.distcp",
        "__1_0.distcp",
    }
    assert all(f.blocks and f.object.startswith(newest.file + "/") for f in newest.files)
    shard = next(f for f in newest.files if f.name == "__1_0.distcp")
    key = f"{url.split('://')[1]}/{shard.object}"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(data))  # one rank's object corrupted, its size unchanged

    shutil.rmtree(tmp_path / "outputs")  # a fresh machine with 3 workers: the same command, one step more
    again = run_cli(
        [*on_store, "launch.nproc_per_node=3", f"trainer.max_steps={previous.step + 1}", "trainer.total_epochs=2"],
        tmp_path,
        env=env,
    )
    assert again.returncode == 0, again.output
    assert f"skipping snapshot {newest.file}" in again.output and "does not match its sha256" in again.output
    assert f"resumed from {previous.file}" in again.output
    resumed = next(v for v in _manager(url, tmp_path / "reader").entries() if v.step == previous.step + 1)
    assert {f.name for f in resumed.files} >= {f"__{r}_0.distcp" for r in range(3)}
    weights = full_model(_manager(url, tmp_path / "reader").load_entry(resumed)[snap.SHARDED_KEY])
    old = full_model(_manager(url, tmp_path / "reader").load_entry(previous)[snap.SHARDED_KEY])
    for name, tensor in old.items():  # one Adam step of lr 0.01 from the previous version
        assert 0 < (weights[name] - tensor).abs().max() < 0.02, name


# ---- background uploads (snapshot.upload=async) ----------------------------------------------------
def _cached(url, tmp_path, **kw):
    """The catalogue a worker uses with snapshot.upload=async; its client gives up on a refused
    connection at once (AWS_MAX_ATTEMPTS=1 does the same for the CLI), so the outage shows quickly."""
    import s3fs

    from runner.snapshot.cached import CachedManager

    fs = s3fs.S3FileSystem(skip_instance_cache=True, config_kwargs={"retries": {"max_attempts": 1}})
    remote = SnapshotManager(None, store=ObjectStore(url, tmp_path / ".snapshot-staging", fs=fs), **kw)
    return CachedManager(tmp_path / "snapshot-cache", remote)


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_background_uploads_ride_out_a_store_outage(s3_env, url, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    manager = _cached(url, tmp_path, keep_last=2)
    _save(manager, 10)
    manager.finish_uploads(30)
    assert [v.step for v in manager.remote.entries()] == [10]
    _stop_server()
    try:
        for step in (20, 30):
            started = time.perf_counter()
            _save(manager, step)
            assert time.perf_counter() - started < 1.0  # the writer never waits for the store
        _wait_for(lambda: "training goes on" in caplog.text)
        time.sleep(2)  # several retries fail meanwhile
        warned = [r.getMessage() for r in caplog.records if "training goes on" in r.getMessage()]
        assert len(warned) == 1, warned  # warned once
        assert url in warned[0] and str(tmp_path / "snapshot-cache") in warned[0]
        assert [v.step for v in manager.entries_local()] == [20, 30]  # kept locally until uploaded
        # A resume on this machine while the store is down reads the local copies.
        version, state = _cached(url, tmp_path).load_latest()
        assert (
            version.step == 30 and version.object is None and torch.equal(state["model"]["w"], torch.full((4,), 30.0))
        )
        assert "reading only the local copies" in caplog.text
        assert manager.finish_uploads(1) is None and "not finished within 1 s" in caplog.text
        assert "only local, in" in caplog.text and "snapshot-000000020.pt (step 20)" in caplog.text
    finally:
        _start_server()
    _wait_for(lambda: "work again" in caplog.text)  # uploaded as soon as the store is back, nobody waiting
    _wait_for(lambda: not manager.uploads().pending())
    assert sum("work again" in r.getMessage() for r in caplog.records) == 1
    assert [v.step for v in manager.remote.entries()] == [20, 30]  # remote retention: keep_last=2

    # Down again, and the process ends with a version only here: the next one on this machine uploads it.
    _stop_server()
    try:
        _save(manager, 40)
        manager.close()
    finally:
        _start_server()
    later = _cached(url, tmp_path, keep_last=2)
    later.finish_uploads(30)
    assert f"snapshot uploads done: {url} holds snapshot-000000040.pt (step 40)" in caplog.text
    assert [v.step for v in later.remote.entries()] == [30, 40]
    assert [v.step for v in later.entries_local()] == [40]  # uploaded: the cache keeps its newest only
    version, state = _manager(url, tmp_path / "fresh").load_latest()  # a fresh machine reads the store
    assert version.step == 40 and version.object and torch.equal(state["model"]["w"], torch.full((4,), 40.0))
    later.close()


def test_upload_checks():
    from omegaconf import OmegaConf

    from runner.driver.checks.store import check_store_config
    from runner.snapshot.location import uploads_in_background

    def cfg(url, **snapshot):
        fields = {"dir": url, "resume": "auto", "format": "file", **snapshot}
        return OmegaConf.create({"snapshot": fields, "trainer": {"strategy": "ddp"}})

    assert uploads_in_background(cfg("s3://b/run"))  # the default with a bucket
    assert not uploads_in_background(cfg("s3://b/run", upload="sync"))
    assert not uploads_in_background(cfg("s3://b/run", upload="auto", format="dcp"))
    assert not uploads_in_background(cfg("snapshots")) and not uploads_in_background(cfg("file:///tmp/x"))
    with pytest.raises(UserError, match="nothing to upload"):
        check_store_config(cfg("snapshots", upload="async"))
    with pytest.raises(UserError, match="not uploaded in the background yet"):
        check_store_config(cfg("s3://b/run", upload="async", format="dcp"))
    check_store_config(cfg("snapshots", upload="sync"))


def test_retries_back_off_exponentially_with_jitter_up_to_a_cap():
    from runner.snapshot.upload import BACKOFF_CAP, BACKOFF_FIRST, backoff

    assert backoff(0, lambda: 0.0) == BACKOFF_FIRST / 2 and backoff(0, lambda: 1.0) == BACKOFF_FIRST
    assert backoff(3, lambda: 1.0) == BACKOFF_FIRST * 8
    assert backoff(50, lambda: 1.0) == BACKOFF_CAP and backoff(50, lambda: 0.0) == BACKOFF_CAP / 2
    assert len({backoff(4) for _ in range(20)}) > 1  # jitter


def _logged(run_dir, text: str) -> bool:
    log_file = run_dir / "train.log"
    return log_file.is_file() and text in log_file.read_text(errors="replace")


def _cache_steps(run_dir) -> list[int]:
    try:
        return [v.step for v in SnapshotManager(run_dir / "snapshot-cache").entries()]
    except Exception:  # being replaced right now
        return []


OUTAGE_ENV = {"AWS_MAX_ATTEMPTS": "1"}  # a refused connection fails at once, not after botocore's retries


@pytest.mark.slow
def test_store_outage_mid_run_training_goes_on_then_a_fresh_machine_resumes(s3_env, url, tmp_path):
    env, fs = s3_env
    for folder in ("ref", "machine"):
        (tmp_path / folder).mkdir()
    ref = run_cli([*RUN, "trainer.total_epochs=4", "name=reference"], tmp_path / "ref")
    assert ref.returncode == 0, ref.output
    reference = latest_snapshot(tmp_path / "ref" / "outputs" / "reference")

    work, run_dir = tmp_path / "machine", tmp_path / "machine" / "outputs" / "cloud"
    on_store = [*RUN, "name=cloud", f"snapshot.dir={url}"]
    proc = start_cli([*on_store, "trainer.total_epochs=2"], work, env={**env, **OUTAGE_ENV})
    try:
        _wait_for(lambda: _manager(url, tmp_path / "r").entries() or proc.poll() is not None, 120)
        _stop_server()  # the store goes away once it holds the first version
        try:
            _wait_for(lambda: _logged(run_dir, "training goes on") or proc.poll() is not None, 120)
            _wait_for(lambda: 128 in _cache_steps(run_dir) or proc.poll() is not None, 120)
            assert proc.poll() is None  # the end of the run waits for the store...
        finally:
            _start_server()  # ...which comes back
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    output = out + err
    assert proc.returncode == 0, output
    assert output.count("training goes on") == 1, output  # warned once
    assert f"snapshot upload to {url} failed" in output and str(run_dir / "snapshot-cache") in output
    assert output.count("work again") == 1, output
    assert f"snapshot uploads done: {url} holds snapshot-000000128.pt (step 128)" in output
    listed = [v.file for v in _manager(url, tmp_path / "reader").entries()]
    assert listed[-1] == "snapshot-000000128.pt" and len(listed) == 3, listed  # keep_last=3, every one uploaded
    assert _cache_steps(run_dir) == [128]  # uploaded: the cache keeps its newest only

    shutil.rmtree(work / "outputs")  # a fresh machine: the same command, more epochs
    second = run_cli([*on_store, "trainer.total_epochs=4"], work, env=env)
    assert second.returncode == 0, second.output
    assert "resumed from snapshot-000000128.pt" in second.output
    version, state = _manager(url, tmp_path / "reader").load_latest()
    assert version.step == 256 and version.object
    assert_same_weights(state["model"], reference["model"])
    for a, b in zip(state["optimizer"]["state"].values(), reference["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_during_an_outage_names_both_places_and_the_same_machine_resumes_locally(s3_env, url, tmp_path):
    env, _ = s3_env
    run_dir = tmp_path / "outputs" / "stopped"
    command = [*RUN, "name=stopped", f"snapshot.dir={url}", "trainer.total_epochs=30", "launch.stop_timeout=12"]
    proc = start_cli(command, tmp_path, env={**env, **OUTAGE_ENV})
    try:
        _wait_for(lambda: _manager(url, tmp_path / "r").entries() or proc.poll() is not None, 120)
        _stop_server()
        try:
            _wait_for(lambda: _logged(run_dir, "training goes on") or proc.poll() is not None, 120)
            out, err = stop_when(proc, lambda: True)
        finally:
            _start_server()
    finally:
        proc.kill()
    output = out + err
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert (run_dir / "logs" / "stopped.json").exists(), output  # the workers ended within launch.stop_timeout
    in_store = _manager(url, tmp_path / "r").entries()[-1]
    stopped_at = json.loads((run_dir / "logs" / "stopped.json").read_text())["step"]
    assert in_store.step < stopped_at
    # One line: what is in the store, and what is only here (the stop's version among them).
    line = next(x for x in output.splitlines() if "snapshot uploads not finished within" in x)
    assert f"{url} holds {in_store.file} (step {in_store.step})" in line, line
    assert f"only local, in {run_dir / 'snapshot-cache'}: " in line and f"(step {stopped_at})" in line, line
    assert _cache_steps(run_dir)[-1] == stopped_at

    # The store is back: the same command on this machine resumes from the newer local version,
    # and uploads it and what it writes.
    epochs = SnapshotManager(run_dir / "snapshot-cache").entries()[-1].epoch + 1
    again = run_cli([*command[:-2], f"trainer.total_epochs={epochs}"], tmp_path, env=env)
    assert again.returncode == 0, again.output
    assert f"resumed from snapshot-{stopped_at:09d}.pt" in again.output
    assert f"snapshot uploads done: {url} holds snapshot-{64 * epochs:09d}.pt" in again.output
    listed = [v.step for v in _manager(url, tmp_path / "r").entries()]
    assert stopped_at in listed and listed[-1] == 64 * epochs, listed  # uploaded, and kept: the run resumed from it


def test_uploads_in_parts_are_verified_by_what_was_sent(s3_env, url, tmp_path, monkeypatch):
    import hashlib

    from runner.snapshot import s3_parts
    from runner.snapshot.versions import StoredFile

    _, fs = s3_env
    monkeypatch.setattr(s3_parts, "PART", 5 * 2**20)  # S3's smallest part: 12 MB go up in 3 parts,
    monkeypatch.setattr(s3_parts, "PARTS_IN_FLIGHT", 2)  # 2 at once, then 1
    data = torch.randint(0, 255, (12 * 2**20,), dtype=torch.uint8).numpy().tobytes()
    local = tmp_path / "snapshot-000000010.pt"
    local.write_bytes(data)
    store = ObjectStore(url, tmp_path / "staging")
    expected = StoredFile(local.name, len(data), hashlib.sha256(data).hexdigest())
    stored = store.upload_file(local, expected)
    assert fs.cat_file(f"{url.split('://')[1]}/{stored.object}") == data and local.exists()
    store.check_verified(store.location / stored.name, stored)  # what a reader checks (the path the manager names)
    wrong = StoredFile(local.name, len(data), "0" * 64)  # the file is not what its manifest entry says
    with pytest.raises(SnapshotError, match="changed while it was uploaded"):
        store.upload_file(local, wrong)
    assert _objects(fs, url) == {stored.object}  # the refused upload left nothing behind


def test_a_resume_takes_the_newest_intact_copy_of_either_place(s3_env, url, tmp_path, caplog):
    _, fs = s3_env
    manager = _cached(url, tmp_path, keep_last=2)
    for step in (10, 20):
        _save(manager, step)
    manager.finish_uploads(30)
    manager.close()
    local = tmp_path / "snapshot-cache" / "snapshot-000000020.pt"
    local.write_bytes(local.read_bytes()[:-1] + b"!")  # the cached copy rots
    reader = _cached(url, tmp_path)
    with caplog.at_level(logging.WARNING):
        version, state = reader.load_latest()
    assert version.step == 20 and version.object is not None  # the store's copy of the same step
    assert "does not match its sha256" in caplog.text and torch.equal(state["model"]["w"], torch.full((4,), 20.0))
    fs.rm_file(f"{url.split('://')[1]}/{version.object}")  # and the store loses it too
    version, state = reader.load_latest()
    assert version.step == 10 and torch.equal(state["model"]["w"], torch.full((4,), 10.0))
    assert [v.step for v in reader.entries()] == [10, 20]  # listed once each, wherever they are


def test_a_cached_copy_that_rotted_before_its_upload_is_never_uploaded(s3_env, url, tmp_path, caplog):
    manager = _cached(url, tmp_path)
    _save(manager, 10)
    manager.finish_uploads(30)
    _stop_server()
    try:
        _save(manager, 20)
        _wait_for(lambda: "training goes on" in caplog.text)
        cached = tmp_path / "snapshot-cache" / "snapshot-000000020.pt"
        cached.write_bytes(cached.read_bytes()[:-1] + b"!")
    finally:
        _start_server()
    with caplog.at_level(logging.ERROR):
        manager.finish_uploads(30)
    assert "snapshot snapshot-000000020.pt is not uploaded" in caplog.text and "changed while" in caplog.text
    assert [v.step for v in manager.remote.entries()] == [10]  # the store keeps what it had, intact
    assert _manager(url, tmp_path / "fresh").load_latest()[0].step == 10
    manager.close()
