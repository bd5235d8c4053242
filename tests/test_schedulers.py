"""fastssl.schedulers: drop-in parity with diffusers' DDPMScheduler / DDIMScheduler and their pipelines: the
steps, the numbers of diffusers' own scheduler test loops, save/load, config conversion, outputs, variances, and
a pipeline that saves and loads back with our scheduler in it. (The configuration layer without diffusers:
test_schedulers_without_diffusers.)"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastssl.scheduler_config import FrozenDict
from fastssl.schedulers import DDIMScheduler, DDPMScheduler, SchedulerOutput
from fastssl.schedules import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

CONFIGS = [
    dict(),
    dict(prediction_type="v_prediction", clip_sample=False, beta_schedule="squaredcos_cap_v2"),
    dict(prediction_type="sample", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
         clip_sample_range=2.0),
]


def _noises(n, shape, device):
    return [torch.randn(shape, device=device) for _ in range(n)]


def _patched_randn(monkeypatch, module, noises):
    """Make diffusers' step draw our noises in order (its randn_tensor), so both steps use the same noise."""
    it = iter(noises)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: next(it))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "fixed_small_log"])
def test_ddpm_scheduler_step_equals_diffusers(backend, device, monkeypatch, config, variance_type):
    import diffusers.schedulers.scheduling_ddpm as module

    ours, theirs = DDPMScheduler(variance_type=variance_type, **config), diffusers.DDPMScheduler(variance_type=variance_type, **config)
    ours.set_timesteps(12, device=device)
    theirs.set_timesteps(12, device=device)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x = torch.randn(2, 3, 4, 5, device=device)
    noises = _noises(len(ours.timesteps), x.shape, device)
    _patched_randn(monkeypatch, module, noises)
    for i, t in enumerate(ours.timesteps):
        model_output = torch.randn_like(x)
        a = ours.step(model_output, t, x, noise=noises[i] if t > 0 else None)
        b = theirs.step(model_output, t, x)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=2e-4, atol=2e-4)
        x = b.prev_sample


@pytest.mark.parametrize("config", CONFIGS + [dict(set_alpha_to_one=False, steps_offset=1)])
@pytest.mark.parametrize("eta, clipped", [(0.0, False), (0.7, False), (1.0, True)])
def test_ddim_scheduler_step_equals_diffusers(backend, device, config, eta, clipped):
    ours, theirs = DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x = torch.randn(2, 3, 5, device=device)
    for t in ours.timesteps:
        model_output, noise = torch.randn_like(x), torch.randn_like(x)
        a = ours.step(model_output, t, x, eta=eta, use_clipped_model_output=clipped, variance_noise=noise)
        b = theirs.step(model_output, t, x, eta=eta, use_clipped_model_output=clipped, variance_noise=noise)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=2e-4, atol=2e-4)
        x = b.prev_sample


