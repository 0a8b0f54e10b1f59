"""Write token shards for `dataset=token_shards` from text on this machine.

    python -m runner.shards data/charlm                      # the Python standard library's source
    python -m runner.shards data/mine --text "books/*.txt" --shards 16 --tokenizer bytes

Each text file is tokenised (`ascii`: codes 0-127, what experiment=charlm_stream's model reads;
`bytes`: one id per UTF-8 byte), followed by the end-of-document id 0, and the ids are spread in
file order over `--shards` files `train-NNNNN.npy` (uint8) of about equal size; the last
`--val-fraction` of the ids goes to `val-00000.npy`. Nothing is held beyond one file's text and
one shard's ids.
"""

from __future__ import annotations

import argparse
import glob
import sys
import sysconfig
from pathlib import Path

import numpy as np

from runner.examples.charlm import DEFAULT_FILES


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / name for name in DEFAULT_FILES if (root / name).is_file()]


def encode(text: str, tokenizer: str) -> np.ndarray:
    data = text.encode("ascii", errors="replace") if tokenizer == "ascii" else text.encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8)


def write_shards(files: list[Path], out: Path, shards: int, val_fraction: float, tokenizer: str) -> dict[str, int]:
    """Token counts written: {file name: ids}."""
    sizes = [len(encode(Path(f).read_text(errors="replace"), tokenizer)) + 1 for f in files]
    total = sum(sizes)
    train = total - int(total * val_fraction)
    per_shard = -(-train // shards)
    ends = [min((i + 1) * per_shard, train) for i in range(shards)]
    names = [f"train-{i:05d}.npy" for i in range(shards)]
    if train < total:
        ends, names = ends + [total], names + ["val-00000.npy"]
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    buffer: list[np.ndarray] = []
    position = shard = 0
    for f in files:
        ids = np.append(encode(Path(f).read_text(errors="replace"), tokenizer), np.uint8(0))
        while len(ids):
            take = min(len(ids), ends[shard] - position)
            buffer.append(ids[:take])
            ids, position = ids[take:], position + take
            if position == ends[shard]:
                np.save(out / names[shard], np.concatenate(buffer))
                written[names[shard]] = ends[shard] - (ends[shard - 1] if shard else 0)
                buffer, shard = [], shard + 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for train-*.npy and val-00000.npy")
    parser.add_argument("--text", default=None, help="glob of text files (default: Python standard library modules)")
    parser.add_argument("--shards", type=int, default=8, help="training shards (default 8)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of ids for validation (0.05)")
    parser.add_argument("--tokenizer", choices=("ascii", "bytes"), default="ascii")
    args = parser.parse_args(argv)
    files = sorted(Path(p) for p in glob.glob(args.text, recursive=True)) if args.text else stdlib_files()
    if not files:
        print(f"error: --text {args.text!r} matches no file", file=sys.stderr)
        return 2
    if args.shards < 1 or not 0 <= args.val_fraction < 1:
        print("error: --shards must be at least 1 and --val-fraction in [0, 1)", file=sys.stderr)
        return 2
    written = write_shards(files, args.out, args.shards, args.val_fraction, args.tokenizer)
    print(f"{sum(written.values()):,} tokens from {len(files)} files in {len(written)} shards under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
