"""Tracking by colorizing videos (Vondrick et al. 2018): a feature net sees grey frames only and must
colour a target frame by pointing into reference frames. Colours (Lab's ab) are quantized into K k-means
clusters; every target pixel j copies the clusters of the reference pixels i it attends to::

    p_j = sum_i softmax_i(<f_i, f_j> / tau) c_i        L = -mean_j log p_j[y_j]      (fastssl.colorization_loss)

with 3 reference frames before the target and attention restricted to a disk of ``radius`` pixels. The
colour is only a free training signal: once trained, the same attention carries any label, so
``fastssl.propagate_labels`` tracks the first frame's object mask through a video.

>>> import torch
>>> model, (grey, colors) = example()
>>> tuple(grey.shape), tuple(colors.shape), model.loss(grey, colors).shape
((2, 4, 1, 12, 12), (2, 4, 6, 6), torch.Size([]))
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int, check_number, check_positive
from ..data import moving_shapes
from ..propagation import colorization_loss, propagate_labels
from ..training import Result, TrainConfig, fit, shuffled_batches
from . import check_size
from .don import PixelEncoder


class ColorQuantizer:
    """k-means over the ab channels of Lab (scikit-learn), fit on training frames: ``grey(frames)`` gives
    L / 100 as (..., 1, H, W), ``labels(frames)`` the cluster id of every pixel (..., H, W). ``seed`` is an
    int in [0, 2**32), scikit-learn's ``random_state`` range (``TrainConfig.sub_seed(bits=32)`` gives one)."""

    def __init__(self, num_colors: int = 16, samples: int = 20000, seed: int = 0):
        check_size("num_colors", num_colors)
        check_size("samples", samples)
        check_int("seed", seed, low=0, high=2**32 - 1)
        self.num_colors, self.samples, self.seed = num_colors, samples, seed
        self.kmeans = None

    @staticmethod
    def _lab(frames: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) RGB in [0, 1] -> (..., H, W, 3) Lab."""
        from skimage.color import rgb2lab

        return torch.from_numpy(rgb2lab(frames.movedim(-3, -1).cpu().double().numpy())).float()

    def fit(self, frames: torch.Tensor) -> "ColorQuantizer":
        from sklearn.cluster import KMeans

        ab = self._lab(frames)[..., 1:].reshape(-1, 2)
        pick = torch.randperm(len(ab), generator=torch.Generator().manual_seed(self.seed))[: self.samples]
        self.kmeans = KMeans(self.num_colors, n_init=3, random_state=self.seed).fit(ab[pick].numpy())
        return self

    def grey(self, frames: torch.Tensor) -> torch.Tensor:
        return self._lab(frames)[..., :1].movedim(-1, -3) / 100.0

    def labels(self, frames: torch.Tensor) -> torch.Tensor:
        if self.kmeans is None:
            raise RuntimeError("call fit(frames) before labels()")
        ab = self._lab(frames)[..., 1:]
        return torch.from_numpy(self.kmeans.predict(ab.reshape(-1, 2).numpy())).long().reshape(ab.shape[:-1])


class ColorizationTracker(nn.Module):
    """A feature net over grey frames and Vondrick's colorization loss: ``loss(grey, colors)`` on clips
    of R + 1 frames, the last being the target, the first R the references."""

    def __init__(self, encoder: nn.Module, num_colors: int = 16, temperature: float = 0.05, radius: float | None = 4.0):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        check_size("num_colors", num_colors)
        check_positive("temperature", temperature)
        if radius is not None:
            check_number("radius", radius, low=0)  # 0: each pixel attends only to its own position
        self.encoder, self.num_colors, self.temperature, self.radius = encoder, num_colors, temperature, radius

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        """L2-normalized features of frames (..., 1, H, W) -> (..., C, H, W)."""
        feats = self.encoder(grey.flatten(0, -4))
        return F.normalize(feats, dim=1).reshape(*grey.shape[:-3], *feats.shape[1:])

    def loss(self, grey: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
        """grey (B, R + 1, 1, H, W), colors (B, R + 1, h, w) cluster ids on the feature grid (h, w = the
        encoder's output size): colorize frame R from frames 0..R-1."""
        if grey.dim() != 5 or colors.dim() != 4 or colors.shape[:2] != grey.shape[:2] or grey.shape[1] < 2:
            raise ValueError(f"grey must be (B, R + 1 >= 2, 1, H, W) and colors (B, R + 1, h, w), got "
                             f"{tuple(grey.shape)} and {tuple(colors.shape)}")
        feats = self(grey)
        if feats.shape[-2:] != colors.shape[-2:]:
            raise ValueError(f"colors must be on the feature grid {tuple(feats.shape[-2:])}, got {tuple(colors.shape)}")
        return colorization_loss(feats[:, -1], feats[:, :-1], colors[:, :-1], colors[:, -1], self.num_colors,
                                 temperature=self.temperature, radius=self.radius)


@torch.no_grad()
def track(encoder: nn.Module, grey: torch.Tensor, first_mask: torch.Tensor, **propagation) -> torch.Tensor:
    """Propagate ``first_mask`` (H, W) through one video's grey frames (T, 1, H, W) with the encoder's
    L2-normalized features (at the encoder's stride: the mask is average-pooled to the feature grid and
    the propagated foreground probability upsampled back): the predicted masks (T, H, W), frame 0 given."""
    was_training = encoder.training
    encoder.eval()
    feats = F.normalize(encoder(grey), dim=1)
    encoder.train(was_training)
    H, W = first_mask.shape
    soft = F.adaptive_avg_pool2d(first_mask[None, None].to(feats), feats.shape[-2:])[0]
    probs = propagate_labels(feats, torch.cat([1 - soft, soft]), **propagation)        # (T, 2, h, w)
    fg = F.interpolate(probs, size=(H, W), mode="bilinear", align_corners=False)
    masks = fg[:, 1] > fg[:, 0]
    masks[0] = first_mask.bool()
    return masks


def mask_iou(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """IoU of boolean-able masks over their last two dims (1 where both are empty)."""
    pred, truth = pred.bool(), truth.bool()
    inter, union = (pred & truth).sum((-2, -1)).float(), (pred | truth).sum((-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def mean_iou(encoder: nn.Module, grey: torch.Tensor, masks: torch.Tensor, **propagation):
    """Mean IoU over the videos (N, T, 1, H, W) and their frames 1..T-1, and the predicted masks."""
    preds = torch.stack([track(encoder, g, m[0], **propagation) for g, m in zip(grey, masks)])
    return mask_iou(preds[:, 1:], masks[:, 1:]).mean().item(), preds


def clips(num_videos: int, frames: int, length: int) -> torch.Tensor:
    """(video, first frame) of every window of ``length`` consecutive frames: (num_videos * (frames - length + 1), 2)."""
    v, t = torch.meshgrid(torch.arange(num_videos), torch.arange(frames - length + 1), indexing="ij")
    return torch.stack([v.reshape(-1), t.reshape(-1)], 1)


def draw_strip(path, frames, masks, rows: dict, video: int = 0, count: int = 8):
    """One held-out video: its frames with the true mask outlined, then a row per model (title ->
    predicted masks (N, T, H, W)) of predicted masks over the grey frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = frames.shape[1]
    steps = torch.linspace(0, T - 1, min(count, T)).round().long().tolist()
    fig, axes = plt.subplots(1 + len(rows), len(steps), figsize=(1.6 * len(steps), 1.7 * (1 + len(rows))), squeeze=False)
    grey = frames[video].mean(1)
    for c, t in enumerate(steps):
        axes[0][c].imshow(frames[video, t].permute(1, 2, 0).numpy())
        axes[0][c].contour(masks[video, t].numpy(), levels=[0.5], colors="white", linewidths=0.8)
        axes[0][c].set_title(f"t={t}", fontsize=8)
        for r, (title, preds) in enumerate(rows.items(), 1):
            iou = mask_iou(preds[video, t], masks[video, t]).item()
            axes[r][c].imshow(grey[t].numpy(), cmap="gray")
            axes[r][c].imshow(preds[video, t].numpy(), cmap="autumn", alpha=0.45 * preds[video, t].float().numpy())
            axes[r][c].set_title(f"{title} IoU {iou:.2f}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def example():
    """A tiny tracker and a clip batch (3 references + target) for one training step: ``model.loss(*args)``."""
    g = torch.Generator().manual_seed(0)
    model = ColorizationTracker(PixelEncoder(1, width=4, out_dim=8, levels=1, stride=2), num_colors=4, radius=3.0)
    return model, (torch.rand(2, 4, 1, 12, 12, generator=g), torch.randint(4, (2, 4, 6, 6), generator=g))


PROPAGATION = dict(context=3, long_memory=(0,), radius=4.0, topk=10, temperature=0.05)  # feature-grid pixels


def train(config: TrainConfig) -> Result:
    refs, size = 3, 32
    videos = moving_shapes(num_videos=48, frames=8, size=size, generator=torch.Generator().manual_seed(config.seed))
    held_out = moving_shapes(num_videos=16, frames=12, size=size,
                             generator=torch.Generator().manual_seed(config.sub_seed(10_000)))
    quantizer = ColorQuantizer(16, seed=config.sub_seed(bits=32)).fit(videos.frames)
    untrained = PixelEncoder(1, width=16, out_dim=32, levels=2, stride=2)
    # grey input at full resolution, colour targets on the feature grid (RGB average-pooled first)
    grey = quantizer.grey(videos.frames).to(config.device)
    colors = quantizer.labels(F.avg_pool2d(videos.frames.flatten(0, 1), 2).unflatten(0, videos.frames.shape[:2]))
    colors = colors.to(config.device)
    model = ColorizationTracker(copy.deepcopy(untrained), num_colors=16).to(config.device)
    windows = clips(len(grey), grey.shape[1], refs + 1)
    offsets = torch.arange(refs + 1)
    g = torch.Generator().manual_seed(config.seed)

    def step(idx):
        v, t = windows[idx, :1], windows[idx, 1:] + offsets                      # (b, 1), (b, R + 1)
        return model.loss(grey[v, t], colors[v, t])

    losses = fit(step, lambda: shuffled_batches(len(windows), 16, g), model.parameters(),
                 epochs=config.epochs_or(8, 40), lr=3e-3, config=config, desc="tracker")
    test_grey = quantizer.grey(held_out.frames).to(config.device)
    value, preds = mean_iou(model.encoder, test_grey, held_out.masks, **PROPAGATION)
    baseline, preds_untrained = mean_iou(untrained.to(config.device), test_grey, held_out.masks, **PROPAGATION)
    figures = {"propagation.png": lambda path: draw_strip(
        path, held_out.frames, held_out.masks, {"trained": preds.cpu(), "untrained": preds_untrained.cpu()})}
    return Result("tracker", "mean_mask_iou", value, baseline, losses=losses, figures=figures,
                  extra={"num_colors": 16, "reference_frames": refs, "train_videos": 48, "test_videos": 16,
                         "propagation": {k: list(v) if isinstance(v, tuple) else v for k, v in PROPAGATION.items()}})
