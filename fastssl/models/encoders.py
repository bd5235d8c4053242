"""Small convolutional encoders shared by the methods of ``fastssl.models`` (sized for 2 CPU cores).

>>> import torch
>>> ConvEncoder(in_channels=1, width=16, out_dim=64)(torch.rand(2, 1, 32, 32)).shape
torch.Size([2, 64])
>>> type(ConvEncoder(1, 8, 16, norm="layer").features[0][1]).__name__
'GroupNorm'
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_choice

NORMS = ("batch", "layer")


def conv_block(cin: int, cout: int, stride: int = 1, norm: str = "batch") -> nn.Sequential:
    """3x3 conv, normalization, ReLU. ``norm``: ``"batch"`` (BatchNorm2d, statistics over the batch) or
    ``"layer"`` (GroupNorm(1, C): each sample normalized over its own C, H, W, as CPC v2 does)."""
    check_choice("norm", norm, NORMS)
    normalize = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(1, cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), normalize, nn.ReLU(inplace=True))


class ConvEncoder(nn.Module):
    """Four 3x3 conv blocks (strides 1, 2, 2, 2) and global average pooling: (N, C, H, W) -> (N, out_dim).
    ``feature_map`` returns the stride-8 map (N, out_dim, H/8, W/8) before pooling; ``norm`` as in
    :func:`conv_block` (``"layer"`` keeps every sample's output independent of the rest of the batch)."""

    def __init__(self, in_channels: int = 1, width: int = 32, out_dim: int = 128, norm: str = "batch"):
        super().__init__()
        self.out_dim = out_dim
        self.features = nn.Sequential(conv_block(in_channels, width, norm=norm), conv_block(width, 2 * width, 2, norm),
                                      conv_block(2 * width, 4 * width, 2, norm), conv_block(4 * width, out_dim, 2, norm))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))

    def block_features(self, x: torch.Tensor, blocks: int = 3, grid: int = 1) -> torch.Tensor:
        """The first ``blocks`` conv blocks average-pooled to ``grid`` x ``grid``, flattened: a linear probe
        of a middle layer (as the colorization and RotNet papers probe theirs)."""
        return F.adaptive_avg_pool2d(self.features[:blocks](x), grid).flatten(1)


def mlp_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """SimCLR's projection head g(.): Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
