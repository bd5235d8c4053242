"""The training harness the methods are written against: a method module (``fastssl/models/<name>.py``)
defines ``train(config) -> Result`` with the loops here (``fit``, ``fit_images``), and
:func:`write_outputs` writes ``metrics.json``, the loss curve and the method's figures. Running methods by
name, and the README's results table, are :mod:`fastssl.runner`'s (this module imports no method).

>>> from fastssl.training import TrainConfig
>>> TrainConfig(quick=True).epochs_or(3, 10)
3
>>> TrainConfig(seed=2**64 - 1).sub_seed(10_000), TrainConfig(seed=2**32).sub_seed(bits=32)
(9999, 0)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from .checks import check_bool, check_int


@dataclass
class TrainConfig:
    """A training run's settings, checked on construction (ValueError/TypeError naming the field)."""

    quick: bool = False
    epochs: Optional[int] = None  # None: the method's preset
    device: str = "cpu"
    out: str = "train-out"
    seed: int = 0
    progress: bool = True
    loss: Optional[str] = None  # a method's loss variant (clip: "softmax" or "sigmoid"); None: its default

    def __post_init__(self):
        check_bool("quick", self.quick)
        check_bool("progress", self.progress)
        if self.epochs is not None:  # stored as Python ints: a numpy seed would wrap in sub_seed's sum
            self.epochs = check_int("epochs", self.epochs, low=1, accepted="None or an int")
        self.seed = check_int("seed", self.seed, low=0, high=2**64 - 1)  # torch.manual_seed's range
        if not isinstance(self.device, (str, torch.device)):
            raise TypeError(f"device must be a str or a torch.device, got {type(self.device).__name__}")
        try:
            torch.device(self.device)  # "cuda:1" is fine
        except RuntimeError:
            raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {self.device!r}") from None
        if not isinstance(self.out, (str, os.PathLike)):
            raise TypeError(f"out must be a folder path (str or os.PathLike), got {type(self.out).__name__}")
        if self.loss is not None and not isinstance(self.loss, str):
            raise TypeError(f"loss must be None or a str, got {type(self.loss).__name__}")

    def epochs_or(self, quick: int, full: int) -> int:
        return self.epochs if self.epochs is not None else (quick if self.quick else full)

    def sub_seed(self, offset: int = 0, *, bits: int = 63) -> int:
        """``(seed + offset) % 2**bits``: a seed for one of the recipe's random streams that every consumer
        takes (63 bits: fastssl's int generators and torch's; 32: scikit-learn's ``random_state``)."""
        return (self.seed + offset) % 2**bits


@dataclass
class Result:
    """What a method reports: its metric against a baseline measured in the same run."""

    method: str
    metric: str
    value: float
    baseline: float
    higher_is_better: bool = True
    losses: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # file name -> callable(path) that draws it

    @property
    def beats_baseline(self) -> bool:
        return self.value > self.baseline if self.higher_is_better else self.value < self.baseline


def fit(step: Callable[[object], torch.Tensor], batches: Callable[[], Iterable], params, *, epochs: int, lr: float,
        config: TrainConfig, desc: str, weight_decay: float = 1e-4, after_step: Callable[[], None] | None = None) -> list:
    """Adam over ``params`` for ``epochs`` passes of ``batches()``; ``step(batch)`` returns the loss.
    Returns the mean loss of every epoch (summed on the device: one host sync an epoch, not a step)."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses = []
    bar = tqdm(range(epochs), desc=desc, disable=not config.progress)
    for _ in bar:
        total, count = 0.0, 0
        for batch in batches():
            loss = step(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step:
                after_step()
            total, count = total + loss.detach().double(), count + 1
        losses.append(float(total) / max(count, 1))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def fit_images(model: torch.nn.Module, images: torch.Tensor, config: TrainConfig, *, batch_size: int, epochs: int,
               desc: str, lr: float = 2e-3, loss: Callable | None = None) -> list:
    """Self-supervised training over ``images`` in shuffled batches: ``loss(batch, generator)`` (default
    ``model.loss``) with one generator seeded by ``config.seed`` for the batches and the method's random
    views, AdamW over the trainable parameters. Returns the mean loss of every epoch."""
    g = torch.Generator().manual_seed(config.seed)
    loss = loss or model.loss
    return fit(lambda idx: loss(images[idx], g), lambda: shuffled_batches(len(images), batch_size, g),
               [p for p in model.parameters() if p.requires_grad], epochs=epochs, lr=lr, config=config, desc=desc)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True):
    """Index batches of a random permutation of range(n)."""
    perm = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return [perm[i:i + batch_size] for i in range(0, stop, batch_size)]


def write_json(path: str, obj) -> None:
    """Write ``obj`` to ``path`` atomically: a temporary file beside it, then a rename (an interrupted run
    leaves the previous complete file, or none)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_outputs(result: Result, out_dir: str, seconds: float, cpu_seconds: float | None = None) -> dict:
    """loss.png, the method's figures, then metrics.json (written atomically and last: a metrics.json
    present means the whole output is) in ``out_dir``; returns the metrics dict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    metrics = {"method": result.method, "metric": result.metric, "value": result.value, "baseline": result.baseline,
               "higher_is_better": result.higher_is_better, "beats_baseline": result.beats_baseline,
               "seconds": round(seconds, 1), "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 1),
               "final_loss": result.losses[-1] if result.losses else None, **result.extra}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(result.losses) + 1), result.losses, marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(result.method)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=100)
    plt.close(fig)
    for name, draw in result.figures.items():
        draw(os.path.join(out_dir, name))
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics
