"""Standard self-supervised and generative methods built on fastssl's ops, one file a method; each
defines its ``nn.Module`` and a ``train(config) -> fastssl.training.Result`` recipe on embedded data.

>>> sorted(METHODS)[:2]
['rotnet', 'simclr']
"""
from __future__ import annotations

import importlib

# name -> (module, one line on what it learns from)
METHODS = {
    "rotnet": ("fastssl.models.rotnet", "predict which of 4 rotations was applied (Gidaris et al. 2018)"),
    "simclr": ("fastssl.models.simclr", "NT-Xent between two augmented views (Chen et al. 2020)"),
}


def load_method(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)} (fastssl train --list)")
    return importlib.import_module(METHODS[name][0])
