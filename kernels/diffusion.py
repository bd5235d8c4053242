"""Triton kernels of the diffusion slice: elementwise, memory-bound, fp32 math in registers.

``cfg_combine``: out = cond + w * (cond - uncond) = (1 + w) * cond - w * uncond, w a scalar or one per
sample (row of the leading dimension). One read of each input and one write: 3 element accesses
(eager PyTorch does 5 and two launches).

``q_sample`` (Algorithm 1's noising, optionally also the v target) and the sampler step (DDPM's
Algorithm 2 and DDIM, one kernel for both, classifier-free guidance fused in) run on a row-blocked
1-D grid: program ``pid`` covers columns ``[(pid % nblk) * BLOCK, ...)`` of row ``pid // nblk`` (a row is
one sample, ``inner`` = elements per sample), so the per-sample schedule coefficients are scalars
computed once per program from the float32 tables, gathered by the sample's timestep read from a device
int64 tensor (no host synchronisation anywhere). Every step, whatever the sampler, prediction and
variance type, is the same affine update with six per-sample coefficients::

    e   = m + w * (m - u)                   (guided model output; e = m without uncond)
    x0  = clip(c1 * x + c2 * e)             (predicted x_0, clamped when clip)
    out = ca * x0 + cx * x + ce * e + cz * z   (z only where t > 0)

DDPM: ca, cx are the posterior-mean coefficients of formula (7), ce = 0; DDIM: ca = sqrt(abar_prev),
cx/ce come from the predicted epsilon, which is itself affine in x and e. Noise z is read from a tensor or
drawn in the kernel by Philox keyed by the element's global index ``i`` (int64), so it does not depend on
BLOCK or the grid; the seed is an int64 loaded from a device pointer. The draw is ``tl.randn(seed, i)``'s,
with a cosine for an argument already in [0, 2 pi) (``_philox_normal``): libdevice's cosf would bring a
stack frame.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from .registry import TL_DTYPE, acc_type, autotune, bucket, device_function, keep, register, variant

# Elementwise configs: 4-16 elements a thread (16-byte vectors for fp32 and bf16), 4 or 8 warps.
# 32 a thread (4096 x 4 warps) spills in the fp64 variants (ptxas, sm_90, tests/test_compile_sm90.py).
ELEMENTWISE_CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block in (1024, 2048, 4096)
    for warps in (4, 8)
    if keep(block, warps, min_per_thread=4, max_per_thread=16)
]

# q_sample and the step kernels: 4 or 8 elements a thread, BLOCK 1024. 16 a thread (2048 x 4 warps,
# 4096 x 8) spills (STACK:8) in the fp64 step kernel with in-kernel Philox noise, and 2048 x 8 spills 8 bytes
# in the fp32 step kernel reading noise on sm_80 (ptxas, tests/test_compile_sm90.py, 2026-11-30); two
# configs also keep the compile test's share of these four kernels small (12 step variants).
STEP_CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block, warps in ((1024, 4), (1024, 8))
    if keep(block, warps, min_per_thread=4, max_per_thread=8)
]




@autotune(ELEMENTWISE_CONFIGS, key=["n_bucket"])
@triton.jit
def _cfg_combine_kernel(cond_ptr, uncond_ptr, w_ptr, out_ptr, n, inner, w_stride, n_bucket,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    cond = tl.load(cond_ptr + offs, mask=mask).to(ACC)
    uncond = tl.load(uncond_ptr + offs, mask=mask).to(ACC)
    w = tl.load(w_ptr + (offs // inner) * w_stride, mask=mask).to(ACC)
    tl.store(out_ptr + offs, (cond + w * (cond - uncond)).to(out_ptr.dtype.element_ty), mask=mask)


@autotune(ELEMENTWISE_CONFIGS, key=["n_bucket"])
@triton.jit
def _cfg_combine_backward_kernel(grad_ptr, w_ptr, grad_cond_ptr, grad_uncond_ptr, n, inner, w_stride, n_bucket,
                                 ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    grad = tl.load(grad_ptr + offs, mask=mask).to(ACC)
    w = tl.load(w_ptr + (offs // inner) * w_stride, mask=mask).to(ACC)
    tl.store(grad_cond_ptr + offs, ((1 + w) * grad).to(grad_cond_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_uncond_ptr + offs, (-w * grad).to(grad_uncond_ptr.dtype.element_ty), mask=mask)


def dtype_variants(tensors, tables=(), ints=(), *, ints16=(), f32_tables=(), i64_tensors=(), floats=(), **constexprs):
    """One compile variant per input dtype: ``tensors`` in that dtype, ``tables`` (per-sample weights) in
    the math dtype, ``f32_tables`` (schedule tables) always float32, ``i64_tensors`` (timesteps, seeds)
    int64, ``ints`` as i32, ``ints16`` as i32 multiples of 16 (``"i32:16"``: sizes and their buckets,
    which are multiples of 16 at every latent and image size the GPU runs, 64M-element steps included,
    so a real launch specializes them so), ``floats`` as fp32 scalars; ``constexprs`` fixed flags of
    every variant."""
    out = []
    for dtype, ty in TL_DTYPE.items():
        table_ty = "fp64" if dtype == torch.float64 else "fp32"
        signature = {**{a: f"*{ty}" for a in tensors}, **{a: f"*{table_ty}" for a in tables},
                     **{a: "*fp32" for a in f32_tables}, **{a: "*i64" for a in i64_tensors},
                     **{a: "i32" for a in ints}, **{a: "i32:16" for a in ints16},
                     **{a: "fp32" for a in floats}}
        out.append(variant(signature, ACC=acc_type(dtype), **constexprs))
    return out


# Sizes (n, inner) and buckets are multiples of 16 at the GPU's shapes (GUIDE §6: 64M elements, latents
# 4x64x64); w_stride is 0 or 1 (a value, not a size): declared plain.
_CFG_INTS16 = ["n", "inner", "n_bucket"]
register(_cfg_combine_kernel, configs=ELEMENTWISE_CONFIGS,
         variants=dtype_variants(["cond_ptr", "uncond_ptr", "out_ptr"], ["w_ptr"], ["w_stride"], ints16=_CFG_INTS16))
register(_cfg_combine_backward_kernel, configs=ELEMENTWISE_CONFIGS,
         variants=dtype_variants(["grad_ptr", "grad_cond_ptr", "grad_uncond_ptr"], ["w_ptr"], ["w_stride"],
                                 ints16=_CFG_INTS16))


def _guidance_table(guidance: float, per_sample: torch.Tensor | None, like: torch.Tensor):
    """(table, stride): the guidance weights the kernels index by sample, in the math dtype."""
    math_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if per_sample is None:
        return torch.full((1,), guidance, dtype=math_dtype, device=like.device), 0
    table = per_sample.to(math_dtype).reshape(-1)
    return table, (0 if table.numel() == 1 else table.stride(0))


def cfg_combine_forward(cond: torch.Tensor, uncond: torch.Tensor, guidance: float,
                        per_sample: torch.Tensor | None = None) -> torch.Tensor:
    """Launch ``_cfg_combine_kernel``; inputs are made contiguous once (a copy only if they are not)."""
    cond, uncond = cond.contiguous(), uncond.contiguous()
    out = torch.empty_like(cond)
    n = cond.numel()
    if n == 0:
        return out
    table, stride = _guidance_table(guidance, per_sample, cond)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    _cfg_combine_kernel[grid](cond, uncond, table, out, n, n // cond.shape[0], stride, bucket(n),
                              ACC=acc_type(cond.dtype))
    return out


def cfg_combine_backward(grad: torch.Tensor, guidance: float, per_sample: torch.Tensor | None = None):
    """Launch ``_cfg_combine_backward_kernel``: returns ((1 + w) * grad, -w * grad)."""
    grad = grad.contiguous()
    grad_cond, grad_uncond = torch.empty_like(grad), torch.empty_like(grad)
    n = grad.numel()
    if n == 0:
        return grad_cond, grad_uncond
    table, stride = _guidance_table(guidance, per_sample, grad)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)  # noqa: E731
    _cfg_combine_backward_kernel[grid](grad, table, grad_cond, grad_uncond, n, n // grad.shape[0], stride,
                                       bucket(n), ACC=acc_type(grad.dtype))
    return grad_cond, grad_uncond


# ----------------------------------------------------------------------------------------------------
# q_sample and the sampler steps: per-sample coefficients gathered from the schedule inside the kernel
# ----------------------------------------------------------------------------------------------------

NOISE_NONE, NOISE_READ, NOISE_PHILOX = 0, 1, 2  # the step kernel's NOISE constexpr
SAMPLER_DDPM, SAMPLER_DDIM = 0, 1
VARIANCE_TYPES = {"fixed_small": 0, "fixed_large": 1}
PREDICTION_TYPES = {"epsilon": 0, "sample": 1, "v_prediction": 2}


@device_function
@triton.jit
def _row_block(inner, BLOCK: tl.constexpr):
    """(row, in-row mask, global int64 offsets) of this program on the row-blocked grid. The row/block split
    is 32-bit division (the grid has < 2**31 programs): a 64-bit division is a ptxas subroutine whose call
    frame shows up as STACK in the compile test; offsets are int64."""
    pid = tl.program_id(0)
    nblk = tl.cdiv(inner, BLOCK)
    row = pid // nblk
    cols = (pid - row * nblk) * BLOCK + tl.arange(0, BLOCK)
    return row.to(tl.int64), cols < inner, row.to(tl.int64) * inner + cols


@device_function
@triton.jit
def _gate(mask, flag):
    """``mask`` where the runtime int ``flag`` is nonzero, else all-false (a vector op: the interpreter
    rejects a scalar operand in a mask)."""
    return mask & ((mask.to(tl.int32) * 0 + flag) != 0)


@device_function
@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """sqrt without IEEE slow-path subroutines: ptxas implements sqrt.rn.f64 (and div.rn) with a called
    routine whose saved registers show up as STACK in the compile test. float32: sqrt.approx; float64: a
    float32 rsqrt estimate refined by Newton steps to double precision (0 -> 0, NaN/negative -> NaN)."""
    if ACC == tl.float64:
        y = tl.math.rsqrt(x.to(tl.float32)).to(tl.float64)
        y = y * (1.5 - 0.5 * x * y * y)
        y = y * (1.5 - 0.5 * x * y * y)
        s = x * y
        s = s + 0.5 * y * (x - s * s)
        return tl.where(x == 0.0, 0.0, s)
    else:
        return tl.sqrt(x)


@device_function
@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """a / b without the IEEE slow-path subroutine (see _sqrt): float32 div.full (2 ulp); float64 a float32
    reciprocal estimate refined by Newton steps, then one residual correction."""
    if ACC == tl.float64:
        r = tl.fdiv(tl.full(b.shape, 1.0, tl.float32), b.to(tl.float32)).to(tl.float64)
        r = r * (2.0 - b * r)
        r = r * (2.0 - b * r)
        q = a * r
        return q + r * (a - b * q)
    else:
        return tl.fdiv(a + 0.0 * b, b)


@device_function
@triton.jit
def _scalar(hi, lo, ACC: tl.constexpr):
    """A float launch argument in the math dtype: Triton passes Python floats as fp32, so the launcher
    splits each into hi = fp32(v) and lo = fp32(v - hi); hi + lo restores ~48 bits for float64 math."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@device_function
