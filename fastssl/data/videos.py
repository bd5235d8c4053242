"""Generated videos of textured shapes moving over a textured background, with their masks: the data
of the video colorization tracker (nothing downloaded).

>>> v = moving_shapes(num_videos=2, frames=4, size=24, generator=__import__("torch").Generator().manual_seed(0))
>>> tuple(v.frames.shape), tuple(v.masks.shape)
((2, 4, 3, 24, 24), (2, 4, 24, 24))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Videos:
    frames: torch.Tensor  # (N, T, 3, H, W) in [0, 1]
    masks: torch.Tensor  # (N, T, H, W) in {0, 1}: the moving shape


def _texture(n: int, size: int, generator) -> torch.Tensor:
    """Smooth random colour textures: upsampled noise at two scales."""
    coarse = F.interpolate(torch.rand(n, 3, size // 8 + 1, size // 8 + 1, generator=generator), size=(size, size),
                           mode="bilinear", align_corners=False)
    fine = F.interpolate(torch.rand(n, 3, size // 3 + 1, size // 3 + 1, generator=generator), size=(size, size),
                         mode="bilinear", align_corners=False)
    return (0.6 * coarse + 0.4 * fine).clamp(0, 1)


def moving_shapes(num_videos: int = 8, frames: int = 8, size: int = 32, *, speed: float = 1.0, generator=None) -> Videos:
    """Each video: a disc or square with its own texture moving in a straight line (``speed`` pixels a
    frame, bouncing off the borders) over a static textured background."""
    bg = _texture(num_videos, size, generator)
    fg = _texture(num_videos, size, generator)
    radius = size * (0.18 + 0.1 * torch.rand(num_videos, generator=generator))
    pos = size * (0.3 + 0.4 * torch.rand(num_videos, 2, generator=generator))
    angle = 2 * torch.pi * torch.rand(num_videos, generator=generator)
    vel = speed * torch.stack([angle.cos(), angle.sin()], 1)
    square = torch.rand(num_videos, generator=generator) < 0.5
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    out_frames, out_masks = [], []
    for _ in range(frames):
        dy, dx = yy[None] - pos[:, 0, None, None], xx[None] - pos[:, 1, None, None]
        r = radius[:, None, None]
        mask = torch.where(square[:, None, None], (dy.abs() <= r) & (dx.abs() <= r), dy**2 + dx**2 <= r**2).float()
        # the shape carries its texture with it: shift the foreground texture by the displacement
        shift = (pos - size / 2).round().long()
        moved = torch.stack([fg[i].roll((int(shift[i, 0]), int(shift[i, 1])), (1, 2)) for i in range(num_videos)])
        out_frames.append(mask[:, None] * moved + (1 - mask[:, None]) * bg)
        out_masks.append(mask)
        pos = pos + vel
        for axis in range(2):  # bounce
            low, high = pos[:, axis] < radius, pos[:, axis] > size - 1 - radius
            vel[low | high, axis] *= -1
            pos[:, axis] = pos[:, axis].clamp(radius, size - 1 - radius)
    return Videos(torch.stack(out_frames, 1), torch.stack(out_masks, 1))
