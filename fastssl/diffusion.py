"""Diffusion ops: forward noising, classifier-free guidance, and the DDPM/DDIM reverse steps with the
guidance fused in (Ho et al. 2020, Algorithms 1 and 2; Song et al. 2021, DDIM; Ho & Salimans 2022,
classifier-free guidance). The schedules are in :mod:`fastssl.schedules`, the step's machinery in
:mod:`fastssl.diffusion_step`, the whole reverse loop in :mod:`fastssl.sampling`.

``cfg_combine`` and ``q_sample`` are ``torch.library.custom_op``s (so ``torch.compile(fullgraph=True)``
traces through them) whose bodies ask :func:`fastssl.backend.use_triton` which path runs: the Triton kernels
of ``fastssl.kernels.diffusion`` or the PyTorch path beside them. The ``*_reference`` functions (first
below) are the float64 formulas the tests compare against.

Timesteps never cause a host synchronisation (:func:`fastssl.schedules.timestep_tensor`): on CUDA an
out-of-range timestep yields NaN in the output instead of a sync; ints and CPU tensors are range-checked.

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

from typing import Optional

import torch
from torch import Tensor

from .backend import first_order, runs_on_host, skip_dispatch, use_triton
from .checks import accumulation_dtype, check_float, check_guidance, check_same, check_same_shape
from .diffusion_step import add_scaled_, apply_step, as_dtype, scaled, step_spec
from .schedules import NoiseSchedule, check_schedule, timestep_tensor

__all__ = ["NoiseSchedule", "cfg_combine", "q_sample", "ddpm_step", "ddim_step", "cfg_combine_reference",
           "q_sample_reference", "ddpm_step_reference", "ddim_step_reference"]


# ----------------------------------------------------------------------------------------------------
# References: the float64 formulas the ops must equal
# ----------------------------------------------------------------------------------------------------

def _row_view(c: Tensor, like: Tensor) -> Tensor:
    """A per-sample vector (1,) or (B,) as (B or 1, 1, ..., 1) to broadcast against ``like``."""
    return c.reshape(-1, *([1] * (like.dim() - 1)))


def cfg_combine_reference(cond: Tensor, uncond: Tensor, guidance, *, upcast: bool = True) -> Tensor:
    """(1 + w) * cond - w * uncond, literally (float64 when ``upcast``); w broadcast per sample."""
    dtype = torch.float64 if upcast else cond.dtype
    w = guidance
    if isinstance(w, Tensor):
        w = w.to(dtype).reshape(-1, *([1] * (cond.dim() - 1)))
    return (1 + w) * cond.to(dtype) - w * uncond.to(dtype)


def q_sample_reference(x0: Tensor, t, noise: Tensor, schedule: NoiseSchedule, *, return_v: bool = False,
                       upcast: bool = True):
    """sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise literally (float64 when ``upcast``); with
    ``return_v`` also v = sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0."""
    dtype = torch.float64 if upcast else x0.dtype
    t = torch.as_tensor(t, device=x0.device).reshape(-1)
    abar = _row_view(schedule.on(x0.device).alphas_cumprod.double()[t], x0).to(dtype)
    a, b = abar.sqrt(), (1 - abar).sqrt()
    out = a * x0.to(dtype) + b * noise.to(dtype)
    return (out, a * noise.to(dtype) - b * x0.to(dtype)) if return_v else out


def _ref_abar(schedule, t, like, below):
    t = torch.as_tensor(t, device=like.device).reshape(-1).long()
    table = schedule.on(like.device).alphas_cumprod.double()
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


def _ref_prediction(model_output, x_t, uncond_output, guidance, a_t, prediction_type, clip_sample, clip_range, dtype):
    """(x, x0, eps, col): x_t in ``dtype``, the guided output's predicted x0 (clamped when clip_sample) and
    epsilon, and ``col`` (a per-sample vector as a broadcastable column in ``dtype``)."""
    col = lambda c: _row_view(c, x_t).to(dtype)  # noqa: E731
    x = x_t.to(dtype)
    e = _ref_guided(model_output, uncond_output, guidance, dtype)
    x0, eps = _ref_x0_eps(x, e, col(a_t.sqrt()), col((1 - a_t).sqrt()), prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_range, clip_range)
    return x, x0, eps, col


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
    x, x0, _, col = _ref_prediction(model_output, x_t, uncond_output, guidance, a_t, prediction_type, clip_sample,
                                    clip_range, dtype)
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
    x, x0, eps, col = _ref_prediction(model_output, x_t, uncond_output, guidance, a_t, prediction_type, clip_sample,
                                      clip_range, dtype)
    var = (1 - a_p) / b_t * (1 - a_t / a_p)
    std = eta * var.sqrt() if eta else torch.zeros_like(var)  # eta = 0: no variance term (DDIMInverseScheduler)
    if use_clipped_model_output:
        eps = (x - col(a_t.sqrt()) * x0) / col(b_t.sqrt())
    out = col(a_p.sqrt()) * x0 + col((1 - a_p - std ** 2).clamp(min=0).sqrt()) * eps
    if noise is not None and eta > 0:
        out = out + col(torch.where(tt > 0, std, torch.zeros_like(std))) * noise.to(dtype)
    return out, x0


# ----------------------------------------------------------------------------------------------------
# cfg_combine: (1 + w) * cond - w * uncond in one pass
# ----------------------------------------------------------------------------------------------------

def _cfg_combine_torch(cond: Tensor, uncond: Tensor, guidance) -> Tensor:
    """The PyTorch path; ``guidance`` a tensor, or a float where the public function calls it directly."""
    if not isinstance(guidance, Tensor):  # one fused lerp (float32 math for half types)
        return torch.lerp(uncond, cond, 1.0 + guidance).contiguous()
    if guidance.numel() == 1 and guidance.device.type == "cpu":
        return torch.lerp(uncond, cond, 1.0 + float(guidance.reshape(()))).contiguous()
    # a device or per-sample weight: upcast copies of both inputs, 3 passes (weights stay in float32)
    acc = accumulation_dtype(cond.dtype)
    w = _row_view(guidance.to(acc), cond)
    c = cond.to(acc)
    return (c + w * (c - uncond.to(acc))).to(cond.dtype)


def _cfg_combine_body(cond: Tensor, uncond: Tensor, guidance: Tensor) -> Tensor:
    if use_triton(cond):
        from .kernels.diffusion import cfg_combine_forward

        return cfg_combine_forward(cond, uncond, guidance)
    return _cfg_combine_torch(cond, uncond, guidance)


_cfg_combine_op = torch.library.custom_op("fastssl::cfg_combine", _cfg_combine_body, mutates_args=())


@_cfg_combine_op.register_fake
def _(cond, uncond, guidance):
    return torch.empty_like(cond, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastssl::cfg_combine_backward", mutates_args=())
def _cfg_combine_backward_op(grad: Tensor, guidance: Tensor) -> tuple[Tensor, Tensor]:
    if use_triton(grad):
        from .kernels.diffusion import cfg_combine_backward

        return cfg_combine_backward(grad, guidance)
    acc = accumulation_dtype(grad.dtype)
    w = _row_view(guidance.to(acc), grad)
    g = grad.to(acc)
    return ((1 + w) * g).to(grad.dtype), (-w * g).to(grad.dtype)


@_cfg_combine_backward_op.register_fake
def _(grad, guidance):
    like = torch.empty_like(grad, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like)


def _cfg_combine_setup(ctx, inputs, output):
    cond, uncond, guidance = inputs
    needs_grad = guidance.requires_grad
    ctx.save_for_backward(guidance, cond if needs_grad else None, uncond if needs_grad else None)


@first_order("fastssl.cfg_combine")
def _cfg_combine_backward(ctx, grad):
    guidance, cond, uncond = ctx.saved_tensors
    grad_cond, grad_uncond = _cfg_combine_backward_op(grad, guidance)
    grad_guidance = None
    if cond is not None:  # d out / d w = cond - uncond, summed over each sample's elements
        acc = accumulation_dtype(grad.dtype)
        prod = grad.to(acc) * (cond.to(acc) - uncond.to(acc))
        grad_guidance = prod.sum() if guidance.numel() == 1 else prod.reshape(prod.shape[0], -1).sum(1)
        grad_guidance = grad_guidance.reshape(guidance.shape).to(guidance.dtype)
    return grad_cond, grad_uncond, grad_guidance


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
    guidance = check_guidance("guidance", guidance, cond, "cond")
    direct = skip_dispatch(cond, uncond, guidance if isinstance(guidance, Tensor) else None)
    if direct and not use_triton(cond):  # the PyTorch path takes a float weight as it is
        return _cfg_combine_torch(cond, uncond, guidance)
    if not isinstance(guidance, Tensor):
        guidance = torch.full((1,), guidance, dtype=accumulation_dtype(cond.dtype), device=cond.device)
    return (_cfg_combine_body if direct else _cfg_combine_op)(cond, uncond, guidance)


# ----------------------------------------------------------------------------------------------------
# q_sample: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (and the v target), differentiable
# ----------------------------------------------------------------------------------------------------

_ONES = (1,) * 16  # trailing broadcast dimensions of a per-sample coefficient


def _q_coefficients(q_coefficients: Tensor, t: Tensor, like: Tensor):
    """(sqrt(abar_t), sqrt(1 - abar_t)) looked up in the schedule's table in the math dtype
    (NoiseSchedule.q_table): Python floats for one timestep on the host, else (B, 1, ..., 1) tensors (NaN
    outside [0, T), as the kernel)."""
    T = q_coefficients.shape[1]
    if t.device.type == "cpu" and not torch.compiler.is_compiling():  # host timesteps are range-checked
        if t.numel() == 1:
            a, b = q_coefficients.numpy()[:, int(t)].tolist()
            return a, b
        both = q_coefficients.index_select(1, t)
    else:
        both = q_coefficients.index_select(1, t.clamp(0, T - 1))
        both = torch.where((t >= 0) & (t < T), both, torch.full_like(both, float("nan")))
    both = both.view(2, -1, *_ONES[:like.dim() - 1])
    return both[0], both[1]


def _host_q_coefficients(schedule: NoiseSchedule, t, like: Tensor, acc: torch.dtype):
    """:func:`_q_coefficients` for the host path, read straight from the schedule: ``t`` checked, then Python
    floats for one timestep, else rows of :meth:`NoiseSchedule.q_rows` (two lookups, no reshaping)."""
    t = timestep_tensor("t", t, schedule, like.shape[0], like.device)
    if t.numel() == 1:
        return _q_coefficients(schedule.on(like.device).q_table(acc), t, like)
    a, b = schedule.on(like.device).q_rows(acc, like.dim())
    return a.index_select(0, t), b.index_select(0, t)


def _q_sample_torch(x0: Tensor, noise: Tensor, a, b, return_v: bool):
    """The PyTorch path, from the coefficients a = sqrt(abar_t), b = sqrt(1 - abar_t) (floats or per-sample
    tensors): (x_t, v), v None without ``return_v``."""
    acc = accumulation_dtype(x0.dtype)
    x, z = as_dtype(x0, acc), as_dtype(noise, acc)
    out = as_dtype(add_scaled_(scaled(x, a), z, b), x0.dtype).contiguous()  # a copy only for non-contiguous inputs
    return out, (as_dtype(add_scaled_(scaled(z, a), x, -b), x0.dtype).contiguous() if return_v else None)


def _q_sample_body(x0: Tensor, noise: Tensor, t: Tensor, q_coefficients: Tensor, return_v: bool
                   ) -> tuple[Tensor, Tensor]:
    if use_triton(x0):
        from .kernels.diffusion import q_sample_forward

        return q_sample_forward(x0, noise, t, q_coefficients, return_v=return_v)
    out, v = _q_sample_torch(x0, noise, *_q_coefficients(q_coefficients, t, x0), return_v)
    return out, (x0.new_empty(0) if v is None else v)


_q_sample_op = torch.library.custom_op("fastssl::q_sample", _q_sample_body, mutates_args=())


@_q_sample_op.register_fake
def _(x0, noise, t, q_coefficients, return_v):
    out = torch.empty_like(x0, memory_format=torch.contiguous_format)
    return out, (torch.empty_like(out) if return_v else x0.new_empty(0))


@torch.library.custom_op("fastssl::q_sample_backward", mutates_args=())
def _q_sample_backward_op(grad: Tensor, grad_v: Optional[Tensor], t: Tensor, q_coefficients: Tensor
                          ) -> tuple[Tensor, Tensor]:
    if use_triton(grad):
        from .kernels.diffusion import q_sample_backward

        return q_sample_backward(grad, grad_v, t, q_coefficients)
    acc = accumulation_dtype(grad.dtype)
    a, b = _q_coefficients(q_coefficients, t, grad)
    g = grad.to(acc)
    grad_x0, grad_noise = torch.mul(g, a), torch.mul(g, b)
    if grad_v is not None:
        gv = grad_v.to(acc)
        add_scaled_(grad_x0, gv, -b)
        add_scaled_(grad_noise, gv, a)
    return grad_x0.to(grad.dtype).contiguous(), grad_noise.to(grad.dtype).contiguous()


@_q_sample_backward_op.register_fake
def _(grad, grad_v, t, q_coefficients):
    out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out)


def _q_sample_setup(ctx, inputs, output):
    x0, noise, t, q_coefficients, return_v = inputs
    ctx.return_v = return_v
    ctx.save_for_backward(t, q_coefficients)


@first_order("fastssl.q_sample")
def _q_sample_backward(ctx, grad, grad_v):
    t, q_coefficients = ctx.saved_tensors
    grad_x0, grad_noise = _q_sample_backward_op(grad, grad_v if ctx.return_v else None, t, q_coefficients)
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
    check_schedule(schedule)
    if x0.dim() == 0:
        raise ValueError("x0 must have a batch dimension (B, ...), got a 0-dim tensor")
    acc, return_v = accumulation_dtype(x0.dtype), bool(return_v)
    if runs_on_host(x0, noise):  # eager on the CPU, nothing to differentiate: the PyTorch path here
        out, v = _q_sample_torch(x0, noise, *_host_q_coefficients(schedule, t, x0, acc), return_v)
    else:
        t = timestep_tensor("t", t, schedule, x0.shape[0], x0.device)
        table = schedule.on(x0.device).q_table(acc)
        out, v = (_q_sample_body if skip_dispatch(x0, noise) else _q_sample_op)(x0, noise, t, table, return_v)
    return (out, v) if return_v else out


# ----------------------------------------------------------------------------------------------------
# The sampler steps (the machinery: fastssl.diffusion_step)
# ----------------------------------------------------------------------------------------------------

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
        variance_type: ``"fixed_small"`` or ``"fixed_large"`` (also diffusers' ``"learned"`` / ``"learned_range"``
            with a ``(B, 2C, ...)`` model_output, sampling only: :mod:`fastssl.diffusion_step`).
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
    spec = step_spec("ddpm", prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip_sample,
                     clip_range=clip_range, prev_offset=-1 if prev_t is None else 0)
    return apply_step(spec, model_output, t, x_t, schedule, prev_t=prev_t, noise=noise, generator=generator,
                      uncond_output=uncond_output, guidance=guidance)[0]


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
    spec = step_spec("ddim", prediction_type=prediction_type, clip_sample=clip_sample, clip_range=clip_range, eta=eta)
    return apply_step(spec, model_output, t, x_t, schedule, prev_t=prev_t, noise=noise, generator=generator,
                      uncond_output=uncond_output, guidance=guidance)[0]
