"""`dataset=hf`: a Hugging Face `datasets` dataset, saved with `save_to_disk` or given as parquet or
JSON lines files (pip install "hydra-torch-runner[hf]").

`streaming=true` reads it as an HF `IterableDataset`, split over ranks with `split_dataset_by_node`
(and over loader workers by HF itself, shard by shard), in file order every epoch (shuffle the
files beforehand), and resumed through its own `state_dict()`; with `field` the texts are
tokenised and cut (or, with `pack`, packed) into seq_len + 1 windows like `dataset=text_shards`.
`streaming=false` gives the memory-mapped, map-style `Dataset` (exact resume by sample index).
"""

from __future__ import annotations

import glob as globlib
import os
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import IterableDataset

from runner.errors import UserError
from runner.streams.sources import tokenizer_for

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json"}


def load(path: str, split: str, streaming: bool):
    """The split at `path`: a save_to_disk folder, or a glob of parquet / JSON lines files."""
    import datasets

    if os.path.isdir(path):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(
                    "dataset.split", split, f"is not a split of {path}", ", ".join(loaded), "pass one of them"
                )
            loaded = loaded[split]
        return loaded.to_iterable_dataset(num_shards=max(loaded.num_rows // 1024, 1)) if streaming else loaded
    files = sorted(globlib.glob(os.path.expanduser(path), recursive=True))
    kinds = {FORMATS.get(os.path.splitext(f)[1]) for f in files}
    if not files or None in kinds or len(kinds) != 1:
        raise UserError(
            "dataset.path",
            path,
            "matches no file" if not files else "matches files that are not all parquet or all JSON lines",
            "a folder written by Dataset.save_to_disk, or a glob of .parquet or .jsonl files",
            "check the path (relative paths start in the directory the command runs in)",
        )
    return datasets.load_dataset(kinds.pop(), data_files=files, split="train", streaming=streaming)


class HFStream(IterableDataset):
    """One split of an HF dataset, streamed; its position is HF's own state plus this wrapper's."""

    def __init__(
        self,
        source,
        field: Optional[str] = None,
        tokenizer: str = "bytes",
        seq_len: Optional[int] = None,
        pack: bool = False,
        eot: int = 0,
    ) -> None:
        self.source, self.field, self.seq_len, self.pack, self.eot = source, field, seq_len, bool(pack), int(eot)
        self.encode = tokenizer_for(tokenizer) if field else None
        self.rank, self.world_size, self.seed, self.shuffle, self.epoch = 0, 1, 0, False, 0
        self._loaded: Optional[dict[str, Any]] = None
        self._state: dict[str, Any] = {"epoch": 0, "hf": None, "within": 0, "carry": []}
        features = getattr(source, "features", None)
        if field and features is not None and field not in features:
            raise UserError("dataset.field", field, "is not a column", ", ".join(features), "pass one of the columns")

    def configure(self, rank: int, world_size: int, seed: int, shuffle: bool) -> None:
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, int(seed), bool(shuffle)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        s = self._state
        return {"epoch": s["epoch"], "hf": s["hf"], "within": s["within"], "carry": list(s["carry"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state

    def _reader(self):
        from datasets.distributed import split_dataset_by_node

        ds = self.source
        # Read in file order every epoch: HF's shuffle keeps a buffer whose contents its state_dict
        # leaves out (a resume would refill it), and its state does not survive one in loader workers.
        # Over the ranks here; inside a loader worker HF's IterableDataset splits its shards over the
        # workers itself (and keeps each worker's position in its state_dict).
        return split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)

    def __iter__(self) -> Iterator[Any]:
        ds = self._reader()
        loaded, self._loaded = self._loaded, None
        fresh = {"epoch": self.epoch, "hf": None, "within": 0, "carry": []}
        self._state = dict(loaded) if loaded is not None and loaded["epoch"] == self.epoch else fresh
        if self._state["hf"] is not None:
            ds.load_state_dict(self._state["hf"])
        state, skip = self._state, self._state["within"]
        iterator = iter(ds)
        while True:
            # HF's state before iterating is not yet split over the loader workers: the position
            # before an example is the one after the previous (or the one this epoch started from).
            before = state["hf"]
            example = next(iterator, None)
            if example is None:
                return
            state["hf"], state["within"] = before, skip  # until the example is used up
            for within, sample in self._samples(example, skip):
                state["within"] = within
                yield sample
            skip = 0
            state["hf"], state["within"] = ds.state_dict(), 0

    def _samples(self, example: dict, skip: int) -> Iterator[tuple[int, Any]]:
        """(position in the example, sample): without `field` the example itself; with it, token
        windows; the position counts the example's samples given, or with packing its tokens read
        (`skip`: the position a resume starts from)."""
        if not self.field:
            if not skip:
                yield 1, {k: torch.as_tensor(v) if isinstance(v, (int, float, list)) else v for k, v in example.items()}
            return
        ids = list(self.encode(str(example[self.field])))
        width = int(self.seq_len) + 1
        if not self.pack:
            for n, begin in enumerate(range(0, len(ids) - width + 1, width - 1), 1):
                if n > skip:
                    yield n, torch.tensor(ids[begin : begin + width], dtype=torch.int64)
            return
        carry, ids = self._state["carry"], ids + [self.eot]
        pos = skip
        while pos < len(ids):
            take = min(width - len(carry), len(ids) - pos)
            carry.extend(ids[pos : pos + take])
            pos += take
            if len(carry) == width:
                window = torch.tensor(carry, dtype=torch.int64)
                del carry[:-1]  # the edge token starts the next window
                yield pos, window


def hf(
    path: str,
    split: str = "train",
    val_split: Optional[str] = None,
    streaming: bool = True,
    field: Optional[str] = None,
    tokenizer: str = "bytes",
    seq_len: Optional[int] = None,
    pack: bool = False,
    eot: int = 0,
):
    """`dataset=hf`: the `split` (and `val_split`, if given) of the dataset at `path`."""
    from runner.data import Splits

    def one(name: str):
        source = load(path, name, streaming)
        if not streaming:
            return source.with_format("torch")
        return HFStream(source, field=field, tokenizer=tokenizer, seq_len=seq_len, pack=pack, eot=eot)

    train = one(split)
    return train if not val_split else Splits(train, one(val_split))