@triton.jit
def _gather_abar(abar_ptr, t, num_t, below):
    """abar[t] from the float32 table; ``below`` for t < 0 (the step before the first); NaN for
    t >= num_t (timesteps are range-checked on the host only for CPU tensors: on CUDA a bad timestep
    gives NaN instead of an out-of-bounds read or a host sync)."""
    a = tl.load(abar_ptr + tl.minimum(tl.maximum(t, 0), num_t - 1))
    return tl.where(t < 0, below, tl.where(t < num_t, a, float("nan")))


@device_function
@triton.jit
def _step_coefficients(abar_ptr, t, prev, num_t, final_abar, eta, sampler, variance, prediction, clipped_eps,
                       ACC: tl.constexpr):
    """The six per-sample scalars (c1, c2, ca, cx, ce, cz) of the affine step (module docstring), in ACC.
    Differences of nearby abar are formed as (abar_prev - abar_t) / abar_prev (exact subtraction) rather
    than 1 - abar_t / abar_prev, which loses ~3 digits in float32 at small t."""
    abar_t = _gather_abar(abar_ptr, t, num_t, float("nan")).to(ACC)
    abar_p = _gather_abar(abar_ptr, prev, num_t, final_abar).to(ACC)
    beta_t = 1.0 - abar_t
    beta_p = 1.0 - abar_p
    beta_cur = _div(abar_p - abar_t, abar_p, ACC)  # 1 - alpha_t (the current step's beta, strided)
    sa = _sqrt(abar_t, ACC)
    sb = _sqrt(beta_t, ACC)
    inv_sa = _div(1.0 + 0.0 * sa, sa, ACC)
    inv_sb = _div(1.0 + 0.0 * sb, sb, ACC)
    # x0 = c1 * x + c2 * e and eps = d1 * x + d2 * e, by prediction type (epsilon, sample, v_prediction)
    c1 = tl.where(prediction == 0, inv_sa, tl.where(prediction == 1, 0.0, sa))
    c2 = tl.where(prediction == 0, -sb * inv_sa, tl.where(prediction == 1, 1.0, -sb))
    d1 = tl.where(prediction == 0, 0.0, tl.where(prediction == 1, inv_sb, sb))
    d2 = tl.where(prediction == 0, 1.0, tl.where(prediction == 1, -sa * inv_sb, sa))
    # DDPM: posterior mean of formula (7); sigma^2 = fixed_small (clamped at 1e-20) or fixed_large
    inv_bt = _div(1.0 + 0.0 * beta_t, beta_t, ACC)
    sqrt_p = _sqrt(abar_p, ACC)
    ddpm_a = sqrt_p * beta_cur * inv_bt
    ddpm_x = _sqrt(1.0 - beta_cur, ACC) * beta_p * inv_bt  # sqrt(alpha_t) = sqrt(abar_t / abar_prev)
    var = beta_p * inv_bt * beta_cur
    ddpm_z = _sqrt(tl.where(variance == 0, tl.maximum(var, 1e-20), beta_cur), ACC)
    # DDIM (formula 12): std = eta * sqrt(beta_p / beta_t * beta_cur); direction weight sqrt(beta_p - std^2)
    std = eta * _sqrt(var, ACC)
    direction = _sqrt(tl.maximum(beta_p - std * std, 0.0), ACC)
    ddim_a = sqrt_p
    ddim_x = direction * d1
    ddim_e = direction * d2
    # use_clipped_model_output: eps re-derived from the clipped x0, eps = (x - sa * x0) / sb
    ddim_a = tl.where(clipped_eps != 0, ddim_a - direction * sa * inv_sb, ddim_a)
    ddim_x = tl.where(clipped_eps != 0, direction * inv_sb, ddim_x)
    ddim_e = tl.where(clipped_eps != 0, 0.0, ddim_e)
    is_ddpm = sampler == 0
    ca = tl.where(is_ddpm, ddpm_a, ddim_a)
    cx = tl.where(is_ddpm, ddpm_x, ddim_x)
    ce = tl.where(is_ddpm, 0.0, ddim_e)
    cz = tl.where(t > 0, tl.where(is_ddpm, ddpm_z, std), 0.0)  # never noise where t == 0
    return c1, c2, ca, cx, ce, cz


