"""SimCLR (Chen et al. 2020; the lecture's Algorithm 1): two augmented views of each image, an encoder
f and a projection head g, and ``fastssl.nt_xent`` between the projections of the 2N views.

>>> import torch
>>> from fastssl.models.encoders import ConvEncoder
>>> m = SimCLR(ConvEncoder(1, 8, 32), proj_dim=16)
>>> m.loss(torch.rand(4, 1, 32, 32)).shape
torch.Size([])
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..contrastive import nt_xent
from ..data import digits, simclr_augment
from ..evaluate import probe_against_untrained
from ..training import Result, TrainConfig, fit_images
from .encoders import ConvEncoder, mlp_head


class SimCLR(nn.Module):
    """Encoder f, projection head g; ``loss(x)`` draws two views and returns NT-Xent over g(f(views))."""

    def __init__(self, encoder: ConvEncoder, proj_dim: int = 64, temperature: float = 0.2, augment=simclr_augment):
        super().__init__()
        self.encoder, self.temperature, self.augment = encoder, temperature, augment
        self.head = mlp_head(encoder.out_dim, encoder.out_dim, proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        z = self(torch.cat([self.augment(x, generator=generator), self.augment(x, generator=generator)]))
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, temperature=self.temperature)


def digit_views(x, generator=None):
    """SimCLR's augmentations at digit scale: milder crops (a digit fills the frame), no colour."""
    return simclr_augment(x, scale=(0.5, 1.0), jitter=0.4, blur=0.0, generator=generator)


def example():
    """A tiny SimCLR and a batch for one training step: ``model.loss(*args)``."""
    return SimCLR(ConvEncoder(1, 8, 32), proj_dim=16), (torch.rand(8, 1, 32, 32),)


def train(config: TrainConfig) -> Result:
    data = digits(32)
    untrained = ConvEncoder(1, 16, 128)
    model = SimCLR(copy.deepcopy(untrained), augment=digit_views).to(config.device)
    losses = fit_images(model, data.train_x.to(config.device), config, batch_size=256, epochs=config.epochs_or(8, 60),
                        desc="simclr")
    value, baseline, extra = probe_against_untrained(model.encoder, untrained.to(config.device), data, device=config.device)
    return Result("simclr", "linear_probe_accuracy", value, baseline, losses=losses, extra=extra)
