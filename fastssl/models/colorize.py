"""Colorization (Zhang et al. 2016): from the lightness L of a CIE Lab image predict its colour ab.
As in the paper the ab plane is cut into a grid of bins (side ``step``), the network classifies each
pixel's bin (cross-entropy, so it may pick a vivid colour where regression would average to grey), rare
colours are up-weighted by class rebalancing, w_q ~ 1 / ((1 - lambda) p_q + lambda / Q) normalised to
E_p[w] = 1, and a colour is read out as the annealed mean of the softmax at temperature T = 0.38.

Data: colour needs colour photos, so this method trains on scikit-image's five sample photos (random
32 x 32 crops of them at three scales, flipped at random); the network sees only L, a single grey
channel like the digits. The metric is then a transfer: a linear probe on digits of the encoder (input
= the digit as lightness) against the same encoder untrained, both read at the stride-8 feature map
(128 x 4 x 4, flattened) that the colour decoder reads: colour is a dense, spatial prediction, and
pooling the map to one vector throws away where things are (the same probe layer as ``inpaint``).
Digits carry no colour, so training on them is not possible. The figure shows L, predicted colour and
true colour of the photos: training images, as five photos are all the colour data there is. (With 8
epochs instead of 16 the probe lost at seed 2, 0.920 vs 0.922.)

>>> import torch
>>> ab = torch.tensor([[[[0.0, 12.0]], [[0.0, -31.0]]]])  # (1, 2, 1, 2): pixels (a, b) = (0, 0), (12, -31)
>>> bins = ab_bins(ab, step=10)
>>> bins.centres.tolist(), bins.index(ab).tolist()
([[5.0, 5.0], [15.0, -35.0]], [[[0, 1]]])
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_float
from ..data import digits, random_patches, sample_images
from ..evaluate import probe_against_untrained
from ..training import Result, TrainConfig, fit
from .encoders import ConvEncoder
from .inpaint import draw_rows, feature_map, upsampler


@dataclass
class ABBins:
    """Quantised ab colours: ``centres`` (Q, 2) of the occupied grid cells of side ``step`` and their
    rebalancing ``weights`` (Q,)."""

    centres: torch.Tensor
    weights: torch.Tensor
    step: float

    def index(self, ab: torch.Tensor) -> torch.Tensor:
        """Nearest bin (N, H, W) of every pixel of ``ab`` (N, 2, H, W)."""
        flat = ab.permute(0, 2, 3, 1).reshape(-1, 2)
        return torch.cdist(flat, self.centres.to(ab)).argmin(1).view(ab.shape[0], *ab.shape[2:])


def ab_bins(ab: torch.Tensor, step: float = 10.0, mix: float = 0.5) -> ABBins:
    """The grid cells of side ``step`` that the pixels of ``ab`` (N, 2, H, W) occupy, and Zhang et al.'s
    rebalancing weights with ``mix`` = lambda (0: inverse frequency, 1: uniform)."""
    if ab.dim() != 4 or ab.shape[1] != 2:
        raise ValueError(f"ab must be (N, 2, H, W), got shape {tuple(ab.shape)}")
    cells = torch.floor(ab.permute(0, 2, 3, 1).reshape(-1, 2) / step)
    occupied, counts = cells.unique(dim=0, return_counts=True)
    p = counts.double() / counts.sum()
    w = 1.0 / ((1 - mix) * p + mix / len(p))
    w = w / (p * w).sum()
    return ABBins((occupied + 0.5) * step, w.float(), step)


def rgb_to_lab(rgb: torch.Tensor):
    """(N, 3, H, W) RGB in [0, 1] to lightness L / 100 (N, 1, H, W) in [0, 1] and ab (N, 2, H, W)."""
    from skimage.color import rgb2lab

    lab = torch.from_numpy(rgb2lab(rgb.permute(0, 2, 3, 1).cpu().numpy())).permute(0, 3, 1, 2).float()
    return lab[:, :1] / 100, lab[:, 1:]


def lab_to_rgb(lightness: torch.Tensor, ab: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab`: (N, H, W, 3) RGB numpy array in [0, 1]."""
    from skimage.color import lab2rgb

    lab = torch.cat([lightness * 100, ab], 1).permute(0, 2, 3, 1).detach().cpu().double().numpy()
    return np.clip(lab2rgb(lab), 0, 1)


