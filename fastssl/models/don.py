"""Dense Object Nets (Florence, Manuelli et al. 2018): a fully convolutional net maps an image to a
D-dimensional descriptor per pixel, trained so that the pixels of two views that show the same scene point
get the same descriptor. The correspondences come for free from known warps: here two random affine crops
of one of scikit-image's sample photos. The pixel-wise contrastive loss is ``fastssl.info_nce`` over the
descriptors of matched pixels: for each matched pixel u_a in view a, its match u_b in view b is the
positive and the other sampled pixels of the batch (matches and random pixels of view b) the negatives::

    L = -1/M sum_i log softmax_j(<d_a(u_a^i), d_b(u_b^j)> / tau)[i]      (descriptors L2-normalized)

At test time a query pixel's match is its nearest descriptor in the other view; the metric is the share
of queries whose match lies within 2 px of the true correspondence.

>>> import torch
>>> net = PixelEncoder(3, width=4, out_dim=8)
>>> net(torch.rand(2, 3, 20, 20)).shape
torch.Size([2, 8, 20, 20])
>>> a, b, pa, pb = warped_pairs(torch.rand(1, 3, 64, 64), 2, 24, 5, generator=torch.Generator().manual_seed(0))
>>> tuple(a.shape), tuple(pa.shape), bool((pb >= 0).all() and (pb <= 23).all())
((2, 3, 24, 24), (2, 5, 2), True)
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_float, check_int, check_ndim, check_positive, check_same_shape
from ..contrastive import info_nce
from ..data import sample_images
from ..training import Result, TrainConfig, fit
from . import check_size
from .encoders import conv_block


class PixelEncoder(nn.Module):
    """A small fully convolutional descriptor net: a stride-1 block, then ``levels`` stride-2 blocks; every
    level is resized (bilinear up, average-pooled down) to the output grid, the input's size divided by
    ``stride`` (1 = full resolution), concatenated, and a 1x1 conv gives ``out_dim`` channels:
    (N, C, H, W) -> (N, out_dim, H / stride, W / stride). Receptive field ~ 2^(levels + 2) px."""

    def __init__(self, in_channels: int = 3, width: int = 16, out_dim: int = 16, levels: int = 3, stride: int = 1):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("width", width), ("out_dim", out_dim), ("levels", levels),
                            ("stride", stride)):
            check_int(name, value, low=1)
        if stride & (stride - 1) or stride > 2 ** levels:
            raise ValueError(f"stride must be a power of 2 up to 2**levels = {2 ** levels}, got {stride}")
        self.out_dim, self.stride = out_dim, stride
        chans = [width * min(2 ** i, 4) for i in range(levels + 1)]
        self.blocks = nn.ModuleList([conv_block(in_channels, chans[0])] +
                                    [conv_block(chans[i], chans[i + 1], 2) for i in range(levels)])
        self.head = nn.Conv2d(sum(chans), out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        maps, h = [], x
        for block in self.blocks:
            h = block(h)
            if h.shape[-2] > size[0]:
                maps.append(F.adaptive_avg_pool2d(h, size))
            elif h.shape[-2:] != size:
                maps.append(F.interpolate(h, size=size, mode="bilinear", align_corners=False))
            else:
                maps.append(h)
        return self.head(torch.cat(maps, 1))


def _pixels_to_grid(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel coordinates (..., 2) as (x, y) -> grid_sample's normalized coordinates (align_corners=False)."""
    size = torch.tensor([width, height], dtype=points.dtype, device=points.device)
    return (points + 0.5) / size * 2 - 1


