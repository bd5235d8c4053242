"""Standard self-supervised and generative methods built on fastssl's ops, one file a method; each
defines its ``nn.Module``, a ``train(config) -> fastssl.training.Result`` recipe on embedded data, and
``example() -> (model, args)``: a tiny model whose ``model.loss(*args)`` is a scalar that reaches every
parameter (the tests take one training step with it).

>>> 'simclr' in METHODS and 'tracker' in METHODS
True
"""
from __future__ import annotations

import importlib

from ..checks import check_int

# name -> (module, one line on what it learns from)
METHODS = {
    "simclr": ("fastssl.models.simclr", "NT-Xent between two augmented views (Chen et al. 2020)"),
    "moco": ("fastssl.models.moco", "InfoNCE against a queue of momentum-encoder keys (He et al. 2020)"),
    "cpc": ("fastssl.models.cpc", "predict the codes of lower rows of patches from the rows above (van den Oord et al. 2018)"),
    "clip": ("fastssl.models.clip", "match images and captions with a learnable temperature (Radford et al. 2021)"),
    "rotnet": ("fastssl.models.rotnet", "predict which of 4 rotations was applied (Gidaris et al. 2018)"),
    "jigsaw": ("fastssl.models.jigsaw", "predict the permutation of 3x3 shuffled patches (Noroozi & Favaro 2016)"),
    "relpos": ("fastssl.models.relpos", "predict where a patch sits relative to another, 8-way (Doersch et al. 2015)"),
    "inpaint": ("fastssl.models.inpaint", "reconstruct a masked region from its context (Pathak et al. 2016)"),
    "colorize": ("fastssl.models.colorize", "predict colour (ab) from lightness (Zhang et al. 2016)"),
    "don": ("fastssl.models.don", "pixel descriptors matched across warped views (Florence et al. 2018)"),
    "ddpm": ("fastssl.models.ddpm", "class-conditional denoising diffusion with guidance (Ho et al. 2020)"),
    "gan": ("fastssl.models.gan", "DCGAN generator against a discriminator (Goodfellow et al. 2014)"),
    "tracker": ("fastssl.models.tracker", "track by colorizing video from reference frames (Vondrick et al. 2018)"),
}


def check_size(name: str, value, *, low: int = 1) -> int:
    """A constructor's size or count: an int >= ``low`` (:func:`fastssl.checks.check_int`). Every bad value
    raises ValueError, a non-int too, as these constructors always have (check_int says TypeError there).

    >>> check_size("width", 0)
    Traceback (most recent call last):
        ...
    ValueError: width must be an int >= 1, got 0
    """
    try:
        return check_int(name, value, low=low)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def load_method(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)} (fastssl train --list)")
    return importlib.import_module(METHODS[name][0])