def test_ddpm_scheduler_generator_reproduces_diffusers(device, monkeypatch):
    """On the PyTorch path the step draws its noise exactly as diffusers does: same generator, same result."""
    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    x = torch.randn(2, 3, 6, device=device)
    g1, g2 = torch.Generator(device=device).manual_seed(3), torch.Generator(device=device).manual_seed(3)
    for t in ours.timesteps:
        model_output = torch.randn_like(x)
        a = ours.step(model_output, t, x, generator=g1).prev_sample
        x = theirs.step(model_output, t, x, generator=g2).prev_sample
        torch.testing.assert_close(a, x, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_a_shared_generator_advances_as_in_diffusers(device, monkeypatch, name):
    """On the PyTorch path a loop with one torch.Generator leaves it where diffusers leaves it, so what the
    caller draws next is the same: DDIM with eta > 0 draws at every step, the last (t = 0, std 0) included, as
    diffusers' DDIMScheduler does (fastssl skipped that draw); DDPM draws only where t > 0, as
    DDPMScheduler. The samples agree too."""
    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    make = {"ddim": (DDIMScheduler, diffusers.DDIMScheduler), "ddpm": (DDPMScheduler, diffusers.DDPMScheduler)}[name]
    outs, start = [], torch.randn(2, 4, device=device)
    for cls in make:
        scheduler = cls()
        scheduler.set_timesteps(3)
        assert scheduler.timesteps[-1] == 0
        g, x = torch.Generator(device=device).manual_seed(0), start
        options = dict(eta=1.0) if name == "ddim" else {}
        for t in scheduler.timesteps:
            x = scheduler.step(0.1 * x, t, x, generator=g, **options).prev_sample
        outs.append((x, torch.randn(2, generator=g, device=device)))
    (ours, our_next), (theirs, their_next) = outs
    assert torch.equal(our_next, their_next)
    torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_zero_terminal_snr_first_step_equals_diffusers(backend, device, monkeypatch, name, clip_sample):
    """rescale_betas_zero_snr with trailing spacing starts at abar = 0: with an epsilon model diffusers' x0 =
    (x - e) / 0 is +-inf (NaN where x = e), clip_sample clamps it to +-1 and the step is finite (fastssl gave
    NaN: inf - inf); without clipping diffusers' +-inf / NaN, which fastssl now gives too, on both backends."""
    import diffusers.schedulers.scheduling_ddpm as module

    config = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=clip_sample)
    ours, theirs = {"ddim": (DDIMScheduler(**config), diffusers.DDIMScheduler(**config)),
                    "ddpm": (DDPMScheduler(**config), diffusers.DDPMScheduler(**config))}[name]
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    t = theirs.timesteps[0]
    assert theirs.alphas_cumprod[t] == 0
    x = torch.tensor([[1.0, -1.0, 0.5, 2.0, -0.3]], device=device).repeat(2, 1)
    e = torch.tensor([[0.5, 0.5, 0.5, -1.0, 0.4]], device=device).repeat(2, 1)
    z = torch.randn_like(x)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: z)
    # (eta = 1 would make diffusers' 1 - abar_prev - std^2 = 0 round below 0 here: NaN, which fastssl clamps)
    variants = [dict(), dict(eta=0.7, variance_noise=z), dict(eta=0.5, variance_noise=z, use_clipped_model_output=True)]
    for kw in (variants if name == "ddim" else [dict()]):
        a = ours.step(e, t, x, **kw, **(dict(noise=z) if name == "ddpm" else {}))
        b = theirs.step(e, t, x, **kw)
        for got, want in ((a.prev_sample, b.prev_sample), (a.pred_original_sample, b.pred_original_sample)):
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), (kw, got, want)
            assert torch.equal(got[want.isinf()], want[want.isinf()])
            torch.testing.assert_close(got[want.isfinite()], want[want.isfinite()], rtol=2e-5, atol=2e-5)
        assert b.prev_sample[:, 0].isfinite().all() == clip_sample and b.prev_sample[:, 2].isnan().all()
    if name == "ddim" and clip_sample:  # the review's numbers: x = 1, e = 0.5
        torch.testing.assert_close(ours.step(e, t, x).prev_sample[0, 0], torch.tensor(0.5102754, device=device))


def _run(pipeline, **kwargs):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=10,
                    output_type="np", **kwargs).images


def test_ddim_pipeline_with_our_scheduler(backend):
    """A diffusers DDIMPipeline (tiny random UNet2DModel, nothing downloaded) with our scheduler swapped in
    gives diffusers' images (eta = 0: deterministic on both backends)."""
    unet = _tiny_unet()
    theirs = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=50))
    ours = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=50))
    ours.scheduler = DDIMScheduler(num_train_timesteps=50)  # DDIMPipeline.__init__ converts to its own class
    assert isinstance(ours.scheduler, DDIMScheduler)
    a, b = _run(ours, eta=0.0), _run(theirs, eta=0.0)
    assert a.shape == (2, 8, 8, 3) and abs(a - b).max() < 1e-4


def test_ddpm_pipeline_with_our_scheduler(backend):
    """DDPMPipeline with our scheduler: on the PyTorch path the very same images as diffusers' (same
    generator, same noise); with the kernels (in-kernel Philox noise) reproducible and as noisy."""
    unet = _tiny_unet()
    ours = diffusers.DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))
    theirs = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=50))
    assert isinstance(ours.scheduler, DDPMScheduler)
    a, b = _run(ours), _run(theirs)
    if backend == "torch":
        assert abs(a - b).max() < 1e-4
    else:
        assert (a == _run(ours)).all() and abs(a.std() - b.std()) < 0.1 and abs(a - b).max() > 1e-3