@device_function
@triton.jit
def _cos_2pi(u):
    """cos(2 pi u) for u in [0, 1) (float32) without libdevice's cosf, whose Payne-Hanek slow path for huge
    arguments is a local array: a stack frame in every kernel that calls it (STACK:32 in the compile test).
    The argument needs no such reduction: u = q/4 + f with q = round(4u) and f in [-1/8, 1/8] exactly
    (u - q/4 is exact in float32), so cos(2 pi u) is +-cos or +-sin of x = 2 pi f in [-pi/4, pi/4], each a
    Cephes minimax polynomial (about 1 ulp, like cosf itself)."""
    q = tl.floor(4.0 * u + 0.5)
    x = (u - 0.25 * q) * 6.283185307179586
    z = x * x
    c = 1.0 - 0.5 * z + z * z * ((2.443315711809948e-05 * z - 1.388731625493765e-03) * z + 4.166664568298827e-02)
    s = x + x * z * ((-1.9515295891e-04 * z + 8.3321608736e-03) * z - 1.6666654611e-01)
    quadrant = q.to(tl.int32) & 3
    return tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))


@device_function
@triton.jit
def _philox_normal(seed, offs):
    """Standard normal float32 noise keyed by (seed, element index): ``tl.randn``'s Philox draw and
    Box-Muller transform (r cos(2 pi u2), r = sqrt(-2 log u1)), with the cosine of ``_cos_2pi``; it
    equals ``tl.randn(seed, offs)`` to about an ulp."""
    i1, i2, _, _ = tl.randint4x(seed, offs)
    u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i1))
    u2 = tl.uint_to_uniform_float(i2)
    return tl.sqrt(-2.0 * tl.log(u1)) * _cos_2pi(u2)


