"""Third-party models, data and tasks as users bring them, for tests/test_third_party.py: a torchvision
classifier with torchvision transforms in the loader workers, a Hugging Face model built from a tiny
config with dict batches, a padding collate and a Task of its own, and the word-level Transformer
of PyTorch's examples (its positional encoding is a buffer that is a transposed view)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from runner.data import Splits
from runner.examples.digits import load_digits_tensors
from runner.tasks import Task

# ---- torchvision -------------------------------------------------------------------------------

# The operator schemas of torchvision's compiled library (torchvision/csrc/ops), for `_torchvision`.
_TORCHVISION_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
    "SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
_schemas_library = None


def _torchvision():
    """torchvision, imported. PyPI's torchvision wheel is linked against the CUDA build of torch; beside
    the CPU build (which comes from PyTorch's own index) its compiled operators (detection boxes: nms,
    roi_align) cannot load, and its import stops at registering them. Then their schemas are declared
    here, so that the pure-Python parts the tests use (models.resnet18, transforms.v2) import as they
    do with a matching build; no compiled operator is called."""
    global _schemas_library
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err) or _schemas_library is not None:
            raise
        import sys

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # the half-finished import
        _schemas_library = torch.library.Library("torchvision", "DEF")
        for schema in _TORCHVISION_OPS:
            _schemas_library.define(schema)
        import torchvision
    return torchvision


def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 (BatchNorm buffers, 11M parameters), untrained."""
    return _torchvision().models.resnet18(num_classes=num_classes)


class AugmentedImages(Dataset):
    """Images read through torchvision's v2 transforms (random crop, horizontal flip) in the loader
    workers; the transforms draw from torch's global RNG, which the runner seeds per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, padding: int = 2) -> None:
        _torchvision()
        from torchvision.transforms import v2

        self.images, self.labels = images, labels
        self.transform = v2.Compose([v2.RandomCrop(images.shape[-1], padding=padding), v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


def digit_images(size: int = 24, train: int = 512, val: int = 256) -> Splits:
    """scikit-learn's 8x8 digits upscaled to size x size RGB: `train` augmented training images,
    `val` plain validation images (0: no validation split)."""
    images, labels = load_digits_tensors()
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    images = images.contiguous()
    held_out = TensorDataset(images[train : train + val], labels[train : train + val]) if val > 0 else None
    return Splits(train=AugmentedImages(images[:train], labels[:train]), val=held_out)


# ---- transformers ------------------------------------------------------------------------------


def tiny_bert(
    vocab_size: int = 100,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    num_labels: int = 2,
    max_length: int = 64,
) -> nn.Module:
    """A BertForSequenceClassification from a tiny config: built locally, nothing downloaded."""
    _torchvision()  # transformers imports torchvision when it is installed
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_length,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


class TokenSequences(Dataset):
    """Sequences of 4 to `max_length` token ids (ids 1..vocab-1; 0 is padding) as dicts, labelled 1
    when the first token is in the upper half of the vocabulary: learnable from one position."""

    def __init__(self, size: int = 512, vocab_size: int = 100, max_length: int = 16, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(4, max_length + 1, (size,), generator=generator)
        self.sequences = [torch.randint(1, vocab_size, (int(n),), generator=generator) for n in lengths]
        self.half = vocab_size // 2

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.sequences[index]
        return {"input_ids": ids, "label": int(ids[0] >= self.half)}


def token_splits(size: int = 512, val_size: int = 128, vocab_size: int = 100, max_length: int = 16) -> Splits:
    return Splits(
        train=TokenSequences(size, vocab_size, max_length, seed=0),
        val=TokenSequences(val_size, vocab_size, max_length, seed=1),
    )


def pad_collate():
    """data.collate_fn: pads a list of {"input_ids", "label"} samples to the longest, with a mask."""

    def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(s["input_ids"]) for s in samples)
        ids = torch.zeros(len(samples), longest, dtype=torch.long)
        mask = torch.zeros(len(samples), longest, dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            ids[row, :n], mask[row, :n] = sample["input_ids"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([s["label"] for s in samples])}

    return collate


class SequenceClassification(Task):
    """Dict batches into a Hugging Face model, which computes its own loss from `labels`."""

    def training_step(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def validation_step(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return {"loss": out.loss, "accuracy": (out.logits.argmax(-1) == batch["labels"]).float().mean()}

    def batch_size(self, batch) -> int:
        return len(batch["labels"])


# ---- PyTorch's word-level Transformer example --------------------------------------------------


class PositionalEncoding(nn.Module):
    """As in PyTorch's examples/word_language_model and the classic transformer tutorial: `pe` is a
    buffer that is a transposed view, (max_len, 1, d_model) with the strides of (1, max_len, d_model)."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 5000) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        pe = pe.unsqueeze(0).transpose(0, 1)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pe[: x.size(0), :]
        return self.dropout(x)


class TransformerModel(nn.Module):
    """The example's TransformerModel (sequence-first inside, a causal mask), taking the runner's
    (batch, length) token batches and returning (batch, length, vocab) logits."""

    def __init__(
        self, ntoken: int = 128, ninp: int = 32, nhead: int = 2, nhid: int = 64, nlayers: int = 2, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.pos_encoder = PositionalEncoding(ninp, dropout)
        layer = nn.TransformerEncoderLayer(ninp, nhead, nhid, dropout)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.ninp = ninp
        self.decoder = nn.Linear(ninp, ntoken)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        src = tokens.t()  # (length, batch), as the example's batchify makes them
        mask = nn.Transformer.generate_square_subsequent_mask(len(src), device=src.device)
        src = self.pos_encoder(self.encoder(src) * math.sqrt(self.ninp))
        output = self.decoder(self.transformer_encoder(src, mask))
        return output.transpose(0, 1)
