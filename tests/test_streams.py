"""Streaming (iterable) training data, in this process: the sharding rule counted sample by sample,
exact resume with loader workers, augmentation and packing, resume on another number of ranks, the
built-in sources and their errors."""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import signal
import tarfile

import numpy as np
import pytest
import torch
from conftest import assert_same_weights, metrics
from loop_helpers import RecordingRegression, config, train
from test_data import data_cfg
from torch.utils.data import IterableDataset

from runner.errors import UserError
from runner.streams.base import ShardedStream
from runner.streams.sources import TextShards, TokenShards, WebDatasetShards
from runner.train.stop import Stopped
from runner.train.streams import StreamBatches

CPU = torch.device("cpu")


class Numbered(ShardedStream):
    """`shards` shards of `per_shard` records; a sample is (x, y, id), x augmented by torch's RNG (only
    reproducible because the stream seeds every sample)."""

    def __init__(self, shards: int = 5, per_shard: int = 20) -> None:
        super().__init__()
        self.paths = [f"shard-{i}" for i in range(shards)]
        self.per_shard = per_shard

    def read(self, shard, start, step, offset):
        for i in range(start, self.per_shard, step):
            yield 0, shard * 1000 + i

    def samples(self, rid):
        x = torch.tensor([float(rid % 7), 1.0, -1.0])
        yield x, x[:1] * 0.5 - 1.0, torch.tensor(rid)

    def transform(self, sample):
        x, y, rid = sample
        return x + 0.1 * torch.rand(3), y, rid


def stream(dataset, workers=2, rank=0, world=1, batch=4, shuffle=True) -> StreamBatches:
    return StreamBatches(dataset, data_cfg(num_workers=workers), batch, rank, world, 7, shuffle, CPU)


def ids(batches) -> list[int]:
    return [i for b in batches for i in b[2].tolist()]


def take(batches: StreamBatches, epoch: int, n: int) -> list:
    """n batches trained, one more read ahead (as the loop does): the state covers the n."""
    it = batches.epoch(epoch, 0)
    got = [next(it) for _ in range(n + 1)]
    return got[:n]


def test_every_sample_once_over_2_ranks_x_2_workers_with_5_shards_and_after_a_resume_on_3_ranks(caplog):
    everything = sorted(s * 1000 + i for s in range(5) for i in range(20))
    ranks = [stream(Numbered(), rank=r, world=2) for r in range(2)]
    per_rank = [list(r.epoch(2, 0)) for r in ranks]
    assert len(per_rank[0]) == len(per_rank[1]), "the ranks step together to the end of the epoch"
    assert sorted(ids(per_rank[0]) + ids(per_rank[1])) == everything
    assert set(ids(per_rank[0])).isdisjoint(ids(per_rank[1]))
    assert ids(list(stream(Numbered(), rank=0, world=2).epoch(3, 0))) != ids(per_rank[0]), "epochs reshuffle"

    # 3 steps on 2 ranks x 2 workers, then the rest of the epoch on 3 ranks x 1 worker.
    first = [stream(Numbered(), rank=r, world=2) for r in range(2)]
    seen = [i for r in first for i in ids(take(r, 2, 3))]
    saved = [r.state_dict() for r in first]
    caplog.set_level(logging.WARNING)
    per_rank = []
    for r in range(3):
        resumed = stream(Numbered(), workers=1, rank=r, world=3)
        resumed.load_state(saved, 2)
        per_rank.append(list(resumed.epoch(2, 0)))
    steps = min(len(batches) for batches in per_rank)  # the ranks end together: at the first one's end
    rest = [i for batches in per_rank for i in ids(batches[:steps])]
    assert sorted(seen + rest) == everything, "nothing seen twice, nothing skipped"
    warnings = [r.message for r in caplog.records if "dealt out again" in r.message]
    assert len(warnings) == 1 and "not be bitwise equal" in warnings[0] and "2 ranks x 2 loader workers" in warnings[0]


