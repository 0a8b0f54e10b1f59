"""A character-level language model on text every machine has: the Python standard library's own
source files (`experiment=charlm`). Nothing to download.

The vocabulary is fixed to the 128 ASCII codes (any other character reads as '?'), so the model's
`vocab_size` is a constant (128) and any text can be encoded for sampling without the corpus:
`python -m runner.sample RUN_DIR --prompt "def "`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from runner.data import Splits

VOCAB_SIZE = 128
VOCAB: list[str] = [chr(i) for i in range(VOCAB_SIZE)]
STOI: dict[str, int] = {ch: i for i, ch in enumerate(VOCAB)}
UNKNOWN = "?"  # what a non-ASCII character becomes

# Well-known modules, read in this order (relative to the standard library's folder). They exist
# on every CPython from 3.9 on; one that a trimmed installation lacks is skipped.
DEFAULT_FILES = (
    "os.py",
    "functools.py",
    "collections/__init__.py",
    "dataclasses.py",
    "argparse.py",
    "typing.py",
    "inspect.py",
    "subprocess.py",
    "threading.py",
    "shutil.py",
    "contextlib.py",
    "enum.py",
    "random.py",
    "textwrap.py",
    "heapq.py",
    "fractions.py",
    "statistics.py",
)


def vocab_size() -> int:
    """The vocabulary's size: fixed, 128 ASCII codes."""
    return VOCAB_SIZE


def encode(text: str) -> torch.Tensor:
    """int64 ids of `text` (ASCII codes; other characters become '?')."""
    data = bytearray(text.encode("ascii", errors="replace"))
    if not data:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64)


def decode(ids) -> str:
    """Text of a sequence of ids (a tensor or a list of ints)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return "".join(VOCAB[i] if 0 <= i < VOCAB_SIZE else UNKNOWN for i in ids)


def stdlib_dir() -> Path:
    return Path(os.path.dirname(os.__file__))


def read_corpus(files: Optional[Sequence[str]] = None, max_chars: int = 400_000) -> str:
    """The text of `files` (paths relative to the standard library's folder, or absolute), in the
    given order, joined by blank lines and cut at `max_chars`. `files=None`: DEFAULT_FILES; an
    empty list: every top-level *.py of the standard library, sorted by name."""
    root = stdlib_dir()
    names = list(DEFAULT_FILES if files is None else files) or sorted(p.name for p in root.glob("*.py"))
    parts, total = [], 0
    for name in names:
        path = Path(name) if os.path.isabs(name) else root / name
        if not path.is_file():
            if files is not None:
                raise FileNotFoundError(f"corpus file {path} does not exist")
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text) + 2
        if total >= max_chars:
            break
    corpus = "\n\n".join(parts)[:max_chars]
    if not corpus:
        raise FileNotFoundError(
            f"no corpus text: none of {names[:3]}... is a file under {root} "
            "(a Python without its standard library's sources?); pass dataset.files=[...]"
        )
    return corpus


class CharWindows(Dataset):
    """Windows of `block_size + 1` consecutive characters of a text: sample i starts at i * stride."""

    vocab, stoi = VOCAB, STOI

    def __init__(self, ids: torch.Tensor, block_size: int, stride: int) -> None:
        if block_size < 1 or stride < 1:
            raise ValueError(f"block_size and stride must be >= 1, got {block_size} and {stride}")
        self.ids, self.block_size, self.stride = ids, int(block_size), int(stride)
        self.count = max(0, (len(ids) - self.block_size - 1) // self.stride + 1)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.count:
            raise IndexError(f"window {index} of {self.count}")
        start = index * self.stride
        return self.ids[start : start + self.block_size + 1].clone()

    def decode(self, ids) -> str:
        return decode(ids)


def CharCorpus(
    block_size: int = 64,
    max_chars: int = 400_000,
    val_fraction: float = 0.1,
    files: Optional[Sequence[str]] = None,
    train_stride: Optional[int] = None,
) -> Splits:
    """Train/val splits of the corpus (the last `val_fraction` of the text is val). Each sample is
    a (block_size + 1,) int64 tensor; train windows overlap by half (`train_stride`, default
    block_size // 2), val windows do not."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids = encode(read_corpus(files, int(max_chars)))
    cut = int(len(ids) * (1 - val_fraction))
    stride = int(train_stride) if train_stride else max(1, block_size // 2)
    train, val = CharWindows(ids[:cut], block_size, stride), CharWindows(ids[cut:], block_size, block_size)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"{len(ids)} characters leave no window of {block_size + 1} in the "
            f"{'train' if len(train) == 0 else 'val'} split: raise max_chars or lower block_size"
        )
    return Splits(train, val)


# ---- the model -------------------------------------------------------------------------------


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = torch.nn.Linear(n_embd, 3 * n_embd)
        self.proj = torch.nn.Linear(n_embd, n_embd)
        self.resid_drop = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(torch.nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(n_embd), torch.nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(n_embd, 4 * n_embd),
            torch.nn.GELU(),
            torch.nn.Linear(4 * n_embd, n_embd),
            torch.nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(torch.nn.Module):
    """A small GPT (nanoGPT style): (B, T) token ids -> (B, T, vocab_size) logits, T <= block_size.
    Token and position embeddings, `n_layer` pre-LN blocks, a final LayerNorm and a linear head
    sharing the token embedding's weight."""

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.vocab_size, self.block_size = int(vocab_size), int(block_size)
        self.tok_emb = torch.nn.Embedding(vocab_size, n_embd)
        self.pos_emb = torch.nn.Embedding(block_size, n_embd)
        self.drop = torch.nn.Dropout(dropout)
        self.blocks = torch.nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = torch.nn.LayerNorm(n_embd)
        self.head = torch.nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * max(n_layer, 1)))

    @staticmethod
    def _init_weights(module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of length {t} is longer than block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to `idx` (B, T) and return it (B, T + max_new_tokens).
        Each step sees the last `block_size` tokens; temperature <= 0 picks the most likely token;
        `top_k` keeps only the k most likely. Call it in eval mode (no dropout)."""
        for _ in range(int(max_new_tokens)):
            logits = self(idx[:, -self.block_size :])[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k > 0:
                    kth = torch.topk(logits, min(int(top_k), logits.shape[-1])).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
