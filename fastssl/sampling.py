"""The whole reverse diffusion loop: x_T ~ N(0, I), then ``num_steps`` fused steps to x_0.

The step's configuration (:class:`fastssl.diffusion_step.StepSpec`) is built and validated once per loop;
timesteps, the guidance weights and the noise seeds are prepared on the device before the loop, so the
loop itself has no host synchronisation. Each model output is checked (metadata only) before its step.

>>> import torch, fastssl
>>> model = lambda x, t, cond: torch.zeros_like(x)
>>> fastssl.sample(model, (1, 2), fastssl.NoiseSchedule.linear(10), progress=False, generator=0).shape
torch.Size([1, 2])
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .backend import use_triton
from .checks import check_guidance, check_int
from .diffusion_step import StepSpec, apply_step, check_generator, guidance_tensor, philox_seeds, torch_noise
from .schedules import NoiseSchedule, check_schedule


def _sampling_timesteps(T: int, num_steps: int, device) -> tuple[Tensor, Tensor]:
    """diffusers' default ("leading", steps_offset 0) spacing: t_k = k * (T // num_steps), descending; the
    step after the last is -1 (abar = 1). Built on the device: a copy from the host would synchronise."""
    ratio = T // num_steps
    ts = torch.arange(num_steps - 1, -1, -1, dtype=torch.long, device=device) * ratio
    return ts, (ts - ratio).clamp(min=-1)


def _model_device_dtype(model, cond):
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            if p.is_floating_point():
                return p.device, p.dtype
    if isinstance(cond, Tensor):
        return cond.device, cond.dtype if cond.is_floating_point() else torch.float32
    return torch.device("cpu"), torch.float32


def sample(model, shape, schedule: NoiseSchedule, *, num_steps: Optional[int] = None, sampler: str = "ddpm",
           eta: float = 0.0, cond=None, uncond=None, guidance=0.0, generator=None, progress: bool = True,
           device=None, dtype: Optional[torch.dtype] = None, prediction_type: str = "epsilon",
           variance_type: str = "fixed_small", clip_sample: bool = False, clip_range: float = 1.0) -> Tensor:
    """The whole reverse diffusion loop: x_T ~ N(0, I), then ``num_steps`` fused steps to x_0.

    ``sampler="ddpm"``: Algorithm 2 over all T steps (``num_steps=None``) or over diffusers' "leading"
    strided subset t_k = k * (T // num_steps) with prev_t the next one (-1 after the last).
    ``sampler="ddim"``: DDIM over the same subset (``num_steps=None``: all T steps) with noise weight
    ``eta``. Each step calls ``model(x, t, cond)`` with ``t`` a LongTensor ``(B,)``; with guidance, cond
    and uncond are evaluated in one batched call, ``model(cat([x, x]), cat([t, t]), cat([cond, uncond]))``,
    and the two halves are combined inside the step kernel. All timesteps, guidance tables and noise
    seeds are prepared on the device before the loop, so the loop itself has no host synchronisation (on
    CUDA it can be captured in a CUDA graph when the model can).

    Args:
        model: a callable ``model(x, t, cond) -> prediction`` (epsilon, x0 or v, see prediction_type): a
            floating tensor of x's shape on x's device (another floating dtype is cast to ``dtype``).
        shape: the sample shape ``(B, ...)``.
        schedule: the :class:`NoiseSchedule` the model was trained with.
        num_steps: the number of steps (default: all T); at most T.
        sampler: ``"ddpm"`` or ``"ddim"``.
        eta: DDIM's noise weight (must be 0 for ddpm).
        cond: the conditioning passed to the model (a tensor with batch B, or anything when guidance is 0).
        uncond: the unconditional conditioning (e.g. the null label), batch B; needed when guidance != 0.
        guidance: w (diffusers' guidance_scale - 1), a float or a ``(B,)`` tensor.
        generator: None, an int seed or a torch.Generator: the initial noise and every step's noise.
        progress: show a tqdm bar (when tqdm is installed).
        device, dtype: of the samples; default the model's first floating parameter's (else cond's, else
            CPU float32).
        prediction_type, variance_type, clip_sample, clip_range: as in :func:`ddpm_step`.

    Returns:
        x_0, a tensor of ``shape`` in ``dtype``.

    Raises:
        ValueError: a bad sampler, num_steps, eta, guidance without uncond, cond/uncond batch mismatch; a
            model output of the wrong shape or device (naming the step and the shapes).
        TypeError: a shape that is not a sequence of ints; a model output that is not a floating tensor.

    >>> import torch, fastssl
    >>> s = fastssl.NoiseSchedule.linear(100)
    >>> model = lambda x, t, cond: torch.zeros_like(x)
    >>> fastssl.sample(model, (2, 3), s, num_steps=10, sampler="ddim", generator=0, progress=False).shape
    torch.Size([2, 3])
    """
    check_schedule(schedule)
    spec = StepSpec(sampler, prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip_sample,
                    clip_range=clip_range, eta=eta)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from exc
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, ...) with positive sizes, got {shape}")
    T = schedule.num_timesteps
    num_steps = check_int("num_steps", T if num_steps is None else num_steps, low=1, high=T)
    check_generator(generator, None)
    dev, dt = _model_device_dtype(model, cond)
    device = torch.device(device) if device is not None else dev
    like = torch.empty(shape, dtype=dtype or dt, device=device)
    B = shape[0]
    guidance = check_guidance("guidance", guidance, like, "the samples")
    guided = isinstance(guidance, Tensor) or guidance != 0
    if guided:
        if uncond is None:
            raise ValueError("guidance != 0 needs uncond (the unconditional conditioning)")
        if not isinstance(cond, Tensor) or not isinstance(uncond, Tensor) or cond.shape[0] != B or uncond.shape[0] != B:
            raise ValueError(f"with guidance, cond and uncond must be tensors with batch {B}, got "
                             f"{getattr(cond, 'shape', type(cond).__name__)} and {getattr(uncond, 'shape', type(uncond).__name__)}")
    weights = guidance_tensor(guidance, like if guided else None, like)  # once, on the device
    if weights is not None and not isinstance(guidance, Tensor):
        weights = weights.reshape(())  # one weight for the batch
    if isinstance(generator, numbers.Integral):
        generator = torch.Generator(device=device).manual_seed(int(generator))
    x = torch_noise(generator, like)

    ts, prevs = _sampling_timesteps(T, num_steps, device)
    t_model = ts[:, None].repeat(1, 2 * B if guided else B)  # (S, B or 2B): row i is step i's timesteps for the model
    model_cond = torch.cat([cond, uncond]) if guided else cond
    triton = use_triton(like)
    seeds = philox_seeds(generator, num_steps, device) if spec.draws_noise and triton else None
    expected = (2 * B, *shape[1:]) if guided else shape
    for i in _progress(range(num_steps), progress, f"fastssl.sample ({sampler})"):
        output = _checked_output(model(torch.cat([x, x]) if guided else x, t_model[i], model_cond), expected, like,
                                 i, num_steps)
        m, u = output.chunk(2) if guided else (output, None)
        noise = torch_noise(generator, like) if spec.draws_noise and not triton else None
        x, _ = apply_step(spec, m, ts[i], x, schedule, prev_t=prevs[i], noise=noise,
                          seed=None if seeds is None else seeds[i:i + 1], uncond_output=u,
                          guidance=weights if guided else 0.0)
    return x


def _checked_output(output, expected: tuple, like: Tensor, step: int, num_steps: int) -> Tensor:
    """The model's output at ``step``, checked by metadata only (no host sync), cast to the samples' dtype."""
    where = f"at step {step} of {num_steps}"
    if not isinstance(output, Tensor) or not output.is_floating_point():
        got = output.dtype if isinstance(output, Tensor) else type(output).__name__
        raise TypeError(f"the model's output {where} must be a floating-point tensor, got {got}")
    if output.device != like.device:
        raise ValueError(f"the model's output {where} is on {output.device} but the samples are on {like.device}")
    if tuple(output.shape) != expected:
        raise ValueError(f"the model's output {where} has shape {tuple(output.shape)} but the step needs {expected} "
                         f"(the shape of its input x{', cond and uncond batched' if expected[0] != like.shape[0] else ''})")
    return output.to(like.dtype)


def _progress(steps, progress: bool, desc: str):
    """``steps`` with a tqdm bar when ``progress`` and tqdm is installed."""
    if progress:
        try:
            from tqdm.auto import tqdm

            return tqdm(steps, desc=desc, total=len(steps))
        except ImportError:
            pass
    return steps
