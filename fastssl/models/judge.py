"""Independent judges of generated images, shared by the generative methods (``ddpm``, ``gan``): a small
CNN classifier trained from scratch with cross-entropy, on real data only for the digit judge, or on a
labelled mix of real and generated images for the real-vs-fake detector.

>>> import torch
>>> x, y = torch.rand(40, 1, 16, 16), torch.arange(40) % 2
>>> x[y == 1] += 1.0  # two trivially separable classes
>>> model = train_classifier(x, y, num_classes=2, epochs=20, seed=0)
>>> accuracy(model, x, y)
1.0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_number
from . import check_size
from .encoders import conv_block


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU blocks with 2x2 max-pooling between them, global average pooling and a linear layer: (N, C, H, W) -> logits.

    Args:
        num_classes: the number of outputs (>= 2).
        in_channels: image channels (>= 1).
        width: channels of the first stage (the second has twice as many).
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32):
        super().__init__()
        for name, value, least in (("num_classes", num_classes, 2), ("in_channels", in_channels, 1), ("width", width, 1)):
            check_size(name, value, low=least)
        self.features = nn.Sequential(conv_block(in_channels, width), nn.MaxPool2d(2), conv_block(width, 2 * width),
                                      nn.MaxPool2d(2), conv_block(2 * width, 2 * width))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def train_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int = 5, seed: int = 0,
                     batch_size: int = 64, lr: float = 2e-3, width: int = 32, device: str = "cpu") -> SmallCNN:
    """A fresh :class:`SmallCNN` fitted to images ``x`` (N, C, H, W) and integer labels ``y`` (N,) by Adam on
    the cross-entropy, ``epochs`` shuffled passes; returned in eval mode."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not isinstance(y, torch.Tensor) or y.shape != x.shape[:1]:
        raise ValueError(f"x must be an (N, C, H, W) tensor and y an (N,) tensor, got {getattr(x, 'shape', x)!r} "
                         f"and {getattr(y, 'shape', y)!r}")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SmallCNN(num_classes, x.shape[1], width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = x.to(device), y.to(device)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Share of ``x`` that ``model`` labels as ``y``."""
    device = next(model.parameters()).device
    pred = torch.cat([model(x[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)])
    return (pred == y.cpu()).float().mean().item()


def digit_judge(data, *, epochs: int = 5, seed: int = 0, device: str = "cpu"):
    """The independent digit classifier: trained on ``data.train_x/train_y`` (real images only) and
    ``(model, accuracy on the real test split)``."""
    model = train_classifier(data.train_x, data.train_y, 10, epochs=epochs, seed=seed, device=device)
    return model, accuracy(model, data.test_x, data.test_y)


def real_vs_fake_accuracy(real: torch.Tensor, fake: torch.Tensor, *, train_fraction: float = 0.5, epochs: int = 10,
                          seed: int = 0, width: int = 32, device: str = "cpu") -> float:
    """Held-out accuracy of a fresh real-vs-fake :class:`SmallCNN` (label 1 = real) trained on a random
    ``train_fraction`` of each of ``real`` and ``fake`` (equal-sized (N, C, H, W) sets) and tested on the
    rest: 0.5 when the two are indistinguishable to it, 1.0 when it separates them perfectly."""
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have the same shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    check_number("train_fraction", train_fraction, low=0, high=1, low_open=True, high_open=True)
    g = torch.Generator().manual_seed(seed)
    n_train = int(len(real) * train_fraction)
    parts = []
    for images, label in ((real, 1), (fake, 0)):
        perm = torch.randperm(len(images), generator=g)
        parts.append((images[perm[:n_train]], images[perm[n_train:]], label))
    train_x = torch.cat([p[0] for p in parts])
    train_y = torch.cat([torch.full((len(p[0]),), p[2]) for p in parts])
    test_x = torch.cat([p[1] for p in parts])
    test_y = torch.cat([torch.full((len(p[1]),), p[2]) for p in parts])
    model = train_classifier(train_x, train_y, 2, epochs=epochs, seed=seed, width=width, device=device)
    return accuracy(model, test_x, test_y)


def image_grid(panels: dict, path: str, row_labels: bool = False):
    """Save ``{title: (rows, cols, H, W) images in [0, 1]}`` as grey panels side by side to ``path``; with
    ``row_labels`` the rows are labelled 0, 1, ... (one class a row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, imgs) in zip(axes[0], panels.items()):
        r, c, h, w = imgs.shape
        ax.imshow(imgs.permute(0, 2, 1, 3).reshape(r * h, c * w).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([h * (i + 0.5) for i in range(r)] if row_labels else [])
        if row_labels:
            ax.set_yticklabels([str(i) for i in range(r)])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
