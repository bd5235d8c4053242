"""Diffusion ops: noise schedules, forward noising, DDPM/DDIM steps with classifier-free guidance fused
in, and the whole reverse sampling loop (Ho et al. 2020, Algorithms 1 and 2; Song et al. 2021, DDIM; Ho &
Salimans 2022, classifier-free guidance).

Each op is a ``torch.library.custom_op`` (so ``torch.compile(fullgraph=True)`` traces through it) whose
body asks :func:`fastssl.backend.use_triton` which path runs: the Triton kernels of
``fastssl.kernels.diffusion`` or the PyTorch path beside them. ``*_reference`` functions are the float64
formulas the tests compare against.

Timesteps never cause a host synchronisation: an int ``t`` becomes a one-element view of a device
``arange`` kept by the schedule (no launch, no copy), a LongTensor ``t`` is read by the kernel, which
gathers the schedule's coefficients itself. Range checks of timestep *values* happen only for CPU tensors
(and Python ints); on CUDA an out-of-range timestep yields NaN in the output instead of a sync.

Noise of the steps (when ``noise`` is not given), Triton path: drawn in the kernel by Philox,
``tl.randn(seed, i)``'s draw (its Box-Muller cosine replaced by one for an argument already in [0, 2 pi),
within ~1e-6 of it) with ``i`` the element's global (int64) index in the contiguous tensor, so it does
not depend on the block size or the grid. ``seed`` is an int64 on the device: ``generator=int`` uses that
int; a ``torch.Generator`` draws it with ``torch.randint(0, 2**62, (1,), generator=generator,
device=generator.device)`` (moved to the tensors' device if the generator lives elsewhere) so the
generator advances and each call gets fresh noise, without a host sync; ``None`` draws it from the
device's default generator the same way. PyTorch path: ``torch.randn(shape, generator=generator,
dtype=x.dtype)`` on the generator's device (an int seeds a fresh ``torch.Generator``), exactly what
diffusers' ``randn_tensor`` draws, so with the same generator the PyTorch path reproduces diffusers'
samples. The two paths draw different (equally distributed) noise.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .backend import use_triton
from .checks import accumulation_dtype, check_choice, check_float, check_positive, check_same, check_same_shape


# ----------------------------------------------------------------------------------------------------
# cfg_combine: the op pattern every slice copies (custom op + fake + autograd, two paths, validation)
# ----------------------------------------------------------------------------------------------------

def cfg_combine_reference(cond: Tensor, uncond: Tensor, guidance, *, upcast: bool = True) -> Tensor:
    """(1 + w) * cond - w * uncond, literally (float64 when ``upcast``); w broadcast per sample."""
    dtype = torch.float64 if upcast else cond.dtype
    w = guidance
    if isinstance(w, Tensor):
        w = w.to(dtype).reshape(-1, *([1] * (cond.dim() - 1)))
    return (1 + w) * cond.to(dtype) - w * uncond.to(dtype)


def _per_sample_view(w: Tensor, like: Tensor) -> Tensor:
    return w.to(accumulation_dtype(like.dtype)).reshape(-1, *([1] * (like.dim() - 1)))


def _cfg_combine_torch(cond: Tensor, uncond: Tensor, guidance: float, per_sample: Optional[Tensor]) -> Tensor:
    if per_sample is None:  # one fused pass (lerp computes in float32 for half types): 3 accesses
        return torch.lerp(uncond, cond, 1.0 + guidance).contiguous()
    # Per-sample weights: upcast copies of both inputs, 3 passes (weights stay in float32).
    acc = accumulation_dtype(cond.dtype)
    w = guidance if per_sample is None else _per_sample_view(per_sample, cond)
    c = cond.to(acc)
    return (c + w * (c - uncond.to(acc))).to(cond.dtype)


@torch.library.custom_op("fastssl::cfg_combine", mutates_args=())
def _cfg_combine_op(cond: Tensor, uncond: Tensor, guidance: float, per_sample: Optional[Tensor]) -> Tensor:
    if use_triton(cond):
        from .kernels.diffusion import cfg_combine_forward

        return cfg_combine_forward(cond, uncond, guidance, per_sample)
    return _cfg_combine_torch(cond, uncond, guidance, per_sample)


@_cfg_combine_op.register_fake
def _(cond, uncond, guidance, per_sample):
    return torch.empty_like(cond, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastssl::cfg_combine_backward", mutates_args=())
def _cfg_combine_backward_op(grad: Tensor, guidance: float, per_sample: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    if use_triton(grad):
        from .kernels.diffusion import cfg_combine_backward

        return cfg_combine_backward(grad, guidance, per_sample)
    acc = accumulation_dtype(grad.dtype)
    w = guidance if per_sample is None else _per_sample_view(per_sample, grad)
    g = grad.to(acc)
    return ((1 + w) * g).to(grad.dtype), (-w * g).to(grad.dtype)


@_cfg_combine_backward_op.register_fake
def _(grad, guidance, per_sample):
    like = torch.empty_like(grad, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like)


def _cfg_combine_setup(ctx, inputs, output):
    cond, uncond, guidance, per_sample = inputs
    ctx.guidance = guidance
    needs_w_grad = per_sample is not None and per_sample.requires_grad
    ctx.save_for_backward(per_sample, cond if needs_w_grad else None, uncond if needs_w_grad else None)


def _cfg_combine_backward(ctx, grad):
    per_sample, cond, uncond = ctx.saved_tensors
    grad_cond, grad_uncond = _cfg_combine_backward_op(grad, ctx.guidance, per_sample)
    grad_w = None
    if cond is not None:  # d out / d w = cond - uncond, summed over each sample's elements
        acc = accumulation_dtype(grad.dtype)
        prod = grad.to(acc) * (cond.to(acc) - uncond.to(acc))
        grad_w = prod.sum() if per_sample.dim() == 0 else prod.reshape(prod.shape[0], -1).sum(1)
        grad_w = grad_w.reshape(per_sample.shape).to(per_sample.dtype)
    return grad_cond, grad_uncond, None, grad_w


_cfg_combine_op.register_autograd(_cfg_combine_backward, setup_context=_cfg_combine_setup)


def cfg_combine(cond: Tensor, uncond: Tensor, guidance) -> Tensor:
    """Classifier-free guidance: ``(1 + w) * cond - w * uncond`` (the lecture's w; diffusers'
    ``guidance_scale`` is 1 + w), fused into one pass over memory.

    Args:
        cond: the conditional model output, any shape ``(B, ...)``, float32/16, bfloat16 or float64.
        uncond: the unconditional output, same shape, dtype and device.
        guidance: w, a Python float, a 0-dim tensor, or a ``(B,)`` tensor of one weight per sample.
            A tensor ``guidance`` that requires grad receives ``sum((cond - uncond) * grad)`` per sample.

    Returns:
        A tensor like ``cond`` (contiguous, same dtype); math in float32 (float64 for float64).

    Raises:
        TypeError: non-tensor or non-float inputs, mixed dtypes, a guidance that is neither a number
            nor a tensor.
        ValueError: shapes or devices that differ, a 0-dim ``cond``, a ``(B,)`` guidance of the wrong length.

    >>> import torch, fastssl
    >>> cond, uncond = torch.ones(2, 3), torch.zeros(2, 3)
    >>> fastssl.cfg_combine(cond, uncond, 2.0)[0]
    tensor([3., 3., 3.])
    """
    check_float("cond", cond)
    check_float("uncond", uncond)
    check_same(("cond", "uncond"), (cond, uncond))
    check_same_shape(("cond", "uncond"), (cond, uncond))
    if cond.dim() == 0:
        raise ValueError("cond must have a batch dimension (B, ...), got a 0-dim tensor")
    if isinstance(guidance, Tensor):
        check_float("guidance", guidance)
        check_same(("cond", "guidance"), (cond, guidance), dtype=False)
        if guidance.dim() > 1 or (guidance.dim() == 1 and guidance.shape[0] != cond.shape[0]):
            raise ValueError(
                f"guidance must be a float, a 0-dim tensor or a ({cond.shape[0]},) tensor (one weight per sample "
                f"of cond), got shape {tuple(guidance.shape)}"
            )
        return _cfg_combine_op(cond, uncond, 0.0, guidance)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise TypeError(f"guidance must be a float or a tensor, got {type(guidance).__name__}")
    return _cfg_combine_op(cond, uncond, float(guidance), None)


# ----------------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------------

class NoiseSchedule:
    """A discrete diffusion noise schedule: ``betas``, ``alphas = 1 - betas`` and ``alphas_cumprod``
    (abar_t, the product of alphas up to t), built in float64 and kept as float32 tensors.

    Construct it from any 1-D ``betas`` (a tensor, list or array with values in [0, 1]), or with the
    class methods :meth:`linear`, :meth:`scaled_linear` and :meth:`cosine`, which equal diffusers'
    ``linear``, ``scaled_linear`` and ``squaredcos_cap_v2`` schedules (built in float64 before the
    float32 rounding, so abar is closer to the exact product than diffusers' float32 cumprod, within
    ~1e-6 relative of it). :meth:`to` returns the schedule on another device; the ops also accept a
    schedule on another device than their tensors and keep a moved copy for each device they see.

    Args:
        betas: the per-step noise variances, 1-D, non-empty, finite, in [0, 1].

    Raises:
        ValueError: betas that are not 1-D, empty, non-finite or outside [0, 1].
        TypeError: betas that are not numbers.

    >>> import fastssl
    >>> s = fastssl.NoiseSchedule.linear(1000)
    >>> s.num_timesteps, s.betas.dtype, round(float(s.alphas_cumprod[-1]), 6)
    (1000, torch.float32, 4e-05)
    >>> fastssl.NoiseSchedule([0.1, 0.2]).alphas_cumprod
    tensor([0.9000, 0.7200])
    """

    def __init__(self, betas):
        try:
            betas64 = torch.as_tensor(betas).detach().to("cpu", torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"betas must be a 1-D tensor, list or array of numbers, got {type(betas).__name__}") from exc
        if betas64.dim() != 1 or betas64.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas64.shape)}")
        if not torch.isfinite(betas64).all() or (betas64 < 0).any() or (betas64 > 1).any():
            raise ValueError(f"betas must be finite and in [0, 1], got min {betas64.min().item()} max {betas64.max().item()}")
        alphas64 = 1.0 - betas64
        self.betas = betas64.float()
        self.alphas = alphas64.float()
        self.alphas_cumprod = torch.cumprod(alphas64, 0).float()
        self.num_timesteps = betas64.numel()
        self._steps = torch.arange(-1, self.num_timesteps, dtype=torch.long)  # int t -> _steps[t + 1], a view
        self._moved = {}

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """betas evenly spaced from ``beta_start`` to ``beta_end`` (DDPM's schedule; diffusers' ``linear``)."""
        _check_schedule_args(num_timesteps, beta_start, beta_end)
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """sqrt(betas) evenly spaced (latent diffusion's schedule; diffusers' ``scaled_linear``)."""
        _check_schedule_args(num_timesteps, beta_start, beta_end)
        return cls(torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal's cosine schedule: abar(u) = cos((u + s) / (1 + s) * pi / 2)^2 for u = t / T,
        beta_t = min(1 - abar((t + 1) / T) / abar(t / T), max_beta) (diffusers' ``squaredcos_cap_v2``)."""
        _check_schedule_args(num_timesteps, 0.0, 0.0)
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise ValueError(f"s must be a float in [0, 1), got {s!r}")
        if isinstance(max_beta, bool) or not isinstance(max_beta, (int, float)) or not 0 < max_beta <= 1:
            raise ValueError(f"max_beta must be a float in (0, 1], got {max_beta!r}")

        def abar(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        T = num_timesteps
        return cls([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)])

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device) -> "NoiseSchedule":
        """This schedule with its tables on ``device`` (a new object; ``self`` is unchanged)."""
        device = torch.device(device)
        new = object.__new__(NoiseSchedule)
        new.betas, new.alphas, new.alphas_cumprod, new._steps = (
            x.to(device) for x in (self.betas, self.alphas, self.alphas_cumprod, self._steps))
        new.num_timesteps, new._moved = self.num_timesteps, {}
        return new

    def _on(self, device: torch.device) -> "NoiseSchedule":
        """The schedule on ``device``: self, or a copy made once and kept."""
        if self.device == device:
            return self
        key = str(device)
        if key not in self._moved:
            self._moved[key] = self.to(device)
        return self._moved[key]

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_timesteps={self.num_timesteps}, device={self.device})"


