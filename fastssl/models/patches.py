"""Patch grids for the context pretext tasks (jigsaw, relative position): cut each image into a
``grid`` x ``grid`` lattice of cells and take one ``patch`` x ``patch`` tile from each cell at a random
offset, so neighbouring tiles are separated by a random gap (Doersch et al. 2015; Noroozi & Favaro
2016): the network cannot solve the task by continuing an edge or a texture across the border.

>>> import torch
>>> x = torch.arange(36.).view(1, 1, 6, 6)
>>> patch_grid(x, grid=3, patch=2).shape
torch.Size([1, 9, 1, 2, 2])
>>> patch_grid(x, grid=3, patch=2)[0, 4, 0].tolist()  # the centre cell, no room to jitter
[[14.0, 15.0], [20.0, 21.0]]
"""
from __future__ import annotations

import torch

from ..checks import check_int


def patch_grid(images: torch.Tensor, grid: int = 3, patch: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Tiles (N, grid*grid, C, patch, patch), cells in row-major order. Cell size is ``H // grid``; each
    tile sits at an offset drawn uniformly in [0, cell - patch] in both directions, independently per
    image and cell (``patch`` defaults to 3/4 of a cell)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    check_int("grid", grid, low=1)
    n, _, h, w = images.shape
    cell = min(h, w) // grid
    patch = check_int("patch", patch, accepted="None or an int") if patch is not None else max(1, (3 * cell) // 4)
    if not 1 <= patch <= cell:
        raise ValueError(f"need 1 <= patch <= cell ({cell} = min(H, W) // grid), got grid={grid}, patch={patch}")
    k = grid * grid
    offsets = torch.randint(cell - patch + 1, (2, n, k), generator=generator).to(images.device)
    cells = torch.arange(k, device=images.device)
    top = (cells // grid) * cell + offsets[0]  # (N, K)
    left = (cells % grid) * cell + offsets[1]
    span = torch.arange(patch, device=images.device)
    rows = (top[..., None] + span)[..., :, None]  # (N, K, P, 1)
    cols = (left[..., None] + span)[..., None, :]  # (N, K, 1, P)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    tiles = images.permute(0, 2, 3, 1)[batch, rows, cols]  # (N, K, P, P, C)
    return tiles.permute(0, 1, 4, 2, 3).contiguous()


def tile_codes(encoder, images: torch.Tensor, grid: int = 3) -> torch.Tensor:
    """The probe layer of the tile methods: ``encoder``'s codes of the ``grid`` x ``grid`` whole cells of
    each image (no gap, no jitter), concatenated in row-major order: (N, grid * grid * D)."""
    cell = min(images.shape[2:]) // grid
    return encoder(patch_grid(images, grid, cell).flatten(0, 1)).view(len(images), -1)