def test_config_and_from_config():
    s = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    assert isinstance(s.config, FrozenDict) and s.config.prediction_type == s.config["prediction_type"] == "v_prediction"
    assert s.config.clip_sample is True and len(s) == 1000 and s.init_noise_sigma == 1.0 and s.order == 1
    theirs = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", steps_offset=1)
    converted = DDPMScheduler.from_config(theirs.config)  # DDIM's own keys are dropped: DDIM is compatible
    assert converted.config.beta_schedule == "squaredcos_cap_v2" and converted.config.steps_offset == 1
    assert "set_alpha_to_one" not in {k for k in converted.config if not k.startswith("_")} - set(theirs.config)
    assert torch.equal(converted.alphas_cumprod, theirs.alphas_cumprod)  # built as diffusers builds them
    again = DDIMScheduler.from_config(DDIMScheduler(clip_sample=False).config, steps_offset=2)
    assert again.config.clip_sample is False and again.config.steps_offset == 2
    assert diffusers.DDIMScheduler.from_config(again.config).config.steps_offset == 2  # and back to diffusers
    s.register_to_config(note="kept")
    assert s.config.note == "kept"


@pytest.mark.parametrize("cls, theirs", [(DDPMScheduler, "DDPMScheduler"), (DDIMScheduler, "DDIMScheduler")])
def test_save_and_load_through_scheduler_config_json(tmp_path, cls, theirs):
    """save_config / save_pretrained write diffusers' scheduler_config.json; from_pretrained reads a folder or
    its subfolder; diffusers' class of the same name loads our folder and ours loads diffusers'."""
    ours = cls(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing",
               trained_betas=np.linspace(1e-3, 0.2, 40), num_train_timesteps=40, clip_sample=False)
    ours.save_pretrained(tmp_path / "pipe" / "scheduler")
    saved = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == theirs and saved["timestep_spacing"] == "trailing" and len(saved["trained_betas"]) == 40
    for loaded in (cls.from_pretrained(tmp_path / "pipe" / "scheduler"), cls.from_pretrained(tmp_path / "pipe", subfolder="scheduler")):
        assert type(loaded) is cls and loaded.betas.tolist() == ours.betas.tolist()
        skip = ("_use_default_values", "trained_betas")  # an array here, a list once through JSON
        assert {k: v for k, v in loaded.config.items() if k not in skip} == \
            {k: v for k, v in ours.config.items() if k not in skip}
    peer = getattr(diffusers, theirs).from_pretrained(tmp_path / "pipe" / "scheduler")
    assert torch.equal(peer.alphas_cumprod, ours.alphas_cumprod)
    peer.save_config(tmp_path / "peer")
    back = cls.from_pretrained(tmp_path / "peer")
    assert type(back) is cls and torch.equal(back.alphas_cumprod, ours.alphas_cumprod)
    x = torch.randn(2, 3, 4)
    for s in (ours, back):
        s.set_timesteps(5)
    a, b = (s.step(0.1 * x, s.timesteps[1], x, generator=torch.Generator().manual_seed(0)).prev_sample for s in (ours, back))
    assert torch.equal(a, b)


def test_step_output_behaves_as_diffusers_base_output():
    s = DDIMScheduler(num_train_timesteps=20)
    s.set_timesteps(5)
    x = torch.randn(2, 3)
    out = s.step(0.3 * x, 8, x)
    assert isinstance(out, diffusers.utils.BaseOutput) and isinstance(out, SchedulerOutput)
    assert list(out.keys()) == ["prev_sample", "pred_original_sample"]
    assert out[0] is out["prev_sample"] is out.prev_sample and out[1] is out.pred_original_sample
    assert [v is w for v, w in zip(out.values(), out.to_tuple())] == [True, True]
    prev, pred = s.step(0.3 * x, 8, x, return_dict=False)
    assert torch.equal(prev, out.prev_sample) and torch.equal(pred, out.pred_original_sample)