def sample_descriptors(desc: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear descriptors of ``desc`` (N, D, H, W) at pixel points (N, M, 2) as (x, y): (N, M, D)."""
    grid = _pixels_to_grid(points, *desc.shape[-2:])[:, :, None]               # (N, M, 1, 2)
    return F.grid_sample(desc, grid, mode="bilinear", align_corners=False)[..., 0].transpose(1, 2)


def _random_affines(count: int, generator, *, crop: float, max_angle: float, shift: float, scale: float):
    """Per view a 2x3 affine from output-normalized to source-normalized coordinates: a crop of relative
    side ``crop``, rotated by up to ``max_angle`` degrees, rescaled by up to ``scale`` (log-uniform), its
    centre moved by up to ``shift``. The pair shares a random centre; each view draws its own warp."""
    centre = (torch.rand(count, 1, 2, generator=generator) * 2 - 1) * (1 - 1.5 * crop)
    thetas = []
    for _ in range(2):
        angle = (torch.rand(count, generator=generator) * 2 - 1) * math.radians(max_angle)
        s = crop * torch.exp((torch.rand(count, generator=generator) * 2 - 1) * math.log(scale))
        rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], 1), torch.stack([angle.sin(), angle.cos()], 1)], 1)
        t = centre[:, 0] + (torch.rand(count, 2, generator=generator) * 2 - 1) * shift
        thetas.append(torch.cat([rot * s[:, None, None], t[:, :, None]], 2))
    return thetas


def warped_pairs(images: torch.Tensor, count: int, size: int, points: int, generator: torch.Generator | None = None, *,
                 crop: float = 0.45, max_angle: float = 30.0, shift: float = 0.1, scale: float = 1.2):
    """``count`` pairs of warped ``size`` x ``size`` views of random ``images`` (N, C, H, W) and ``points``
    known correspondences per pair: ``(view_a, view_b, points_a, points_b)``, points (count, points, 2) as
    (x, y) pixel coordinates, every one inside both views. Warps are random affine crops (rotation, scale,
    shift); view b also gets a random brightness/contrast change."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    idx = torch.randint(len(images), (count,), generator=generator)
    theta_a, theta_b = _random_affines(count, generator, crop=crop, max_angle=max_angle, shift=shift, scale=scale)
    src = images[idx]
    views = [F.grid_sample(src, F.affine_grid(t.to(src), (count, src.shape[1], size, size), align_corners=False),
                           mode="bilinear", padding_mode="reflection", align_corners=False) for t in (theta_a, theta_b)]
    gain = 0.8 + 0.4 * torch.rand(count, 1, 1, 1, generator=generator)
    bias = 0.1 * (torch.rand(count, 1, 1, 1, generator=generator) * 2 - 1)
    view_b = ((views[1] - 0.5) * gain + 0.5 + bias).clamp(0, 1)
    # correspondences: u_b = M_b^-1 (M_a u_a + t_a - t_b), kept where u_b falls inside view b
    over = 4 * points
    pa = torch.rand(count, over, 2, generator=generator) * (size - 1)
    ua = _pixels_to_grid(pa, size, size)
    src_pts = ua @ theta_a[:, :, :2].transpose(1, 2) + theta_a[:, None, :, 2]
    ub = (src_pts - theta_b[:, None, :, 2]) @ torch.linalg.inv(theta_b[:, :, :2]).transpose(1, 2)
    pb = (ub + 1) / 2 * size - 0.5
    inside = ((pb >= 0) & (pb <= size - 1)).all(-1)                          # (count, over)
    order = torch.sort((~inside).float() + torch.rand(count, over, generator=generator) * 0.5, 1).indices[:, :points]
    if not inside.gather(1, order).all():
        raise ValueError("views overlap too little for the requested points; lower max_angle/shift or points")
    take = lambda p: p.gather(1, order[..., None].expand(-1, -1, 2))  # noqa: E731
    return views[0].to(images), view_b.to(images), take(pa).to(images), take(pb).to(images)


def check_pairs(view_a, view_b, points_a, points_b) -> None:
    """Views (N, C, H, W) of one shape and matched points (N, M, 2) of one shape, all floating tensors."""
    for name, value in (("view_a", view_a), ("view_b", view_b), ("points_a", points_a), ("points_b", points_b)):
        check_float(name, value)
    check_ndim("view_a", view_a, 4, "(N, C, H, W)")
    check_same_shape(("view_a", "view_b"), (view_a, view_b))
    if points_a.dim() != 3 or points_a.shape[0] != view_a.shape[0] or points_a.shape[2] != 2:
        raise ValueError(f"points_a must be (N, M, 2) with N = {view_a.shape[0]} views, got shape {tuple(points_a.shape)}")
    check_same_shape(("points_a", "points_b"), (points_a, points_b))


class DenseObjectNet(nn.Module):
    """A descriptor net and its pixel-wise contrastive loss over matched pixels."""

    def __init__(self, encoder: PixelEncoder, temperature: float = 0.1, num_negatives: int = 64):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        check_positive("temperature", temperature)
        check_size("num_negatives", num_negatives, low=0)
        self.encoder, self.temperature, self.num_negatives = encoder, temperature, num_negatives

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalized descriptors (N, D, H, W)."""
        return F.normalize(self.encoder(x), dim=1)

    def loss(self, view_a, view_b, points_a, points_b, generator: torch.Generator | None = None) -> torch.Tensor:
        """info_nce of matched descriptors: queries d_a(points_a), keys d_b(points_b) (the positives, row
        for row) followed by ``num_negatives`` random pixels of each view b. Views (N, C, H, W) and points
        (N, M, 2) as :func:`warped_pairs` gives them; each pair's shapes must match."""
        check_pairs(view_a, view_b, points_a, points_b)
        desc = self(torch.cat([view_a, view_b]))
        da, db = desc.chunk(2)
        n, _, h, w = db.shape
        query, key = sample_descriptors(da, points_a).flatten(0, 1), sample_descriptors(db, points_b).flatten(0, 1)
        if self.num_negatives:
            idx = torch.randint(h * w, (n, self.num_negatives), generator=generator).to(db.device)
            negatives = db.flatten(2).gather(2, idx[:, None].expand(-1, db.shape[1], -1)).transpose(1, 2)
            key = torch.cat([key, negatives.flatten(0, 1)])
        return info_nce(query, key, temperature=self.temperature, normalize=False)


@torch.no_grad()
def match_accuracy(encoder: nn.Module, view_a, view_b, points_a, points_b, threshold: float = 2.0):
    """Share of query points whose nearest descriptor (cosine) in view b lies within ``threshold`` px of
    the true correspondence; also returns the matched pixel coordinates (N, M, 2) for drawing."""
    check_pairs(view_a, view_b, points_a, points_b)
    was_training = encoder.training
    encoder.eval()
    da, db = (F.normalize(encoder(v), dim=1) for v in (view_a, view_b))
    encoder.train(was_training)
    query = sample_descriptors(da, points_a)                                   # (N, M, D)
    best = (query @ db.flatten(2)).argmax(-1)                                  # (N, M): a pixel of view b
    w = db.shape[-1]
    matched = torch.stack([best % w, best // w], -1).to(points_b.dtype)
    return ((matched - points_b).norm(dim=-1) <= threshold).float().mean().item(), matched


def draw_correspondences(path, view_a, view_b, points_a, points_b, rows: dict, threshold: float = 2.0, count: int = 25):
    """Pairs side by side, one row per model in ``rows`` (title -> matched points); lines from each
    query to its match, green within ``threshold`` px of the truth, red otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = min(3, len(view_a))
    size = view_a.shape[-1]
    fig, axes = plt.subplots(len(rows), pairs, figsize=(4.2 * pairs, 2.3 * len(rows)), squeeze=False)
    for r, (title, matched) in enumerate(rows.items()):
        for i in range(pairs):
            ax = axes[r][i]
            ax.imshow(torch.cat([view_a[i], view_b[i]], 2).permute(1, 2, 0).cpu().numpy())
            for (xa, ya), (xm, ym), truth in zip(points_a[i][:count].tolist(), matched[i][:count].tolist(),
                                                 points_b[i][:count].tolist()):
                good = math.dist((xm, ym), truth) <= threshold
                ax.plot([xa, xm + size], [ya, ym], color="lime" if good else "red", lw=0.8)
            ax.axis("off")
            ax.set_title(f"{title}, pair {i}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def example():
    """A tiny Dense Object Net and a warped pair for one training step: ``model.loss(*args)``."""
    g = torch.Generator().manual_seed(0)
    return DenseObjectNet(PixelEncoder(3, width=4, out_dim=8, levels=2), num_negatives=8), \
        warped_pairs(torch.rand(2, 3, 48, 48, generator=g), 2, 16, 12, generator=g)


def train(config: TrainConfig) -> Result:
    photos = sample_images(128).to(config.device)
    untrained = PixelEncoder(3, width=8, out_dim=16, levels=3)
    model = DenseObjectNet(copy.deepcopy(untrained)).to(config.device)
    g = torch.Generator().manual_seed(config.seed)
    size, batch, points = 48, 8, 128

    def step(_):
        return model.loss(*warped_pairs(photos, batch, size, points, generator=g), generator=g)

    losses = fit(step, lambda: range(25), model.parameters(), epochs=config.epochs_or(12, 60), lr=3e-3, config=config,
                 desc="don")
    # held-out warps: a generator the training never used, 64 pairs x 100 query pixels
    test = warped_pairs(photos, 64, size, 100, generator=torch.Generator().manual_seed(config.sub_seed(10_000)))
    value, matched = match_accuracy(model.encoder, *test)
    baseline, matched_untrained = match_accuracy(untrained.to(config.device), *test)
    figures = {"correspondences.png": lambda path: draw_correspondences(
        path, *test, {"trained": matched, "untrained": matched_untrained})}
    return Result("don", "match_within_2px", value, baseline, losses=losses, figures=figures,
                  extra={"view_size": size, "descriptor_dim": 16, "test_pairs": 64, "queries_per_pair": 100})
