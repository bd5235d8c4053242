"""Diffusion slice benchmarks: memory-bound elementwise steps, reported in GB/s.

cfg_combine reads cond and uncond and writes the result: 3 element accesses (eager does 5). The steps'
counts are below (ACCESSES).
"""
import torch

from fastssl.benchmarks.harness import Case

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cfg_eager(cond, uncond, w):
    return (1 + w) * cond - w * uncond


def _cfg_case(provider: str, dtype: str, numel: int) -> Case:
    def make(device):
        import fastssl

        cond = torch.randn(numel // 4096 or 1, min(numel, 4096), device=device, dtype=DTYPES[dtype])
        uncond = torch.randn_like(cond)
        fn = {"fastssl": fastssl.cfg_combine, "torch": _cfg_eager, "compile": torch.compile(_cfg_eager)}[provider]
        return lambda: fn(cond, uncond, 7.5)

    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return Case("cfg_combine", provider, "fwd", dtype, {"numel": numel}, make, size=numel, bytes=3 * numel * elem)


def _small(preset: str) -> bool:
    return preset in ("quick", "cpu")


def cases(preset: str, device: str) -> list[Case]:
    if preset == "targets":
        return _step_cases(preset, device)
    sizes = [2**14, 2**20] if _small(preset) else [2**14, 2**20, 2**24, 2**26]
    dtypes = ["float32"] if _small(preset) and device == "cpu" else list(DTYPES)
    providers = ["fastssl", "torch"] + (["compile"] if preset != "quick" else [])
    return [_cfg_case(p, d, n) for d in dtypes for n in sizes for p in providers] + _step_cases(preset, device)


def test_case(benchmark, case):
    case.run_with(benchmark)


# ----------------------------------------------------------------------------------------------------
# q_sample and the sampler steps. Element accesses per element (GB/s counts these): q_sample 3 (x0, noise
# read; x_t written), ddpm_step 3 (model output, x_t read; x_prev written; the noise is drawn in the kernel on
# CUDA), ddpm_step_cfg 4 (+ the unconditional output), ddim_step (eta = 0) 3. Eager diffusers does ~30.
# Every provider draws its step noise itself, as a sampling loop does. Schedule: linear, 1000 steps; the
# step goes from t = 500 to 480 (50 inference steps), clip_sample on (diffusers' default).
# ----------------------------------------------------------------------------------------------------

STEP_T, STEP_PREV, CFG_W = 500, 480, 6.5  # CFG_W: the lecture's w (diffusers' guidance_scale 7.5)
ACCESSES = {"q_sample": 3, "ddpm_step": 3, "ddpm_step_cfg": 4, "ddim_step": 3}


def _shape(numel: int):
    rows = max(numel // 4096, 1)
    return rows, numel // rows


def _abar(device):
    import fastssl

    return fastssl.NoiseSchedule.linear(1000).to(device).alphas_cumprod


def _q_sample_eager(x0, noise, abar, t):  # gather, 2 sqrt, 2 views, 2 multiplies, 1 add: ~5 passes over the data
    a = abar[t].reshape(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _ddpm_eager(m, x, abar, u=None, w=0.0, t=STEP_T, prev=STEP_PREV):
    """The step as written from the math (clip on), materializing every intermediate: ~12 passes."""
    if u is not None:
        m = (1 + w) * m - w * u
    a_t, a_p = abar[t], abar[prev]
    beta = 1 - a_t / a_p
    x0 = ((x - (1 - a_t).sqrt() * m) / a_t.sqrt()).clamp(-1, 1)
    mean = a_p.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_p) / (1 - a_t) * x
    var = ((1 - a_p) / (1 - a_t) * beta).clamp(min=1e-20)
    return mean + var.sqrt() * torch.randn_like(x)


def _ddim_eager(m, x, abar, t=STEP_T, prev=STEP_PREV):
    a_t, a_p = abar[t], abar[prev]
    x0 = ((x - (1 - a_t).sqrt() * m) / a_t.sqrt()).clamp(-1, 1)
    return a_p.sqrt() * x0 + (1 - a_p).sqrt() * m


def _step_case(op: str, provider: str, dtype: str, numel: int) -> Case:
    def make(device):
        import fastssl

        dt = DTYPES[dtype]
        shape = _shape(numel)
        m, u, x = (torch.randn(shape, device=device, dtype=dt) for _ in range(3))
        abar = _abar(device)
        schedule = fastssl.NoiseSchedule.linear(1000).to(device)
        t_vec = torch.randint(0, 1000, (shape[0],), device=device)
        if op == "q_sample":
            if provider == "fastssl":
                return lambda: fastssl.q_sample(m, t_vec, u, schedule)
            if provider == "diffusers":
                from diffusers import DDPMScheduler

                scheduler = DDPMScheduler()
                return lambda: scheduler.add_noise(m, u, t_vec)
            fn = _q_sample_eager if provider == "torch" else torch.compile(_q_sample_eager)
            return lambda: fn(m, u, abar, t_vec)
        cfg = op == "ddpm_step_cfg"
        if provider == "fastssl":
            if op == "ddim_step":
                return lambda: fastssl.ddim_step(m, STEP_T, STEP_PREV, x, schedule, clip_sample=True)
            kw = dict(uncond_output=u, guidance=CFG_W) if cfg else {}
            return lambda: fastssl.ddpm_step(m, STEP_T, x, schedule, prev_t=STEP_PREV, clip_sample=True, **kw)
        if provider == "diffusers":  # its step plus eager CFG (pipelines' noise_uncond + scale * (cond - uncond))
            from diffusers import DDIMScheduler, DDPMScheduler

            scheduler = DDIMScheduler() if op == "ddim_step" else DDPMScheduler()
            scheduler.set_timesteps(50)
            if cfg:
                return lambda: scheduler.step(u + (1 + CFG_W) * (m - u), STEP_T, x).prev_sample
            return lambda: scheduler.step(m, STEP_T, x).prev_sample
        if op == "ddim_step":
            fn = _ddim_eager if provider == "torch" else torch.compile(_ddim_eager)
            return lambda: fn(m, x, abar)
        fn = _ddpm_eager if provider == "torch" else torch.compile(_ddpm_eager)
        return (lambda: fn(m, x, abar, u, CFG_W)) if cfg else (lambda: fn(m, x, abar))

    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return Case(op, provider, "fwd", dtype, {"numel": numel}, make, size=numel, bytes=ACCESSES[op] * numel * elem)


def _step_cases(preset: str, device: str) -> list[Case]:
    from fastssl.benchmarks.harness import have

    diffusers = ["diffusers"] if have("diffusers") else []
    if preset == "targets":
        if device != "cuda":  # GUIDE §6's diffusion targets are GPU targets
            return []
        # GUIDE §6: the guided step at 64M elements against the copy ceiling (and eager), and against
        # diffusers' step plus eager CFG at a latent size (1M elements: 16 SDXL latents of 4 x 128 x 128)
        return ([_step_case("ddpm_step_cfg", p, d, 2**26) for d in ("bfloat16", "float32") for p in ("fastssl", "torch")]
                + [_step_case("ddpm_step_cfg", p, "bfloat16", 2**20) for p in ["fastssl"] + diffusers])
    sizes = [2**14, 2**20] if _small(preset) else [2**14, 2**20, 2**24, 2**26]
    dtypes = ["float32"] if _small(preset) and device == "cpu" else list(DTYPES)
    providers = ["fastssl", "torch", "compile"] + diffusers
    if _small(preset) and device == "cpu":  # the CPU presets skip torch.compile (its compile time
        providers = [p for p in providers if p != "compile"]  # dominates a case; the full preset has it)
    return [_step_case(op, p, d, n) for op in ACCESSES for d in dtypes for n in sizes for p in providers]
