"""Diffusion slice: parity against the float64 reference on both backends, gradients, validation."""
import math

import pytest
import torch

import fastssl
from conftest import assert_close, assert_close_lowp
from fastssl.diffusion import cfg_combine_reference, ddim_step_reference, ddpm_step_reference, q_sample_reference
from fastssl.diffusion_step import StepSpec, apply_step
from fastssl.schedules import NoiseSchedule

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guidance_kind", ["float", "per_sample", "zero_dim"])
def test_cfg_combine_matches_reference(backend, device, dtype, guidance_kind):
    cond = torch.randn(3, 37, 5, device=device, dtype=dtype)  # 555 elements: not a multiple of any block
    uncond = torch.randn_like(cond)
    guidance = {"float": 3.7,
                "per_sample": torch.rand(3, device=device, dtype=dtype) * 8,
                "zero_dim": torch.tensor(2.5, device=device, dtype=dtype)}[guidance_kind]
    out = fastssl.cfg_combine(cond, uncond, guidance)
    assert out.dtype == dtype and out.shape == cond.shape
    reference = cfg_combine_reference(cond, uncond, guidance)
    if dtype in (torch.float16, torch.bfloat16):  # atol: one rounding of the largest output (PyTorch's own
        # error can be luckily small on 555 elements, ours is the output rounding)
        assert_close_lowp(out, reference, cfg_combine_reference(cond, uncond, guidance, upcast=False),
                          atol=reference.abs().max().item() * torch.finfo(dtype).eps)
    else:
        assert_close(out, reference, scale=10)


def test_cfg_combine_non_contiguous_and_empty(backend, device):
    cond = torch.randn(4, 6, 9, device=device).transpose(1, 2)
    uncond = torch.randn(4, 9, 6, device=device)
    assert_close(fastssl.cfg_combine(cond, uncond, 1.5), cfg_combine_reference(cond, uncond, 1.5), torch.float32)
    empty = torch.empty(0, 3, device=device)
    assert fastssl.cfg_combine(empty, empty, 1.0).shape == (0, 3)


