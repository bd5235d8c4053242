"""Embedded data sets: nothing is downloaded. Digits come from scikit-learn, photos from scikit-image's
sample images, videos of moving textured shapes are generated (``pip install fastssl[train]``).

>>> from fastssl.data import digits
>>> d = digits(size=16)
>>> tuple(d.train_x.shape[1:]), d.train_x.dtype, int(d.train_y.max())
((1, 16, 16), torch.float32, 9)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import simclr_augment  # noqa: F401
from .videos import moving_shapes  # noqa: F401


@dataclass
class Split:
    """Images (N, C, H, W) in [0, 1] and integer labels (N,), train and test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _require(module: str, extra: str = "train"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} provides this data set: pip install 'fastssl[{extra}]'") from exc


def digits(size: int = 32, test_fraction: float = 0.3, seed: int = 0) -> Split:
    """scikit-learn's 1797 handwritten digits (8 x 8, 16 grey levels), upsampled bilinearly to
    ``size`` x ``size``, scaled to [0, 1], split by a fixed stratified permutation."""
    datasets = _require("sklearn.datasets")
    raw = datasets.load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    y = torch.tensor(raw.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):  # stratified: the same share of each class in the test split
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: round(len(idx) * test_fraction)]] = True
    return Split(x[~test], y[~test], x[test], y[test])


SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")  # skimage.data.cat is chelsea


def sample_images(size: int = 128) -> torch.Tensor:
    """scikit-image's colour sample photos, centre-cropped square and resized: (5, 3, size, size) in [0, 1]."""
    skdata = _require("skimage.data")
    out = []
    for name in SAMPLE_IMAGES:
        img = torch.tensor(getattr(skdata, name)(), dtype=torch.float32).permute(2, 0, 1) / 255.0
        s = min(img.shape[1:])
        top, left = (img.shape[1] - s) // 2, (img.shape[2] - s) // 2
        img = img[:, top:top + s, left:left + s]
        out.append(F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
    return torch.stack(out).clamp_(0, 1)


def random_patches(images: torch.Tensor, count: int, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` random ``size`` x ``size`` crops drawn uniformly from ``images`` (N, C, H, W)."""
    n, _, h, w = images.shape
    idx = torch.randint(n, (count,), generator=generator)
    ys = torch.randint(h - size + 1, (count,), generator=generator)
    xs = torch.randint(w - size + 1, (count,), generator=generator)
    return torch.stack([images[i, :, y:y + size, x:x + size] for i, y, x in zip(idx.tolist(), ys.tolist(), xs.tolist())])