def test_compatibles_convert_both_ways():
    ours = DDPMScheduler(beta_schedule="scaled_linear", steps_offset=1)
    names = {(c.__module__.split(".")[0], c.__name__) for c in ours.compatibles}
    assert {("fastssl", "DDPMScheduler"), ("fastssl", "DDIMScheduler"), ("diffusers", "DDPMScheduler"),
            ("diffusers", "EulerDiscreteScheduler")} <= names
    for cls in (c for c in ours.compatibles if c.__name__ != "DPMSolverSDEScheduler"):  # that one needs torchsde
        other = cls.from_config(ours.config)
        back = DDPMScheduler.from_config(other.config)
        assert {k: v for k, v in back.config.items() if k in ours.config and not k.startswith("_")} == \
            {k: v for k, v in ours.config.items() if not k.startswith("_")}, cls


def test_config_entries_read_as_attributes_warn_as_in_diffusers():
    s = DDPMScheduler()
    s.register_to_config(extra_entry=5)
    with pytest.warns(FutureWarning):
        assert s.extra_entry == 5
    with pytest.raises(AttributeError, match="'DDPMScheduler' object has no attribute 'missing'"):
        s.missing


def _dummy_model(sample, t):
    """A deterministic stand-in for a denoiser: x * t / (t + 1)."""
    t = torch.as_tensor(t, dtype=sample.dtype)
    return sample * t / (t + 1)


