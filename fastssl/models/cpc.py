"""CPC on images (van den Oord et al. 2018, section 3.3): cut an image into a grid of overlapping patches,
encode every patch, z = g_enc(patch); run an autoregressive context model down each column,
c_t = g_ar(z_1..z_t) (a GRU over rows, fed a 1x3 convolution across the row), and predict the codes of
the rows below with ``fastssl.losses.CPCLoss``: for k = 1..K the bilinear score z_{t+k}^T W_k c_t, InfoNCE
against the codes of every other (image, column, row) of the batch. Patches overlap by half, so the
prediction skips the next row (which shares pixels with row t): step k scores row t + k + skip.
The patch encoder normalizes each patch on its own (layer norm, as CPC v2, Henaff et al. 2019): batch norm
in training would pool statistics over every patch of the batch, the rows below included, and so let the
context see what it must predict. Trained on scikit-learn's digits (the probe's data); the patch encoder is
what is evaluated.

>>> import torch
>>> from fastssl.models.encoders import ConvEncoder
>>> m = CPC(ConvEncoder(1, 8, 16, norm="layer"), patch=8, stride=4, context_dim=16, prediction_steps=2)
>>> m.patches(torch.rand(2, 1, 32, 32)).shape  # 7 x 7 patches of 8 x 8
torch.Size([2, 7, 7, 1, 8, 8])
>>> m.loss(torch.rand(2, 1, 32, 32)).shape
torch.Size([])
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..data import digits
from ..evaluate import probe_against_untrained
from ..losses import CPCLoss
from ..training import Result, TrainConfig, fit_images
from . import check_size
from .encoders import ConvEncoder


class CPC(nn.Module):
    """Patch encoder g_enc, column-wise GRU context g_ar over rows, and CPC's bilinear predictors W_k.

    Args:
        encoder: the patch encoder (e.g. ``ConvEncoder(..., norm="layer")``; ``encoder.out_dim`` is the code
            width); no batch norm, which would mix the patches of the batch.
        patch: side of the square patches, in pixels.
        stride: step between patches (``patch // 2``: CPC's 50% overlap).
        context_dim: width of the context vectors c_t.
        prediction_steps: K, how many rows below are predicted.
        skip: rows skipped before the first predicted one (1 when patches overlap, so that the target
            shares no pixels with the context).
    """

    def __init__(self, encoder: ConvEncoder, patch: int = 8, stride: int = 4, context_dim: int = 64,
                 prediction_steps: int = 3, skip: int = 1):
        super().__init__()
        if not isinstance(encoder, nn.Module) or not hasattr(encoder, "out_dim"):
            raise TypeError(f"encoder must be an nn.Module with an out_dim (e.g. ConvEncoder), got {type(encoder).__name__}")
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules()):
            raise ValueError("encoder must not use batch norm: in training it mixes every patch of the batch, so the "
                             "context would see the rows it predicts; use a per-sample norm, e.g. "
                             "ConvEncoder(..., norm=\"layer\")")
        for name, value in (("patch", patch), ("stride", stride), ("context_dim", context_dim),
                            ("prediction_steps", prediction_steps)):
            check_size(name, value)
        check_size("skip", skip, low=0)
        self.encoder, self.patch, self.stride, self.skip = encoder, patch, stride, skip
        code_dim = encoder.out_dim
        self.row_mix = nn.Conv1d(code_dim, context_dim, 3, padding=1)  # across the columns of one row
        self.gru = nn.GRU(context_dim, context_dim, batch_first=True)  # down each column
        self.cpc_loss = CPCLoss(context_dim, code_dim, prediction_steps)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, rows, cols, C, patch, patch), rows top to bottom."""
        if x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        return x.unfold(2, self.patch, self.stride).unfold(3, self.patch, self.stride).permute(0, 2, 3, 1, 4, 5)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """z of every patch: (N, rows, cols, code_dim)."""
        p = self.patches(x)
        n, rows, cols = p.shape[:3]
        return self.encoder(p.reshape(n * rows * cols, *p.shape[3:])).view(n, rows, cols, -1)

    def context(self, z: torch.Tensor) -> torch.Tensor:
        """c of every patch, (N, cols, rows, context_dim): c at row t sees rows 1..t only."""
        n, rows, cols, d = z.shape
        mixed = self.row_mix(z.reshape(n * rows, cols, d).transpose(1, 2)).relu()  # (N*rows, ctx, cols)
        seq = mixed.view(n, rows, -1, cols).permute(0, 3, 1, 2).reshape(n * cols, rows, -1)
        return self.gru(seq)[0].view(n, cols, rows, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The patch encoder's features pooled over all patches: (N, code_dim)."""
        return self.codes(x).mean(dim=(1, 2))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        z = self.codes(x)
        rows = z.shape[1]
        if rows <= self.skip + self.cpc_loss.prediction_steps:
            raise ValueError(f"{rows} rows of patches cannot predict {self.cpc_loss.prediction_steps} steps "
                             f"after skipping {self.skip}; use larger images or fewer steps")
        c = self.context(z).flatten(0, 1)  # (N*cols, rows, ctx)
        z = z.permute(0, 2, 1, 3).flatten(0, 1)  # (N*cols, rows, code)
        return self.cpc_loss(c[:, :rows - self.skip], z[:, self.skip:])


def pooled_patch_features(model: CPC):
    """``features(encoder, images)`` for the probe: ``model``'s patch grid, encoded by ``encoder``, mean-pooled."""
    def features(encoder, images):
        p = model.patches(images)
        n, rows, cols = p.shape[:3]
        return encoder(p.reshape(n * rows * cols, *p.shape[3:])).view(n, rows * cols, -1).mean(1)
    return features


def example():
    """A tiny CPC and a batch for one training step: ``model.loss(*args)``."""
    return CPC(ConvEncoder(1, 8, 16, norm="layer"), context_dim=16, prediction_steps=2), (torch.rand(4, 1, 32, 32),)


def train(config: TrainConfig) -> Result:
    data = digits(32)
    untrained = ConvEncoder(1, 16, 64, norm="layer")
    model = CPC(copy.deepcopy(untrained), patch=8, stride=4).to(config.device)
    losses = fit_images(model, data.train_x.to(config.device), config, batch_size=32, epochs=config.epochs_or(6, 40),
                        desc="cpc", loss=lambda x, generator: model.loss(x))
    value, baseline, extra = probe_against_untrained(model.encoder, untrained.to(config.device), data, device=config.device,
                                                     features=pooled_patch_features(model))
    extra.update(patch=model.patch, stride=model.stride, prediction_steps=model.cpc_loss.prediction_steps, skip=model.skip)
    return Result("cpc", "linear_probe_accuracy", value, baseline, losses=losses, extra=extra)