def test_uneven_shards_are_striped_so_no_reader_idles():
    # 3 shards over 2 ranks x 2 workers: every shard is the tail, each reader takes every 4th record.
    everything = sorted(s * 1000 + i for s in range(3) for i in range(20))
    got = [ids(stream(Numbered(shards=3), rank=r, world=2).epoch(0, 0)) for r in range(2)]
    assert sorted(got[0] + got[1]) == everything and len(got[0]) == len(got[1]) == 30


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_next_batch_bitwise_with_workers_and_augmentation(workers):
    full = list(stream(Numbered(), workers=workers).epoch(1, 0))
    first = stream(Numbered(), workers=workers)
    head = take(first, 1, 5)
    resumed = stream(Numbered(), workers=workers)
    resumed.load_state([first.state_dict()], 1)
    tail = list(resumed.epoch(1, 0))
    assert len(head) + len(tail) == len(full) == (25 if workers == 0 else 26)  # each worker ends with 2 samples
    for a, b in zip(head + tail, full):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    inline = list(stream(Numbered(), workers=0, shuffle=False).epoch(1, 0))
    two = list(stream(Numbered(), workers=2, shuffle=False).epoch(1, 0))
    by_id = {int(i): x for b in inline for x, i in zip(b[0], b[2])}
    assert all(torch.equal(by_id[int(i)], x) for b in two for x, i in zip(b[0], b[2])), "augmentation per sample"


def write_text_shards(tmp_path, n=5, lines=25):
    for s in range(n):
        with open(tmp_path / f"part-{s}.txt", "w") as f:
            for j in range(lines):
                f.write(f"shard {s} line {j}: " + "abcdefghij"[: (j * 7) % 10] + "\n")
    return str(tmp_path / "part-*.txt")


def test_packing_joins_documents_across_shards_and_resumes_mid_document_bitwise(tmp_path):
    files = write_text_shards(tmp_path)
    make = lambda: stream(TextShards(files, seq_len=24, pack=True), workers=2)
    full = [b.clone() for b in make().epoch(0, 0)]
    assert all(b.shape[1] == 25 for b in full)
    ends = torch.cat([b[:, :-1] for b in full]).flatten().tolist().count(0)
    assert 3 <= ends <= 5, "an end-of-document token after each file (each worker's last window may be cut)"
    for n in (1, 6, 11):  # different depths, mid-document each time
        first = make()
        head = take(first, 0, n)
        resumed = make()
        resumed.load_state([first.state_dict()], 0)
        tail = list(resumed.epoch(0, 0))
        assert len(head) + len(tail) == len(full)
        assert all(torch.equal(a, b) for a, b in zip(head + tail, full))
    # Every byte of every file is in some window once (windows share one edge token).
    text = b"".join(open(p, "rb").read() for p in sorted(tmp_path.glob("part-*.txt")))
    counted = collections.Counter(text)
    windows = torch.cat([b[:, :-1] for b in full]).flatten().tolist()  # the shared edge counted once
    got = collections.Counter(t for t in windows if t != 0)
    assert all(got[k] <= v for k, v in counted.items()) and sum(got.values()) >= len(text) - 4 * 25


def test_json_lines_token_shards_and_webdataset_sources(tmp_path):
    with open(tmp_path / "a.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"text": "x" * 30 + str(i), "id": i}) + "\n")
    docs = list(TextShards(str(tmp_path / "*.jsonl"), seq_len=8, field="text", pack=True))
    assert [len(d) for d in docs] == [9] * len(docs) and sum(int((d[1:] == 0).sum()) for d in docs) >= 2
    np.save(tmp_path / "t0.npy", np.arange(100, dtype=np.int32))
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "t1.bin")
    npy = TokenShards(str(tmp_path / "t0.npy"), seq_len=10)
    windows = list(npy)
    assert len(windows) == 9 and windows[1].tolist() == list(range(10, 21)) and windows[0].dtype == torch.int64
    assert [w.tolist() for w in TokenShards(str(tmp_path / "t1.bin"), seq_len=10, dtype="uint16")][-1] == list(
        range(30, 41)
    )
    with tarfile.open(tmp_path / "w-0.tar", "w") as tar:
        for i in range(4):
            for ext, data in (("txt", f"sample {i}".encode()), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    samples = list(WebDatasetShards(str(tmp_path / "*.tar")))
    assert [(s["__key__"], s["txt"], s["cls"]) for s in samples] == [
        (f"s{i:03d}", f"sample {i}", i % 2) for i in range(4)
    ]
    ds = WebDatasetShards(str(tmp_path / "*.tar"))
    ds.configure(1, 2, 0, False)  # rank 1 of 2: one shard striped, every other sample
    assert [s["cls"] for s in ds] == [1, 1]


def test_bad_stream_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="matches no file") as err:
        TextShards(str(tmp_path / "nothing-*.txt"))
    assert "dataset.files" in str(err.value)
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(UserError, match="dataset.field") as err:
        TextShards(str(tmp_path / "a.jsonl"), field="text")
    assert "body" in str(err.value)
    np.arange(10, dtype=np.float32).tofile(tmp_path / "f.bin")
    with pytest.raises(UserError, match="not an integer dtype"):
        TokenShards(str(tmp_path / "f.bin"), dtype="float32")