def _ramp(flip=False):
    """A deterministic (4, 3, 8, 8) input in [0, 1)."""
    n = 4 * 3 * 8 * 8
    values = torch.arange(n).flip(-1) if flip else torch.arange(n)
    return (values.reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def _loop(scheduler, steps=None, start=None):
    """diffusers' test-style loop: all train timesteps (or ``steps`` inference ones, or the tail from ``start``
    after noising the ramp to its first timestep), the dummy model, a seeded generator. Our DDPM reads the
    generator's draws as explicit noise (on the Triton path it would draw its own by Philox)."""
    if steps is not None:
        scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps if start is None else scheduler.timesteps[start:]
    x = _ramp() if start is None else scheduler.add_noise(_ramp(), _ramp(flip=True), timesteps[:1])
    generator = torch.manual_seed(0)
    for t in timesteps:
        if isinstance(scheduler, DDPMScheduler):
            noise = torch.randn(x.shape, generator=generator) if t > 0 else None
            x = scheduler.step(_dummy_model(x, t), t, x, noise=noise).prev_sample
        else:
            x = scheduler.step(_dummy_model(x, t), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("name, config, steps, start", [
    ("ddpm", dict(), None, None),
    ("ddpm", dict(prediction_type="v_prediction"), None, None),
    ("ddpm", dict(), None, 998),  # noised to t = 1, then steps 1 and 0 with drawn noise: small t, where
    ("ddpm", dict(variance_type="fixed_large", beta_schedule="squaredcos_cap_v2"), None, 990),  # rounding shows
    ("ddpm", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", clip_sample=False), 25, None),
    ("ddim", dict(), 10, None),
    ("ddim", dict(prediction_type="v_prediction"), 10, None),
    ("ddim", dict(set_alpha_to_one=False, beta_start=0.01), 10, None),
    ("ddim", dict(), 10, 8),
    ("ddim", dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"), 10, None),
])
def test_loops_reproduce_diffusers_numbers(backend, name, config, steps, start):
    """diffusers' own scheduler tests check loops like these by their sum to 1e-2 (~3e-5 relative); we hold
    the whole result to 2e-5 relative of diffusers' (tables and the step's beta rounded as diffusers rounds
    them; the remaining difference is the step's arithmetic, float64 on the host, float32 in the kernel)."""
    cls = {"ddpm": (DDPMScheduler, diffusers.DDPMScheduler), "ddim": (DDIMScheduler, diffusers.DDIMScheduler)}[name]
    if backend == "triton" and steps is None and start is None:
        steps = 100  # the interpreter runs 1000 launches slowly; the strided loop covers the same code
    ours, theirs = (_loop(c(**config), steps, start) for c in cls)
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5 * scale)
    assert abs(ours.abs().sum().item() - theirs.abs().sum().item()) < 1e-3


@pytest.mark.parametrize("beta_end", [0.02, 2.0])
@pytest.mark.parametrize("config", [dict(), dict(beta_schedule="scaled_linear"), dict(beta_schedule="squaredcos_cap_v2"),
                                    dict(beta_schedule="sigmoid"), dict(rescale_betas_zero_snr=True),
                                    dict(trained_betas=[0.1, 0.3], num_train_timesteps=2)])
def test_tables_are_built_as_diffusers_builds_them(config, beta_end):
    """Bit for bit, also where diffusers accepts betas above 1 (its tests use beta_end=2). (Rescaled to zero
    terminal SNR such betas give NaN betas, which diffusers keeps and NoiseSchedule refuses.)"""
    if beta_end > 1 and config.get("rescale_betas_zero_snr"):
        with pytest.raises(ValueError, match="betas must be finite"):
            DDPMScheduler(beta_end=beta_end, **config)
        return
    for ours, theirs in ((DDPMScheduler, diffusers.DDPMScheduler), (DDIMScheduler, diffusers.DDIMScheduler)):
        if config.get("beta_schedule") == "sigmoid" and ours is DDIMScheduler:
            continue  # diffusers' DDIM has no sigmoid schedule
        a, b = ours(beta_end=beta_end, **config), theirs(beta_end=beta_end, **config)
        for name in ("betas", "alphas", "alphas_cumprod"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    exact = NoiseSchedule.linear(1000)  # fastssl.NoiseSchedule keeps its float64-built tables
    built = NoiseSchedule.float32_built(torch.linspace(1e-4, 0.02, 1000))
    assert not torch.equal(exact.alphas_cumprod, built.alphas_cumprod)
    torch.testing.assert_close(exact.alphas_cumprod, built.alphas_cumprod, rtol=1e-6, atol=0)


def test_get_variance_equals_diffusers():
    for variance_type in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"):
        ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
        predicted = torch.rand(2, 3) * 2 - 1
        for s in (ours, theirs):
            s.set_timesteps(20)
        for t in (0, 50, 500, 950):
            torch.testing.assert_close(ours._get_variance(t, predicted, variance_type),
                                       theirs._get_variance(t, predicted, variance_type), rtol=1e-6, atol=0)
    ours, theirs = DDIMScheduler(set_alpha_to_one=False), diffusers.DDIMScheduler(set_alpha_to_one=False)
    for t, prev in ((0, 0), (420, 400), (980, 960), (10, -10)):
        torch.testing.assert_close(ours._get_variance(t, prev), theirs._get_variance(t, prev), rtol=1e-6, atol=0)


def test_unknown_variance_type_steps_as_fixed_small_like_diffusers():
    with pytest.warns(UserWarning, match="'other'.*fixed_small"):
        other = DDPMScheduler(variance_type="other")
    z = torch.randn(2, 5)
    a = other.step(torch.zeros(2, 5), 300, torch.ones(2, 5), noise=z).prev_sample
    b = DDPMScheduler().step(torch.zeros(2, 5), 300, torch.ones(2, 5), noise=z).prev_sample
    assert torch.equal(a, b)


def _tiny_unet(out_channels=3):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def test_pipeline_saves_and_loads_back_with_our_scheduler(tmp_path):
    """model_index.json records ["fastssl.schedulers", "DDPMScheduler"] and from_pretrained rebuilds ours (diffusers
    resolves a library it does not know from the imported modules: fastssl.schedulers is imported here)."""
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=50, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["fastssl.schedulers", "DDPMScheduler"]
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is DDPMScheduler and loaded.scheduler.config.clip_sample is False
    loaded.set_progress_bar_config(disable=True)
    run = lambda p: p(batch_size=1, generator=torch.Generator().manual_seed(1), num_inference_steps=5,  # noqa: E731
                      output_type="np").images
    np.testing.assert_allclose(run(pipe), run(loaded), rtol=0, atol=1e-5)  # the reloaded UNet: ~1e-7 apart
    # DDIMPipeline.__init__ converts any scheduler to diffusers' DDIMScheduler (construction and loading alike):
    # put ours in after construction, as the README says.
    ddim = diffusers.DDIMPipeline(unet=_tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=50))
    assert type(ddim.scheduler) is diffusers.DDIMScheduler
    ddim.scheduler = DDIMScheduler.from_config(ddim.scheduler.config)
    ddim.save_pretrained(tmp_path / "ddim")
    assert json.loads((tmp_path / "ddim" / "model_index.json").read_text())["scheduler"] == ["fastssl.schedulers", "DDIMScheduler"]
    assert type(DDIMScheduler.from_pretrained(tmp_path / "ddim", subfolder="scheduler")) is DDIMScheduler


def test_schedulers_without_diffusers(tmp_path):
    """With diffusers absent the same classes work on the local configuration layer (a fresh interpreter where
    importing diffusers fails)."""
    code = f"""
import sys, json, warnings
sys.modules["diffusers"] = None
import torch
from fastssl.scheduler_config import DIFFUSERS
from fastssl.schedulers import DDIMScheduler, DDPMScheduler
assert not DIFFUSERS
s = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction", steps_offset=1)
s.save_pretrained({str(tmp_path)!r} + "/pipe/scheduler")
saved = json.load(open({str(tmp_path)!r} + "/pipe/scheduler/scheduler_config.json"))
assert saved["_class_name"] == "DDPMScheduler" and saved["prediction_type"] == "v_prediction"
for t in (DDPMScheduler.from_pretrained({str(tmp_path)!r} + "/pipe", subfolder="scheduler"),
          DDPMScheduler.from_config(s.config)):
    assert dict(t.config) == dict(s.config) and torch.equal(t.alphas_cumprod, s.alphas_cumprod)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    d = DDIMScheduler.from_config({{**s.config, "unknown_key": 1}})
assert [str(w.message).count("unknown_key") for w in caught] == [1] and d.config.steps_offset == 1
assert set(s.compatibles) == {{DDPMScheduler, DDIMScheduler}}
d.set_timesteps(4)
out = d.step(torch.zeros(1, 2), d.timesteps[0], torch.ones(1, 2))
assert out[0] is out["prev_sample"] is out.prev_sample and list(out.keys()) == ["prev_sample", "pred_original_sample"]
try:
    s.config["prediction_type"] = "epsilon"
except TypeError:
    print("ok")
"""
    env = dict(os.environ, FASTSSL_BACKEND="torch")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("n, offset", [(7, 0), (50, 1), (3, 2)])
def test_set_timesteps_spacings_equal_diffusers(spacing, n, offset):
    for ours, theirs in ((DDPMScheduler, diffusers.DDPMScheduler), (DDIMScheduler, diffusers.DDIMScheduler)):
        a, b = ours(timestep_spacing=spacing, steps_offset=offset), theirs(timestep_spacing=spacing, steps_offset=offset)
        a.set_timesteps(n)
        b.set_timesteps(n)
        assert torch.equal(a.timesteps, b.timesteps)


def test_add_noise_and_velocity_equal_diffusers(backend, device):
    ours, theirs = DDPMScheduler(beta_schedule="squaredcos_cap_v2"), diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x, noise = torch.randn(3, 2, 5, device=device), torch.randn(3, 2, 5, device=device)
    for t in (torch.tensor([0, 400, 999]), torch.tensor([250]), torch.tensor([7, 8, 9], dtype=torch.int32)):
        torch.testing.assert_close(ours.add_noise(x, noise, t), theirs.add_noise(x, noise, t), rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(ours.get_velocity(x, noise, t), theirs.get_velocity(x, noise, t), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("make", [DDPMScheduler, DDIMScheduler])
def test_add_noise_and_velocity_refuse_float_timesteps(make):
    """add_noise / get_velocity took float timesteps and truncated them (10.9 read as 10, 999.5 as 999); now a
    TypeError naming timesteps, as step's (diffusers' lookup refuses float indices: its own tests pass the
    integer scheduler.timesteps). Judged by type and dtype only (no read of a device tensor); integer
    timesteps of every kind still work."""
    s = make()
    x, noise = torch.randn(2, 3), torch.randn(2, 3)
    for bad in (torch.tensor([10.9, 999.5]), torch.tensor([10.0, 20.0]), torch.tensor(5.0), 10.9, 10.0, np.float64(3.0),
                [1.5, 2.0], np.array([1.0, 2.0]), True, torch.tensor([True, False])):
        for call in (s.add_noise, s.get_velocity):
            with pytest.raises(TypeError, match="timesteps must be an int or an integer tensor"):
                call(x, noise, bad)
    want = diffusers.DDPMScheduler().add_noise(x, noise, torch.tensor([10, 999]))
    for good in (torch.tensor([10, 999]), torch.tensor([10, 999], dtype=torch.int32), [10, 999], np.array([10, 999])):
        torch.testing.assert_close(s.add_noise(x, noise, good), want, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(s.add_noise(x, noise, np.int64(10)), s.add_noise(x, noise, torch.tensor([10, 10])))
    assert s.get_velocity(x, noise, 10).shape == (2, 3)


def test_step_with_fused_guidance(backend, device):
    s = DDPMScheduler()
    s.set_timesteps(10)
    cond, uncond, x, z = (torch.randn(2, 9, device=device) for _ in range(4))
    fused = s.step(cond, 501, x, uncond_output=uncond, guidance=2.5, noise=z).prev_sample
    eager = s.step(uncond + 3.5 * (cond - uncond), 501, x, noise=z).prev_sample
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: DDPMScheduler(variance_type="fixed_large_log"), "fixed_large_log"),
    (lambda: DDPMScheduler(beta_schedule="laplace"), "laplace"),
])
def test_unimplemented_options_raise(make, match):
    with pytest.raises(NotImplementedError, match=match):
        make()


def test_scheduler_errors():
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMScheduler().step(torch.zeros(1, 2), 10, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="cannot be larger"):
        DDPMScheduler(num_train_timesteps=10).set_timesteps(11)
    with pytest.raises(ValueError, match="descending"):
        DDPMScheduler().set_timesteps(timesteps=[1, 5])
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDPMScheduler(timestep_spacing="uniform")
    s = DDIMScheduler()
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="generator"):
        s.step(torch.zeros(1, 2), 750, torch.zeros(1, 2), eta=0.5, generator=torch.Generator(),
               variance_noise=torch.zeros(1, 2))



@pytest.mark.parametrize("make", [DDPMScheduler, DDIMScheduler])
def test_step_timestep_outside_the_table_or_fractional_is_refused(make):
    """A host timestep outside [0, num_train_timesteps) is a ValueError naming timestep and the range (it was
    a bare IndexError from a table lookup before any check); a float timestep a TypeError (999.6 was
    silently read as 999; diffusers' lookup refuses float indices too)."""
    s = make()
    s.set_timesteps(10)
    x = torch.zeros(3, 2)
    for bad in (1000, torch.tensor(1000), torch.tensor([5, 1000, 7]), torch.tensor([-1, 5, 7]), -1):
        with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\)"):
            s.step(torch.zeros(3, 2), bad, x)
    for bad in (torch.tensor(999.6), torch.tensor([5.0, 7.0, 9.0]), 999.0, True):
        with pytest.raises(TypeError, match="timestep must be an int or an integer tensor"):
            s.step(torch.zeros(3, 2), bad, x)
    assert s.step(torch.zeros(3, 2), torch.tensor([999, 0, 500]), x).prev_sample.isfinite().all()

def test_diffusers_rounding_of_the_step_beta(backend, device):
    """StepSpec(diffusers_rounding=True): beta = 1 - fl32(abar_t / abar_prev), the rest exact, on both backends
    (per-sample and one-for-all timesteps); at t = 1 that rounding is ~3e-4 of beta, so the exact step differs."""
    from conftest import assert_close
    from fastssl.diffusion_step import StepSpec, apply_step

    schedule = NoiseSchedule.float32_built(torch.linspace(1e-4, 0.02, 1000))
    m, x, z = (torch.randn(3, 37, device=device) for _ in range(3))
    abar = schedule.alphas_cumprod.double().to(device)
    for t in (torch.tensor([1, 2, 500], device=device), 1):
        tt = torch.as_tensor(t, device=device).reshape(-1)
        a_t, a_p = abar[tt][:, None], abar[tt - 1][:, None]
        beta = 1 - (a_t / a_p).float().double()
        x0 = (x.double() - (1 - a_t).sqrt() * m.double()) / a_t.sqrt()
        ref = (a_p.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_p) / (1 - a_t) * x.double()
               + ((1 - a_p) / (1 - a_t) * beta).sqrt() * z.double())
        out, _ = apply_step(StepSpec("ddpm", diffusers_rounding=True, prev_offset=-1), m, t, x, schedule, noise=z)
        assert_close(out, ref, scale=10)
        exact, _ = apply_step(StepSpec("ddpm", prev_offset=-1), m, t, x, schedule, noise=z)
        assert (exact - out).abs().max() > 1e-5


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("sample_max_value", [0.5, 2.0])
def test_thresholding_steps_equal_diffusers(backend, monkeypatch, name, prediction_type, sample_max_value):
    """Dynamic thresholding (the quantile on the device, then the fused step reading s per sample) gives
    diffusers' prev_sample and pred_original_sample; inputs large enough that s is above 1 and clamped."""
    import diffusers.schedulers.scheduling_ddpm as module

    config = dict(thresholding=True, prediction_type=prediction_type, sample_max_value=sample_max_value,
                  dynamic_thresholding_ratio=0.9)
    ours, theirs = ((DDPMScheduler, diffusers.DDPMScheduler) if name == "ddpm" else
                    (DDIMScheduler, diffusers.DDIMScheduler))
    ours, theirs = ours(**config), theirs(**config)
    for s in (ours, theirs):
        s.set_timesteps(10)
    x = 3 * torch.randn(2, 3, 5, 4)
    noises = _noises(len(ours.timesteps), x.shape, "cpu")
    _patched_randn(monkeypatch, module, noises)
    for i, t in enumerate(ours.timesteps):
        m = 3 * torch.randn_like(x)
        if name == "ddpm":
            a, b = ours.step(m, t, x, noise=noises[i] if t > 0 else None), theirs.step(m, t, x)
        else:
            a, b = (s.step(m, t, x, eta=0.5, variance_noise=noises[i]) for s in (ours, theirs))
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=2e-5, atol=2e-5)
        x = b.prev_sample


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_learned_variance_steps_equal_diffusers(backend, monkeypatch, variance_type):
    """A 2C-channel model output, split and turned into a per-element sigma as diffusers does, in the step."""
    import diffusers.schedulers.scheduling_ddpm as module

    ours, theirs = (cls(variance_type=variance_type, num_train_timesteps=100) for cls in
                    (DDPMScheduler, diffusers.DDPMScheduler))
    for s in (ours, theirs):
        s.set_timesteps(10)
    x = torch.randn(2, 3, 4, 5)
    noises = _noises(len(ours.timesteps), x.shape, "cpu")
    _patched_randn(monkeypatch, module, noises)
    for i, t in enumerate(ours.timesteps):
        v = torch.rand_like(x) * 0.05 if variance_type == "learned" else torch.rand_like(x) * 2 - 1
        m = torch.cat([torch.randn_like(x), v], 1)
        a, b = ours.step(m, t, x, noise=noises[i] if t > 0 else None), theirs.step(m, t, x)
        assert a.pred_original_sample.shape == x.shape
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=2e-5, atol=2e-5)
        x = b.prev_sample


def test_ddpm_pipeline_with_learned_range_and_thresholding(monkeypatch):
    """A UNet with 6 output channels (mean and variance) in DDPMPipeline: our scheduler's images are
    diffusers' (PyTorch path: the same generator draws the same noise)."""
    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    unet = _tiny_unet(out_channels=6)
    config = dict(num_train_timesteps=50, variance_type="learned_range", thresholding=True, sample_max_value=1.5)
    ours = diffusers.DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**config))
    theirs = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**config))
    a, b = _run(ours), _run(theirs)
    assert a.shape == (2, 8, 8, 3) and abs(a - b).max() < 1e-4


def test_readme_drop_in_example_runs(tmp_path, monkeypatch):
    """The README's drop-in scheduler example is real code: a pipeline takes our scheduler, samples, saves
    and loads back with it."""
    readme = (os.path.dirname(__file__) + "/../README.md")
    text = open(readme).read()
    block = next(b for b in text.split("```python\n")[1:] if "fastssl.schedulers" in b.split("```")[0])
    monkeypatch.chdir(tmp_path)
    exec(compile(block.split("```")[0], "README.md", "exec"), {})
    assert (tmp_path / "my-pipe" / "scheduler" / "scheduler_config.json").is_file()
