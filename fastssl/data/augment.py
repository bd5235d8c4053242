"""SimCLR's augmentations (Chen et al. 2020, the lecture's Algorithm 1), batched on tensors, any device:
random resized crop + horizontal flip (one affine resample), colour jitter, random grey, Gaussian blur.
Images are floating (N, C, H, W); float16 and bfloat16 are computed in float32, float64 in float64, and the
view comes back in the images' dtype.

>>> import torch
>>> x = torch.rand(4, 3, 32, 32)
>>> simclr_augment(x, generator=torch.Generator().manual_seed(0)).shape
torch.Size([4, 3, 32, 32])
>>> simclr_augment(x.bfloat16(), generator=torch.Generator().manual_seed(0)).dtype
torch.bfloat16
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..checks import accumulation_dtype, check_float, check_ndim


def _images(fn):
    """``fn(x, ...)`` with ``x`` checked ((N, C, H, W), floating), computed in float32 (float64 for float64)
    and returned in x's dtype."""
    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        check_ndim("x", check_float("x", x), 4, "(N, C, H, W)")
        return fn(x.to(accumulation_dtype(x.dtype)), *args, **kwargs).to(x.dtype)
    return wrapper


def _uniform(n, lo, hi, generator, device):
    return torch.rand(n, generator=generator).to(device) * (hi - lo) + lo


@_images
def random_resized_crop(x: torch.Tensor, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5, generator=None):
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``, resize back, flip
    horizontally with probability ``flip``: one ``grid_sample`` per batch."""
    n, dev = x.shape[0], x.device
    area = _uniform(n, *scale, generator, dev)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, dev)
    w = torch.sqrt(area * log_r.exp()).clamp(max=1.0)
    h = torch.sqrt(area / log_r.exp()).clamp(max=1.0)
    cx = (_uniform(n, 0, 1, generator, dev) * 2 - 1) * (1 - w)
    cy = (_uniform(n, 0, 1, generator, dev) * 2 - 1) * (1 - h)
    sign = torch.where(torch.rand(n, generator=generator).to(dev) < flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@_images
def color_jitter(x: torch.Tensor, strength: float = 0.5, p: float = 0.8, generator=None):
    """Brightness, contrast and saturation factors in [1 - 0.8 s, 1 + 0.8 s], applied with probability ``p``."""
    n, dev = x.shape[0], x.device
    apply = (torch.rand(n, generator=generator) < p).to(dev).view(n, 1, 1, 1)
    b, c, s = (_uniform(n, 1 - 0.8 * strength, 1 + 0.8 * strength, generator, dev).view(n, 1, 1, 1) for _ in range(3))
    y = x * b
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * c + mean
    if x.shape[1] == 3:
        grey = y.mean(dim=1, keepdim=True)
        y = (y - grey) * s + grey
    return torch.where(apply, y.clamp(0, 1), x)


@_images
def random_grey(x: torch.Tensor, p: float = 0.2, generator=None):
    if x.shape[1] != 3:
        return x
    apply = (torch.rand(x.shape[0], generator=generator) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(apply, x.mean(dim=1, keepdim=True).expand_as(x), x)


@_images
def gaussian_blur(x: torch.Tensor, p: float = 0.5, sigma=(0.1, 2.0), generator=None):
    """Separable Gaussian blur, a kernel of about a tenth of the image side, sigma drawn per image."""
    n, ch, hgt, wid = x.shape
    radius = max(1, hgt // 20)
    sig = _uniform(n, *sigma, generator, x.device) * hgt / 224  # SimCLR draws sigma in pixels of a 224 image
    offs = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-offs[None] ** 2 / (2 * sig[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # (n * ch, 2r + 1)
    y = x.reshape(1, n * ch, hgt, wid)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * ch)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * ch)
    apply = (torch.rand(n, generator=generator) < p).to(x.device).view(n, 1, 1, 1)
    return torch.where(apply, y.reshape_as(x), x)


@_images
def simclr_augment(x: torch.Tensor, *, scale=(0.2, 1.0), jitter: float = 0.5, blur: float = 0.5, generator=None):
    """One random view of each image in ``x`` (N, C, H, W) in [0, 1]: crop+resize+flip, colour jitter,
    random grey, blur."""
    x = random_resized_crop(x, scale=scale, generator=generator)
    x = color_jitter(x, jitter, generator=generator)
    x = random_grey(x, generator=generator)
    return gaussian_blur(x, p=blur, generator=generator)
