"""RotNet (Gidaris et al. 2018): the pretext task is to tell which of four rotations (0, 90, 180, 270
degrees) was applied to an image; a network that can must recognise the objects' shape.

Training draws a mild random crop of each image before rotating it (the paper's CIFAR recipe augments
too); without it the network learns fewer shape features on 8 x 8 digits. Evaluation: the linear probe
reads the third of the encoder's four conv blocks pooled to 2 x 2, as the paper probes its middle blocks:
the last block specialises in rotation (on digits its pooled probe falls below the untrained network's).

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

from ..checks import check_ndim, check_tensor
from ..data import digits
from ..data.augment import random_resized_crop
from ..evaluate import probe_against_untrained
from ..training import Result, TrainConfig, fit_images
from .encoders import ConvEncoder


def rotations(x: torch.Tensor):
    """All four rotations of each square image of ``x`` (N, C, H, H), stacked rotation-major, and the rotation
    labels."""
    check_ndim("x", check_tensor("x", x), 4, "(N, C, H, W)")
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"x must hold square images (H == W: a rotation by 90 degrees keeps the shape), got "
                         f"shape {tuple(x.shape)}")
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


def example():
    """A tiny RotNet and a batch for one training step: ``model.loss(*args)``."""
    return RotNet(ConvEncoder(1, 8, 32)), (torch.rand(8, 1, 32, 32),)


def train(config: TrainConfig) -> Result:
    data = digits(32)
    untrained = ConvEncoder(1, 16, 128)
    model = RotNet(copy.deepcopy(untrained)).to(config.device)
    def loss(x, generator):  # a mild random crop, then the four rotations
        return model.loss(random_resized_crop(x, scale=(0.5, 1.0), flip=0.0, generator=generator))

    losses = fit_images(model, data.train_x.to(config.device), config, batch_size=128, epochs=config.epochs_or(10, 40),
                        desc="rotnet", loss=loss)
    value, baseline, extra = probe_against_untrained(model.encoder, untrained.to(config.device), data, device=config.device,
                                                     features=lambda encoder, x: encoder.block_features(x, 3, grid=2))
    extra["probe_layer"] = "conv block 3 of 4, average-pooled to 2 x 2"
    return Result("rotnet", "linear_probe_accuracy", value, baseline, losses=losses, extra=extra)
