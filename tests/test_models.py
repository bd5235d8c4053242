"""Embedded data, augmentations, the linear probe, the training harness and the methods' modules:
shapes, forward/backward and one short training step each."""
import json

import pytest
import torch

from fastssl.data import digits, moving_shapes, sample_images, simclr_augment
from fastssl.evaluate import linear_probe
from fastssl.models import METHODS, load_method


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_augmentations_keep_the_dtype_and_refuse_integer_images(dtype):
    """theta was always float32: float64 and bfloat16 images died in affine_grid / grid_sample."""
    from fastssl.data.augment import random_resized_crop

    x = sample_images(16)
    for augment in (simclr_augment, random_resized_crop):
        out = augment(x.to(dtype), generator=torch.Generator().manual_seed(0))
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out.float(), augment(x, generator=torch.Generator().manual_seed(0)),
                                   atol=2e-2, rtol=0)  # float32 math, rounded once to dtype
        with pytest.raises(TypeError, match="x must be a floating-point tensor"):
            augment((x * 255).to(torch.uint8))


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
    model, args = load_method(name).example()
    assert isinstance(model, torch.nn.Module) and callable(load_method(name).train)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model.loss(*args)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"no finite gradient for {missing}"
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


SMOKE = ("simclr", "clip", "don", "gan", "tracker")  # one of each kind of op; ~70 s on 2 cores together


@pytest.mark.parametrize("name", SMOKE)
def test_quick_preset_beats_its_baseline(name, tmp_path):
    """CI's smoke test of ``fastssl train METHOD --quick``: the whole recipe, outputs written, baseline beaten.
    Seeded, so a loss here is a regression (README's table has every method)."""
    from fastssl.runner import run
    from fastssl.training import TrainConfig

    metrics = run(name, TrainConfig(quick=True, out=str(tmp_path), progress=False))
    assert metrics["beats_baseline"], metrics
    assert {p.name for p in (tmp_path / name).iterdir()} >= {"metrics.json", "loss.png"}


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
    assert "unknown method 'simclear'" in _bad_cli_call(["train", "simclear"], capsys)
    assert "--readme goes with --all" in _bad_cli_call(["train", "simclr", "--readme", "README.md"], capsys)


def test_train_cli_without_a_method_names_the_choices(capsys):
    """``fastssl train`` alone: exit 2 with one error line listing the methods (it once printed the list on
    stdout and exited 2 with nothing on stderr)."""
    line = _bad_cli_call(["train"], capsys)
    assert line.startswith("fastssl train: error: a METHOD is needed") and all(name in line for name in METHODS)


def test_tracker_takes_radius_zero_and_refuses_a_negative_one():
    """API.md: radius >= 0 (0: each pixel sees only its own position in the reference frames)."""
    from fastssl.models.tracker import ColorizationTracker, PixelEncoder

    model, (grey, colors) = load_method("tracker").example()
    zero = ColorizationTracker(model.encoder, num_colors=4, radius=0.0)
    assert zero.radius == 0.0 and torch.isfinite(zero.loss(grey, colors))
    with pytest.raises(ValueError, match="radius must be a finite number >= 0"):
        ColorizationTracker(PixelEncoder(1, width=4, out_dim=8, levels=1, stride=2), radius=-1.0)


def _bad_cli_call(argv, capsys) -> str:
    """Run the CLI on ``argv``, which must exit 2 before any work; return its one line of stderr."""
    from fastssl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("epochs", ["0", "-1", "two"])
def test_train_cli_refuses_epochs_below_one(tmp_path, capsys, epochs):
    line = _bad_cli_call(["train", "simclr", "--epochs", epochs, "--out", str(tmp_path / "o")], capsys)
    assert "--epochs" in line and "must be an int >= 1" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**64), "1.5"])
