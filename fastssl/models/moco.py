"""MoCo (He et al. 2020, "Momentum Contrast"): a query encoder f_q trained by InfoNCE against the key of
another view of the same image, k = f_k(x'), and a queue of K keys of earlier batches as negatives:

    loss = -log exp(q.k+ / t) / (exp(q.k+ / t) + sum_{k- in queue} exp(q.k- / t))   (fastssl.moco_loss)

f_k gets no gradient: it trails f_q by a momentum update theta_k <- m theta_k + (1 - m) theta_q
(m = 0.99-0.999), so the keys in the queue stay consistent. Keys enter a ``fastssl.losses.MoCoQueue``.

>>> import torch
>>> from fastssl.models.encoders import ConvEncoder
>>> m = MoCo(ConvEncoder(1, 8, 32), proj_dim=16, queue_size=32)
>>> m.loss(torch.rand(4, 1, 32, 32)).shape, m.queue.ptr
(torch.Size([]), 4)
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..checks import check_float, check_ndim, check_number, check_positive
from ..contrastive import moco_loss
from ..data import digits
from ..evaluate import probe_against_untrained
from ..losses import MoCoQueue
from ..training import Result, TrainConfig, fit_images
from . import check_size
from .encoders import ConvEncoder, mlp_head
from .simclr import digit_views


class MoCo(nn.Module):
    """Query encoder + projection head (trained), their momentum copy (the key encoder) and the key queue.

    Args:
        encoder: the backbone f (a :class:`ConvEncoder`); its momentum copy is made here.
        proj_dim: width of the projected queries/keys (MoCo v2's MLP head).
        queue_size: K, how many negative keys the queue holds.
        momentum: m of the key encoder's update, in [0, 1).
        temperature: t of the InfoNCE logits, > 0.
        augment: ``augment(x, generator=...)`` draws a random view of a batch.
        key_bn_groups: the key batch is shuffled and encoded in this many groups of balanced sizes (MoCo's
            "shuffling BN" on one device), so batch-norm statistics cannot leak which key matches which
            query; a batch needs at least 2 samples a group.
    """

    def __init__(self, encoder: ConvEncoder, proj_dim: int = 64, queue_size: int = 1024, momentum: float = 0.99,
                 temperature: float = 0.2, augment=digit_views, key_bn_groups: int = 2):
        super().__init__()
        if not isinstance(encoder, nn.Module) or not hasattr(encoder, "out_dim"):
            raise TypeError(f"encoder must be an nn.Module with an out_dim (e.g. ConvEncoder), got {type(encoder).__name__}")
        check_number("momentum", momentum, low=0, high=1, high_open=True)
        check_positive("temperature", temperature)
        check_size("key_bn_groups", key_bn_groups)
        self.momentum, self.temperature, self.augment, self.key_bn_groups = momentum, temperature, augment, key_bn_groups
        self.encoder = encoder
        self.head = mlp_head(encoder.out_dim, encoder.out_dim, proj_dim)
        self.key_encoder, self.key_head = copy.deepcopy(self.encoder), copy.deepcopy(self.head)
        for p in self.key_parameters():
            p.requires_grad_(False)
        self.queue = MoCoQueue(queue_size, proj_dim)

    def key_parameters(self):
        return [*self.key_encoder.parameters(), *self.key_head.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Queries: the projected features of the query encoder."""
        return self.head(self.encoder(x))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q; batch-norm running statistics are copied alike."""
        query = [*self.encoder.parameters(), *self.head.parameters()]
        for k, q in zip(self.key_parameters(), query):
            k.lerp_(q, 1.0 - self.momentum)
        for k, q in zip([*self.key_encoder.buffers(), *self.key_head.buffers()], [*self.encoder.buffers(), *self.head.buffers()]):
            k.copy_(q)

    def _check_batch(self, x: torch.Tensor) -> None:
        """``x`` is (N, C, H, W) with N >= 2 * key_bn_groups: batch norm needs 2 samples in every key group."""
        check_float("x", x)
        check_ndim("x", x, 4, "(N, C, H, W)")
        if len(x) < 2 * self.key_bn_groups:
            raise ValueError(f"x has {len(x)} samples but key_bn_groups={self.key_bn_groups} needs at least "
                             f"{2 * self.key_bn_groups} (2 a group for batch norm); use a larger batch or fewer groups")

    @torch.no_grad()
    def keys(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Keys of ``x`` from the momentum encoder, encoded in shuffled groups of balanced sizes (shuffling BN)."""
        self._check_batch(x)
        perm = torch.randperm(len(x), generator=generator).to(x.device)
        groups = [self.key_head(self.key_encoder(chunk)) for chunk in x[perm].tensor_split(self.key_bn_groups)]
        return torch.cat(groups)[perm.argsort()]

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One MoCo step's loss: the key encoder first catches up with the last step's query encoder, then
        InfoNCE of the queries against their keys and the queue; this batch's keys are enqueued after."""
        self._check_batch(x)  # before any state changes
        self.momentum_update()
        q = self(self.augment(x, generator=generator))
        k = self.keys(self.augment(x, generator=generator), generator)
        loss = moco_loss(q, k, self.queue.negatives().clone(), temperature=self.temperature)
        self.queue.enqueue(nn.functional.normalize(k, dim=1))
        return loss


def example():
    """A tiny MoCo and a batch for one training step: ``model.loss(*args)``."""
    return MoCo(ConvEncoder(1, 8, 32), proj_dim=16, queue_size=32), (torch.rand(8, 1, 32, 32),)


def train(config: TrainConfig) -> Result:
    data = digits(32)
    untrained = ConvEncoder(1, 16, 128)
    model = MoCo(copy.deepcopy(untrained), queue_size=1024, momentum=0.99).to(config.device)
    losses = fit_images(model, data.train_x.to(config.device), config, batch_size=128, epochs=config.epochs_or(20, 100),
                        desc="moco")
    value, baseline, extra = probe_against_untrained(model.encoder, untrained.to(config.device), data, device=config.device)
    extra.update(momentum=model.momentum, queue_size=model.queue.size, temperature=model.temperature)
    return Result("moco", "linear_probe_accuracy", value, baseline, losses=losses, extra=extra)
