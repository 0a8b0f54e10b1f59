"""Snapshots in an object store: a real S3-compatible server (moto's, started here on 127.0.0.1)
talked to through s3fs. Nothing of ours is mocked: the conditional manifest write is refused by
the server itself."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import socket

import pytest
import torch
from conftest import FAST, assert_same_weights, latest_snapshot, run_cli, snapshot_state

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from runner.errors import UserError  # noqa: E402
from runner.snapshot import SnapshotError, SnapshotManager  # noqa: E402
from runner.snapshot.object_store import ManifestConflict, ObjectStore  # noqa: E402

BUCKET = "runs"


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
    server.stop()


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

    missing = importlib.util.find_spec("gcsfs") is None  # not in the test extra: the usual case
    with pytest.raises(UserError, match="pip install gcsfs" if missing else "no conditional manifest publish"):
        check_store_config(cfg("gs://bucket/run"))
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
    assert "resumed from step-000000040" in first.output  # the SIGKILLed worker's restart read the store
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