def test_cfg_combine_gradcheck(backend, device):
    cond = torch.randn(3, 7, device=device, dtype=torch.float64, requires_grad=True)
    uncond = torch.randn(3, 7, device=device, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(3, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, u: fastssl.cfg_combine(c, u, 0.7), (cond, uncond))
    assert torch.autograd.gradcheck(fastssl.cfg_combine, (cond, uncond, weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cfg_combine_backward_with_uneven_grad(backend, device, dtype):
    cond = torch.randn(5, 41, device=device, dtype=dtype, requires_grad=True)
    uncond = torch.randn(5, 41, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(5, 41, device=device, dtype=dtype)
    fastssl.cfg_combine(cond, uncond, 1.25).backward(grad)
    assert_close(cond.grad, 2.25 * grad.double(), dtype)
    assert_close(uncond.grad, -1.25 * grad.double(), dtype)


def test_cfg_combine_nan_propagates(backend, device):
    cond = torch.randn(2, 5, device=device)
    cond[1, 3] = float("nan")
    out = fastssl.cfg_combine(cond, torch.randn_like(cond), 1.0)
    assert out[1, 3].isnan() and not out[0].isnan().any()


def test_cfg_combine_compiles_fullgraph(backend, device):
    cond, uncond = torch.randn(2, 8, device=device), torch.randn(2, 8, device=device)
    compiled = torch.compile(lambda c, u: fastssl.cfg_combine(c, u, 2.0) * 3, fullgraph=True)
    assert_close(compiled(cond, uncond), 3 * cfg_combine_reference(cond, uncond, 2.0), torch.float32)


@pytest.mark.parametrize("call, error, match", [
    (lambda d: fastssl.cfg_combine(torch.ones(2, 3, device=d), torch.ones(2, 4, device=d), 1.0), ValueError, r"uncond has shape \(2, 4\)"),
    (lambda d: fastssl.cfg_combine(torch.ones(2, 3, device=d), torch.ones(2, 3, device=d, dtype=torch.float16), 1.0), TypeError, "mixing dtypes"),
    (lambda d: fastssl.cfg_combine(torch.ones(2, 3, device=d, dtype=torch.long), torch.ones(2, 3, device=d), 1.0), TypeError, "cond must be a floating-point"),
    (lambda d: fastssl.cfg_combine(torch.ones(2, 3, device=d), [1.0], 1.0), TypeError, "uncond must be a torch.Tensor"),
    (lambda d: fastssl.cfg_combine(torch.ones(2, 3, device=d), torch.ones(2, 3, device=d), "7.5"), TypeError, "guidance must be a float"),
    (lambda d: fastssl.cfg_combine(torch.ones(2, 3, device=d), torch.ones(2, 3, device=d), torch.ones(3, device=d)), ValueError, r"guidance must be .* \(2,\) tensor"),
    (lambda d: fastssl.cfg_combine(torch.tensor(1.0, device=d), torch.tensor(1.0, device=d), 1.0), ValueError, "batch dimension"),
])
def test_cfg_combine_rejects_bad_input(device, call, error, match):
    with pytest.raises(error, match=match):
        call(device)


# ----------------------------------------------------------------------------------------------------
# Schedules, q_sample, the fused DDPM / DDIM steps, sample()
# ----------------------------------------------------------------------------------------------------

T = 1000
SCHEDULE = NoiseSchedule.linear(T)
LOWP = (torch.float16, torch.bfloat16)


def _inputs(device, dtype=torch.float32, shape=(3, 37), guided=True):
    m = torch.randn(shape, device=device, dtype=dtype)
    return m, torch.randn_like(m), torch.randn_like(m), torch.randn_like(m)  # model, uncond, x_t, noise


def _check(out, ref, ref_lowp, dtype, scale=10):
    assert out.dtype == dtype and not out.isnan().any()
    if dtype in LOWP:  # atol: one rounding of the largest output to the dtype (all our error can be)
        assert_close_lowp(out, ref, ref_lowp, atol=ref.abs().max().item() * torch.finfo(dtype).eps)
    else:
        assert_close(out, ref, scale=scale)


def test_schedules_equal_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for ours, name, kw in [(NoiseSchedule.linear(), "linear", {}),
                           (NoiseSchedule.scaled_linear(1000, 0.00085, 0.012), "scaled_linear",
                            dict(beta_start=0.00085, beta_end=0.012)),
                           (NoiseSchedule.cosine(), "squaredcos_cap_v2", {})]:
        theirs = diffusers.DDPMScheduler(beta_schedule=name, **kw)
        assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float32
        torch.testing.assert_close(ours.betas, theirs.betas, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ours.alphas, theirs.alphas, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=2e-5, atol=1e-9)


def test_schedule_tables_are_float64_products():
    betas = torch.rand(50, dtype=torch.float64) * 0.05
    s = NoiseSchedule(betas)
    expected = torch.cumprod(1 - betas, 0)
    assert s.num_timesteps == len(s) == 50 and s.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(s.alphas_cumprod, expected.float(), rtol=0, atol=0)  # rounded once from float64
    torch.testing.assert_close(NoiseSchedule.linear(10, 0.1, 0.2).betas, torch.linspace(0.1, 0.2, 10, dtype=torch.float64).float())
    u = torch.arange(11, dtype=torch.float64) / 10
    f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(NoiseSchedule.cosine(10).betas, (1 - f[1:] / f[:-1]).clamp(max=0.999).float())
    moved = s.to("cpu")
    assert moved is not s and torch.equal(moved.alphas_cumprod, s.alphas_cumprod) and moved.device.type == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t_kind", ["int", "per_sample", "zero_dim"])
def test_q_sample_matches_reference(backend, device, dtype, t_kind):
    x0, noise = torch.randn(3, 37, device=device, dtype=dtype), torch.randn(3, 37, device=device, dtype=dtype)
    t = {"int": 417, "per_sample": torch.tensor([0, 500, T - 1], device=device),
         "zero_dim": torch.tensor(999, device=device)}[t_kind]
    out, v = fastssl.q_sample(x0, t, noise, SCHEDULE, return_v=True)
    ref, ref_v = q_sample_reference(x0, t, noise, SCHEDULE, return_v=True)
    low, low_v = q_sample_reference(x0, t, noise, SCHEDULE, return_v=True, upcast=False)
    _check(out, ref, low, dtype)
    _check(v, ref_v, low_v, dtype)
    assert torch.equal(fastssl.q_sample(x0, t, noise, SCHEDULE), out)


def test_q_sample_equals_diffusers_add_noise(backend, device):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = NoiseSchedule.scaled_linear(1000, 0.00085, 0.012)
    x0, noise = torch.randn(4, 3, 5, 7, device=device), torch.randn(4, 3, 5, 7, device=device)
    t = torch.tensor([0, 1, 640, 999], device=device)
    torch.testing.assert_close(fastssl.q_sample(x0, t, noise, ours), theirs.add_noise(x0, noise, t), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(fastssl.q_sample(x0, t, noise, ours, return_v=True)[1], theirs.get_velocity(x0, noise, t),
                               rtol=1e-5, atol=2e-5)


def test_q_sample_gradients(backend, device):
    x0 = torch.randn(3, 11, device=device, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(3, 11, device=device, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([3, 0, 998], device=device)
    assert torch.autograd.gradcheck(lambda a, b: fastssl.q_sample(a, t, b, SCHEDULE), (x0, noise))
    assert torch.autograd.gradcheck(lambda a, b: fastssl.q_sample(a, 77, b, SCHEDULE, return_v=True), (x0, noise))
    # float32, uneven upstream gradients into both outputs, against autograd through the float64 formula
    a, b = (x.detach().float().requires_grad_() for x in (x0, noise))
    g, gv = torch.randn(3, 11, device=device), torch.randn(3, 11, device=device)
    out, v = fastssl.q_sample(a, t, b, SCHEDULE, return_v=True)
    torch.autograd.backward((out, v), (g, gv))
    a64, b64 = (x.detach().double().requires_grad_() for x in (a, b))
    r, rv = q_sample_reference(a64, t, b64, SCHEDULE, return_v=True)
    torch.autograd.backward((r, rv), (g.double(), gv.double()))
    assert_close(a.grad, a64.grad, torch.float32)
    assert_close(b.grad, b64.grad, torch.float32)


GUIDANCE_KINDS = ["none", "float", "per_sample"]


def _guidance(kind, device, dtype=torch.float32):
    return {"none": 0.0, "float": 3.5, "per_sample": torch.tensor([0.0, 1.5, 7.0], device=device, dtype=dtype)}[kind]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("guidance_kind", GUIDANCE_KINDS)
def test_ddpm_step_matches_reference(backend, device, prediction_type, variance_type, clip_sample, guidance_kind):
    m, u, x, z = _inputs(device)
    guidance = _guidance(guidance_kind, device)
    uncond = None if guidance_kind == "none" else u
    t = torch.tensor([0, 7, T - 1], device=device)  # t = 0 gets no noise
    opts = dict(uncond_output=uncond, guidance=guidance, variance_type=variance_type, prediction_type=prediction_type,
                clip_sample=clip_sample, clip_range=1.5)
    for prev_t in (None, t - 20):  # Algorithm 2, and a strided step (prev_t < 0 for t = 0, 7: abar_prev = 1)
        out = fastssl.ddpm_step(m, t, x, SCHEDULE, prev_t=prev_t, noise=z, **opts)
        ref, _ = ddpm_step_reference(m, t, x, SCHEDULE, prev_t=prev_t, noise=z, **opts)
        _check(out, ref, None, torch.float32)
    # An int t takes the same path as a tensor of one timestep per sample.
    out = fastssl.ddpm_step(m, 500, x, SCHEDULE, prev_t=480, noise=z, **opts)
    assert_close(out, ddpm_step_reference(m, 500, x, SCHEDULE, prev_t=480, noise=z, **opts)[0], scale=10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("guidance_kind", GUIDANCE_KINDS)
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_step_matches_reference(backend, device, prediction_type, clip_sample, guidance_kind, eta):
    m, u, x, z = _inputs(device)
    guidance = _guidance(guidance_kind, device)
    opts = dict(uncond_output=None if guidance_kind == "none" else u, guidance=guidance, prediction_type=prediction_type,
                clip_sample=clip_sample, clip_range=1.5, eta=eta, noise=z)
    t = torch.tensor([0, 40, T - 1], device=device)
    for prev_t in (t - 1, t - 40, -1):  # an int prev_t < 0: abar_prev = 1
        out = fastssl.ddim_step(m, t, prev_t, x, SCHEDULE, **opts)
        ref, _ = ddim_step_reference(m, t, prev_t, x, SCHEDULE, **opts)
        _check(out, ref, None, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_step_dtypes(backend, device, dtype, sampler):
    m, u, x, z = _inputs(device, dtype)
    w = _guidance("per_sample", device, dtype)
    t = torch.tensor([0, 30, 900], device=device)
    opts = dict(uncond_output=u, guidance=w, noise=z, prediction_type="v_prediction", clip_sample=True)
    if sampler == "ddpm":
        out = fastssl.ddpm_step(m, t, x, SCHEDULE, prev_t=t - 10, **opts)
        ref, low = (ddpm_step_reference(m, t, x, SCHEDULE, prev_t=t - 10, upcast=up, **opts)[0] for up in (True, False))
    else:
        out = fastssl.ddim_step(m, t, t - 10, x, SCHEDULE, eta=1.0, **opts)
        ref, low = (ddim_step_reference(m, t, t - 10, x, SCHEDULE, eta=1.0, upcast=up, **opts)[0] for up in (True, False))
    _check(out, ref, low, dtype)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("config", [dict(variance_type="fixed_small", clip_sample=True),
                                    dict(variance_type="fixed_large", clip_sample=False)])
def test_ddpm_step_equals_diffusers(backend, device, prediction_type, config):
    """Same configuration, same noise: diffusers' DDPMScheduler.step over a strided schedule, with eager CFG."""
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDPMScheduler(prediction_type=prediction_type, **config)
    theirs.set_timesteps(25)
    m, u, x, z = _inputs(device, shape=(2, 3, 4, 5))
    w = 2.0
    for t in theirs.timesteps[::6].tolist() + [0]:
        prev = theirs.previous_timestep(t)
        ours = fastssl.ddpm_step(m, t, x, SCHEDULE, prev_t=int(prev), noise=z, uncond_output=u, guidance=w,
                                 prediction_type=prediction_type, **config)
        guided = u + (1 + w) * (m - u)  # diffusers pipelines' CFG with guidance_scale = 1 + w
        torch.testing.assert_close(ours, _diffusers_ddpm(theirs, guided, t, x, z), rtol=2e-4, atol=2e-4)


def _diffusers_ddpm(scheduler, model_output, t, x, noise):
    """diffusers' step with our noise: its step draws the noise via randn_tensor, so patch that."""
    import diffusers.schedulers.scheduling_ddpm as module

    original = module.randn_tensor
    module.randn_tensor = lambda shape, **kw: noise.to(kw.get("dtype") or noise.dtype)
    try:
        return scheduler.step(model_output, t, x).prev_sample
    finally:
        module.randn_tensor = original


def _noise_of(backend, device, generator, shape=(4, 2001), t=600, block=None):
    """The noise a DDPM step draws, recovered: with model output and x_t zero the step is sigma_t * z."""
    zeros = torch.zeros(shape, device=device)
    sigma = ddpm_step_reference(zeros, t, zeros, SCHEDULE, noise=torch.ones(shape, device=device))[0][0, 0].item()
    if block is not None:  # launch the kernel itself with a fixed BLOCK (no autotuning)
        from fastssl.kernels.diffusion import diffusion_step_forward

        steps = torch.tensor([t], device=device)
        out, _ = diffusion_step_forward(model_output=zeros, uncond_output=None, x_t=zeros, noise=None,
                                        seed=torch.full((1,), generator, dtype=torch.long, device=device), t=steps, prev_t=steps,
                                        guidance=None, alphas_cumprod=SCHEDULE.to(device).alphas_cumprod, block=block,
                                        **StepSpec("ddpm", prev_offset=-1).options())
        return out / sigma
    return fastssl.ddpm_step(zeros, t, zeros, SCHEDULE, generator=generator) / sigma


def test_step_noise_statistics(backend, device):
    z = _noise_of(backend, device, 1234).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 0.05
    assert abs(((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2 - 3) < 0.5  # Gaussian kurtosis
    corr = torch.corrcoef(z)  # rows are samples: no correlation between them
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max() < 5 / math.sqrt(z.shape[1])
    assert torch.equal(_noise_of(backend, device, 1234), _noise_of(backend, device, 1234))  # same seed, same noise
    assert not torch.equal(_noise_of(backend, device, 1234), _noise_of(backend, device, 1235))
    g = torch.Generator(device=device).manual_seed(5)
    first, second = _noise_of(backend, device, g), _noise_of(backend, device, g)  # the generator advances
    assert not torch.equal(first, second)
    assert torch.equal(first, _noise_of(backend, device, torch.Generator(device=device).manual_seed(5)))


def test_kernel_noise_does_not_depend_on_block_size(device):
    pytest.importorskip("triton")
    a = _noise_of("triton", device, 99, shape=(3, 1500), block=256)
    b = _noise_of("triton", device, 99, shape=(3, 1500), block=1024)
    assert torch.equal(a, b) and a.std() > 0.9


def test_a_term_the_step_lacks_is_left_out(backend, device):
    """StepSpec.terms: an absent term is left out, not added as 0 * it, so with clipping an inf in x_t (DDIM,
    epsilon model: x enters through x0 only) or in model_output (DDPM: no e term) gives the literal
    formula's finite result on both backends."""
    m, _, x, z = _inputs(device)
    t, prev = torch.tensor([10, 500, 990], device=device), torch.tensor([0, 480, 970], device=device)
    x_inf, m_inf = x.clone(), m.clone()
    x_inf[1, 3] = m_inf[2, 5] = float("inf")
    out = fastssl.ddim_step(m, t, prev, x_inf, SCHEDULE, clip_sample=True)
    ref, _ = ddim_step_reference(m, t, prev, x_inf, SCHEDULE, clip_sample=True)
    assert ref.isfinite().all()
    assert_close(out, ref, scale=10)
    out = fastssl.ddpm_step(m_inf, t, x, SCHEDULE, clip_sample=True, noise=z)
    ref, _ = ddpm_step_reference(m_inf, t, x, SCHEDULE, clip_sample=True, noise=z)
    assert ref.isfinite().all()
    assert_close(out, ref, scale=10)


def test_non_finite_inputs_give_one_result_on_both_backends(device, monkeypatch):
    """Inf and NaN inputs come out the same on the PyTorch path and the kernels (issue 16 item 6): an inf
    guidance, an inf model output with and without clipping (the unclamped x0 stage folds into one map of
    x and e on both), a NaN in x_t."""
    pytest.importorskip("triton")
    m, u, x, z = _inputs(device)
    m_inf, x_nan = m.clone(), x.clone()
    m_inf[0, 1], m_inf[2, 3], x_nan[1, 2] = float("inf"), float("-inf"), float("nan")
    t = torch.tensor([10, 500, 990], device=device)
    calls = [lambda: fastssl.ddpm_step(m, t, x, SCHEDULE, uncond_output=u, guidance=float("inf"), noise=z),
             lambda: fastssl.ddim_step(m_inf, t, t - 20, x, SCHEDULE),
             lambda: fastssl.ddim_step(m_inf, t, t - 20, x, SCHEDULE, clip_sample=True),
             lambda: fastssl.ddpm_step(m_inf, t, x, SCHEDULE, noise=z),
             lambda: fastssl.ddpm_step(m, t, x_nan, SCHEDULE, noise=z, clip_sample=True),
             lambda: fastssl.cfg_combine(m_inf, u, float("inf"))]
    for call in calls:
        outs = []
        for backend in ("torch", "triton"):
            monkeypatch.setenv("FASTSSL_BACKEND", backend)
            outs.append(call())
        ours, theirs = outs
        assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf())
        finite = ours.isfinite()
        assert torch.equal(ours[~finite].nan_to_num(), theirs[~finite].nan_to_num())
        assert_close(ours[finite], theirs[finite], scale=10)


def _assert_same_or_close(out, ref, dtype, scale=10):
    """``out`` equals ``ref`` where ``ref`` is not finite (NaN where NaN, the same signed inf) and is close to
    it elsewhere."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf()), (out, ref)
    assert torch.equal(out[ref.isinf()], ref[ref.isinf()])
    finite = ref.isfinite()
    assert_close(out[finite], ref[finite], dtype, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_zero_terminal_snr_steps_match_the_reference(backend, device, dtype, clip_sample):
    """abar_t = 0 (zero terminal SNR: beta = 1) with an epsilon model: x0 = (x - sqrt(1 - abar) e) / sqrt(abar)
    is +-inf (NaN where x = e), which clip_sample clamps to +-1 and the rest of the step keeps finite. The
    affine x0 = c1 x + c2 e with c1 = inf, c2 = -inf made it inf - inf = NaN on both backends. Without clipping
    the literal formula's +-inf / NaN, as diffusers; one timestep for all and per sample (a row at abar_t = 0
    beside one that is not)."""
    schedule = NoiseSchedule([0.1, 0.2, 1.0])  # abar_2 = 0
    x = torch.tensor([[1.0, -1.0, 0.5, 0.3, 2.0, -0.7]], device=device, dtype=dtype).repeat(2, 1)
    e = torch.tensor([[0.5, 0.5, 0.5, 0.3, -1.0, 0.2]], device=device, dtype=dtype).repeat(2, 1)
    z = torch.randn_like(x)
    for t in (2, torch.tensor([2, 1], device=device)):
        opts = dict(clip_sample=clip_sample)
        cases = [(fastssl.ddim_step(e, t, 0, x, schedule, **opts), ddim_step_reference(e, t, 0, x, schedule, **opts)),
                 (fastssl.ddim_step(e, t, 0, x, schedule, eta=0.6, noise=z, **opts),
                  ddim_step_reference(e, t, 0, x, schedule, eta=0.6, noise=z, **opts))]
        for variance_type in ("fixed_small", "fixed_large"):
            opts = dict(clip_sample=clip_sample, variance_type=variance_type, noise=z)
            cases.append((fastssl.ddpm_step(e, t, x, schedule, **opts), ddpm_step_reference(e, t, x, schedule, **opts)))
        spec = StepSpec("ddim", eta=0.3, use_clipped_model_output=True, clip_sample=clip_sample, return_pred_x0=True)
        out, x0 = apply_step(spec, e, t, x, schedule, prev_t=0, noise=z)
        ref, ref_x0 = ddim_step_reference(e, t, 0, x, schedule, eta=0.3, noise=z, clip_sample=clip_sample,
                                          use_clipped_model_output=True)
        cases += [(out, (ref, None)), (x0, (ref_x0, None))]
        for out, (ref, _) in cases:
            assert ref[0, 0].isfinite() == clip_sample and ref[0, 2].isnan()  # x = e: 0 / 0
            _assert_same_or_close(out, ref, dtype)


def test_noise_is_never_added_at_t_zero_even_if_it_is_nan(backend, device):
    """Noise never enters where t == 0 (its coefficient is 0, and 0 * NaN is NaN): a NaN or inf noise
    there leaves the mean, on both backends, for one timestep and per-sample ones (issue 16 item 2)."""
    m, _, x, _ = _inputs(device)
    bad = torch.full_like(x, float("nan"))
    bad[1] = float("inf")
    mean, _ = ddpm_step_reference(m, 0, x, SCHEDULE)
    assert_close(fastssl.ddpm_step(m, 0, x, SCHEDULE, noise=bad), mean, scale=10)
    t = torch.tensor([0, 5, 0], device=device)
    out = fastssl.ddpm_step(m, t, x, SCHEDULE, noise=bad)
    assert_close(out[[0, 2]], ddpm_step_reference(m, t, x, SCHEDULE)[0][[0, 2]], scale=10)
    assert not out[1].isfinite().any()  # t = 5 does add it
    out = fastssl.ddim_step(m, t, t - 1, x, SCHEDULE, eta=1.0, noise=bad)
    assert_close(out[[0, 2]], ddim_step_reference(m, t, t - 1, x, SCHEDULE, eta=1.0)[0][[0, 2]], scale=10)


def test_ddim_with_eta_zero_inverts_and_the_rest_refuse_a_later_timestep(backend, device):
    """prev_t > t: DDIM with eta = 0 takes the inversion step (diffusers' DDIMInverseScheduler: no variance
    term); DDPM and DDIM with eta > 0 have no such step: a ValueError naming prev_t on the host, NaN from
    the kernel where the timesteps are on the GPU (issue 16 item 3)."""
    m, _, x, z = _inputs(device)
    t, later = torch.tensor([10, 200, 500], device=device), torch.tensor([30, 220, 520], device=device)
    out = fastssl.ddim_step(m, t, later, x, SCHEDULE)
    a_t, a_n = (SCHEDULE.alphas_cumprod.double()[v.cpu()].to(device)[:, None] for v in (t, later))
    x0 = (x.double() - (1 - a_t).sqrt() * m.double()) / a_t.sqrt()
    inverted = a_n.sqrt() * x0 + (1 - a_n).sqrt() * m.double()  # DDIMInverseScheduler.step's formula
    assert out.isfinite().all()
    assert_close(out, inverted, scale=10)
    assert_close(out, ddim_step_reference(m, t, later, x, SCHEDULE)[0], scale=10)
    with pytest.raises(ValueError, match="prev_t must not be after t for DDPM"):
        fastssl.ddpm_step(m, t, x, SCHEDULE, prev_t=later, noise=z)
    with pytest.raises(ValueError, match="prev_t must not be after t for DDIM with eta=0.5"):
        fastssl.ddim_step(m, 10, 30, x, SCHEDULE, eta=0.5, noise=z)
    if backend == "triton":  # the kernel itself (what a CUDA launch does, unchecked): NaN, not a number
        from fastssl.kernels.diffusion import diffusion_step_forward

        for spec in (StepSpec("ddpm"), StepSpec("ddim", eta=0.5)):
            out, _ = diffusion_step_forward(model_output=m, uncond_output=None, x_t=x, noise=z, seed=None, t=t,
                                            prev_t=later, guidance=None, alphas_cumprod=SCHEDULE.alphas_cumprod.to(device),
                                            return_pred_x0=False, **{k: v for k, v in spec.options().items()
                                                                     if k != "return_pred_x0"})
            assert out.isnan().all(), spec


def _philox4x32(seed: int, counter):
    """Philox4x32-10 (Salmon et al. 2011) in numpy, as ``tl.randint4x(seed, counter)`` keys it: the seed's
    low and high words are the key, the int64 counter's the first two words of the block."""
    import numpy as np

    mask = np.uint64(0xFFFFFFFF)
    c = [counter.astype(np.uint64) & mask, counter.astype(np.uint64) >> np.uint64(32),
         np.zeros_like(counter, np.uint64), np.zeros_like(counter, np.uint64)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0, p2 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p2 >> np.uint64(32)) ^ c[1] ^ k0, p2 & mask, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c


def _kernel_noise_reference(seed: int, rows: int, inner: int):
    """The kernels' documented draw in float64: column j of sample b is normal j % 4 of the Philox call at
    counter b * ceil(inner / 4) + j // 4, its four words two Box-Muller pairs (r cos, r sin) of uniforms
    formed as ``tl.uint_to_uniform_float`` forms them."""
    import numpy as np

    b, j = np.meshgrid(np.arange(rows), np.arange(inner), indexing="ij")
    words = _philox4x32(seed, b * -(-inner // 4) + j // 4)

    def uniform(w):  # int32 bits, negatives folded (~x), times the largest scale keeping the result < 1
        x = w.astype(np.uint32).view(np.int32)
        return (np.float32(np.where(x < 0, ~x, x)) * np.float32(4.6566127342e-10)).astype(np.float64)

    lane = j % 4
    pair = [(words[0], words[1]), (words[2], words[3])]
    u1 = np.where(lane < 2, uniform(pair[0][0]), uniform(pair[1][0]))
    u2 = np.where(lane < 2, uniform(pair[0][1]), uniform(pair[1][1]))
    r = np.sqrt(-2 * np.log(np.maximum(u1, np.float32(1e-7))))
    return torch.from_numpy(np.where(lane % 2 == 0, r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)))


@pytest.mark.parametrize("shape", [(3, 1500), (2, 37)])
def test_kernel_noise_is_the_documented_philox_draw(device, shape):
    """In-kernel noise against a float64 numpy Philox4x32-10 + Box-Muller: four normals a call, in order,
    keyed by (sample, column); rows whose size is not a multiple of 4 start a fresh counter."""
    pytest.importorskip("triton")
    seed = 2**40 + 12345  # both key words in use
    z = _noise_of("triton", device, seed, shape=shape, block=256).double().cpu()
    ref = _kernel_noise_reference(seed, *shape)
    # the accurate transforms (the interpreter, fp32 on a GPU): float32 rounding of r, log and sin/cos
    torch.testing.assert_close(z, ref, atol=2e-5, rtol=2e-5)


def test_no_noise_where_t_is_zero(backend, device):
    m, u, x, z = _inputs(device)
    t = torch.tensor([0, 5, 0], device=device)
    for generator in (7, None):
        out = fastssl.ddpm_step(m, t, x, SCHEDULE, generator=generator, uncond_output=u, guidance=1.0)
        mean, _ = ddpm_step_reference(m, t, x, SCHEDULE, uncond_output=u, guidance=1.0)
        assert_close(out[[0, 2]], mean[[0, 2]], scale=10)
        assert (out[1] - mean[1].float()).abs().max() > 1e-3
    out = fastssl.ddim_step(m, t, t - 1, x, SCHEDULE, eta=1.0, generator=3)
    assert_close(out[[0, 2]], ddim_step_reference(m, t, t - 1, x, SCHEDULE, eta=1.0)[0][[0, 2]], scale=10)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_step_gradients(backend, device, sampler):
    """gradcheck in float64 through the kernels, and float32 gradients with an uneven grad_output against
    autograd through the float64 reference (clamp active on part of the elements, per-sample guidance)."""
    m, u, x, z = (v.double().requires_grad_() for v in _inputs(device, shape=(3, 9)))
    w = torch.tensor([0.5, 2.0, 4.0], device=device, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 60, 990], device=device)
    opts = dict(prediction_type="epsilon", clip_sample=True, clip_range=2.0)

    def ours(m, u, x, z, w):
        if sampler == "ddpm":
            return fastssl.ddpm_step(m, t, x, SCHEDULE, prev_t=t - 30, noise=z, uncond_output=u, guidance=w, **opts)
        return fastssl.ddim_step(m, t, t - 30, x, SCHEDULE, eta=0.8, noise=z, uncond_output=u, guidance=w, **opts)

    def ref(m, u, x, z, w):
        if sampler == "ddpm":
            return ddpm_step_reference(m, t, x, SCHEDULE, prev_t=t - 30, noise=z, uncond_output=u, guidance=w, **opts)[0]
        return ddim_step_reference(m, t, t - 30, x, SCHEDULE, eta=0.8, noise=z, uncond_output=u, guidance=w, **opts)[0]

    assert torch.autograd.gradcheck(ours, (m, u, x, z, w))
    grad = torch.randn(3, 9, device=device, dtype=torch.float64)
    inputs32 = [v.detach().float().requires_grad_() for v in (m, u, x, z, w)]
    ours(*inputs32).backward(grad.float())
    inputs64 = [v.detach().double().requires_grad_() for v in inputs32]
    ref(*inputs64).backward(grad)
    for a, b in zip(inputs32, inputs64):
        assert_close(a.grad, b.grad, torch.float32, scale=20)


def _model_output_only_cases(device):
    """(name, ours, reference) of steps where only model_output needs a gradient: no uncond_output, and the
    noise either a tensor that needs none or drawn from a seed; ddpm_step, ddim_step (eta 0 and > 0) and both
    schedulers' step (their float32 tables, read by the float64 reference)."""
    from fastssl.schedulers import DDIMScheduler, DDPMScheduler

    _, _, x, z = _inputs(device)
    t = torch.tensor([5, 300, 990], device=device)
    ddpm, ddim = DDPMScheduler(), DDIMScheduler()
    ddpm.set_timesteps(10)
    ddim.set_timesteps(10)
    s = int(ddpm.timesteps[2])  # 700 (a step's beta far from t = 1, where diffusers' rounding of it shows)
    return [
        ("ddpm_step", lambda m: fastssl.ddpm_step(m, t, x, SCHEDULE, noise=z, clip_sample=True),
         lambda m: ddpm_step_reference(m, t, x, SCHEDULE, noise=z, clip_sample=True)[0]),
        ("ddpm_step seeded", lambda m: fastssl.ddpm_step(m, 300, x, SCHEDULE, generator=3),
         lambda m: ddpm_step_reference(m, 300, x, SCHEDULE)[0]),
        ("ddim_step", lambda m: fastssl.ddim_step(m, t, t - 20, x, SCHEDULE, prediction_type="v_prediction"),
         lambda m: ddim_step_reference(m, t, t - 20, x, SCHEDULE, prediction_type="v_prediction")[0]),
        ("ddim_step eta", lambda m: fastssl.ddim_step(m, t, t - 20, x, SCHEDULE, eta=0.7, noise=z, clip_sample=True),
         lambda m: ddim_step_reference(m, t, t - 20, x, SCHEDULE, eta=0.7, noise=z, clip_sample=True)[0]),
        ("ddim_step eta seeded", lambda m: fastssl.ddim_step(m, t, t - 20, x, SCHEDULE, eta=1.0, generator=4),
         lambda m: ddim_step_reference(m, t, t - 20, x, SCHEDULE, eta=1.0)[0]),
        ("DDPMScheduler.step", lambda m: ddpm.step(m, s, x, noise=z).prev_sample,
         lambda m: ddpm_step_reference(m, s, x, ddpm.schedule, prev_t=ddpm.previous_timestep(s), noise=z,
                                       clip_sample=True)[0]),
        ("DDIMScheduler.step eta", lambda m: ddim.step(m, s, x, eta=0.5, variance_noise=z).prev_sample,
         lambda m: ddim_step_reference(m, s, s - 100, x, ddim.schedule, eta=0.5, noise=z, clip_sample=True)[0]),
        ("DDIMScheduler.step", lambda m: ddim.step(m, s, x).prev_sample,
         lambda m: ddim_step_reference(m, s, s - 100, x, ddim.schedule, clip_sample=True)[0]),
    ]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_step_backward_with_only_model_output_requiring_grad(backend, device, compiled):
    """The common training case, only model_output needing a gradient: the backward op returned one empty
    tensor for both absent gradients (uncond's, noise's), which a custom op may not ("may not alias any
    inputs ... or other returns"), so every such backward raised. Its gradient now equals autograd through
    the float64 reference, eagerly and under torch.compile(fullgraph=True) (aot_eager: the op's fake too)."""
    m = torch.randn(3, 37, device=device)
    grad = torch.randn_like(m)
    for name, ours, ref in _model_output_only_cases(device):
        if compiled:
            torch._dynamo.reset()
            ours = torch.compile(ours, backend="aot_eager", fullgraph=True)
        m32 = m.clone().requires_grad_()
        (got,) = torch.autograd.grad(ours(m32), m32, grad)
        m64 = m.double().requires_grad_()
        (want,) = torch.autograd.grad(ref(m64), m64, grad.double())
        assert want.isfinite().all() and want.abs().max() > 0, name
        assert_close(got, want, torch.float32, scale=20), name


def test_ops_compile_fullgraph(backend, device):
    m, u, x, z = _inputs(device)
    t = torch.tensor([3, 200, 999], device=device)

    def f(m, u, x, z):
        a = fastssl.ddpm_step(m, t, x, SCHEDULE, noise=z, uncond_output=u, guidance=2.0, clip_sample=True)
        b = fastssl.ddim_step(m, t, t - 50, x, SCHEDULE, prediction_type="v_prediction")
        return a + b, fastssl.q_sample(x, t, z, SCHEDULE)

    compiled = torch.compile(f, fullgraph=True)
    for got, want in zip(compiled(m, u, x, z), f(m, u, x, z)):
        assert_close(got, want.double(), torch.float32)


def test_an_int_seed_compiles_fullgraph_and_a_generator_says_why_not(device):
    """torch.compile(fullgraph=True) of a step drawing its noise from an int seed gives the eager draw (the
    PyTorch path draws it through the fastssl::seeded_noise op); a torch.Generator, which dynamo cannot
    trace, fails naming generator (issue 16 item 7: both failed with dynamo's "opaque object")."""
    m, _, x, _ = _inputs(device)
    step = torch.compile(lambda m, x: fastssl.ddpm_step(m, 500, x, SCHEDULE, generator=7), fullgraph=True)
    assert_close(step(m, x), fastssl.ddpm_step(m, 500, x, SCHEDULE, generator=7))
    gen = torch.Generator(device=device).manual_seed(0)
    with pytest.raises(Exception, match="generator: a torch.Generator cannot be traced by torch.compile"):
        torch.compile(lambda m, x: fastssl.ddpm_step(m, 500, x, SCHEDULE, generator=gen), fullgraph=True)(m, x)


def test_double_backward_is_refused_naming_the_op(backend, device):
    """create_graph=True through an op's fused backward: a RuntimeError naming the op (issue 16 item 7: it
    was PyTorch's generic "no autograd formula was registered")."""
    m, u, x, z = (v.requires_grad_() for v in _inputs(device))
    for call, name in ((lambda: fastssl.q_sample(x, 5, z, SCHEDULE), "fastssl.q_sample"),
                       (lambda: fastssl.cfg_combine(m, u, 2.0), "fastssl.cfg_combine"),
                       (lambda: fastssl.ddpm_step(m, 5, x, SCHEDULE, noise=z), "ddpm_step")):
        with pytest.raises(RuntimeError, match=f"{name}.* has no double backward|{name} has no double backward"):
            torch.autograd.grad(call().square().sum(), x if name != "fastssl.cfg_combine" else m, create_graph=True)
        (grad,) = torch.autograd.grad(call().square().sum(), x if name != "fastssl.cfg_combine" else m)
        assert grad.isfinite().all()  # the first derivative as before


def test_step_nan_propagates_and_non_contiguous(backend, device):
    m, u, x, z = _inputs(device, shape=(2, 5, 6))
    m[1, 2, 3] = float("nan")
    out = fastssl.ddpm_step(m, 100, x, SCHEDULE, noise=z, clip_sample=True)
    assert out[1, 2, 3].isnan() and out.isnan().sum() == 1
    mt, xt, zt = (v.transpose(1, 2) for v in (u, x, z))  # (2, 6, 5) views
    out = fastssl.ddim_step(mt, 500, 300, xt, SCHEDULE, eta=0.5, noise=zt)
    assert out.is_contiguous()
    assert_close(out, ddim_step_reference(mt, 500, 300, xt, SCHEDULE, eta=0.5, noise=zt)[0], scale=10)
    assert fastssl.ddpm_step(x[:0], 3, x[:0], SCHEDULE, noise=z[:0]).shape == (0, 5, 6)


def test_kernel_out_of_range_timestep_gives_nan(device):
    """On CUDA timesteps are not range-checked (that would sync): the kernel gives NaN instead of reading
    out of bounds. Launched directly here, as validation would reject the value on the CPU."""
    pytest.importorskip("triton")
    from fastssl.kernels.diffusion import q_sample_forward

    x = torch.randn(2, 40, device=device)
    out, _ = q_sample_forward(x, x, torch.tensor([5, T], device=device), SCHEDULE.q_coefficients, return_v=False)
    assert not out[0].isnan().any() and out[1].isnan().all()


def _toy_model(calls):
    def model(x, t, cond):
        calls.append((x.shape[0], t.clone(), None if cond is None else cond.clone()))
        scale = 1.0 if cond is None else _row(cond.float(), x)
        return 0.1 * x * scale + 0.01 * _row(t.float(), x) / T
    return model


def _row(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def test_sample_ddpm_equals_manual_loop(device, monkeypatch):
    """Algorithm 2 step by step with the float64 reference and the same noise draws (PyTorch path)."""
    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    s = NoiseSchedule.linear(30)
    calls = []
    out = fastssl.sample(_toy_model(calls), (2, 3, 4), s, generator=11, progress=False, device=device)
    g = torch.Generator(device=device).manual_seed(11)
    x = torch.randn((2, 3, 4), generator=g, device=device)
    for t in range(29, -1, -1):
        z = torch.randn((2, 3, 4), generator=g, device=device)
        tt = torch.full((2,), t, device=device)
        x = ddpm_step_reference(_toy_model([])(x.float(), tt, None), tt, x, s, noise=z)[0]
    assert_close(out, x, scale=50)
    assert [c[1].tolist() for c in calls] == [[t, t] for t in range(29, -1, -1)]


def test_sample_guidance_is_one_batched_call(backend, device):
    s = NoiseSchedule.linear(40)
    cond, uncond = torch.tensor([1.0, 2.0], device=device), torch.tensor([0.0, 0.0], device=device)
    calls = []
    out = fastssl.sample(_toy_model(calls), (2, 5), s, num_steps=8, sampler="ddim", cond=cond, uncond=uncond,
                         guidance=3.0, generator=4, progress=False, device=device)
    assert len(calls) == 8 and all(c[0] == 4 for c in calls)  # one call per step, cond and uncond together
    assert calls[0][1].tolist() == [35] * 4 and calls[-1][1].tolist() == [0] * 4  # leading spacing, 40 // 8 = 5
    assert torch.equal(calls[0][2], torch.cat([cond, uncond]))
    # The same loop by hand: DDIM (eta = 0 is deterministic), guidance fused.
    g = torch.Generator(device=device).manual_seed(4)
    x = torch.randn((2, 5), generator=g, device=device).double()
    model = _toy_model([])
    for t in range(35, -1, -5):
        tt = torch.full((2,), t, device=device)
        ref = ddim_step_reference(model(x.float(), tt, cond), tt, tt - 5, x, s, uncond_output=model(x.float(), tt, uncond),
                                  guidance=3.0)[0]
        x = ref
    assert_close(out, x, scale=50)


def test_sample_ddpm_reproducible(backend, device):
    s = NoiseSchedule.cosine(20)
    model = _toy_model([])
    a = fastssl.sample(model, (3, 6), s, generator=9, progress=False, device=device)
    b = fastssl.sample(model, (3, 6), s, generator=torch.Generator(device=device).manual_seed(9), progress=False,
                       device=device)
    c = fastssl.sample(model, (3, 6), s, num_steps=5, generator=10, progress=False, device=device)
    assert torch.equal(a, b) and a.shape == c.shape == (3, 6) and not torch.equal(a[:, :1], c[:, :1])
    assert torch.isfinite(a).all() and torch.isfinite(c).all()


def _call(fn, d, **override):
    base = dict(model_output=torch.ones(2, 3, device=d), t=5, x_t=torch.ones(2, 3, device=d), schedule=SCHEDULE)
    base.update(override)
    return fn(base.pop("model_output"), base.pop("t"), base.pop("x_t"), base.pop("schedule"), **base)


@pytest.mark.parametrize("call, error, match", [
    (lambda d: _call(fastssl.ddpm_step, d, t=1000), ValueError, r"t must be in \[0, 999\].* got 1000"),
    (lambda d: _call(fastssl.ddpm_step, d, t=-1), ValueError, r"t must be in \[0, 999\]"),
    (lambda d: _call(fastssl.ddpm_step, d, t=torch.tensor([3, 1000], device=d)), ValueError, "got 1000"),
    (lambda d: _call(fastssl.ddpm_step, d, t=torch.tensor([3, 4, 5], device=d)), ValueError, r"\(2,\) tensor"),
    (lambda d: _call(fastssl.ddpm_step, d, t=torch.tensor([3.0, 4.0], device=d)), TypeError, "t must be an integer tensor"),
    (lambda d: _call(fastssl.ddpm_step, d, t=2.5), TypeError, "t must be an int or a LongTensor"),
    (lambda d: _call(fastssl.ddpm_step, d, prev_t=1000), ValueError, r"prev_t must be in \[any negative int, 999\]"),
    (lambda d: _call(fastssl.ddpm_step, d, x_t=torch.ones(2, 4, device=d)), ValueError, r"model_output has shape \(2, 3\)"),
    (lambda d: _call(fastssl.ddpm_step, d, x_t=torch.ones(2, 3, device=d, dtype=torch.float64)), TypeError, "mixing dtypes"),
    (lambda d: _call(fastssl.ddpm_step, d, x_t=torch.ones(2, 3, device=d, dtype=torch.long)), TypeError, "x_t must be a floating-point"),
    (lambda d: _call(fastssl.ddpm_step, d, x_t=torch.tensor(1.0, device=d), model_output=torch.tensor(1.0, device=d)), ValueError, "batch dimension"),
    (lambda d: _call(fastssl.ddpm_step, d, noise=torch.ones(2, 2, device=d)), ValueError, "noise has shape"),
    (lambda d: _call(fastssl.ddpm_step, d, uncond_output=torch.ones(2, 3, device=d, dtype=torch.float16)), TypeError, "mixing dtypes"),
    (lambda d: _call(fastssl.ddpm_step, d, guidance=2.0), ValueError, "needs uncond_output"),
    (lambda d: _call(fastssl.ddpm_step, d, guidance="2", uncond_output=torch.ones(2, 3, device=d)), TypeError, "guidance must be a float"),
    (lambda d: _call(fastssl.ddpm_step, d, guidance=torch.ones(3, device=d), uncond_output=torch.ones(2, 3, device=d)), ValueError, r"\(2,\) tensor"),
    (lambda d: _call(fastssl.ddpm_step, d, variance_type="fixed_large_log"), ValueError, "variance_type must be one of"),
    (lambda d: _call(fastssl.ddpm_step, d, variance_type="learned_range"), ValueError, r"needs model_output of shape \(B, 2C"),
    (lambda d: _call(fastssl.ddpm_step, d, prediction_type="eps"), ValueError, "prediction_type must be one of"),
    (lambda d: _call(fastssl.ddpm_step, d, clip_range=0.0), ValueError, "clip_range must be a finite number > 0"),
    (lambda d: _call(fastssl.ddpm_step, d, generator=1, noise=torch.ones(2, 3, device=d)), ValueError, "either noise or generator"),
    (lambda d: _call(fastssl.ddpm_step, d, generator="seed"), TypeError, "generator must be None, an int seed"),
    (lambda d: _call(fastssl.ddpm_step, d, schedule="linear"), TypeError, "schedule must be a fastssl.NoiseSchedule"),
    (lambda d: fastssl.ddim_step(torch.ones(2, 3, device=d), 5, 0, torch.ones(2, 3, device=d), SCHEDULE, eta=-0.1), ValueError, "eta must be"),
    (lambda d: fastssl.ddim_step(torch.ones(2, 3, device=d), 5, None, torch.ones(2, 3, device=d), SCHEDULE), TypeError, "prev_t must be an int"),
    (lambda d: fastssl.q_sample(torch.ones(2, 3, device=d), 5, torch.ones(3, 3, device=d), SCHEDULE), ValueError, "noise has shape"),
    (lambda d: fastssl.q_sample(torch.ones(2, 3, device=d), torch.tensor([1, 2000]), torch.ones(2, 3, device=d), SCHEDULE), ValueError, "got 2000"),
    (lambda d: NoiseSchedule(torch.ones(2, 2)), ValueError, "1-D"),
    (lambda d: NoiseSchedule([0.1, 1.5]), ValueError, r"in \[0, 1\]"),
    (lambda d: NoiseSchedule.linear(0), ValueError, "num_timesteps must be an int >= 1"),
    (lambda d: fastssl.sample(lambda x, t, c: x, (2, 3), SCHEDULE, sampler="euler"), ValueError, "sampler must be one of"),
    (lambda d: fastssl.sample(lambda x, t, c: x, (2, 3), SCHEDULE, num_steps=2000), ValueError, "num_steps must be"),
    (lambda d: fastssl.sample(lambda x, t, c: x, (2, 3), SCHEDULE, eta=0.5), ValueError, "sampler='ddim'"),
    (lambda d: fastssl.sample(lambda x, t, c: x, (2, 3), SCHEDULE, guidance=1.0, cond=torch.ones(2)), ValueError, "needs uncond"),
])
def test_diffusion_rejects_bad_input(device, call, error, match):
    with pytest.raises(error, match=match):
        call(device)


def test_step_pred_x0_output_gradients(backend, device):
    """The schedulers' step also returns the (clamped) predicted x0; gradients flow through both outputs."""
    m, u, x, z = (v.double().requires_grad_() for v in _inputs(device, shape=(3, 7)))
    t = torch.tensor([2, 300, 999], device=device)
    spec = StepSpec("ddim", eta=0.5, prediction_type="sample", clip_sample=True, clip_range=1.2,
                    use_clipped_model_output=True, return_pred_x0=True, prev_offset=-25)

    def both(m, u, x, z):
        return apply_step(spec, m, t, x, SCHEDULE, noise=z, uncond_output=u, guidance=1.5)

    assert torch.autograd.gradcheck(both, (m, u, x, z))
    out, x0 = both(m, u, x, z)
    ref, ref_x0 = ddim_step_reference(m, t, t - 25, x, SCHEDULE, eta=0.5, noise=z, uncond_output=u, guidance=1.5,
                                      prediction_type="sample", clip_sample=True, clip_range=1.2,
                                      use_clipped_model_output=True)
    assert_close(out, ref)
    assert_close(x0, ref_x0)


@pytest.mark.parametrize("output, error, match", [
    (lambda x: x[:1], ValueError, r"at step 0 of 5 has shape \(1, 4\) but the step needs \(3, 4\)"),
    (lambda x: torch.cat([x, x[:1]]), ValueError, r"has shape \(4, 4\) but the step needs \(3, 4\)"),
    (lambda x: x.long(), TypeError, "at step 0 of 5 must be a floating-point tensor, got torch.int64"),
    (lambda x: x.tolist(), TypeError, "must be a floating-point tensor, got list"),
])
def test_sample_checks_every_model_output(backend, device, output, error, match):
    """A model output of the wrong shape or type is an error naming the step, never broadcast, truncated or
    read past its end (the kernel assumes valid input)."""
    with pytest.raises(error, match=match):
        fastssl.sample(lambda x, t, c: output(x), (3, 4), SCHEDULE, num_steps=5, generator=0, device=device,
                       progress=False)


def test_sample_with_guidance_needs_the_batched_output(backend, device):
    cond, uncond = torch.ones(2, device=device), torch.zeros(2, device=device)
    with pytest.raises(ValueError, match=r"has shape \(2, 4\) but the step needs \(4, 4\).*cond and uncond batched"):
        fastssl.sample(lambda x, t, c: x[:2], (2, 4), SCHEDULE, num_steps=3, guidance=1.0, cond=cond, uncond=uncond,
                       device=device, progress=False)


def test_step_spec_is_validated_once_and_travels_as_its_key():
    spec = StepSpec("ddim", prediction_type="v_prediction", clip_sample=True, clip_range=2, eta=1, prev_offset=-20,
                    final_alpha_cumprod=0.5, use_clipped_model_output=True, return_pred_x0=True)
    assert spec.clip_range == 2.0 and isinstance(spec.clip_range, float) and isinstance(spec.eta, float)
    assert StepSpec.from_key(spec.key) == spec
    with pytest.raises(ValueError, match="sampler must be one of"):
        StepSpec("euler")
    with pytest.raises(ValueError, match="sampler='ddim'"):
        StepSpec("ddpm", eta=0.5)
    with pytest.raises(TypeError, match="clip_sample must be True or False"):
        StepSpec("ddpm", clip_sample=1)
    with pytest.raises(ValueError, match="final_alpha_cumprod must be a finite number in"):
        StepSpec("ddim", final_alpha_cumprod=1.5)
    with pytest.raises(TypeError, match="clip_range must be a Python float, got list"):
        fastssl.ddpm_step(torch.ones(1, 2), 3, torch.ones(1, 2), SCHEDULE, clip_range=[1.0])


def test_sample_progress_bar(device, capsys):
    pytest.importorskip("tqdm")
    out = fastssl.sample(lambda x, t, c: 0.1 * x, (1, 4), NoiseSchedule.linear(10), sampler="ddim", num_steps=5,
                         eta=0.5, generator=1, device=device)
    assert out.shape == (1, 4) and "fastssl.sample (ddim)" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check: needs CUDA")
def test_cuda_steps_do_not_sync_and_a_sampling_loop_captures_in_a_graph():
    """No host synchronisation in the steps (sync debug mode 'error'), and a 50-step DDPM loop with fused
    guidance and in-kernel noise replays from a CUDA graph with the result of the eager loop."""
    s = NoiseSchedule.linear(1000).to("cuda")
    B, shape = 4, (4, 3, 16, 16)
    m, u, x = (torch.randn(shape, device="cuda") for _ in range(3))
    t = torch.randint(0, 1000, (B,), device="cuda")
    w = torch.rand(B, device="cuda") * 5
    gen = torch.Generator(device="cuda").manual_seed(0)
    fastssl.ddpm_step(m, t, x, s, uncond_output=u, guidance=w, generator=gen)  # warm-up: autotune, compile
    fastssl.ddim_step(m, t, t - 20, x, s, eta=0.5, generator=gen, uncond_output=u, guidance=1.5)
    fastssl.q_sample(x, t, m, s, return_v=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastssl.ddpm_step(m, t, x, s, uncond_output=u, guidance=w, generator=gen, prev_t=t - 10, clip_sample=True)
        fastssl.ddpm_step(m, 999, x, s, generator=3)
        fastssl.ddim_step(m, t, t - 20, x, s, eta=0.5, generator=gen, uncond_output=u, guidance=1.5)
        fastssl.q_sample(x, t, m, s, return_v=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)

    steps = torch.arange(999, -1, -20, device="cuda")  # 50 steps
    t_rows = steps[:, None].repeat(1, B)
    prev_rows = (steps - 20)[:, None].repeat(1, B)
    seeds = torch.arange(50, device="cuda", dtype=torch.long) * 7919
    weights = torch.full((1,), 2.0, device="cuda")
    spec = StepSpec("ddpm", clip_sample=True)
    model = lambda x, t: 0.1 * x + 1e-4 * t.float().reshape(-1, 1, 1, 1)  # noqa: E731

    def loop(x):
        for i in range(50):
            both = model(torch.cat([x, x]), torch.cat([t_rows[i], t_rows[i]]))
            c, un = both.chunk(2)
            x, _ = apply_step(spec, c, t_rows[i], x, s, prev_t=prev_rows[i], seed=seeds[i:i + 1], uncond_output=un,
                              guidance=weights)
        return x

    static_x = torch.randn(shape, device="cuda")
    eager = loop(static_x.clone())
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loop(static_x.clone())
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        static_out = loop(static_x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, eager, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Dynamic thresholding and learned variances (the drop-in schedulers' options), against float64 references
# ----------------------------------------------------------------------------------------------------

def _abar_pair(t, prev, like):
    table = SCHEDULE.alphas_cumprod.double().to(like.device)
    col = lambda v: v.reshape(-1, *([1] * (like.dim() - 1)))  # noqa: E731
    return col(table[t]), col(torch.where(prev >= 0, table[prev.clamp(min=0)], torch.ones_like(table[t])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_step_dynamic_thresholding_matches_reference(backend, device, dtype, prediction_type, sampler):
    """x0 = clamp(x0, -s, s) / s with s = clamp(quantile(|x0|, ratio), 1, max) per sample (Saharia et al. 2022),
    then the step as usual; guided, per-sample timesteps, explicit noise; one sample stays within 1 (s = 1)."""
    m, u, x, z = (3 * v for v in _inputs(device, dtype, shape=(3, 4, 9)))
    m[0], x[0] = m[0] / 100, x[0] / 100  # sample 0: |x0| < 1 where x0 is not scaled up by the schedule
    t = torch.tensor([0, 40, 700], device=device)
    prev = t - 20
    w = _guidance("per_sample", device, dtype)
    spec = StepSpec(sampler, prediction_type=prediction_type, thresholding=True, dynamic_thresholding_ratio=0.9,
                    sample_max_value=2.5, eta=0.5 if sampler == "ddim" else 0.0, return_pred_x0=True)
    out, x0 = apply_step(spec, m, t, x, SCHEDULE, prev_t=prev, noise=z, uncond_output=u, guidance=w)
    a_t, a_p = _abar_pair(t, prev, x)
    e = ((1 + w.double()[:, None, None]) * m.double() - w.double()[:, None, None] * u.double())
    xd = x.double()
    ref_x0, eps = {"epsilon": ((xd - (1 - a_t).sqrt() * e) / a_t.sqrt(), e),
                   "sample": (e, (xd - a_t.sqrt() * e) / (1 - a_t).sqrt()),
                   "v_prediction": (a_t.sqrt() * xd - (1 - a_t).sqrt() * e, a_t.sqrt() * e + (1 - a_t).sqrt() * xd)}[prediction_type]
    s = torch.quantile(ref_x0.abs().reshape(3, -1), 0.9, dim=1).clamp(1, 2.5).reshape(3, 1, 1)
    ref_x0 = torch.minimum(torch.maximum(ref_x0, -s), s) / s
    beta = 1 - a_t / a_p
    var = (1 - a_p) / (1 - a_t) * beta
    noisy = (t > 0).reshape(3, 1, 1)
    if sampler == "ddpm":
        ref = a_p.sqrt() * beta / (1 - a_t) * ref_x0 + (1 - beta).sqrt() * (1 - a_p) / (1 - a_t) * xd \
            + torch.where(noisy, var.clamp(min=1e-20).sqrt(), 0) * z.double()
    else:
        std = 0.5 * var.sqrt()
        ref = a_p.sqrt() * ref_x0 + (1 - a_p - std ** 2).sqrt() * eps + torch.where(noisy, std, 0) * z.double()
    assert (s[1:] > 1).all() and s[0] == 1  # the threshold is active where it should be
    _check(x0, ref_x0, None, dtype)
    _check(out, ref, None, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
@pytest.mark.parametrize("guided", [False, True])
def test_step_learned_variance_matches_reference(backend, device, dtype, variance_type, guided):
    """A (B, 2C, ...) model output: the mean from its first C channels (guided), each element's sigma from its
    last C: sqrt(v) (learned) or exp(((1 - f) log var + f log beta) / 2), f = (v + 1) / 2 (learned_range), as
    diffusers splits and computes them; no noise where t == 0."""
    x, z = (torch.randn(3, 3, 7, device=device, dtype=dtype) for _ in range(2))
    m, u = torch.randn(3, 6, 7, device=device, dtype=dtype), torch.randn(3, 6, 7, device=device, dtype=dtype)
    v = torch.rand(3, 3, 7, device=device, dtype=dtype) * (0.02 if variance_type == "learned" else 2) \
        - (0 if variance_type == "learned" else 1)
    m[:, 3:] = v
    t = torch.tensor([0, 5, 600], device=device)
    opts = dict(uncond_output=u, guidance=2.0) if guided else {}
    spec = StepSpec("ddpm", variance_type=variance_type, clip_sample=True, return_pred_x0=True, prev_offset=-1)
    out, x0 = apply_step(spec, m, t, x, SCHEDULE, noise=z, **opts)
    mean, ref_x0 = ddpm_step_reference(m[:, :3], t, x, SCHEDULE, uncond_output=u[:, :3] if guided else None,
                                       guidance=2.0 if guided else 0.0, clip_sample=True)
    a_t, a_p = _abar_pair(t, t - 1, x)
    beta = 1 - a_t / a_p
    var = ((1 - a_p) / (1 - a_t) * beta).clamp(min=1e-20)
    vd = v.double()
    frac = (vd + 1) / 2
    sigma = vd.sqrt() if variance_type == "learned" else torch.exp(0.5 * (frac * beta.log() + (1 - frac) * var.log()))
    ref = mean + torch.where((t > 0).reshape(3, 1, 1), sigma * z.double(), 0)
    _check(x0, ref_x0, None, dtype)
    _check(out, ref, None, dtype)
    if backend == "triton":  # in-kernel noise: the same Philox draw as a fixed_small step's, scaled per element
        fixed = StepSpec("ddpm", clip_sample=True, prev_offset=-1)
        plain, _ = apply_step(fixed, m[:, :3].contiguous(), t, x, SCHEDULE, generator=7, **({} if not guided else dict(
            uncond_output=u[:, :3].contiguous(), guidance=2.0)))
        drawn = (plain.double() - mean) / torch.where(var > 1e-20, var.sqrt(), 1)
        learned, _ = apply_step(spec, m, t, x, SCHEDULE, generator=7, **opts)
        expected = mean + torch.where((t > 0).reshape(3, 1, 1), sigma * drawn, 0)
        torch.testing.assert_close(learned.double(), expected, rtol=1e-4, atol=1e-5)


def test_thresholding_and_learned_variance_validate_and_have_no_backward(device):
    x = torch.randn(2, 3, 4, device=device)
    with pytest.raises(ValueError, match=r"needs model_output of shape \(B, 2C, ...\) = \(2, 6, 4\)"):
        apply_step(StepSpec("ddpm", variance_type="learned"), x, 5, x, SCHEDULE, noise=x)
    with pytest.raises(ValueError, match="variance_type='learned' is a DDPM option"):
        StepSpec("ddim", variance_type="learned")
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio must be a finite number in"):
        StepSpec("ddpm", thresholding=True, dynamic_thresholding_ratio=1.5)
    with pytest.raises(ValueError, match="sample_max_value must be a finite number > 0"):
        StepSpec("ddpm", thresholding=True, sample_max_value=0.0)
    m = torch.randn(2, 6, 4, device=device, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no backward"):
        apply_step(StepSpec("ddpm", variance_type="learned_range"), m, 5, x, SCHEDULE, noise=x)
    with pytest.raises(NotImplementedError, match="thresholding has no backward"):
        apply_step(StepSpec("ddpm", thresholding=True), x.requires_grad_(), 5, x.detach(), SCHEDULE, noise=x.detach())
    with torch.no_grad():
        assert apply_step(StepSpec("ddpm", variance_type="learned_range"), m, 5, x, SCHEDULE, noise=x)[0].shape == x.shape


@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_host_path_gives_the_op_paths_numbers(device, monkeypatch, sampler, clip_sample):
    """An eager CPU call with nothing to differentiate takes the PyTorch path directly (int timesteps stay
    ints, coefficients kept per timestep pair, c1 out of the clamp): bitwise the numbers of the same step
    through the custom op (a gradient to compute) and with tensor timesteps; q_sample likewise."""
    if device != "cpu":
        pytest.skip("the host path is the CPU's")
    monkeypatch.setenv("FASTSSL_BACKEND", "auto")
    s = NoiseSchedule.linear(1000)
    m, u, x, z = (torch.randn(3, 4, 5) * 2 for _ in range(4))
    for guided in (False, True):
        kw = dict(uncond_output=u, guidance=3.0) if guided else {}

        def step(model_output, t, prev):
            if sampler == "ddim":
                return fastssl.ddim_step(model_output, t, prev, x, s, eta=0.5, noise=z, clip_sample=clip_sample, **kw)
            return fastssl.ddpm_step(model_output, t, x, s, prev_t=prev, noise=z, clip_sample=clip_sample, **kw)
        for t, prev in ((500, 480), (7, -1), (0, -1)):
            host = step(m, t, prev)
            assert torch.equal(host, step(m, t, prev))  # the kept coefficients give the same numbers again
            assert torch.equal(host, step(m, torch.tensor(t), torch.tensor(prev)))
            assert torch.equal(host, step(m.clone().requires_grad_(), t, prev).detach())
    tv = torch.tensor([3, 999, 0])
    host = fastssl.q_sample(m, tv, z, s)
    assert torch.equal(host, fastssl.q_sample(m.clone().requires_grad_(), tv, z, s).detach())
    assert torch.equal(fastssl.q_sample(m[:1], 5, z[:1], s), fastssl.q_sample(m[:1], torch.tensor(5), z[:1], s))
