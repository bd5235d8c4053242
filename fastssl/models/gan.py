"""DCGAN (Radford et al. 2016) trained as a GAN (Goodfellow et al. 2014) on 16 x 16 digits.

A generator G maps z ~ N(0, I) to an image through a strided transposed convolution (BatchNorm, ReLU) and a
fixed bilinear upsampling, as the data were made; a discriminator D maps an image to a logit through strided
convolutions (LeakyReLU, BatchNorm). With s = softplus (so softplus(-l) = -log sigmoid(l)):

- discriminator: min_D  E_x s(-D(x)) + E_z s(D(G(z)))        (cross-entropy, real = 1, fake = 0)
- generator, non-saturating: min_G  E_z s(-D(G(z))) = -E_z log D(G(z)), which keeps a useful gradient
  while D rejects the fakes (the minimax log(1 - D(G(z))) saturates there),

with ``k`` discriminator steps per generator step; samples come from an exponential moving average of G's
weights. The evaluation trains a *fresh* real-vs-fake classifier
(:func:`fastssl.models.judge.real_vs_fake_accuracy`) on half of (real test digits, as many samples) and
reports its accuracy on the other half, averaged over 3 random splits: lower is better, 0.5 is ideal. The baseline is the same protocol
with the untrained generator (a copy taken before training).

>>> import torch
>>> gan = GAN(Generator(z_dim=8, width=8), Discriminator(width=8))
>>> gan.generate(3).shape
torch.Size([3, 1, 16, 16])
>>> gan.loss(torch.rand(4, 1, 16, 16) * 2 - 1, torch.randn(4, 8)).shape
torch.Size([])
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..data import digits
from ..training import Result, TrainConfig, shuffled_batches
from . import check_size
from .judge import image_grid, real_vs_fake_accuracy


def _check_positive_int(**values):
    for name, value in values.items():
        check_size(name, value)


class Generator(nn.Module):
    """z (N, z_dim) -> Linear -> (4w, 4, 4) -> ConvT -> (2w, 8, 8) -> Conv -> (channels, 8, 8) -> bilinear x2
    -> hardtanh -> (channels, 16, 16) in [-1, 1].

    The digits are 8 x 8 images upsampled bilinearly (``fastssl.data.digits(16)``), so G draws at 8 x 8 and
    upsamples the same way, and its hardtanh output can reach the exact black (-1) of their background,
    which tanh only approaches.
    """

    def __init__(self, z_dim: int = 32, width: int = 32, channels: int = 1):
        super().__init__()
        _check_positive_int(z_dim=z_dim, width=width, channels=channels)
        self.z_dim, self.width = z_dim, width
        self.project = nn.Sequential(nn.Linear(z_dim, 4 * width * 16, bias=False), nn.BatchNorm1d(4 * width * 16), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
                                nn.ReLU(), nn.Conv2d(2 * width, channels, 3, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.up(self.project(z).view(len(z), 4 * self.width, 4, 4))
        return F.hardtanh(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))


class Discriminator(nn.Module):
    """(channels, 16, 16) -> Conv -> (w, 8, 8) -> Conv -> (2w, 4, 4) -> Linear -> one logit (real vs fake)."""

    def __init__(self, width: int = 32, channels: int = 1):
        super().__init__()
        _check_positive_int(width=width, channels=channels)
        self.net = nn.Sequential(nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
                                 nn.Flatten(), nn.Linear(2 * width * 16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (16, 16):
            raise ValueError(f"the discriminator takes 16 x 16 images, got {tuple(x.shape[-2:])}")
        return self.net(x).squeeze(1)


class GAN(nn.Module):
    """The two players. ``d_loss`` and ``g_loss`` are each player's objective, with gradients for that player
    only (fakes are detached for D; D's parameters are detached for G); ``loss`` is their sum, so one
    backward pass gives both players their own gradients.

    Args:
        generator: maps (N, z_dim) noise to images; must have a ``z_dim`` attribute.
        discriminator: maps images to (N,) logits.
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module):
        super().__init__()
        if not hasattr(generator, "z_dim"):
            raise TypeError(f"generator must have a z_dim attribute, got {type(generator).__name__}")
        self.generator, self.discriminator = generator, discriminator

    def d_loss(self, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """E s(-D(x)) + E s(D(G(z))): D's cross-entropy with real = 1 and (detached) fake = 0."""
        fake = self.generator(z).detach()
        return F.softplus(-self.discriminator(real)).mean() + F.softplus(self.discriminator(fake)).mean()

    def g_loss(self, z: torch.Tensor) -> torch.Tensor:
        """The non-saturating generator loss E s(-D(G(z))) = -E log D(G(z)), through a detached D."""
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return F.softplus(-functional_call(self.discriminator, frozen, (self.generator(z),))).mean()

    def loss(self, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.d_loss(real, z) + self.g_loss(z)

    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples in [-1, 1] from G in eval mode (BatchNorm running statistics)."""
        was_training = self.training
        self.eval()
        device = next(self.generator.parameters()).device
        x = self.generator(torch.randn(n, self.generator.z_dim, generator=generator).to(device))
        self.train(was_training)
        return x


def example():
    """A tiny GAN and a batch for one training step: ``model.loss(*args)``."""
    return GAN(Generator(z_dim=8, width=8), Discriminator(width=8)), (torch.rand(8, 1, 16, 16) * 2 - 1, torch.randn(8, 8))


def fit_gan(gan: GAN, images: torch.Tensor, *, epochs: int, config: TrainConfig, k: int = 1, batch_size: int = 64,
            lr: float = 2e-4, generator: torch.Generator | None = None, after_generator_step=None):
    """Alternate ``k`` discriminator steps (each on a fresh real batch) and one generator step, Adam(0.5, 0.999)
    as in DCGAN, for ``epochs`` passes over ``images``, calling ``after_generator_step()`` after each generator
    step; returns the per-epoch mean (generator, discriminator) losses."""
    from tqdm import tqdm

    _check_positive_int(k=k, epochs=epochs)
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=lr, betas=(0.5, 0.999))
    device, z_dim = images.device, gan.generator.z_dim

    def noise():
        return torch.randn(batch_size, z_dim, generator=generator).to(device)

    g_losses, d_losses = [], []
    bar = tqdm(range(epochs), desc="gan", disable=not config.progress)
    for _ in bar:
        g_sum, d_sum, d_count, g_count = 0.0, 0.0, 0, 0
        for i, idx in enumerate(shuffled_batches(len(images), batch_size, generator)):
            d = gan.d_loss(images[idx], noise())
            opt_d.zero_grad(set_to_none=True)
            d.backward()
            opt_d.step()
            d_sum, d_count = d_sum + d.detach().double(), d_count + 1  # one host sync an epoch
            if (i + 1) % k == 0:
                g = gan.g_loss(noise())
                opt_g.zero_grad(set_to_none=True)
                g.backward()
                opt_g.step()
                if after_generator_step:
                    after_generator_step()
                g_sum, g_count = g_sum + g.detach().double(), g_count + 1
        g_losses.append(float(g_sum) / max(g_count, 1))
        d_losses.append(float(d_sum) / max(d_count, 1))
        bar.set_postfix(g=f"{g_losses[-1]:.3f}", d=f"{d_losses[-1]:.3f}")
    return g_losses, d_losses


@torch.no_grad()
def update_ema(average: nn.Module, model: nn.Module, decay: float):
    """Exponential moving average of ``model``'s parameters into ``average``; buffers (BatchNorm statistics) copied."""
    for pa, p in zip(average.parameters(), model.parameters()):
        pa.lerp_(p, 1 - decay)
    for ba, b in zip(average.buffers(), model.buffers()):
        ba.copy_(b)


def train(config: TrainConfig) -> Result:
    data = digits(16)
    k, detector_splits = 1, 3
    gan = GAN(Generator(z_dim=32, width=32), Discriminator(width=32)).to(config.device)
    untrained = copy.deepcopy(gan)
    ema = copy.deepcopy(gan.generator).requires_grad_(False)  # the generator that is sampled (Karras et al. 2018)
    g = torch.Generator().manual_seed(config.seed)
    g_losses, d_losses = fit_gan(gan, (data.train_x * 2 - 1).to(config.device), epochs=config.epochs_or(60, 200),
                                 config=config, k=k, lr=5e-4, generator=g,
                                 after_generator_step=lambda: update_ema(ema, gan.generator, 0.995))
    real = data.test_x  # digits the GAN never saw, in [0, 1]

    def samples(generator_net):
        fixed = torch.Generator().manual_seed(config.sub_seed(1))
        return (GAN(generator_net, gan.discriminator).generate(len(real), fixed).cpu() + 1) / 2

    def detected(fake):  # mean over random train/test splits: one detector's accuracy varies by several points
        return sum(real_vs_fake_accuracy(real, fake, seed=config.sub_seed(100 * s), device=config.device)
                   for s in range(detector_splits)) / detector_splits

    fake, fake_untrained = samples(ema), samples(untrained.generator)
    value, baseline = detected(fake), detected(fake_untrained)
    grid = lambda x: x[:64].reshape(8, 8, 16, 16)
    figures = {"samples.png": lambda path: image_grid({"real (test)": grid(real), "GAN samples": grid(fake),
                                                        "untrained G": grid(fake_untrained)}, path)}
    extra = {"discriminator_steps_per_generator_step": k, "discriminator_loss": d_losses, "losses_are": "generator",
             "real_vs_fake_accuracy_without_ema": detected(samples(gan.generator)), "generator_ema_decay": 0.995,
             "detector": f"fresh SmallCNN, 50% of real test digits + as many samples to train, the rest to test, "
                         f"mean of {detector_splits} splits", "image_size": 16}
    return Result("gan", "real_vs_fake_accuracy", value, baseline, higher_is_better=False, losses=g_losses, extra=extra,
                  figures=figures)