@autotune(STEP_CONFIGS, key=["n_bucket", "inner_bucket"])
@triton.jit
def _q_sample_kernel(x0_ptr, noise_ptr, t_ptr, abar_ptr, out_ptr, v_ptr, inner, t_stride, num_t, write_v,
                     n_bucket, inner_bucket, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, mask, offs = _row_block(inner, BLOCK)
    abar = _gather_abar(abar_ptr, tl.load(t_ptr + row * t_stride), num_t, float("nan")).to(ACC)
    a = _sqrt(abar, ACC)
    b = _sqrt(1.0 - abar, ACC)
    x0 = tl.load(x0_ptr + offs, mask=mask).to(ACC)
    z = tl.load(noise_ptr + offs, mask=mask).to(ACC)
    tl.store(out_ptr + offs, (a * x0 + b * z).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, (a * z - b * x0).to(v_ptr.dtype.element_ty), mask=_gate(mask, write_v))


@autotune(STEP_CONFIGS, key=["n_bucket", "inner_bucket"])
@triton.jit
def _q_sample_backward_kernel(grad_ptr, grad_v_ptr, t_ptr, abar_ptr, grad_x0_ptr, grad_noise_ptr, inner, t_stride,
                              num_t, has_grad_v, n_bucket, inner_bucket, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, mask, offs = _row_block(inner, BLOCK)
    abar = _gather_abar(abar_ptr, tl.load(t_ptr + row * t_stride), num_t, float("nan")).to(ACC)
    a = _sqrt(abar, ACC)
    b = _sqrt(1.0 - abar, ACC)
    g = tl.load(grad_ptr + offs, mask=mask).to(ACC)
    gv = tl.load(grad_v_ptr + offs, mask=_gate(mask, has_grad_v), other=0.0).to(ACC)
    tl.store(grad_x0_ptr + offs, (a * g - b * gv).to(grad_x0_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_noise_ptr + offs, (b * g + a * gv).to(grad_noise_ptr.dtype.element_ty), mask=mask)


@autotune(STEP_CONFIGS, key=["n_bucket", "inner_bucket"])
@triton.jit
def _diffusion_step_kernel(model_ptr, uncond_ptr, x_ptr, noise_ptr, seed_ptr, t_ptr, prev_ptr, w_ptr, abar_ptr,
                           out_ptr, x0_ptr, inner, t_stride, prev_stride, prev_delta, w_stride, num_t,
                           sampler, variance, prediction, has_uncond, clip, clipped_eps, write_x0,
                           w_add, w_add_lo, final_abar, final_abar_lo, eta, eta_lo, clip_range, clip_range_lo,
                           n_bucket, inner_bucket,
                           ACC: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr):
    row, mask, offs = _row_block(inner, BLOCK)
    t = tl.load(t_ptr + row * t_stride)
    prev = tl.load(prev_ptr + row * prev_stride) + prev_delta
    c1, c2, ca, cx, ce, cz = _step_coefficients(abar_ptr, t, prev, num_t, _scalar(final_abar, final_abar_lo, ACC),
                                                _scalar(eta, eta_lo, ACC), sampler, variance, prediction, clipped_eps,
                                                ACC)
    w = tl.load(w_ptr + row * w_stride).to(ACC) + _scalar(w_add, w_add_lo, ACC)
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    e = tl.load(model_ptr + offs, mask=mask).to(ACC)
    u = tl.load(uncond_ptr + offs, mask=_gate(mask, has_uncond), other=0.0).to(ACC)
    e = tl.where(has_uncond != 0, e + w * (e - u), e)  # classifier-free guidance, fused
    x0 = c1 * x + c2 * e
    r = _scalar(clip_range, clip_range_lo, ACC)
    clamped = tl.minimum(tl.maximum(x0, -r, propagate_nan=tl.PropagateNan.ALL), r, propagate_nan=tl.PropagateNan.ALL)
    x0 = tl.where(clip != 0, clamped, x0)
    out = ca * x0 + cx * x + ce * e
    if NOISE == 1:
        z = tl.load(noise_ptr + offs, mask=mask).to(ACC)
        out = tl.where(t > 0, out + cz * z, out)
    if NOISE == 2:
        z = _philox_normal(tl.load(seed_ptr), offs).to(ACC)
        out = tl.where(t > 0, out + cz * z, out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=_gate(mask, write_x0))


@autotune(STEP_CONFIGS, key=["n_bucket", "inner_bucket"])
@triton.jit
def _diffusion_step_backward_kernel(grad_ptr, grad_x0_ptr, model_ptr, uncond_ptr, x_ptr, t_ptr, prev_ptr, w_ptr,
                                    abar_ptr, grad_model_ptr, grad_uncond_ptr, grad_x_ptr, grad_noise_ptr,
                                    inner, t_stride, prev_stride, prev_delta, w_stride, num_t,
                                    sampler, variance, prediction, has_uncond, clip, clipped_eps, has_grad_x0,
                                    want_grad_noise, w_add, w_add_lo, final_abar, final_abar_lo, eta, eta_lo,
                                    clip_range, clip_range_lo, n_bucket, inner_bucket,
                                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, mask, offs = _row_block(inner, BLOCK)
    t = tl.load(t_ptr + row * t_stride)
    prev = tl.load(prev_ptr + row * prev_stride) + prev_delta
    c1, c2, ca, cx, ce, cz = _step_coefficients(abar_ptr, t, prev, num_t, _scalar(final_abar, final_abar_lo, ACC),
                                                _scalar(eta, eta_lo, ACC), sampler, variance, prediction, clipped_eps,
                                                ACC)
    w = tl.load(w_ptr + row * w_stride).to(ACC) + _scalar(w_add, w_add_lo, ACC)
    g = tl.load(grad_ptr + offs, mask=mask).to(ACC)
    g_x0 = ca * g + tl.load(grad_x0_ptr + offs, mask=_gate(mask, has_grad_x0), other=0.0).to(ACC)
    # clamp passes the gradient where -r <= x0 <= r: recompute x0 (x, m, u are read only when clipping)
    clipping = _gate(mask, clip)
    x = tl.load(x_ptr + offs, mask=clipping, other=0.0).to(ACC)
    e = tl.load(model_ptr + offs, mask=clipping, other=0.0).to(ACC)
    u = tl.load(uncond_ptr + offs, mask=_gate(clipping, has_uncond), other=0.0).to(ACC)
    e = tl.where(has_uncond != 0, e + w * (e - u), e)
    x0 = c1 * x + c2 * e
    r = _scalar(clip_range, clip_range_lo, ACC)
    g_x0 = tl.where((clip == 0) | ((x0 >= -r) & (x0 <= r)), g_x0, 0.0)
    g_e = c2 * g_x0 + ce * g
    g_x = c1 * g_x0 + cx * g
    tl.store(grad_model_ptr + offs, tl.where(has_uncond != 0, (1.0 + w) * g_e, g_e).to(grad_model_ptr.dtype.element_ty),
             mask=mask)
    tl.store(grad_uncond_ptr + offs, (-w * g_e).to(grad_uncond_ptr.dtype.element_ty), mask=_gate(mask, has_uncond))
    tl.store(grad_x_ptr + offs, g_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_noise_ptr + offs, (cz * g).to(grad_noise_ptr.dtype.element_ty), mask=_gate(mask, want_grad_noise))


# The per-sample size and the buckets are multiples of 16 at the GPU's shapes; strides (0 or 1), num_t (1000),
# prev_delta and the flags are values, declared plain (a real launch folds a 1 into a constant and marks a
# 0 divisible: the plain variant is the general code both share).
_SIZES16 = ["inner", "n_bucket", "inner_bucket"]
_Q_INTS = ["t_stride", "num_t"]
register(_q_sample_kernel, configs=STEP_CONFIGS,
         variants=dtype_variants(["x0_ptr", "noise_ptr", "out_ptr", "v_ptr"], ints=_Q_INTS + ["write_v"],
                                 ints16=_SIZES16, f32_tables=["abar_ptr"], i64_tensors=["t_ptr"]))
register(_q_sample_backward_kernel, configs=STEP_CONFIGS,
         variants=dtype_variants(["grad_ptr", "grad_v_ptr", "grad_x0_ptr", "grad_noise_ptr"],
                                 ints=_Q_INTS + ["has_grad_v"], ints16=_SIZES16, f32_tables=["abar_ptr"],
                                 i64_tensors=["t_ptr"]))
_STEP_INTS = ["t_stride", "prev_stride", "prev_delta", "w_stride", "num_t", "sampler", "variance",
              "prediction", "has_uncond", "clip", "clipped_eps"]
_STEP_FLOATS = ["w_add", "w_add_lo", "final_abar", "final_abar_lo", "eta", "eta_lo", "clip_range", "clip_range_lo"]
register(_diffusion_step_kernel, configs=STEP_CONFIGS,
         variants=[v for noise in (NOISE_NONE, NOISE_READ, NOISE_PHILOX)
                   for v in dtype_variants(["model_ptr", "uncond_ptr", "x_ptr", "noise_ptr", "out_ptr", "x0_ptr"],
                                           ["w_ptr"], _STEP_INTS + ["write_x0"], ints16=_SIZES16,
                                           f32_tables=["abar_ptr"],
                                           i64_tensors=["seed_ptr", "t_ptr", "prev_ptr"], floats=_STEP_FLOATS,
                                           NOISE=noise)])
register(_diffusion_step_backward_kernel, configs=STEP_CONFIGS,
         variants=dtype_variants(["grad_ptr", "grad_x0_ptr", "model_ptr", "uncond_ptr", "x_ptr", "grad_model_ptr",
                                  "grad_uncond_ptr", "grad_x_ptr", "grad_noise_ptr"], ["w_ptr"],
                                 _STEP_INTS + ["has_grad_x0", "want_grad_noise"], ints16=_SIZES16, f32_tables=["abar_ptr"],
                                 i64_tensors=["t_ptr", "prev_ptr"], floats=_STEP_FLOATS))


_ZEROS: dict = {}


def _zeros(device, dtype) -> torch.Tensor:
    """A cached one-element zero table (the guidance table when there is none; never written)."""
    key = (str(device), dtype)
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros(1, dtype=dtype, device=device)
    return _ZEROS[key]


def _split(value: float) -> tuple:
    """(hi, lo) float32 parts of a Python float (see _scalar)."""
    with np.errstate(over="ignore"):
        hi = float(np.float32(value))
    return hi, (float(value - hi) if math.isfinite(hi) else 0.0)


def _stride(table: torch.Tensor) -> int:
    """0 for a one-element table (the same value for every sample), else the per-sample stride."""
    return 0 if table.numel() == 1 else table.stride(0)


def _launch(kernel, rows: int, inner: int, args: tuple, block=None, **kwargs):
    """Launch on the row-blocked grid; ``block`` bypasses autotuning (the tests use it to show results do not
    depend on BLOCK)."""
    grid = lambda meta: (rows * triton.cdiv(inner, meta["BLOCK"]),)  # noqa: E731
    if block is None:
        kernel[grid](*args, **kwargs)
    else:
        kernel.fn[(rows * triton.cdiv(inner, block),)](*args, BLOCK=block, num_warps=4, **kwargs)


def q_sample_forward(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, return_v: bool,
                     block=None):
    """Launch ``_q_sample_kernel``: (x_t, v or an empty tensor). ``t`` int64 (1,) or (B,) on the device;
    inputs are made contiguous once (a copy only if they are not: one extra read and write each)."""
    x0, noise = x0.contiguous(), noise.contiguous()
    out = torch.empty_like(x0)
    v = torch.empty_like(x0) if return_v else torch.empty(0, dtype=x0.dtype, device=x0.device)
    n = x0.numel()
    if n == 0:
        return out, v
    rows = x0.shape[0]
    inner = n // rows
    _launch(_q_sample_kernel, rows, inner,
            (x0, noise, t, abar, out, v if return_v else out, inner, _stride(t), abar.numel(), int(return_v),
             bucket(n), bucket(inner)), block, ACC=acc_type(x0.dtype))
    return out, v


def q_sample_backward(grad: torch.Tensor, grad_v, t: torch.Tensor, abar: torch.Tensor, block=None):
    """Launch ``_q_sample_backward_kernel``: (grad_x0, grad_noise) = (a g - b gv, b g + a gv)."""
    grad = grad.contiguous()
    grad_v = grad_v.contiguous() if grad_v is not None else None
    grad_x0, grad_noise = torch.empty_like(grad), torch.empty_like(grad)
    n = grad.numel()
    if n == 0:
        return grad_x0, grad_noise
    rows = grad.shape[0]
    inner = n // rows
    _launch(_q_sample_backward_kernel, rows, inner,
            (grad, grad if grad_v is None else grad_v, t, abar, grad_x0, grad_noise, inner, _stride(t), abar.numel(),
             int(grad_v is not None), bucket(n), bucket(inner)), block, ACC=acc_type(grad.dtype))
    return grad_x0, grad_noise


def _step_scalars(x, t, prev, prev_delta, w, w_add, abar, p):
    """The launch arguments the forward and backward step kernels share (``p``: the step's options)."""
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    w_table = _zeros(x.device, math_dtype) if w is None else w
    n = x.numel()
    inner = n // x.shape[0]
    return (t, prev, w_table, abar), (
        inner, _stride(t), _stride(prev), int(prev_delta), _stride(w_table), abar.numel(), int(p["sampler"]),
        int(p["variance"]), int(p["prediction"]), int(p["has_uncond"]), int(p["clip"]), int(p["clipped_eps"]))


def diffusion_step_forward(model, uncond, x, noise, seed, t, prev, prev_delta, w, w_add, abar, *, sampler, variance,
                           prediction, clip, clip_range, eta, final_abar, clipped_eps, write_x0, block=None):
    """Launch ``_diffusion_step_kernel``: (x_prev, pred_x0 or an empty tensor).

    ``t``/``prev``: int64 (1,) or (B,) device tensors (prev is read as ``prev + prev_delta``); ``w``: the
    per-sample guidance table in the math dtype or None (then ``w_add`` is the guidance); ``noise``: a tensor
    to read, else ``seed`` (int64 (1,) device tensor) for in-kernel Philox noise, else no noise. Inputs are
    made contiguous once (a copy only when they are not)."""
    model, x = model.contiguous(), x.contiguous()
    uncond = uncond.contiguous() if uncond is not None else None
    noise = noise.contiguous() if noise is not None else None
    out = torch.empty_like(x)
    x0 = torch.empty_like(x) if write_x0 else torch.empty(0, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return out, x0
    mode = NOISE_READ if noise is not None else NOISE_PHILOX if seed is not None else NOISE_NONE
    p = dict(sampler=sampler, variance=variance, prediction=prediction, has_uncond=uncond is not None, clip=clip,
             clipped_eps=clipped_eps)
    tables, ints = _step_scalars(x, t, prev, prev_delta, w, w_add, abar, p)
    t, prev, w_table, abar = tables
    args = (model, model if uncond is None else uncond, x, x if noise is None else noise, t if seed is None else seed,
            t, prev, w_table, abar, out, x0 if write_x0 else out, *ints, int(write_x0),
            *_split(w_add), *_split(final_abar), *_split(eta), *_split(clip_range), bucket(n), bucket(ints[0]))
    _launch(_diffusion_step_kernel, x.shape[0], ints[0], args, block, ACC=acc_type(x.dtype), NOISE=mode)
    return out, x0


def diffusion_step_backward(grad, grad_x0, model, uncond, x, t, prev, prev_delta, w, w_add, abar, *, sampler, variance,
                            prediction, clip, clip_range, eta, final_abar, clipped_eps, want_grad_noise, block=None):
    """Launch ``_diffusion_step_backward_kernel``: (grad_model, grad_uncond, grad_x, grad_noise); the
    entries for an absent uncond or an unwanted noise gradient are empty tensors. With ``clip`` the kernel
    re-reads model, uncond and x to rebuild the clamp's mask."""
    grad = grad.contiguous()
    grad_x0 = grad_x0.contiguous() if grad_x0 is not None else None
    model, x = model.contiguous(), x.contiguous()
    uncond = uncond.contiguous() if uncond is not None else None
    empty = torch.empty(0, dtype=grad.dtype, device=grad.device)
    grad_model, grad_x = torch.empty_like(grad), torch.empty_like(grad)
    grad_uncond = torch.empty_like(grad) if uncond is not None else empty
    grad_noise = torch.empty_like(grad) if want_grad_noise else empty
    n = grad.numel()
    if n == 0:
        return grad_model, grad_uncond, grad_x, grad_noise
    p = dict(sampler=sampler, variance=variance, prediction=prediction, has_uncond=uncond is not None, clip=clip,
             clipped_eps=clipped_eps)
    tables, ints = _step_scalars(grad, t, prev, prev_delta, w, w_add, abar, p)
    t, prev, w_table, abar = tables
    args = (grad, grad if grad_x0 is None else grad_x0, model, model if uncond is None else uncond, x, t, prev, w_table,
            abar, grad_model, grad_uncond if uncond is not None else grad_model, grad_x,
            grad_noise if want_grad_noise else grad_model, *ints, int(grad_x0 is not None), int(want_grad_noise),
            *_split(w_add), *_split(final_abar), *_split(eta), *_split(clip_range), bucket(n), bucket(ints[0]))
    _launch(_diffusion_step_backward_kernel, grad.shape[0], ints[0], args, block, ACC=acc_type(grad.dtype))
    return grad_model, grad_uncond, grad_x, grad_noise