class Colorizer(nn.Module):
    """An encoder with a stride-8 ``feature_map`` (:class:`ConvEncoder`) and a small decoder to logits over
    the ab bins at stride 4 (as in the paper: colour varies slowly, the full-resolution L carries the
    detail; :meth:`colorize` upsamples the ab it reads out).

    Args:
        encoder: takes L (N, 1, H, W) in [0, 1], H and W multiples of 8.
        bins: the colour classes and their weights (:func:`ab_bins`).
        temperature: of the annealed-mean readout in :meth:`colorize` (Zhang et al.: 0.38).
    """

    stride = 4

    def __init__(self, encoder: ConvEncoder, bins: ABBins, temperature: float = 0.38, decoder_width: int = 32):
        super().__init__()
        if not isinstance(bins, ABBins):
            raise TypeError(f"bins must be an ABBins (see ab_bins), got {type(bins).__name__}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.encoder, self.temperature, self.step = encoder, temperature, bins.step
        self.register_buffer("centres", bins.centres.clone())
        self.register_buffer("weights", bins.weights.clone())
        self.decoder = upsampler(encoder.out_dim, len(bins.centres), decoder_width, steps=1)

    @property
    def bins(self) -> ABBins:
        return ABBins(self.centres, self.weights, self.step)

    def forward(self, lightness: torch.Tensor) -> torch.Tensor:
        """Logits (N, Q, H/4, W/4) over the ab bins."""
        return self.decoder(self.encoder.feature_map(lightness))

    def loss(self, lightness: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        """Rebalanced cross-entropy between the predicted bins and the bins of the true ``ab`` averaged
        over 4 x 4 blocks. ``lightness`` (N, 1, H, W) and ``ab`` (N, 2, H, W), H and W multiples of 8."""
        check_float("lightness", lightness)
        check_float("ab", ab)
        if lightness.dim() != 4 or lightness.shape[1] != 1 or lightness.shape[2] % 8 or lightness.shape[3] % 8:
            raise ValueError(f"lightness must be (N, 1, H, W) with H and W multiples of 8 (the encoder's stride), got "
                             f"shape {tuple(lightness.shape)}")
        if ab.shape != (lightness.shape[0], 2, *lightness.shape[2:]):
            raise ValueError(f"ab must be (N, 2, H, W) = {(lightness.shape[0], 2, *lightness.shape[2:])} to match "
                             f"lightness, got shape {tuple(ab.shape)}")
        target = self.bins.index(F.avg_pool2d(ab, self.stride))
        return F.cross_entropy(self(lightness), target, weight=self.weights)

    @torch.no_grad()
    def colorize(self, lightness: torch.Tensor) -> torch.Tensor:
        """ab (N, 2, H, W): the annealed mean sum_q softmax(logits / T)_q * centre_q, upsampled bilinearly."""
        p = torch.softmax(self(lightness) / self.temperature, dim=1)
        ab = torch.einsum("nqhw,qc->nchw", p, self.centres)
        return F.interpolate(ab, size=lightness.shape[2:], mode="bilinear", align_corners=False)


def example():
    """A tiny Colorizer and a batch (L, ab) for one training step: ``model.loss(*args)``."""
    g = torch.Generator().manual_seed(0)
    lightness, ab = torch.rand(4, 1, 16, 16, generator=g), torch.randn(4, 2, 16, 16, generator=g) * 30
    return Colorizer(ConvEncoder(1, 8, 16), ab_bins(ab, step=20), decoder_width=16), (lightness, ab)


def photo_crops(sizes=(48, 64, 96)):
    """L / 100 and ab of the sample photos at each of ``sizes`` (a list of (L, ab) pairs)."""
    return [rgb_to_lab(sample_images(s)) for s in sizes]


def train(config: TrainConfig) -> Result:
    data = digits(32)
    scales = photo_crops()
    bins = ab_bins(torch.cat([ab.flatten(2) for _, ab in scales], 2).unsqueeze(-1))
    untrained = ConvEncoder(1, 16, 128)
    model = Colorizer(copy.deepcopy(untrained), bins).to(config.device)
    lab = [torch.cat(pair, 1).to(config.device) for pair in scales]
    g = torch.Generator().manual_seed(config.seed)

    def step(scale):
        crops = random_patches(lab[scale], 64, 32, generator=g)
        flip = torch.rand(len(crops), generator=g).to(crops.device) < 0.5
        crops = torch.where(flip.view(-1, 1, 1, 1), crops.flip(3), crops)
        return model.loss(crops[:, :1], crops[:, 1:])

    losses = fit(step, lambda: [int(i) % len(lab) for i in torch.randint(len(lab), (30,), generator=g)],
                 model.parameters(), epochs=config.epochs_or(16, 60), lr=2e-3, config=config, desc="colorize")
    value, baseline, extra = probe_against_untrained(model.encoder, untrained.to(config.device), data, device=config.device,
                                                     features=feature_map)
    photos = scales[-1]

    def strip(path):
        model.eval()
        predicted = model.colorize(photos[0].to(config.device)).cpu()
        draw_rows(path, [("L input", list(photos[0][:, 0].numpy())), ("predicted colour", list(lab_to_rgb(photos[0], predicted))),
                         ("true colour", list(lab_to_rgb(*photos)))],
                  "colorize: L -> ab on scikit-image's sample photos (the training images)", size=2.0)

    return Result("colorize", "linear_probe_accuracy", value, baseline, losses=losses,
                  extra={**extra, "probe_layer": "feature_map (stride 8)", "ab_bins": len(bins.centres),
                         "train_images": "skimage sample photos"},
                  figures={"colorize.png": strip})
