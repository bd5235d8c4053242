"""Embedded data, augmentations, the linear probe, the training harness and the methods' modules:
shapes, forward/backward and one short training step each."""
import json

import pytest
import torch

from fastssl.data import digits, moving_shapes, sample_images, simclr_augment
from fastssl.evaluate import linear_probe
from fastssl.models import METHODS, load_method
from fastssl.models.encoders import ConvEncoder


def test_digits_split_is_stratified_and_in_range():
    d = digits(size=16)
    assert d.train_x.shape[1:] == (1, 16, 16) and len(d.train_x) + len(d.test_x) == 1797
    assert 0 <= d.train_x.min() and d.train_x.max() <= 1
    share = torch.bincount(d.test_y, minlength=10) / torch.bincount(torch.cat([d.train_y, d.test_y]), minlength=10)
    assert torch.allclose(share, torch.full((10,), 0.3), atol=0.02)


def test_sample_images_are_distinct_colour_photos():
    imgs = sample_images(32)
    assert imgs.shape == (5, 3, 32, 32)
    flat = imgs.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(5) * 1e9).min() > 1.0  # no photo twice


def test_simclr_augment_is_random_reproducible_and_in_range():
    x = sample_images(32)
    a = simclr_augment(x, generator=torch.Generator().manual_seed(0))
    b = simclr_augment(x, generator=torch.Generator().manual_seed(0))
    c = simclr_augment(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1


def test_moving_shapes_masks_move_with_the_shape():
    v = moving_shapes(num_videos=3, frames=5, size=24, speed=1.5, generator=torch.Generator().manual_seed(0))
    assert v.frames.shape == (3, 5, 3, 24, 24) and v.masks.shape == (3, 5, 24, 24)
    area = v.masks.sum((2, 3))
    assert (area > 20).all() and (area.std(1) / area.mean(1) < 0.1).all()  # same shape, every frame
    assert ((v.masks[:, 0] - v.masks[:, -1]).abs().sum((1, 2)) > 0).all()  # it moved


def test_linear_probe_separates_separable_classes_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    x = torch.randn(400, 8, generator=g) * 0.3 + torch.nn.functional.one_hot(y, 8).float() * 3
    assert linear_probe(x[:300], y[:300], x[300:], y[300:], label_fraction=0.2) > 0.95
    noise = torch.randn(400, 8, generator=g)
    assert linear_probe(noise[:300], y[:300], noise[300:], y[300:], label_fraction=0.2) < 0.5


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_module_trains_one_step(name):
    module = load_method(name)
    x = digits(32).train_x[:16]
    model_cls = {"rotnet": "RotNet", "simclr": "SimCLR"}[name]
    model = getattr(module, model_cls)(ConvEncoder(1, 8, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model.loss(x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_train_cli_writes_metrics_and_curve(tmp_path):
    from fastssl.cli import main

    assert main(["train", "rotnet", "--epochs", "1", "--out", str(tmp_path), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "rotnet" / "metrics.json").read_text())
    assert {"method", "metric", "value", "baseline", "higher_is_better"} <= metrics.keys()
    assert 0.1 < metrics["value"] <= 1 and 0.1 < metrics["baseline"] <= 1
    assert (tmp_path / "rotnet" / "loss.png").stat().st_size > 5000


def test_train_cli_lists_methods_and_rejects_unknown(capsys):
    from fastssl.cli import main

    assert main(["train", "--list"]) == 0
    assert "simclr" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown method 'simclear'"):
        main(["train", "simclear"])