def test_train_cli_refuses_a_seed_torch_cannot_take(tmp_path, capsys, seed):
    line = _bad_cli_call(["train", "simclr", "--seed", seed, "--out", str(tmp_path / "o")], capsys)
    assert "--seed" in line and "must be an int in [0, 2**64)" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, says", [
    (["simclr", "--all"], "METHOD 'simclr' and --all do not go together"),
    (["--list", "--all"], "--list and --all do not go together"),
    (["simclr", "--list"], "METHOD 'simclr' and --list do not go together"),
])
def test_train_cli_takes_one_of_a_method_list_and_all(tmp_path, capsys, monkeypatch, argv, says):
    """A METHOD beside --all (or --list beside --all) was ignored: every method was trained, or listed."""
    import fastssl.runner as runner

    monkeypatch.setattr(runner, "run", lambda name, config: pytest.fail("trained"))
    assert says in _bad_cli_call(["train", *argv, "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert not (tmp_path / "o").exists()


def test_train_cli_checks_the_readme_before_training(tmp_path, capsys, monkeypatch):
    """--readme without the train-table markers (or a folder) failed after all 13 methods had trained."""
    import fastssl.runner as runner

    trained = []
    monkeypatch.setattr(runner, "run", lambda name, config: trained.append(name) or {
        "method": name, "metric": "acc", "value": 0.9, "baseline": 0.5, "higher_is_better": True,
        "beats_baseline": True, "seconds": 1.0})
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# no table here\n")
    for readme, says in ((no_markers, "no <!-- train-table:begin -->"), (tmp_path, "is not a writable file"),
                         (tmp_path / "missing.md", "is not a writable file")):
        line = _bad_cli_call(["train", "--all", "--readme", str(readme), "--out", str(tmp_path / "o"), "--quiet"], capsys)
        assert f"--readme {readme}" in line and says in line and not trained
    good = tmp_path / "README.md"
    good.write_text(f"intro\n{runner.TABLE_BEGIN}\nold\n{runner.TABLE_END}\n")
    from fastssl.cli import main

    assert main(["train", "--all", "--readme", str(good), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert trained == list(METHODS) and "| simclr | acc" in good.read_text()


@pytest.mark.parametrize("kw, error, says", [
    ({"epochs": 0}, ValueError, "epochs must be an int >= 1"), ({"epochs": -3}, ValueError, "epochs must be"),
    ({"epochs": 2.0}, TypeError, "epochs must be None or an int"), ({"seed": -1}, ValueError, "seed must be"),
    ({"seed": 2**64}, ValueError, "seed must be"), ({"seed": "0"}, TypeError, "seed must be"),
    ({"quick": "yes"}, TypeError, "quick must be True or False"), ({"device": "gpu"}, ValueError, "device must"),
    ({"out": None}, TypeError, "out must be"), ({"loss": 1}, TypeError, "loss must be"),
])
def test_train_config_checks_its_fields(kw, error, says):
    """TrainConfig(epochs=0) through the Python API trained nothing and still reported a result."""
    from fastssl.training import TrainConfig

    with pytest.raises(error, match=says):
        TrainConfig(**kw)


def _stub_training_and_evaluation(name, monkeypatch):
    """``name``'s recipe module with its training loop and evaluation stubbed: what still runs is the recipe's
    own seeding (data, held-out sets, quantizer, samplers); the stubs take their seeds as torch does."""
    module = load_method(name)

    def seeded(seed, value):
        torch.manual_seed(seed)
        return value

    def small_sample(model, shape, schedule, **kwargs):  # the real sampler, one step, on 2 of the samples
        kwargs.update(num_steps=1, cond=kwargs["cond"][:2], uncond=kwargs["uncond"][:2])
        x = real_sample(model, (2, *shape[1:]), schedule, **kwargs)
        return torch.cat([x, x.new_zeros(shape[0] - 2, *shape[1:])])

    real_sample, judge = getattr(module, "sample", None), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    stubs = {"tracker": {"fit": lambda *a, **k: [1.0], "mean_iou": lambda *a, **k: (0.5, None)},
             "don": {"fit": lambda *a, **k: [1.0], "match_accuracy": lambda *a, **k: (0.5, None)},
             "gan": {"fit_gan": lambda *a, **k: ([1.0], [1.0]),
                     "real_vs_fake_accuracy": lambda real, fake, seed, device: seeded(seed, 0.5)},
             "ddpm": {"fit": lambda *a, **k: [1.0], "digit_judge": lambda data, seed, device: seeded(seed, (judge, 1.0)),
                      "sample": small_sample}}[name]
    for attr, stub in stubs.items():
        monkeypatch.setattr(module, attr, stub)
    return module


@pytest.mark.parametrize("seed", [2**32, 2**63, 2**64 - 1])
@pytest.mark.parametrize("name", ["tracker", "don", "gan", "ddpm"])
def test_recipes_take_every_seed_the_cli_takes(name, seed, monkeypatch):
    """--seed takes [0, 2**64); recipes died inside it: scikit-learn's KMeans (< 2**32), fastssl's int generator
    (< 2**63), manual_seed(10_000 + seed) and seed + 1 (> 2**64 - 1). TrainConfig.sub_seed keeps them in range."""
    from fastssl.training import TrainConfig

    result = _stub_training_and_evaluation(name, monkeypatch).train(TrainConfig(seed=seed, epochs=1, progress=False))
    assert result.losses == [1.0]
    config = TrainConfig(seed=seed)
    assert config.sub_seed(10_000) < 2**63 and config.sub_seed(bits=32) < 2**32
    assert TrainConfig(seed=5).sub_seed(10_000) == 10_005  # seeds below 2**63 keep their streams


def test_train_and_bench_cli_check_the_output_folder_first(tmp_path, capsys):
    """An --out that is a file, or under one, exits 2 at once (it used to train the whole run first)."""
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for out, says in ((a_file, "is a file"), (a_file / "sub", "is not a writable folder")):
        assert says in _bad_cli_call(["train", "rotnet", "--epochs", "1", "--out", str(out), "--quiet"], capsys)
        assert says in _bad_cli_call(["bench", "--quick", "--only", "cfg_combine", "--out", str(out), "--quiet"],
                                     capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_refuses_cuda_without_a_gpu(tmp_path, capsys):
    for argv in (["train", "rotnet", "--device", "cuda"], ["bench", "--quick", "--device", "cuda"]):
        assert "no CUDA device is available" in _bad_cli_call(argv + ["--out", str(tmp_path)], capsys)


def test_train_cli_names_a_missing_extra_before_training(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    line = _bad_cli_call(["train", "rotnet", "--epochs", "1", "--out", str(tmp_path / "o")], capsys)
    assert "needs matplotlib" in line and "fastssl[train]" in line


def test_training_outputs_are_written_atomically(tmp_path, monkeypatch):
    """metrics.json is written last, by a rename: a run killed while writing it leaves no partial file."""
    from fastssl import training

    result = training.Result("m", "acc", 0.9, 0.5, losses=[1.0, 0.5])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        training.write_outputs(result, str(tmp_path), 1.0)
    assert not (tmp_path / "metrics.json").exists()
    monkeypatch.undo()
    assert training.write_outputs(result, str(tmp_path), 1.0)["value"] == 0.9
    assert json.loads((tmp_path / "metrics.json").read_text())["value"] == 0.9


def test_train_all_writes_summary_and_replaces_the_readme_table(tmp_path, monkeypatch):
    import fastssl.runner as runner

    def fake_run(name, config):  # the harness around the methods, not the training itself
        value = {"a": 0.9, "b": 0.4}[name]
        return {"method": name, "metric": "acc", "value": value, "baseline": 0.5, "higher_is_better": True,
                "beats_baseline": value > 0.5, "seconds": 1.0}

    monkeypatch.setattr(runner, "run", fake_run)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{runner.TABLE_BEGIN}\nold\n{runner.TABLE_END}\nrest\n")
    rows = runner.run_all(["a", "b"], runner.TrainConfig(out=str(tmp_path / "out")), readme=str(readme))
    text = readme.read_text()
    assert [r["method"] for r in rows] == ["a", "b"] and "old" not in text and text.endswith("rest\n")
    assert "| a | acc (higher is better) | 0.900 | 0.500 | yes |" in text and "| b |" in text and "**no**" in text
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows"] == rows
    with pytest.raises(ValueError, match="train-table"):
        runner.replace_table("no markers", "x")


def test_clip_trains_with_the_sigmoid_loss(tmp_path, capsys):
    """``fastssl train clip --loss sigmoid``: SigLIP's loss (learnable scale and bias) reaches them; one epoch
    of the recipe writes its metrics as clip-sigmoid (the quick preset beats its baseline: README's table);
    --loss with another method is refused."""
    from fastssl.cli import main
    from fastssl.models import clip

    model, args = clip.example(loss="sigmoid")
    loss = model.loss(*args)
    loss.backward()
    assert model.log_scale.grad is not None and model.logit_bias.grad is not None
    assert main(["train", "clip", "--loss", "sigmoid", "--epochs", "1", "--out", str(tmp_path), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "clip-sigmoid" / "metrics.json").read_text())
    assert metrics["method"] == "clip-sigmoid" and metrics["loss"] == "sigmoid" and metrics["logit_bias"] < 0
    assert "--loss goes with the clip method" in _bad_cli_call(["train", "simclr", "--loss", "sigmoid"], capsys)
