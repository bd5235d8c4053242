"""Context encoder (Pathak et al. 2016): blank out a region of the image, encode what is left and
decode the whole image; the loss is the mean squared error over the blanked region only (the paper's
L2 reconstruction loss; its optional adversarial term is left out). Filling a hole needs the encoder to
know what the object around it is. The hole is a random square anywhere in the image (the paper's
"random block" masks, which it found transfer better than a fixed central hole), filled with a constant
grey that neither the black background nor the white strokes take.

Data: the digits' training images (32 x 32), labels unused. The issue lists scikit-image's photos for
inpainting, but the metric is a linear probe on digits: a network that completes pen strokes is what
the probe can reward, and five photos give nothing it could transfer. The probe encodes whole, unmasked
digits with the trained encoder.

>>> import torch
>>> model, (x,) = example()
>>> holed, mask = model.mask(x, torch.Generator().manual_seed(0))
>>> mask.shape, mask.sum((1, 2, 3)).unique().tolist(), model(holed).shape
(torch.Size([8, 1, 24, 24]), [64.0], torch.Size([8, 1, 24, 24]))
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..checks import check_float
from ..data import digits
from ..evaluate import probe_against_untrained
from ..training import Result, TrainConfig, fit_images
from . import check_size
from .encoders import ConvEncoder, conv_block


def feature_map(encoder: ConvEncoder, images: torch.Tensor) -> torch.Tensor:
    """The probe layer of the dense pretext tasks (inpaint, colorize): the encoder's stride-8 map."""
    return encoder.feature_map(images)


def upsampler(in_channels: int, out_channels: int, width: int = 32, steps: int = 3) -> nn.Sequential:
    """A decoder from an encoder's stride-``2**steps`` feature map back to full resolution: ``steps``
    x (2x nearest upsampling, 3x3 conv block), halving the width each time, then a 1x1 conv to
    ``out_channels``."""
    layers, cin = [], in_channels
    for i in range(steps):
        cout = max(width >> i, 8)
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv_block(cin, cout)]
        cin = cout
    return nn.Sequential(*layers, nn.Conv2d(cin, out_channels, 1))


class ContextEncoder(nn.Module):
    """An encoder with a ``feature_map`` (e.g. :class:`ConvEncoder`, stride 8) and a decoder to pixels.

    Args:
        encoder: its ``feature_map(x)`` is decoded; ``encoder.out_dim`` channels.
        channels: image channels to reconstruct.
        hole: side of the square hole in pixels.
        fill: the value the hole is filled with.
    """

    def __init__(self, encoder: ConvEncoder, channels: int = 1, hole: int = 12, fill: float = 0.5, decoder_width: int = 64):
        super().__init__()
        if hole < 1:
            raise ValueError(f"hole must be a positive number of pixels, got {hole}")
        self.encoder, self.channels, self.hole, self.fill = encoder, check_size("channels", channels), hole, fill
        self.decoder = upsampler(encoder.out_dim, channels, decoder_width)

    def forward(self, holed: torch.Tensor) -> torch.Tensor:
        """The reconstructed image (N, C, H, W) in [0, 1] from the holed one."""
        return torch.sigmoid(self.decoder(self.encoder.feature_map(holed)))

    def mask(self, images: torch.Tensor, generator: torch.Generator | None = None):
        """``images`` with one random ``hole`` x ``hole`` square each set to ``fill``, and the 0/1 mask
        (N, 1, H, W) of the hole."""
        check_float("images", images)
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"images must be (N, {self.channels}, H, W) (channels={self.channels}), got shape "
                             f"{tuple(images.shape)}")
        n, _, h, w = images.shape
        if self.hole > min(h, w):
            raise ValueError(f"hole {self.hole} does not fit in {h} x {w} images")
        top = torch.randint(h - self.hole + 1, (n, 1, 1), generator=generator).to(images.device)
        left = torch.randint(w - self.hole + 1, (n, 1, 1), generator=generator).to(images.device)
        rows = torch.arange(h, device=images.device).view(1, h, 1)
        cols = torch.arange(w, device=images.device).view(1, 1, w)
        mask = ((rows >= top) & (rows < top + self.hole) & (cols >= left) & (cols < left + self.hole)).unsqueeze(1)
        return torch.where(mask, torch.full_like(images, self.fill), images), mask.to(images.dtype)

    def loss(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean squared error of the reconstruction over the hole's pixels."""
        holed, mask = self.mask(images, generator)
        err = (self(holed) - images).pow(2) * mask
        return err.sum() / (mask.sum() * images.shape[1])


def example():
    """A tiny context encoder and a batch for one training step: ``model.loss(*args)``."""
    return ContextEncoder(ConvEncoder(1, 8, 16), hole=8, decoder_width=16), (torch.rand(8, 1, 24, 24),)


def draw_rows(path: str, rows, title: str, size: float = 1.2) -> None:
    """A figure of labelled rows of images: ``rows`` = [(label, [image, ...]), ...], each image (H, W)
    grey in [0, 1] or (H, W, 3) RGB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(size * cols, size * len(rows) + 0.6), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c, img in enumerate(images):
            axes[r, c].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(config: TrainConfig) -> Result:
    data = digits(32)
    untrained = ConvEncoder(1, 16, 128)
    model = ContextEncoder(copy.deepcopy(untrained), hole=12).to(config.device)
    losses = fit_images(model, data.train_x.to(config.device), config, batch_size=64, epochs=config.epochs_or(8, 50),
                        desc="inpaint")
    value, baseline, extra = probe_against_untrained(model.encoder, untrained.to(config.device), data, device=config.device,
                                                     features=feature_map)
    shown = data.test_x[:8].to(config.device)

    def strip(path):
        model.eval()
        with torch.no_grad():
            holed, mask = model.mask(shown, torch.Generator().manual_seed(0))
            filled = torch.where(mask.bool(), model(holed), shown)
        rows = [(title, [img[0] for img in images.cpu()]) for title, images in
                [("holed", holed), ("filled in", filled), ("original", shown)]]
        draw_rows(path, rows, "inpaint: held-out test digits")

    return Result("inpaint", "linear_probe_accuracy", value, baseline, losses=losses,
                  extra={**extra, "probe_layer": "feature_map (stride 8)", "hole": model.hole},
                  figures={"inpaint.png": strip})
