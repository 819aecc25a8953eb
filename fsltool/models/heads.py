"""Classification heads for supervised pretraining over a split's classes: a linear layer, or cosine similarity
to learned class weights times a learned scale (Chen et al. 2019's Baseline++ / Meta-Baseline's pretraining)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class CosineHead(nn.Module):
    """Scores = scale * cos(embedding, class weight); the scale is learned in log space, so it stays positive."""

    def __init__(self, features: int, classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * F.normalize(embeddings, dim=-1) @ F.normalize(self.weight, dim=-1).T


HEADS: dict[str, Callable[[int, int, float], nn.Module]] = {
    "linear": lambda features, classes, scale: nn.Linear(features, classes),
    "cosine": CosineHead,
}


def build_head(name: str, features: int, classes: int, scale: float) -> nn.Module:
    return HEADS[name](features, classes, scale)