def _check_schedule_args(num_timesteps, beta_start, beta_end):
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, numbers.Integral) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")


# ----------------------------------------------------------------------------------------------------
# Shared argument handling: timesteps, guidance, noise
# ----------------------------------------------------------------------------------------------------

def _check_schedule(schedule):
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a fastssl.NoiseSchedule, got {type(schedule).__name__}")


def _timesteps(name: str, t, schedule: NoiseSchedule, batch: int, device, *, allow_negative: bool = False) -> Tensor:
    """``t`` as an int64 device tensor of shape (1,) (one timestep for all) or (batch,), without a sync.

    Ints are checked here; tensor values only when they are on the CPU. With ``allow_negative`` (prev_t),
    values below 0 mean "before the first step" (abar = 1) and an int below 0 becomes -1."""
    T = schedule.num_timesteps
    low = "any negative int" if allow_negative else "0"
    if isinstance(t, numbers.Integral) and not isinstance(t, bool):
        t = int(t)
        if t >= T or (t < 0 and not allow_negative):
            raise ValueError(f"{name} must be in [{low}, {T - 1}] for this {T}-step schedule, got {t}")
        return schedule._on(torch.device(device))._steps[max(t, -1) + 1:max(t, -1) + 2]
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int or a LongTensor of shape ({batch},), got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {t.dtype}")
    if t.device != device and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but the samples are on {device}; move it to one device")
    if not (t.dim() == 0 or (t.dim() == 1 and t.shape[0] == batch)):
        raise ValueError(f"{name} must be an int, a 0-dim tensor or a ({batch},) tensor (one timestep per sample), "
                         f"got shape {tuple(t.shape)}")
    if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():  # eager CPU only: no sync
        values = t.reshape(-1).tolist() if t.numel() <= _SMALL_BATCH else [int(t.min()), int(t.max())]
        bad = [v for v in values if v >= T or (v < 0 and not allow_negative)]
        if bad:
            raise ValueError(f"{name} must be in [{low}, {T - 1}] for this {T}-step schedule, got {bad[0]}")
    return t.reshape(1).long() if t.dim() == 0 else t.long()


def _guidance_args(guidance, uncond_output, like: Tensor, name: str = "guidance"):
    """(w table or None, w_add): a float guidance is passed as a kernel scalar, a tensor as a table."""
    if isinstance(guidance, Tensor):
        check_float(name, guidance)
        check_same(("model_output", name), (like, guidance), dtype=False)
        if guidance.dim() > 1 or (guidance.dim() == 1 and guidance.shape[0] != like.shape[0]):
            raise ValueError(f"{name} must be a float, a 0-dim tensor or a ({like.shape[0]},) tensor (one weight per "
                             f"sample), got shape {tuple(guidance.shape)}")
        if uncond_output is None:
            raise ValueError(f"{name} is a tensor but uncond_output is None: guidance needs the unconditional output")
        return guidance.to(accumulation_dtype(like.dtype)).reshape(-1), 0.0
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(guidance).__name__}")
    if guidance != 0 and uncond_output is None:
        raise ValueError(f"{name}={guidance} needs uncond_output (classifier-free guidance combines the conditional "
                         "model_output with the unconditional one)")
    return None, float(guidance)


