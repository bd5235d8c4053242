"""RotNet (Gidaris et al. 2018): the pretext task is to tell which of four rotations (0, 90, 180, 270
degrees) was applied to an image; a network that can must recognise the objects' shape.

>>> import torch
>>> x, y = rotations(torch.rand(2, 1, 8, 8))
>>> tuple(x.shape), y.tolist()
((8, 1, 8, 8), [0, 0, 1, 1, 2, 2, 3, 3])
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..data import digits
from ..evaluate import probe_against_untrained
from ..training import Result, TrainConfig, fit, shuffled_batches
from .encoders import ConvEncoder


def rotations(x: torch.Tensor):
    """All four rotations of each image, stacked rotation-major, and the rotation labels."""
    views = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return torch.cat(views), labels


class RotNet(nn.Module):
    """An encoder and a 4-way linear head over its pooled features."""

    def __init__(self, encoder: ConvEncoder):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        views, labels = rotations(x)
        return F.cross_entropy(self(views), labels)


def train(config: TrainConfig) -> Result:
    data = digits(32)
    untrained = ConvEncoder(1, 16, 128)
    model = RotNet(copy.deepcopy(untrained)).to(config.device)
    g = torch.Generator().manual_seed(config.seed)
    images = data.train_x.to(config.device)
    losses = fit(lambda idx: model.loss(images[idx]), lambda: shuffled_batches(len(images), 128, g), model.parameters(),
                 epochs=config.epochs_or(6, 30), lr=2e-3, config=config, desc="rotnet")
    value, baseline, extra = probe_against_untrained(model.encoder, untrained.to(config.device), data, device=config.device)
    return Result("rotnet", "linear_probe_accuracy", value, baseline, losses=losses, extra=extra)
