"""`python -m runner.sample RUN_DIR --prompt "def "`: text from a trained character-level language model.

Loads the run's model with `runner.load_model` (the best snapshot by `snapshot.monitor` when the run
kept one, else the newest; `--last` for the newest), encodes the prompt with the fixed 128-code
ASCII vocabulary of `runner.examples.charlm` (other characters become '?'), calls the model's
`generate(idx, max_new_tokens, temperature, top_k, generator)` and prints the prompt and what
followed it. Any model with such a `generate` method over ASCII ids works (e.g. experiment=charlm).

    python -m runner experiment=charlm
    python -m runner.sample outputs/<run> --prompt "class " --tokens 300 --temperature 0.7 --seed 1
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from pathlib import Path
from typing import Optional

from runner.errors import EXIT_USER_ERROR, UserError, full_errors_requested

PROG = "python -m runner.sample"


class SampleError(Exception):
    """A one-line reason why nothing can be sampled (exit 2)."""


def _one_line(err: UserError) -> str:
    first = str(err).splitlines()[0].removeprefix("Error: ")
    return f"{first} (fix: {err.fix})" if err.fix else first


def check_has_snapshot(run_dir: Path | str) -> None:
    """A clear message for the common mistakes before anything is built: no directory, or a run
    that has not written a snapshot yet. Anything subtler is left to `runner.load_model` (which
    also reads a snapshot URL: its manifest records the run's config)."""
    from omegaconf import OmegaConf

    from runner.layout import CONFIG_FILE
    from runner.snapshot.format import SnapshotError
    from runner.snapshot.sources import is_snapshot_url, run_snapshots

    if is_snapshot_url(run_dir):
        return
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SampleError(
            f"{run_dir} is not a directory: pass the run directory a training run wrote (e.g. outputs/<name>)"
        )
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        return  # load_model explains what a run directory is
    try:
        snapshots = run_snapshots(run_dir, OmegaConf.load(config))
        entries = snapshots.manager.entries()
    except (SnapshotError, UserError):
        return  # load_model says what is wrong with the manifest or the URL
    except Exception:
        return  # a store that does not answer: load_model says so
    if not entries:
        raise SampleError(
            f"{run_dir} has no snapshot to sample from ({snapshots.where} lists none): "
            "train first, e.g. python -m runner experiment=charlm"
        )


def sample(
    run_dir: Path | str,
    prompt: str,
    tokens: int = 200,
    temperature: float = 0.8,
    top_k: Optional[int] = 20,
    seed: int = 0,
    best: bool = True,
) -> str:
    """The prompt followed by `tokens` generated characters."""
    import torch

    from runner import load_model
    from runner.examples.charlm import decode, encode

    check_has_snapshot(run_dir)
    model = load_model(run_dir, best=best)
    generate = getattr(model, "generate", None)
    if not callable(generate):
        raise SampleError(
            f"the model of {run_dir} ({type(model).__name__}) has no generate() method: sampling needs a "
            "language model such as runner.examples.charlm.TinyGPT (model=tiny_gpt)"
        )
    vocab = getattr(model, "vocab_size", None)
    ids = encode(prompt or "\n")  # the model needs a first token to continue from
    if isinstance(vocab, int) and ids.numel() and int(ids.max()) >= vocab:
        raise SampleError(
            f"the prompt has character codes up to {int(ids.max())}, but the model's vocabulary has {vocab}"
        )
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    torch.manual_seed(seed)  # for a generate() that draws from the global RNG
    kwargs = {"temperature": float(temperature), "top_k": top_k if top_k and top_k > 0 else None}
    try:
        takes_generator = "generator" in inspect.signature(generate).parameters
    except (TypeError, ValueError):
        takes_generator = False
    if takes_generator:
        kwargs["generator"] = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        out = generate(ids.to(device).unsqueeze(0), int(tokens), **kwargs)
    return (prompt if prompt else "") + decode(out[0, ids.numel() :] if prompt else out[0, 1:])


def _run_dir_or_url(text: str) -> Path | str:
    return text if "://" in text else Path(text)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        type=_run_dir_or_url,
        help="a run directory (holds config.yaml and snapshots/), or the snapshot.dir URL a run wrote to",
    )
    parser.add_argument("--prompt", default="", help="text to continue (ASCII; default: start from a newline)")
    parser.add_argument("--tokens", type=int, default=200, help="characters to generate (default: 200)")
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature; 0 = always the most likely (default: 0.8)"
    )
    parser.add_argument(
        "--top-k", type=int, default=20, help="sample among the k most likely characters; 0 = all (default: 20)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed: the same seed gives the same text (default: 0)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--best",
        dest="best",
        action="store_true",
        default=True,
        help="the best snapshot by snapshot.monitor, else the newest (default)",
    )
    which.add_argument("--last", dest="best", action="store_false", help="the newest valid snapshot")
    args = parser.parse_args(argv)
    if args.tokens < 0:
        parser.error("--tokens must be >= 0")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        text = sample(args.run_dir, args.prompt, args.tokens, args.temperature, args.top_k, args.seed, args.best)
    except (SampleError, UserError) as err:
        if full_errors_requested():
            raise
        message = _one_line(err) if isinstance(err, UserError) else str(err)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