def _check_generator(generator, noise):
    if generator is not None and not isinstance(generator, torch.Generator) and (
            isinstance(generator, bool) or not isinstance(generator, numbers.Integral)):
        raise TypeError(f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}")
    if isinstance(generator, numbers.Integral) and not -2**63 <= int(generator) < 2**63:
        raise ValueError(f"generator as an int seed must fit in int64, got {generator}")
    if generator is not None and noise is not None:
        raise ValueError("pass either noise or generator, not both (noise is used as given)")


def _philox_seed(generator, device) -> Tensor:
    """The int64 (1,) device tensor the kernel seeds Philox with (module docstring); no host sync."""
    if isinstance(generator, torch.Generator):
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device, dtype=torch.long)
        return seed.to(device, non_blocking=True)
    if generator is None:
        return torch.randint(0, 2**62, (1,), device=device, dtype=torch.long)
    return torch.full((1,), int(generator), dtype=torch.long, device=device)


def _torch_noise(generator, like: Tensor) -> Tensor:
    """Standard normal noise like ``like`` drawn as diffusers' ``randn_tensor`` draws it."""
    if generator is None:
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator(device=like.device).manual_seed(int(generator))
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)


def _plain_eager(*tensors) -> bool:
    """Eager mode with nothing to differentiate: the PyTorch path may skip the custom op's dispatch (~40 us
    a call, which dominates latent-sized steps on the CPU); compiled or differentiated calls go through it."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def _axpy(out: Tensor, t: Tensor, c) -> Tensor:
    """out += c * t in place, one pass; c a float or a broadcastable tensor."""
    return out.add_(t, alpha=c) if isinstance(c, float) else out.addcmul_(t, c)


def _row_view(c: Tensor, like: Tensor) -> Tensor:
    """A per-sample vector (1,) or (B,) as (B or 1, 1, ..., 1) to broadcast against ``like``."""
    return c.reshape(-1, *([1] * (like.dim() - 1)))


def _gather_abar_torch(abar: Tensor, t: Tensor, below: float) -> Tensor:
    """abar[t] in float64 as the kernel gathers it: ``below`` where t < 0, NaN where t >= len(abar)."""
    T = abar.numel()
    values = abar.double().index_select(0, t.clamp(0, T - 1))
    values = torch.where(t < T, values, torch.full_like(values, float("nan")))
    return torch.where(t < 0, torch.full_like(values, below), values)


# ----------------------------------------------------------------------------------------------------
# q_sample: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (and the v target), differentiable
# ----------------------------------------------------------------------------------------------------

def q_sample_reference(x0: Tensor, t, noise: Tensor, schedule: NoiseSchedule, *, return_v: bool = False,
                       upcast: bool = True):
    """sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise literally (float64 when ``upcast``); with
    ``return_v`` also v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0."""
    dtype = torch.float64 if upcast else x0.dtype
    t = torch.as_tensor(t, device=x0.device).reshape(-1)
    abar = _row_view(schedule._on(x0.device).alphas_cumprod.double()[t], x0).to(dtype)
    a, b = abar.sqrt(), (1 - abar).sqrt()
    out = a * x0.to(dtype) + b * noise.to(dtype)
    return (out, a * noise.to(dtype) - b * x0.to(dtype)) if return_v else out


def _q_coefficients(abar: Tensor, t: Tensor, like: Tensor):
    """(sqrt(abar_t), sqrt(1 - abar_t)) as (B, 1, ..., 1) tensors in the math dtype."""
    acc = accumulation_dtype(like.dtype)
    a64 = _gather_abar_torch(abar, t, float("nan"))
    both = torch.stack([a64.sqrt(), (1 - a64).sqrt()]).to(acc)
    a, b = both.reshape(2, -1, *([1] * (like.dim() - 1))).unbind(0)
    return a, b


def _q_sample_torch(x0: Tensor, noise: Tensor, t: Tensor, abar: Tensor, return_v: bool):
    acc = accumulation_dtype(x0.dtype)
    if _host_math(abar, t):  # eager CPU (t range-checked): gather from the cached float64-derived sqrt table
        if t.numel() == 1:
            a, b = _host_q_table(abar, torch.float64)[:, int(t.reshape(()))].tolist()  # Python floats
        else:
            a, b = _host_q_table(abar, acc).index_select(1, t).reshape(2, -1, *([1] * (x0.dim() - 1))).unbind(0)
    else:
        a, b = _q_coefficients(abar, t, x0)
    x, z = _to(x0, acc), _to(noise, acc)
    out = _to(_axpy(torch.mul(x, a), z, b), x0.dtype).contiguous()  # a copy only for non-contiguous inputs
    v = _to(_axpy(torch.mul(z, a), x, -b), x0.dtype).contiguous() if return_v else x0.new_empty(0)
    return out, v


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


@torch.library.custom_op("fastssl::q_sample", mutates_args=())
def _q_sample_op(x0: Tensor, noise: Tensor, t: Tensor, abar: Tensor, return_v: bool) -> tuple[Tensor, Tensor]:
    if use_triton(x0):
        from .kernels.diffusion import q_sample_forward

        return q_sample_forward(x0, noise, t, abar, return_v)
    return _q_sample_torch(x0, noise, t, abar, return_v)


@_q_sample_op.register_fake
def _(x0, noise, t, abar, return_v):
    out = torch.empty_like(x0, memory_format=torch.contiguous_format)
    return out, (torch.empty_like(out) if return_v else x0.new_empty(0))


@torch.library.custom_op("fastssl::q_sample_backward", mutates_args=())
def _q_sample_backward_op(grad: Tensor, grad_v: Optional[Tensor], t: Tensor, abar: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton(grad):
        from .kernels.diffusion import q_sample_backward

        return q_sample_backward(grad, grad_v, t, abar)
    a, b = _q_coefficients(abar, t, grad)
    g = grad.to(a.dtype)
    grad_x0, grad_noise = torch.mul(g, a), torch.mul(g, b)
    if grad_v is not None:
        gv = grad_v.to(a.dtype)
        grad_x0.addcmul_(gv, b, value=-1)
        grad_noise.addcmul_(gv, a)
    return grad_x0.to(grad.dtype).contiguous(), grad_noise.to(grad.dtype).contiguous()


@_q_sample_backward_op.register_fake
def _(grad, grad_v, t, abar):
    out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out)


def _q_sample_setup(ctx, inputs, output):
    x0, noise, t, abar, return_v = inputs
    ctx.return_v = return_v
    ctx.save_for_backward(t, abar)


def _q_sample_backward(ctx, grad, grad_v):
    t, abar = ctx.saved_tensors
    grad_x0, grad_noise = _q_sample_backward_op(grad, grad_v if ctx.return_v else None, t, abar)
    return grad_x0, grad_noise, None, None, None


_q_sample_op.register_autograd(_q_sample_backward, setup_context=_q_sample_setup)


def q_sample(x0: Tensor, t, noise: Tensor, schedule: NoiseSchedule, *, return_v: bool = False):
    """Forward diffusion (Algorithm 1's noising): ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise``,
    one fused pass (2 reads, 1 write). Equals diffusers' ``scheduler.add_noise(x0, noise, t)``.

    Args:
        x0: clean samples ``(B, ...)``, float32/16, bfloat16 or float64.
        t: an int, or a LongTensor ``(B,)`` (or 0-dim) of per-sample timesteps in ``[0, T - 1]``, on x0's
            device. Values are range-checked only for ints and CPU tensors (no host sync on CUDA, where an
            out-of-range timestep gives NaN).
        noise: the Gaussian noise, same shape, dtype and device as ``x0``.
        schedule: a :class:`NoiseSchedule` (on any device).
        return_v: also return the v-prediction target ``v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0``
            (diffusers' ``get_velocity``), written by the same pass.

    Returns:
        ``x_t`` like ``x0`` (contiguous, same dtype), or ``(x_t, v)`` with ``return_v``. Math in float32
        (float64 for float64). Gradients flow to ``x0`` and ``noise`` (not to t or the schedule).
        Non-contiguous inputs are copied once to contiguous memory first.

    Raises:
        TypeError: non-tensor or non-float inputs, mixed dtypes, a float ``t``, a schedule that is not a
            NoiseSchedule.
        ValueError: shapes or devices that differ, a 0-dim x0, a ``t`` of the wrong shape or out of range.

    >>> import torch, fastssl
    >>> s = fastssl.NoiseSchedule.linear(1000)
    >>> x0, noise = torch.ones(2, 3), torch.zeros(2, 3)
    >>> fastssl.q_sample(x0, 0, noise, s)[0]
    tensor([0.9999, 0.9999, 0.9999])
    >>> x_t, v = fastssl.q_sample(x0, torch.tensor([0, 999]), noise, s, return_v=True)
    >>> v[1]
    tensor([-1.0000, -1.0000, -1.0000])
    """
    check_float("x0", x0)
    check_float("noise", noise)
    check_same(("x0", "noise"), (x0, noise))
    check_same_shape(("x0", "noise"), (x0, noise))
    _check_schedule(schedule)
    if x0.dim() == 0:
        raise ValueError("x0 must have a batch dimension (B, ...), got a 0-dim tensor")
    t = _timesteps("t", t, schedule, x0.shape[0], x0.device)
    abar = schedule._on(x0.device).alphas_cumprod
    if not use_triton(x0) and _plain_eager(x0, noise):
        out, v = _q_sample_torch(x0, noise, t, abar, bool(return_v))  # the op's body, without dispatch overhead
    else:
        out, v = _q_sample_op(x0, noise, t, abar, bool(return_v))
    return (out, v) if return_v else out


# ----------------------------------------------------------------------------------------------------
# The sampler step (DDPM and DDIM, guidance fused): reference, PyTorch path, custom ops
# ----------------------------------------------------------------------------------------------------

_SAMPLERS = {"ddpm": 0, "ddim": 1}
_VARIANCE_TYPES = {"fixed_small": 0, "fixed_large": 1}
_PREDICTION_TYPES = {"epsilon": 0, "sample": 1, "v_prediction": 2}


def _ref_abar(schedule, t, like, below):
    t = torch.as_tensor(t, device=like.device).reshape(-1).long()
    table = schedule._on(like.device).alphas_cumprod.double()
    return torch.where(t >= 0, table[t.clamp(min=0)], torch.full(t.shape, below, dtype=torch.float64, device=like.device)), t


def _ref_guided(model_output, uncond_output, guidance, dtype):
    m = model_output.to(dtype)
    if uncond_output is None:
        return m
    w = guidance
    if isinstance(w, Tensor):
        w = _row_view(w.to(dtype).reshape(-1), m)
    return (1 + w) * m - w * uncond_output.to(dtype)


def _ref_x0_eps(x, e, sqrt_a, sqrt_b, prediction_type):
    """(pred x0, implied eps) from the model output ``e`` under diffusers' three prediction types."""
    if prediction_type == "epsilon":
        return (x - sqrt_b * e) / sqrt_a, e
    if prediction_type == "sample":
        return e, (x - sqrt_a * e) / sqrt_b
    return sqrt_a * x - sqrt_b * e, sqrt_a * e + sqrt_b * x  # v_prediction


def ddpm_step_reference(model_output, t, x_t, schedule, *, prev_t=None, noise=None, uncond_output=None, guidance=0.0,
                        variance_type="fixed_small", prediction_type="epsilon", clip_sample=False, clip_range=1.0,
                        upcast=True):
    """diffusers' ``DDPMScheduler.step`` formulas literally, per sample, in float64 when ``upcast`` (else in
    the input dtype, coefficients rounded to it): abar_t, abar_prev (1 for prev < 0), current_beta =
    1 - abar_t / abar_prev, posterior mean of formula (7), sigma from fixed_small (clamped at 1e-20) or
    fixed_large, ``noise`` (if given) added where t > 0. Returns (x_prev, pred_x0)."""
    dtype = torch.float64 if upcast else x_t.dtype
    a_t, tt = _ref_abar(schedule, t, x_t, float("nan"))
    a_p, _ = _ref_abar(schedule, tt - 1 if prev_t is None else prev_t, x_t, 1.0)
    b_t, b_p = 1 - a_t, 1 - a_p
    cur_alpha = a_t / a_p
    cur_beta = 1 - cur_alpha
    col = lambda c: _row_view(c, x_t).to(dtype)  # noqa: E731
    x = x_t.to(dtype)
    e = _ref_guided(model_output, uncond_output, guidance, dtype)
    x0, _ = _ref_x0_eps(x, e, col(a_t.sqrt()), col(b_t.sqrt()), prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_range, clip_range)
    out = col(a_p.sqrt() * cur_beta / b_t) * x0 + col(cur_alpha.sqrt() * b_p / b_t) * x
    if noise is not None:
        var = (b_p / b_t * cur_beta).clamp(min=1e-20) if variance_type == "fixed_small" else cur_beta
        out = out + col(torch.where(tt > 0, var.sqrt(), torch.zeros_like(var))) * noise.to(dtype)
    return out, x0


def ddim_step_reference(model_output, t, prev_t, x_t, schedule, *, eta=0.0, noise=None, uncond_output=None,
                        guidance=0.0, prediction_type="epsilon", clip_sample=False, clip_range=1.0,
                        use_clipped_model_output=False, final_alpha_cumprod=1.0, upcast=True):
    """diffusers' ``DDIMScheduler.step`` formulas literally (prev_t < 0 uses ``final_alpha_cumprod``, 1 for
    ``set_alpha_to_one=True``), per sample, float64 when ``upcast``; ``noise`` (if given, eta > 0) added
    where t > 0. Returns (x_prev, pred_x0)."""
    dtype = torch.float64 if upcast else x_t.dtype
    a_t, tt = _ref_abar(schedule, t, x_t, float("nan"))
    a_p, _ = _ref_abar(schedule, prev_t, x_t, final_alpha_cumprod)
    b_t = 1 - a_t
    col = lambda c: _row_view(c, x_t).to(dtype)  # noqa: E731
    x = x_t.to(dtype)
    e = _ref_guided(model_output, uncond_output, guidance, dtype)
    x0, eps = _ref_x0_eps(x, e, col(a_t.sqrt()), col(b_t.sqrt()), prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_range, clip_range)
    var = (1 - a_p) / b_t * (1 - a_t / a_p)
    std = eta * var.sqrt()
    if use_clipped_model_output:
        eps = (x - col(a_t.sqrt()) * x0) / col(b_t.sqrt())
    out = col(a_p.sqrt()) * x0 + col((1 - a_p - std ** 2).clamp(min=0).sqrt()) * eps
    if noise is not None and eta > 0:
        out = out + col(torch.where(tt > 0, std, torch.zeros_like(std))) * noise.to(dtype)
    return out, x0


class _TorchMath:
    sqrt = staticmethod(torch.sqrt)
    where = staticmethod(torch.where)
    clamp_min = staticmethod(lambda a, v: a.clamp(min=v))

    @staticmethod
    def gather(abar, t, below):
        return _gather_abar_torch(abar, t, below)


class _NumpyMath:
    """The same formulas on host arrays: on CPU tensors the per-sample coefficients cost microseconds,
    not the ~100 us of two dozen tiny tensor ops."""
    sqrt = staticmethod(np.sqrt)
    where = staticmethod(np.where)
    clamp_min = staticmethod(np.maximum)

    @staticmethod
    def gather(abar, t, below):
        T = abar.shape[0]
        values = abar[np.clip(t, 0, T - 1)].astype(np.float64)
        return np.where(t < 0, below, np.where(t < T, values, np.nan))


_SMALL_BATCH = 64  # up to this many per-sample timesteps, CPU coefficients are computed on Python floats


class _ScalarMath:
    """The same formulas on Python floats (one timestep for the whole batch: the common sampling case)."""
    sqrt = staticmethod(lambda a: math.sqrt(a) if a >= 0 else float("nan"))
    where = staticmethod(lambda c, a, b: a if c else b)
    clamp_min = staticmethod(lambda a, v: a if a >= v or a != a else v)

    @staticmethod
    def gather(abar, t, below):
        return below if t < 0 else (abar[t] if t < len(abar) else float("nan"))


def _host_math(*tensors) -> bool:
    return all(t.device.type == "cpu" for t in tensors) and not torch.compiler.is_compiling()


def _step_coefficients_torch(abar, t, prev, prev_delta, final_abar, eta, sampler, variance, prediction, clipped_eps):
    """The kernel's six per-sample coefficients (c1, c2, ca, cx, ce, cz), float64 tensors of shape (1,)
    or (B,) (kernels/diffusion.py: _step_coefficients); computed with numpy for CPU tensors."""
    host = _host_math(abar, t, prev)
    xp = _NumpyMath if host else _TorchMath
    if host and t.numel() == 1 and prev.numel() == 1:
        try:
            return _step_coefficients(_ScalarMath, _host_table(abar), int(t.reshape(())), int(prev.reshape(())),
                                      prev_delta, final_abar, eta, sampler, variance, prediction, clipped_eps)
        except ZeroDivisionError:  # a degenerate schedule (abar = 1 or 0): numpy's inf/NaN semantics below
            pass
    if host and max(t.numel(), prev.numel()) <= _SMALL_BATCH:  # a few samples: Python floats per row
        table, ts, ps = _host_table(abar), t.tolist(), prev.tolist()
        n = max(len(ts), len(ps))
        try:
            rows = [_step_coefficients(_ScalarMath, table, ts[i % len(ts)], ps[i % len(ps)], prev_delta, final_abar,
                                       eta, sampler, variance, prediction, clipped_eps) for i in range(n)]
            return tuple(torch.tensor(column, dtype=torch.float64) for column in zip(*rows))
        except ZeroDivisionError:
            pass
    if host:
        abar, t, prev = abar.numpy(), t.numpy(), prev.numpy()
    out = _step_coefficients(xp, abar, t, prev, prev_delta, final_abar, eta, sampler, variance, prediction, clipped_eps)
    return tuple(torch.from_numpy(np.asarray(c, dtype=np.float64)) for c in out) if host else out


_HOST_TABLES: dict = {}


def _host_table(abar: Tensor) -> list:
    """A CPU schedule table as a list of Python floats, kept per table (tables are never modified)."""
    key = (abar.data_ptr(), abar.numel())
    if key not in _HOST_TABLES:
        _HOST_TABLES[key] = (abar, abar.tolist())  # the tensor is kept so its address is not reused
    return _HOST_TABLES[key][1]


_HOST_Q_TABLES: dict = {}


def _host_q_table(abar: Tensor, dtype: torch.dtype) -> Tensor:
    """(2, T): sqrt(abar_t) and sqrt(1 - abar_t) of a CPU table's float32 values, computed in float64 and
    rounded once to ``dtype``, kept per table and dtype."""
    key = (abar.data_ptr(), abar.numel(), dtype)
    if key not in _HOST_Q_TABLES:
        a64 = abar.double()
        _HOST_Q_TABLES[key] = (abar, torch.stack([a64.sqrt(), (1 - a64).sqrt()]).to(dtype))
    return _HOST_Q_TABLES[key][1]


def _step_coefficients(xp, abar, t, prev, prev_delta, final_abar, eta, sampler, variance, prediction, clipped_eps):
    with np.errstate(all="ignore"):
        a_t = xp.gather(abar, t, float("nan"))
        a_p = xp.gather(abar, prev + prev_delta, final_abar)
        b_t, b_p = 1 - a_t, 1 - a_p
        beta_cur = (a_p - a_t) / a_p
        sa, sb = xp.sqrt(a_t), xp.sqrt(b_t)
        zero = 0 * sa
        one = zero + 1
        c1, c2, d1, d2 = {0: (1 / sa, -sb / sa, zero, one), 1: (zero, one, 1 / sb, -sa / sb),
                          2: (sa, -sb, sb, sa)}[prediction]
        if sampler == 0:
            ca, cx, ce = xp.sqrt(a_p) * beta_cur / b_t, xp.sqrt(a_t / a_p) * b_p / b_t, zero
            cz = xp.sqrt(xp.clamp_min(b_p / b_t * beta_cur, 1e-20)) if variance == 0 else xp.sqrt(beta_cur)
        else:
            cz = eta * xp.sqrt(b_p / b_t * beta_cur)
            direction = xp.sqrt(xp.clamp_min(b_p - cz * cz, 0.0))
            if clipped_eps:
                ca, cx, ce = xp.sqrt(a_p) - direction * sa / sb, direction / sb, zero
            else:
                ca, cx, ce = xp.sqrt(a_p), direction * d1, direction * d2
        cz = xp.where(t > 0, cz, 0 * cz)  # never noise where t == 0
    return c1, c2, ca, cx, ce, cz


def _coefficient_views(coeffs, like: Tensor, acc: torch.dtype):
    """Coefficient vectors as what the elementwise ops take: Python floats when there is one value for the
    whole batch (the cheapest broadcast), else (B, 1, ..., 1) tensors in the math dtype."""
    if all(isinstance(c, float) for c in coeffs):
        return list(coeffs)
    coeffs = torch.broadcast_tensors(*[c.reshape(-1) for c in coeffs])
    if coeffs[0].numel() == 1 and coeffs[0].device.type == "cpu" and not torch.compiler.is_compiling():
        return [float(c.reshape(())) for c in coeffs]
    stacked = torch.stack(coeffs).to(acc)
    return list(stacked.reshape(len(coeffs), -1, *([1] * (like.dim() - 1))).unbind(0))


def _step_torch(model, uncond, x, noise, t, prev, w, abar, prev_delta, w_add, sampler, variance, prediction, clip,
                clip_range, eta, final_abar, clipped_eps, write_x0):
    """The PyTorch path: per-sample coefficients on (B,) vectors, then in-place passes over fresh buffers.
    Without clipping (and without pred_x0 wanted) the x0 stage is folded into the coefficients, so the
    update is 3 passes (x, e, noise) plus the guidance lerp."""
    acc = accumulation_dtype(x.dtype)
    coeffs = _step_coefficients_torch(abar, t, prev, prev_delta, final_abar, eta, sampler, variance, prediction,
                                      clipped_eps)
    folded = not (clip or write_x0)
    if folded:  # out = (ca c1 + cx) x + (ca c2 + ce) e + cz z
        c1, c2, ca, cx, ce, cz = coeffs
        coeffs = (ca * c1 + cx, ca * c2 + ce, cz)
    views = _coefficient_views(coeffs, x, acc)
    xa, e = x.to(acc), model.to(acc)
    if uncond is not None:
        weight = 1.0 + w_add if w is None else _row_view(w.to(acc) + w_add, x) + 1.0
        e = torch.lerp(uncond.to(acc), e, weight)  # (1 + w) * m - w * u
    x0 = None
    if folded:
        kx, ke, cz = views
        out = _axpy(torch.mul(xa, kx), e, ke)
    else:
        c1, c2, ca, cx, ce, cz = views
        x0 = _axpy(torch.mul(xa, c1), e, c2)
        if clip:
            x0.clamp_(-clip_range, clip_range)
        out = _axpy(torch.mul(x0, ca), xa, cx)
        if sampler == 1:
            _axpy(out, e, ce)
    if noise is not None:
        _axpy(out, noise.to(acc), cz)
    out = out.to(x.dtype).contiguous()  # a copy only for non-contiguous inputs
    return out, (x0.to(x.dtype).contiguous() if write_x0 else x.new_empty(0))


@torch.library.custom_op("fastssl::diffusion_step", mutates_args=())
def _step_op(model_output: Tensor, uncond_output: Optional[Tensor], x_t: Tensor, noise: Optional[Tensor],
             seed: Optional[Tensor], t: Tensor, prev: Tensor, w: Optional[Tensor], abar: Tensor, prev_delta: int,
             w_add: float, sampler: int, variance: int, prediction: int, clip: bool, clip_range: float, eta: float,
             final_abar: float, clipped_eps: bool, write_x0: bool) -> tuple[Tensor, Tensor]:
    if use_triton(x_t):
        from .kernels.diffusion import diffusion_step_forward

        return diffusion_step_forward(model_output, uncond_output, x_t, noise, seed, t, prev, prev_delta, w, w_add,
                                      abar, sampler=sampler, variance=variance, prediction=prediction, clip=clip,
                                      clip_range=clip_range, eta=eta, final_abar=final_abar, clipped_eps=clipped_eps,
                                      write_x0=write_x0)
    if seed is not None:
        raise RuntimeError("fastssl::diffusion_step: a Philox seed needs the Triton kernels; the PyTorch path reads noise")
    return _step_torch(model_output, uncond_output, x_t, noise, t, prev, w, abar, prev_delta, w_add, sampler, variance,
                       prediction, clip, clip_range, eta, final_abar, clipped_eps, write_x0)


@_step_op.register_fake
def _(model_output, uncond_output, x_t, noise, seed, t, prev, w, abar, prev_delta, w_add, sampler, variance,
      prediction, clip, clip_range, eta, final_abar, clipped_eps, write_x0):
    out = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    return out, (torch.empty_like(out) if write_x0 else x_t.new_empty(0))


def _step_backward_torch(grad, grad_x0, model, uncond, x, t, prev, w, abar, prev_delta, w_add, sampler, variance,
                         prediction, clip, clip_range, eta, final_abar, clipped_eps, want_grad_noise):
    acc = accumulation_dtype(grad.dtype)
    coeffs = _step_coefficients_torch(abar, t, prev, prev_delta, final_abar, eta, sampler, variance, prediction,
                                      clipped_eps)
    c1, c2, ca, cx, ce, cz = _coefficient_views(coeffs, grad, acc)
    g = grad.to(acc)
    g_x0 = torch.mul(g, ca)
    if grad_x0 is not None:
        g_x0.add_(grad_x0.to(acc))
    wv = None
    if uncond is not None:
        wv = torch.full((1,), w_add, dtype=acc, device=grad.device) if w is None else w.to(acc) + w_add
        wv = _row_view(wv, grad)
    if clip:
        e = model.to(acc)
        if uncond is not None:
            e = torch.lerp(uncond.to(acc), e, wv + 1.0)
        x0 = _axpy(torch.mul(x.to(acc), c1), e, c2)
        g_x0.mul_((x0 >= -clip_range) & (x0 <= clip_range))
    g_e = _axpy(torch.mul(g_x0, c2), g, ce)
    g_x = _axpy(torch.mul(g_x0, c1), g, cx)
    empty = grad.new_empty(0)
    grad_model = g_e if uncond is None else g_e * (1.0 + wv)
    grad_uncond = empty if uncond is None else -wv * g_e
    grad_noise = torch.mul(g, cz).to(grad.dtype).contiguous() if want_grad_noise else empty
    return (grad_model.to(grad.dtype).contiguous(), grad_uncond.to(grad.dtype).contiguous(),
            g_x.to(grad.dtype).contiguous(), grad_noise)


@torch.library.custom_op("fastssl::diffusion_step_backward", mutates_args=())
def _step_backward_op(grad: Tensor, grad_x0: Optional[Tensor], model_output: Tensor, uncond_output: Optional[Tensor],
                      x_t: Tensor, t: Tensor, prev: Tensor, w: Optional[Tensor], abar: Tensor, prev_delta: int,
                      w_add: float, sampler: int, variance: int, prediction: int, clip: bool, clip_range: float,
                      eta: float, final_abar: float, clipped_eps: bool, want_grad_noise: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (model_output, uncond_output, x_t, t, prev, prev_delta, w, w_add, abar)
    if use_triton(grad):
        from .kernels.diffusion import diffusion_step_backward

        return diffusion_step_backward(grad, grad_x0, *args, sampler=sampler, variance=variance, prediction=prediction,
                                       clip=clip, clip_range=clip_range, eta=eta, final_abar=final_abar,
                                       clipped_eps=clipped_eps, want_grad_noise=want_grad_noise)
    return _step_backward_torch(grad, grad_x0, model_output, uncond_output, x_t, t, prev, w, abar, prev_delta, w_add,
                                sampler, variance, prediction, clip, clip_range, eta, final_abar, clipped_eps,
                                want_grad_noise)


@_step_backward_op.register_fake
def _(grad, grad_x0, model_output, uncond_output, x_t, t, prev, w, abar, prev_delta, w_add, sampler, variance,
      prediction, clip, clip_range, eta, final_abar, clipped_eps, want_grad_noise):
    like = torch.empty_like(grad, memory_format=torch.contiguous_format)
    empty = grad.new_empty(0)
    return (like, torch.empty_like(like) if uncond_output is not None else empty, torch.empty_like(like),
            torch.empty_like(like) if want_grad_noise else empty)


_STEP_OPTIONS = ("prev_delta", "w_add", "sampler", "variance", "prediction", "clip", "clip_range", "eta", "final_abar",
                 "clipped_eps")


def _step_setup(ctx, inputs, output):
    (model_output, uncond_output, x_t, noise, seed, t, prev, w, abar, *options) = inputs
    ctx.options = dict(zip(_STEP_OPTIONS, options[:len(_STEP_OPTIONS)]))
    ctx.write_x0 = options[-1]
    ctx.has_uncond = uncond_output is not None
    ctx.has_noise = noise is not None
    keep = ctx.options["clip"] or (w is not None and w.requires_grad)
    ctx.save_for_backward(model_output if keep else None, uncond_output if keep else None, x_t if keep else None,
                          t, prev, w, abar)


def _step_backward(ctx, grad, grad_x0):
    model_output, uncond_output, x_t, t, prev, w, abar = ctx.saved_tensors
    o = ctx.options
    # The kernel re-reads model/uncond/x only when clipping; otherwise any tensor of the right shape will do.
    like = grad if model_output is None else model_output
    want_noise = ctx.has_noise and ctx.needs_input_grad[3]
    grad_model, grad_uncond, grad_x, grad_noise = _step_backward_op(
        grad, grad_x0 if ctx.write_x0 else None, like, (uncond_output if uncond_output is not None else like)
        if ctx.has_uncond else None, grad if x_t is None else x_t, t, prev, w, abar, o["prev_delta"], o["w_add"],
        o["sampler"], o["variance"], o["prediction"], o["clip"], o["clip_range"], o["eta"], o["final_abar"],
        o["clipped_eps"], want_noise)
    grad_w = None
    if w is not None and w.requires_grad:  # d x_prev / d w = (m - u) * d/de, summed per sample
        acc = accumulation_dtype(grad.dtype)
        g_e = grad_model.to(acc) + grad_uncond.to(acc)  # (1 + w) g_e - w g_e
        prod = (model_output.to(acc) - uncond_output.to(acc)) * g_e
        grad_w = prod.sum() if w.numel() == 1 else prod.reshape(prod.shape[0], -1).sum(1)
        grad_w = grad_w.reshape(w.shape).to(w.dtype)
    return (grad_model, grad_uncond if ctx.has_uncond else None, grad_x, grad_noise if want_noise else None, None, None,
            None, grad_w, None) + (None,) * (len(_STEP_OPTIONS) + 1)


_step_op.register_autograd(_step_backward, setup_context=_step_setup)


def _step(sampler: str, model_output, t, prev_t, x_t, schedule, *, eta=0.0, noise=None, generator=None,
          uncond_output=None, guidance=0.0, variance_type="fixed_small", prediction_type="epsilon", clip_sample=False,
          clip_range=1.0, final_alpha_cumprod=1.0, use_clipped_model_output=False, return_pred_x0=False,
          prev_delta=None):
    """Validate, prepare and run one step (ddpm_step, ddim_step and the schedulers call it). ``prev_delta``
    (DDIM scheduler): prev_t is ``t + prev_delta``, computed in the kernel. Returns (x_prev, pred_x0)."""
    check_float("model_output", model_output)
    check_float("x_t", x_t)
    check_same(("x_t", "model_output"), (x_t, model_output))
    check_same_shape(("x_t", "model_output"), (x_t, model_output))
    if uncond_output is not None:
        check_float("uncond_output", uncond_output)
        check_same(("model_output", "uncond_output"), (model_output, uncond_output))
        check_same_shape(("model_output", "uncond_output"), (model_output, uncond_output))
    if noise is not None:
        check_float("noise", noise)
        check_same(("x_t", "noise"), (x_t, noise))
        check_same_shape(("x_t", "noise"), (x_t, noise))
    if x_t.dim() == 0:
        raise ValueError("x_t must have a batch dimension (B, ...), got a 0-dim tensor")
    _check_schedule(schedule)
    check_choice("variance_type", variance_type, tuple(_VARIANCE_TYPES))
    check_choice("prediction_type", prediction_type, tuple(_PREDICTION_TYPES))
    clip_range = check_positive("clip_range", clip_range)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < float("inf"):
        raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")
    _check_generator(generator, noise)
    w, w_add = _guidance_args(guidance, uncond_output, model_output)
    batch, device = x_t.shape[0], x_t.device
    t_dev = _timesteps("t", t, schedule, batch, device)
    if prev_delta is not None:
        prev_dev, delta = t_dev, int(prev_delta)
    elif prev_t is None:
        prev_dev, delta = t_dev, -1
    else:
        prev_dev, delta = _timesteps("prev_t", prev_t, schedule, batch, device, allow_negative=True), 0
    abar = schedule._on(device).alphas_cumprod
    triton = use_triton(x_t)
    seed = None
    needs_noise = sampler == "ddpm" or eta > 0
    if needs_noise and noise is None:
        if triton:
            seed = _philox_seed(generator, device)
        elif torch.compiler.is_compiling() or not (t_dev.device.type == "cpu" and bool((t_dev <= 0).all())):
            # like diffusers, draw no noise for a step that adds none (checked on the CPU only)
            noise = _torch_noise(generator, x_t)
    elif not needs_noise:
        noise = None
    args = (model_output, uncond_output, x_t, noise, seed, t_dev, prev_dev, w, abar, delta, w_add, _SAMPLERS[sampler],
            _VARIANCE_TYPES[variance_type], _PREDICTION_TYPES[prediction_type], bool(clip_sample), clip_range,
            float(eta), float(final_alpha_cumprod), bool(use_clipped_model_output), bool(return_pred_x0))
    if not triton and _plain_eager(model_output, uncond_output, x_t, noise, w):
        return _step_torch(*args[:4], *args[5:])  # the op's own PyTorch body, without the dispatch overhead
    return _step_op(*args)


def ddpm_step(model_output: Tensor, t, x_t: Tensor, schedule: NoiseSchedule, *, prev_t=None, noise=None,
              generator=None, uncond_output=None, guidance=0.0, variance_type: str = "fixed_small",
              prediction_type: str = "epsilon", clip_sample: bool = False, clip_range: float = 1.0) -> Tensor:
    """One DDPM reverse step (Algorithm 2), x_t -> x_{t-1}, with classifier-free guidance fused in: one pass
    that reads model_output, uncond_output, x_t (and noise, if given) once and writes x_{t-1} once.

    With abar_t, abar_prev (1 when prev_t < 0), beta = 1 - abar_t / abar_prev (the strided step's beta)::

        e       = (1 + w) * model_output - w * uncond_output         (e = model_output without uncond)
        x0      = (x_t - sqrt(1 - abar_t) e) / sqrt(abar_t)  | e  | sqrt(abar_t) x_t - sqrt(1 - abar_t) e
                  (prediction_type epsilon | sample | v_prediction), clamped to +-clip_range if clip_sample
        mean    = sqrt(abar_prev) beta / (1 - abar_t) * x0 + sqrt(1 - beta) (1 - abar_prev) / (1 - abar_t) * x_t
        sigma^2 = max((1 - abar_prev) / (1 - abar_t) * beta, 1e-20) (fixed_small) | beta (fixed_large)
        x_prev  = mean + sigma * z   where t > 0, mean where t == 0

    This is diffusers' ``DDPMScheduler.step(...).prev_sample`` for the same configuration and noise (the
    lecture's w: diffusers' ``guidance_scale`` = 1 + w).

    Args:
        model_output: the model's prediction (epsilon, x0 or v), ``(B, ...)`` like ``x_t``.
        t: an int or a LongTensor ``(B,)`` (or 0-dim) of per-sample timesteps in [0, T - 1], on x_t's device.
            No host sync: values are checked only for ints and CPU tensors (on CUDA an out-of-range timestep
            gives NaN).
        x_t: the current samples ``(B, ...)``, float32/16, bfloat16 or float64.
        schedule: a :class:`NoiseSchedule`.
        prev_t: the previous timestep (int or LongTensor like t); default t - 1. Strided samplers pass it;
            negative means "before the first step" (abar_prev = 1).
        noise: the noise z, like ``x_t``; if None it is drawn from ``generator`` (module docstring: in the
            kernel by Philox on the Triton path, ``torch.randn`` on the PyTorch path).
        generator: None, an int seed or a ``torch.Generator``; not with ``noise``.
        uncond_output: the unconditional model output for classifier-free guidance.
        guidance: w, a float or a per-sample tensor (0-dim or ``(B,)``); nonzero needs ``uncond_output``.
        variance_type: ``"fixed_small"`` or ``"fixed_large"``.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        clip_sample: clamp the predicted x0 to ``[-clip_range, clip_range]``.
        clip_range: a float > 0.

    Returns:
        x_{t-1} like ``x_t`` (contiguous, same dtype); math in float32 (float64 for float64). Gradients flow
        to model_output, uncond_output, x_t and noise (the step is affine in them; through the clamp where
        it is active), and to a tensor ``guidance``; not to t or the schedule. Non-contiguous inputs are
        copied once to contiguous memory first (one extra read and write each).

    Raises:
        TypeError: non-tensor or non-float inputs, mixed dtypes, a float ``t``, a bad ``generator`` or
            ``guidance`` type, a schedule that is not a NoiseSchedule.
        ValueError: shapes or devices that differ, a 0-dim x_t, t or prev_t of the wrong shape or out of range,
            an unknown variance_type or prediction_type, clip_range <= 0, guidance without uncond_output,
            both noise and generator.

    >>> import torch, fastssl
    >>> s = fastssl.NoiseSchedule.linear(1000)
    >>> x_t, eps = torch.ones(2, 4), torch.zeros(2, 4)
    >>> fastssl.ddpm_step(eps, 0, x_t, s)[0]  # t = 0: no noise, x_{-1} = x0 = x_t / sqrt(abar_0)
    tensor([1.0001, 1.0001, 1.0001, 1.0001])
    >>> out = fastssl.ddpm_step(eps, torch.tensor([10, 500]), x_t, s, generator=0)
    >>> out.shape
    torch.Size([2, 4])
    """
    return _step("ddpm", model_output, t, prev_t, x_t, schedule, noise=noise, generator=generator,
                 uncond_output=uncond_output, guidance=guidance, variance_type=variance_type,
                 prediction_type=prediction_type, clip_sample=clip_sample, clip_range=clip_range)[0]


def ddim_step(model_output: Tensor, t, prev_t, x_t: Tensor, schedule: NoiseSchedule, *, eta: float = 0.0, noise=None,
              generator=None, uncond_output=None, guidance=0.0, prediction_type: str = "epsilon",
              clip_sample: bool = False, clip_range: float = 1.0) -> Tensor:
    """One DDIM step (Song et al. 2021, formula 12), x_t -> x_{prev_t}, guidance fused in, one pass::

        e     = (1 + w) * model_output - w * uncond_output
        x0, eps from e and x_t by prediction_type (x0 clamped to +-clip_range if clip_sample)
        sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        x_prev = sqrt(abar_prev) x0 + sqrt(max(1 - abar_prev - sigma^2, 0)) eps + sigma z   (z only where t > 0)

    with abar_prev = 1 for prev_t < 0 (diffusers' ``set_alpha_to_one=True``). Equals diffusers'
    ``DDIMScheduler.step(...).prev_sample`` for the same configuration, eta and noise. With eta = 0 no noise
    is read or drawn. (The max(., 0) only guards against rounding and eta > 1, where diffusers gives NaN.)

    Args:
        model_output, x_t, schedule, uncond_output, guidance, prediction_type, clip_sample, clip_range:
            as in :func:`ddpm_step`.
        t: int or LongTensor ``(B,)`` of current timesteps in [0, T - 1].
        prev_t: int or LongTensor ``(B,)`` of the timesteps to step to (any negative value: abar_prev = 1).
        eta: the noise weight, a float >= 0 (0: deterministic DDIM, 1: DDPM-like).
        noise, generator: as in :func:`ddpm_step`; used only when eta > 0.

    Returns:
        x_{prev_t} like ``x_t``. Gradients as in :func:`ddpm_step`.

    Raises:
        TypeError, ValueError: as in :func:`ddpm_step`; also eta < 0 or not finite.

    >>> import torch, fastssl
    >>> s = fastssl.NoiseSchedule.linear(1000)
    >>> x_t, eps = torch.ones(1, 3), torch.zeros(1, 3)
    >>> fastssl.ddim_step(eps, 999, 979, x_t, s).shape
    torch.Size([1, 3])
    >>> fastssl.ddim_step(eps, 0, -1, x_t, s)  # the last step returns the predicted x0 = x_t / sqrt(abar_0)
    tensor([[1.0001, 1.0001, 1.0001]])
    """
    if prev_t is None:
        raise TypeError("prev_t must be an int or a LongTensor (the timestep to step to), got None")
    return _step("ddim", model_output, t, prev_t, x_t, schedule, eta=eta, noise=noise, generator=generator,
                 uncond_output=uncond_output, guidance=guidance, prediction_type=prediction_type,
                 clip_sample=clip_sample, clip_range=clip_range)[0]


# ----------------------------------------------------------------------------------------------------
# The reverse loop
# ----------------------------------------------------------------------------------------------------

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
        model: a callable ``model(x, t, cond) -> prediction`` (epsilon, x0 or v, see prediction_type), same
            shape as x.
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
        ValueError: a bad sampler, num_steps, eta, guidance without uncond, cond/uncond batch mismatch.
        TypeError: a shape that is not a sequence of ints.

    >>> import torch, fastssl
    >>> s = fastssl.NoiseSchedule.linear(100)
    >>> model = lambda x, t, cond: torch.zeros_like(x)
    >>> fastssl.sample(model, (2, 3), s, num_steps=10, sampler="ddim", generator=0, progress=False).shape
    torch.Size([2, 3])
    """
    _check_schedule(schedule)
    check_choice("sampler", sampler, tuple(_SAMPLERS))
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from exc
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, ...) with positive sizes, got {shape}")
    T = schedule.num_timesteps
    if num_steps is None:
        num_steps = T
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an int in [1, {T}], got {num_steps!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta < float("inf"):
        raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")
    if sampler == "ddpm" and eta != 0:
        raise ValueError(f"eta={eta} is a DDIM parameter; use sampler='ddim' (DDPM's noise is fixed by variance_type)")
    check_choice("variance_type", variance_type, tuple(_VARIANCE_TYPES))
    check_choice("prediction_type", prediction_type, tuple(_PREDICTION_TYPES))
    clip_range = check_positive("clip_range", clip_range)
    _check_generator(generator, None)
    dev, dt = _model_device_dtype(model, cond)
    device = torch.device(device) if device is not None else dev
    dtype = dtype or dt
    B = shape[0]
    guided = isinstance(guidance, Tensor) or guidance != 0
    if guided:
        if uncond is None:
            raise ValueError("guidance != 0 needs uncond (the unconditional conditioning)")
        if not isinstance(cond, Tensor) or not isinstance(uncond, Tensor) or cond.shape[0] != B or uncond.shape[0] != B:
            raise ValueError(f"with guidance, cond and uncond must be tensors with batch {B}, got "
                             f"{getattr(cond, 'shape', type(cond).__name__)} and {getattr(uncond, 'shape', type(uncond).__name__)}")
    like = torch.empty(shape, dtype=dtype, device=device)
    w, w_add = _guidance_args(guidance, like if guided else None, like)
    if isinstance(generator, numbers.Integral):
        generator = torch.Generator(device=device).manual_seed(int(generator))
    x = torch.randn(shape, generator=generator, dtype=dtype,
                    device=generator.device if generator is not None else device).to(device)

    ts_dev, prev_dev = _sampling_timesteps(T, num_steps, device)
    sched = schedule._on(device)
    t_rows = ts_dev[:, None].repeat(1, B)  # (S, B): row i is step i's (B,) timesteps for the model
    t_model = t_rows.repeat(1, 2) if guided else t_rows
    prev_rows = prev_dev[:, None].repeat(1, B)
    model_cond = torch.cat([cond, uncond]) if guided else cond
    triton = use_triton(like)
    needs_noise = sampler == "ddpm" or eta > 0
    seeds = None
    if needs_noise and triton:
        seeds = (torch.randint(0, 2**62, (num_steps,), generator=generator, device=generator.device, dtype=torch.long)
                 .to(device) if generator is not None else torch.randint(0, 2**62, (num_steps,), device=device))
    abar = sched.alphas_cumprod
    steps = range(num_steps)
    if progress:
        try:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"fastssl.sample ({sampler})", total=num_steps)
        except ImportError:
            pass
    for i in steps:
        if guided:
            both = model(torch.cat([x, x]), t_model[i], model_cond)
            m, u = both.to(dtype).chunk(2)
        else:
            m, u = model(x, t_rows[i], cond).to(dtype), None
        noise = None
        if needs_noise and not triton:
            noise = torch.randn(shape, generator=generator, dtype=dtype,
                                device=generator.device if generator is not None else device).to(device)
        args = (m, u, x, noise, None if seeds is None else seeds[i:i + 1], t_rows[i], prev_rows[i], w, abar, 0, w_add,
                _SAMPLERS[sampler], _VARIANCE_TYPES[variance_type], _PREDICTION_TYPES[prediction_type],
                bool(clip_sample), clip_range, float(eta), 1.0, False, False)
        if not triton and _plain_eager(m, u, x, w):
            x, _ = _step_torch(*args[:4], *args[5:])
        else:
            x, _ = _step_op(*args)
    return x
