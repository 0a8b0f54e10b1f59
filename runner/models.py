"""Small models referenced by conf/model/*.yaml. Any torch.nn.Module with a `_target_` works too."""

from __future__ import annotations

import torch
from hydra.utils import get_class


class MLP(torch.nn.Sequential):
    """`depth` hidden layers of `hidden_size` units with an activation, then a linear head."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_size: int = 64,
        depth: int = 2,
        activation: str = "torch.nn.ReLU",
        dropout: float = 0.0,
    ) -> None:
        act = get_class(activation)
        layers: list[torch.nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden_size), act()]
            if dropout > 0:
                layers.append(torch.nn.Dropout(dropout))
            width = hidden_size
        layers.append(torch.nn.Linear(width, out_features))
        super().__init__(*layers)
