"""Evaluation used by ``fastssl train``: the linear probe of self-supervised learning (the lecture's
"how to evaluate a self-supervised method": freeze the encoder, fit a linear classifier on its features).

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(200, 5, generator=g); y = (x[:, 0] > 0).long()
>>> linear_probe(x[:150], y[:150], x[150:], y[150:], label_fraction=1.0) > 0.9
True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract(encoder, images: torch.Tensor, batch_size: int = 256, device: str = "cpu", features=None) -> torch.Tensor:
    """Frozen features of ``images``, flattened to (N, F), in eval mode: ``features(encoder, batch)`` if
    given (e.g. an intermediate block), else ``encoder(batch)``."""
    was_training = encoder.training
    encoder.eval()
    fn = features or (lambda enc, x: enc(x))
    feats = [fn(encoder, images[i:i + batch_size].to(device)).flatten(1).float().cpu()
             for i in range(0, len(images), batch_size)]
    encoder.train(was_training)
    return torch.cat(feats)


def fraction_of_labels(y: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Indices of a class-stratified ``fraction`` of the labelled set (at least one a class)."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        keep.append(idx[torch.randperm(len(idx), generator=g)[: max(1, round(len(idx) * fraction))]])
    return torch.cat(keep)


def linear_probe(train_x, train_y, test_x, test_y, *, label_fraction: float = 0.1, weight_decay: float = 1e-3,
                 seed: int = 0, steps: int = 300) -> float:
    """Test accuracy of multinomial logistic regression (L2 ``weight_decay``, L-BFGS, float64) fitted on a
    stratified ``label_fraction`` of the training labels, on standardized features."""
    idx = fraction_of_labels(train_y, label_fraction, seed)
    x, y = train_x[idx].double(), train_y[idx]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1], dtype=torch.float64)
    x, xt = (x - mean) / std, (test_x.double() - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((xt @ w + b).argmax(1) == test_y).double().mean().item()


def probe_accuracy(train_x, train_y, test_x, test_y, *, label_fraction: float = 0.1, seeds: int = 3) -> float:
    """:func:`linear_probe` accuracy averaged over ``seeds`` different labelled subsets (a 10% subset of
    digits is ~125 images, so one draw moves the accuracy by a point or two)."""
    return sum(linear_probe(train_x, train_y, test_x, test_y, label_fraction=label_fraction, seed=s)
               for s in range(seeds)) / seeds


def probe_against_untrained(trained, untrained, data, *, device: str = "cpu", label_fraction: float = 0.1,
                            features=None, seeds: int = 3):
    """Linear-probe accuracy of ``trained``'s frozen features and of the same architecture untrained
    (the baseline, same run, same ``features`` layer), plus the raw-pixel probe for context:
    ``(value, baseline, extra)``. Each accuracy is the mean over ``seeds`` labelled subsets."""
    def probe(train_x, test_x):
        return probe_accuracy(train_x, data.train_y, test_x, data.test_y, label_fraction=label_fraction, seeds=seeds)

    def encoded(encoder):
        return probe(extract(encoder, data.train_x, device=device, features=features),
                     extract(encoder, data.test_x, device=device, features=features))

    raw = probe(data.train_x.flatten(1), data.test_x.flatten(1))
    return encoded(trained), encoded(untrained), {"raw_pixel_probe": raw, "label_fraction": label_fraction,
                                                  "probe_seeds": seeds}