def test_the_loop_stops_and_resumes_a_stream_bitwise(tmp_path):
    cfg = config("data.num_workers=2", "trainer.total_epochs=2")
    reference = train(tmp_path / "reference", cfg, dataset=Numbered())
    assert reference.error is None, reference.error
    assert reference.summary["steps"] == 52 and len(reference.task.seen) == 52  # 2 x 13 batches an epoch

    run_dir = tmp_path / "run"
    stopped = train(run_dir, cfg, dataset=Numbered(), task=RecordingRegression(stop_at=33))
    assert isinstance(stopped.error, Stopped) and stopped.error.step == 33
    resumed = train(run_dir, cfg, dataset=Numbered())
    assert resumed.error is None, resumed.error
    assert stopped.task.seen + resumed.task.seen == reference.task.seen
    assert_same_weights(resumed.weights(), reference.weights())
    assert [r["train/loss"] for r in metrics(run_dir)] == [r["train/loss"] for r in metrics(tmp_path / "reference")]


class Plain(IterableDataset):
    """An iterable with no state: resuming restarts its epoch, with a warning."""

    def __iter__(self):
        for i in range(30):
            x = torch.tensor([float(i % 5), 0.0, 1.0])
            yield x, x[:1], torch.tensor(i)


def test_a_stateless_iterable_trains_and_a_resume_restarts_its_epoch(tmp_path, caplog):
    cfg = config("trainer.total_epochs=1")
    stopped = train(tmp_path, cfg, dataset=Plain(), task=RecordingRegression(stop_at=3))
    assert isinstance(stopped.error, Stopped)
    caplog.set_level(logging.WARNING)
    resumed = train(tmp_path, cfg, dataset=Plain())
    assert resumed.error is None and resumed.summary["steps"] == 3 + 8
    assert resumed.task.seen[0] == [0, 1, 2, 3]
    assert sum("restarts from the beginning" in r.message for r in caplog.records) == 1
    assert signal.getsignal(signal.SIGTERM) is not None


@pytest.mark.parametrize("pack", [False, True])
def test_hf_streaming_dataset_from_parquet_resumes_mid_epoch_bitwise(tmp_path, pack):
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    import pyarrow as pa

    from runner.streams.hf import hf

    for s in range(4):
        texts = [f"parquet shard {s} document {d} " + "words " * ((s + d) % 9) for d in range(12)]
        pq.write_table(pa.table({"text": texts, "n": list(range(12))}), tmp_path / f"part-{s}.parquet")
    make = lambda: stream(hf(str(tmp_path / "*.parquet"), field="text", seq_len=16, pack=pack), workers=2, batch=2)
    full = [b.clone() for b in make().epoch(0, 0)]
    assert len(full) > 8 and all(b.shape[1] == 17 for b in full)
    first = make()
    head = take(first, 0, 5)
    resumed = make()
    resumed.load_state([first.state_dict()], 0)
    tail = list(resumed.epoch(0, 0))
    assert len(head) + len(tail) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full))
    mapped = hf(str(tmp_path / "*.parquet"), streaming=False)  # memory-mapped, map-style: the sampler resumes it
    assert len(mapped) == 48 and int(mapped[13]["n"]) == 1
    with pytest.raises(UserError, match="dataset.field"):
        hf(str(tmp_path / "*.parquet"), field="body")
    with pytest.raises(UserError, match="matches no file"):
        hf(str(tmp_path / "none-*.parquet"))


def test_bad_stream_input_is_refused_before_launch(tmp_path):
    from check_helpers import refusal

    lm = ["task=language_model", "model=tiny_gpt", "model.block_size=16", "dataset.seq_len=16"]
    err = refusal(["dataset=text_shards", "dataset.files=nothing/*.txt", *lm], tmp_path)
    assert (err.key, err.value) == ("dataset.files", "nothing/*.txt") and "matches no file" in str(err)
    assert refusal(["dataset=token_shards", *lm], tmp_path).key == "dataset.files"  # not given at all
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "some text"}) + "\n")
    err = refusal(["dataset=text_shards", f"dataset.files={tmp_path}/*.jsonl", "dataset.field=text", *lm], tmp_path)
    assert err.key == "dataset.field" and "body" in str(err)
    np.save(tmp_path / "t.npy", np.arange(100, dtype=np.int16))
    shards = [f"dataset.files={tmp_path}/t.npy", *lm]
    err = refusal(["dataset=token_shards", *shards, "dataset.dtype=float16"], tmp_path)
    assert err.key == "dataset.dtype" and "not an integer dtype" in str(err)
    err = refusal(["dataset=token_shards", *shards, "scheduler=warmup_cosine"], tmp_path)
    assert err.key == "trainer.max_steps" and "streamed" in str(err)
    err = refusal(["dataset=token_shards", *shards, "data.val_fraction=0.1"], tmp_path)
    assert err.key == "data.val_fraction" and "dataset.val_files" in str(err)


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_memory_stays_bounded_on_a_corpus_ten_times_larger(tmp_path):
    """The whole corpus streams through this process; its peak resident memory (VmHWM, reset before)
    grows by under a tenth of the corpus: a memory-mapped shard's pages at a time, a text shard's
    line, never the corpus."""
    for s in range(20):
        np.full(8 << 20, s, dtype=np.uint8).tofile(tmp_path / f"tokens-{s}.bin")  # 160 MB in all
    rnd = np.random.default_rng(0)
    for s in range(10):
        words = rnd.integers(97, 123, size=1 << 20, dtype=np.uint8)
        words[::50] = 10
        (tmp_path / f"text-{s}.txt").write_bytes(words.tobytes())  # 10 MB of lines in all
    for dataset, corpus_kb in (
        (TokenShards(str(tmp_path / "tokens-*.bin"), seq_len=4096, dtype="uint8"), 160 << 10),
        (TextShards(str(tmp_path / "text-*.txt"), seq_len=1024, pack=True), 10 << 10),
    ):
        batches = stream(dataset, workers=0, batch=8, shuffle=False)
        before = _rss_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak
        windows = sum(len(b) for b in batches.epoch(0, 0))
        grew = _rss_kb("VmHWM") - before
        assert windows * batches.loader.batch_size >= windows and windows > 0
        assert grew < corpus_kb / 10, f"peak grew by {grew} kB for a corpus of {corpus_kb} kB"


def test_a_stop_after_the_last_batch_of_an_epoch_resumes_in_the_next(tmp_path):
    cfg = config("data.num_workers=2", "trainer.total_epochs=2")
    stopped = train(tmp_path, cfg, dataset=Numbered(), task=RecordingRegression(stop_at=26))  # the epoch's last step
    assert isinstance(stopped.error, Stopped) and stopped.error.step == 26
    resumed = train(tmp_path, cfg, dataset=Numbered())
    assert resumed.error is None and resumed.summary["steps"] == 52
    assert len(resumed.task.seen) == 26, "the finished epoch is not read again"
    assert sorted(i for b in resumed.task.seen for i in b) == sorted(s * 1000 + i for s in range(5) for i in range(20))


def test_resume_with_another_number_of_loader_workers_reads_the_rest_once(tmp_path, caplog):
    stopped = train(tmp_path, config("data.num_workers=2"), dataset=Numbered(), task=RecordingRegression(stop_at=9))
    assert isinstance(stopped.error, Stopped)
    caplog.set_level(logging.WARNING)
    resumed = train(tmp_path, config("data.num_workers=1"), dataset=Numbered())
    assert resumed.error is None, resumed.error
    first_epoch = (
        stopped.task.seen + resumed.task.seen[: len(resumed.task.seen) - 25]
    )  # epoch 2: 25 batches of 1 worker
    assert sorted(i for b in first_epoch for i in b) == sorted(s * 1000 + i for s in range(5) for i in range(20))
    assert sum("dealt out again" in r.message for r in caplog.records) == 1
