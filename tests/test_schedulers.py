"""fastssl.schedulers: drop-in parity with diffusers' DDPMScheduler / DDIMScheduler and their pipelines."""
import pytest
import torch

from fastssl.schedulers import DDIMScheduler, DDPMScheduler, FrozenConfig

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


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


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
    assert isinstance(s.config, FrozenConfig) and s.config.prediction_type == s.config["prediction_type"] == "v_prediction"
    assert s.config.clip_sample is True and len(s) == 1000 and s.init_noise_sigma == 1.0 and s.order == 1
    with pytest.raises(TypeError, match="frozen"):
        s.config["clip_sample"] = False
    with pytest.raises(TypeError, match="frozen"):
        s.config.clip_sample = False
    theirs = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", steps_offset=1)
    with pytest.warns(UserWarning, match="set_alpha_to_one"):  # a DDIM key our DDPM does not know
        converted = DDPMScheduler.from_config(theirs.config)
    assert converted.config.beta_schedule == "squaredcos_cap_v2" and converted.config.steps_offset == 1
    torch.testing.assert_close(converted.alphas_cumprod, theirs.alphas_cumprod, rtol=2e-5, atol=1e-9)
    again = DDIMScheduler.from_config(DDIMScheduler(clip_sample=False).config, steps_offset=2)
    assert again.config.clip_sample is False and again.config.steps_offset == 2
    assert diffusers.DDIMScheduler.from_config(again.config).config.steps_offset == 2  # and back to diffusers
    out = DDIMScheduler(num_train_timesteps=20)
    out.set_timesteps(5)
    prev, pred = out.step(torch.zeros(1, 2), 4, torch.ones(1, 2), return_dict=False)
    assert prev.shape == pred.shape == (1, 2)


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


def test_step_with_fused_guidance(backend, device):
    s = DDPMScheduler()
    s.set_timesteps(10)
    cond, uncond, x, z = (torch.randn(2, 9, device=device) for _ in range(4))
    fused = s.step(cond, 501, x, uncond_output=uncond, guidance=2.5, noise=z).prev_sample
    eager = s.step(uncond + 3.5 * (cond - uncond), 501, x, noise=z).prev_sample
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: DDPMScheduler(thresholding=True), "thresholding"),
    (lambda: DDIMScheduler(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (lambda: DDPMScheduler(variance_type="learned_range"), "learned_range"),
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
    s = DDIMScheduler()
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="generator"):
        s.step(torch.zeros(1, 2), 750, torch.zeros(1, 2), eta=0.5, generator=torch.Generator(),
               variance_noise=torch.zeros(1, 2))
