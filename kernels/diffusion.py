"""Triton kernels of the diffusion slice: elementwise, memory-bound, fp32 math in registers.

``cfg_combine``: out = cond + w * (cond - uncond) = (1 + w) * cond - w * uncond, w a scalar or one per
sample (row of the leading dimension), on the row-blocked grid below (one weight a program). One read of
each input and one write: 3 element accesses (eager PyTorch does 5 and two launches).

``q_sample`` (Algorithm 1's noising, optionally also the v target) and the sampler step (DDPM's
Algorithm 2 and DDIM, one kernel for both, classifier-free guidance fused in) run on a row-blocked
1-D grid: program ``pid`` covers columns ``[(pid % nblk) * BLOCK, ...)`` of row ``pid // nblk`` (a row is
one sample, ``inner`` = elements per sample), so the per-sample schedule coefficients are scalars
computed once per program, gathered by the sample's timestep read from a device int64 tensor (no host
synchronisation anywhere): q_sample reads sqrt(abar_t) and sqrt(1 - abar_t) from the schedule's table in
the math dtype (NoiseSchedule.q_table), the step derives its coefficients from the float32 abar table.
Every step, whatever the sampler, prediction and variance type, is the same affine update with six
per-sample coefficients (seven with learned_range)::

    e   = m + w * (m - u)                   (guided model output; e = m without uncond)
    x0  = clip(c1 * x + c2 * e)             (predicted x_0, clamped when clip_sample; with thresholding
                                             clamp(x0, -s, s) / s, s a per-sample table the caller computed;
                                             formed as (q * x + k * e) * p: an epsilon model's
                                             (x - sqrt(1 - abar_t) e) / sqrt(abar_t), +-inf at abar_t = 0)
    out = ca * x0 + cx * x + ce * e + cz * f(v) * z   (z only where t > 0)

DDPM: ca, cx are the posterior-mean coefficients of formula (7), and no e term; DDIM: ca = sqrt(abar_prev),
cx/ce come from the predicted epsilon, which is itself affine in x and e (no x term for an epsilon model).
f(v) = 1, but for DDPM's learned variances: the model output has 2C channels (rows ``model_stride`` = 2 *
inner apart), m and u are read from the first C, v from the last C of the model output, and f(v) = sqrt(v)
(learned) or exp((v + 1) / 2 * ck) (learned_range; a seventh per-sample coefficient): one more read, in the
same pass, only where noise is added.
A term a step does not have is left out, not added as 0 * it. Noise z is read from a tensor or
drawn in the kernel: four normals from each Philox4x32-10 call (two Box-Muller pairs) keyed by the
element's index, so it does not depend on BLOCK or the grid (``_philox_normals``); the seed is an int64
loaded from a device pointer. For 16-bit outputs the transforms use the MUFU approximations (their error
is far below those dtypes'); otherwise an accurate log and a sine/cosine for an argument already in
[0, 2 pi) (libdevice's sinf/cosf would bring a stack frame). Launchers take keyword arguments named as
fastssl.diffusion_step.StepSpec names the step's options, and launch the kernels by keyword.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..backend import interpreting
from .registry import TL_DTYPE, acc_type, autotune, bucket, device_function, keep, launch, register, variant

# Elementwise configs: 8 or 16 elements a thread, 4 or 8 warps: every thread's share of a 16-bit tensor is
# one 128-bit access or more (4 a thread, 1024 x 8 warps, gave 16-bit tensors 64-bit loads: --report).
# 32 a thread (4096 x 4 warps) spills in the fp64 variants (ptxas, sm_90, tests/test_compile_sm90.py).
ELEMENTWISE_CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block in (1024, 2048, 4096)
    for warps in (4, 8)
    if keep(block, warps, min_per_thread=8, max_per_thread=16)
]

# q_sample and the step kernels: 8 elements a thread (one 128-bit access of each 16-bit tensor, two of
# fp32), 1024 x 4 warps. 16 a thread (2048 x 4 warps, 4096 x 8) spills (STACK:8) in the fp64 step kernel
# with in-kernel noise; 2048 x 8 warps, the same work a thread in CTAs twice the size (no gain in occupancy:
# 16 CTAs of 128 threads fill an SM), gives the fp64 backward an 8-byte stack frame at 80 registers under
# triton 3.6 (sm_90). One config also keeps the compile test's share of these four kernels small.
STEP_CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block, warps in ((1024, 4),)
    if keep(block, warps, min_per_thread=8, max_per_thread=8)
]


@device_function
@triton.jit
def _row_block(inner, BLOCK: tl.constexpr):
    """(row, first column, in-row mask, global int64 offsets) of this program on the row-blocked grid. The
    row/block split is 32-bit division (the grid has < 2**31 programs): a 64-bit division is a ptxas
    subroutine whose call frame shows up as STACK in the compile test; offsets are int64."""
    pid = tl.program_id(0)
    nblk = tl.cdiv(inner, BLOCK)
    row = pid // nblk
    col0 = (pid - row * nblk) * BLOCK
    cols = col0 + tl.arange(0, BLOCK)
    return row.to(tl.int64), col0, cols < inner, row.to(tl.int64) * inner + cols


@autotune(ELEMENTWISE_CONFIGS, key=["n_bucket"])
@triton.jit
def _cfg_combine_kernel(cond_ptr, uncond_ptr, guidance_ptr, out_ptr, inner, guidance_stride, n_bucket,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, _, mask, offs = _row_block(inner, BLOCK)
    w = tl.load(guidance_ptr + row * guidance_stride).to(ACC)  # one weight a program (its sample's)
    cond = tl.load(cond_ptr + offs, mask=mask).to(ACC)
    uncond = tl.load(uncond_ptr + offs, mask=mask).to(ACC)
    tl.store(out_ptr + offs, (cond + w * (cond - uncond)).to(out_ptr.dtype.element_ty), mask=mask)


@autotune(ELEMENTWISE_CONFIGS, key=["n_bucket"])
@triton.jit
def _cfg_combine_backward_kernel(grad_ptr, guidance_ptr, grad_cond_ptr, grad_uncond_ptr, inner, guidance_stride,
                                 n_bucket, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, _, mask, offs = _row_block(inner, BLOCK)
    w = tl.load(guidance_ptr + row * guidance_stride).to(ACC)
    grad = tl.load(grad_ptr + offs, mask=mask).to(ACC)
    tl.store(grad_cond_ptr + offs, ((1 + w) * grad).to(grad_cond_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_uncond_ptr + offs, (-w * grad).to(grad_uncond_ptr.dtype.element_ty), mask=mask)


def dtype_variants(tensors, tables=(), ints=(), *, ints16=(), f32_tables=(), i64_tensors=(), floats=(),
                   **constexprs):
    """One compile variant per input dtype: ``tensors`` in that dtype, ``tables`` in the math dtype
    (guidance weights, q_sample's coefficients), ``f32_tables`` (abar) always float32, ``i64_tensors``
    (timesteps, seeds) int64, ``ints`` as i32, ``ints16`` as i32 multiples of 16 (``"i32:16"``: sizes and
    their buckets, which are multiples of 16 at every latent and image size the GPU runs, 64M-element steps included,
    so a real launch specializes them so), ``floats`` as fp32 scalars; ``constexprs`` fixed flags of
    every variant."""
    out = []
    for dtype, ty in TL_DTYPE.items():
        table_ty = "fp64" if dtype == torch.float64 else "fp32"
        signature = {**{a: f"*{ty}" for a in tensors}, **{a: f"*{table_ty}" for a in tables},
                     **{a: "*fp32" for a in f32_tables},
                     **{a: "*i64" for a in i64_tensors},
                     **{a: "i32" for a in ints}, **{a: "i32:16" for a in ints16},
                     **{a: "fp32" for a in floats}}
        out.append(variant(signature, ACC=acc_type(dtype), **constexprs))
    return out


# Sizes (n, inner) and buckets are multiples of 16 at the GPU's shapes (GUIDE §6: 64M elements, latents
# 4x64x64); guidance_stride is 0 or 1 (a value, not a size): declared plain.
_CFG_INTS16 = ["inner", "n_bucket"]
register(_cfg_combine_kernel, configs=ELEMENTWISE_CONFIGS,
         variants=dtype_variants(["cond_ptr", "uncond_ptr", "out_ptr"], ["guidance_ptr"], ["guidance_stride"],
                                 ints16=_CFG_INTS16))
register(_cfg_combine_backward_kernel, configs=ELEMENTWISE_CONFIGS,
         variants=dtype_variants(["grad_ptr", "grad_cond_ptr", "grad_uncond_ptr"], ["guidance_ptr"], ["guidance_stride"],
                                 ints16=_CFG_INTS16))


def _stride(table: torch.Tensor) -> int:
    """0 for a one-element table (the same value for every sample), else the per-sample stride."""
    return 0 if table.numel() == 1 else table.stride(0)


def _launch(kernel, rows: int, inner: int, block=None, /, **kwargs):
    """Launch by keyword (registry.launch) on ``rows * cdiv(inner, BLOCK)`` programs; ``block`` bypasses
    autotuning (the tests use it to show results do not depend on BLOCK)."""
    launch(kernel, lambda meta: (rows * triton.cdiv(inner, meta["BLOCK"]),),
           config=None if block is None else {"BLOCK": block, "num_warps": 4}, **kwargs)


def _guidance_table(guidance: torch.Tensor, like: torch.Tensor):
    """(table, stride): the guidance weights (one, or one per sample) in the math dtype, as the kernels
    index them by sample (stride 0: one weight for all)."""
    table = guidance.to(torch.float64 if like.dtype == torch.float64 else torch.float32).reshape(-1)
    return table, _stride(table)


def cfg_combine_forward(cond: torch.Tensor, uncond: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """Launch ``_cfg_combine_kernel``; inputs are made contiguous once (a copy only if they are not).
    ``guidance``: one weight (1 element) or one per sample, any float dtype, on the inputs' device."""
    cond, uncond = cond.contiguous(), uncond.contiguous()
    out = torch.empty_like(cond)
    n = cond.numel()
    if n == 0:
        return out
    table, stride = _guidance_table(guidance, cond)
    rows = cond.shape[0] if stride else 1
    _launch(_cfg_combine_kernel, rows, n // rows, None, cond_ptr=cond, uncond_ptr=uncond, guidance_ptr=table,
            out_ptr=out, inner=n // rows, guidance_stride=stride, n_bucket=bucket(n), ACC=acc_type(cond.dtype))
    return out


def cfg_combine_backward(grad: torch.Tensor, guidance: torch.Tensor):
    """Launch ``_cfg_combine_backward_kernel``: returns ((1 + w) * grad, -w * grad)."""
    grad = grad.contiguous()
    grad_cond, grad_uncond = torch.empty_like(grad), torch.empty_like(grad)
    n = grad.numel()
    if n == 0:
        return grad_cond, grad_uncond
    table, stride = _guidance_table(guidance, grad)
    rows = grad.shape[0] if stride else 1
    _launch(_cfg_combine_backward_kernel, rows, n // rows, None, grad_ptr=grad, guidance_ptr=table,
            grad_cond_ptr=grad_cond, grad_uncond_ptr=grad_uncond, inner=n // rows, guidance_stride=stride,
            n_bucket=bucket(n), ACC=acc_type(grad.dtype))
    return grad_cond, grad_uncond


# ----------------------------------------------------------------------------------------------------
# q_sample and the sampler steps: per-sample coefficients gathered from the schedule inside the kernel
# ----------------------------------------------------------------------------------------------------

NOISE_NONE, NOISE_READ, NOISE_PHILOX = 0, 1, 2  # the step kernel's NOISE constexpr
LN2 = tl.constexpr(0.6931471805599453)
# libdevice's fast (MUFU) functions have no interpreter implementation: under the interpreter the noise
# takes the accurate functions (the same values to ~2**-21)
_MUFU = tl.constexpr(not interpreting())
# The step kernel's int codes of the step's string options (sampler, variance_type, prediction_type).
CHOICE_CODES = {"ddpm": 0, "ddim": 1, "fixed_small": 0, "fixed_large": 1, "learned": 2, "learned_range": 3,
                "epsilon": 0, "sample": 1, "v_prediction": 2}


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
    reciprocal estimate refined by Newton steps, then one residual correction; b = 0 gives a * (+-inf), as
    IEEE division (the Newton steps would make that inf * 0 = NaN). Per-program scalars only."""
    if ACC == tl.float64:
        r0 = tl.fdiv(tl.full(b.shape, 1.0, tl.float32), b.to(tl.float32)).to(tl.float64)
        r = r0 * (2.0 - b * r0)
        r = r * (2.0 - b * r)
        q = a * r
        return tl.where(b == 0.0, a * r0, q + r * (a - b * q))
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
def _gather_q(q_ptr, t, num_t, ACC: tl.constexpr):
    """(sqrt(abar_t), sqrt(1 - abar_t)) from the schedule's (2, T) table in the math dtype (NoiseSchedule.q_table),
    NaN for t outside [0, num_t) (see _gather_abar)."""
    i = tl.minimum(tl.maximum(t, 0), num_t - 1)
    inside = (t >= 0) & (t < num_t)
    a = tl.where(inside, tl.load(q_ptr + i), float("nan"))
    b = tl.where(inside, tl.load(q_ptr + num_t + i), float("nan"))
    return a.to(ACC), b.to(ACC)


@device_function
@triton.jit
def _step_coefficients(abar_ptr, t, prev_t, num_t, final_alpha_cumprod, eta, sampler, variance_type, prediction_type,
                       use_clipped_model_output, diffusers_rounding, ACC: tl.constexpr):
    """The per-sample scalars (p, q, k, ca, cx, ce, cz, ck) of the affine step (module docstring), in ACC:
    x0 = (q * x + k * e) * p, so c1 = p * q and c2 = p * k (ck: learned_range's rate,
    fastssl.diffusion_step._derive). An epsilon model has p = 1 / sqrt(abar_t), q = 1, k = -sqrt(1 - abar_t):
    diffusers' (x - sqrt(1 - abar_t) e) / sqrt(abar_t), which at abar_t = 0 (zero terminal SNR) is +-inf (then
    clamped by clip_sample), where c1 * x + c2 * e would be inf - inf = NaN; the other types have p = 1.
    Differences of nearby abar are formed as (abar_prev - abar_t) / abar_prev (exact subtraction) rather
    than 1 - abar_t / abar_prev, which loses ~3 digits in float32 at small t; ``diffusers_rounding``
    reproduces that loss as diffusers' schedulers have it, 1 - fl32(abar_t / abar_prev) (the ratio divided
    in float64 and rounded once, as IEEE float32 division rounds it)."""
    abar_t = _gather_abar(abar_ptr, t, num_t, float("nan")).to(ACC)
    abar_p = _gather_abar(abar_ptr, prev_t, num_t, final_alpha_cumprod).to(ACC)
    beta_t = 1.0 - abar_t
    beta_p = 1.0 - abar_p
    ratio32 = _div(abar_t.to(tl.float64), abar_p.to(tl.float64), tl.float64).to(tl.float32).to(ACC)
    # 1 - alpha_t (the current step's beta, strided)
    beta_cur = tl.where(diffusers_rounding != 0, 1.0 - ratio32, _div(abar_p - abar_t, abar_p, ACC))
    # DDPM to a later timestep has no posterior: NaN (as the host path), not a number
    beta_cur = tl.where((sampler == 0) & (beta_cur < 0), float("nan"), beta_cur)
    sa = _sqrt(abar_t, ACC)
    sb = _sqrt(beta_t, ACC)
    inv_sa = _div(1.0 + 0.0 * sa, sa, ACC)
    inv_sb = _div(1.0 + 0.0 * sb, sb, ACC)
    # x0 = (q * x + k * e) * p and eps = d1 * x + d2 * e, by prediction type (epsilon, sample, v_prediction)
    p = tl.where(prediction_type == 0, inv_sa, 1.0)
    q = tl.where(prediction_type == 0, 1.0, tl.where(prediction_type == 1, 0.0, sa))
    k = tl.where(prediction_type == 1, 1.0, -sb)
    d1 = tl.where(prediction_type == 0, 0.0, tl.where(prediction_type == 1, inv_sb, sb))
    d2 = tl.where(prediction_type == 0, 1.0, tl.where(prediction_type == 1, -sa * inv_sb, sa))
    # DDPM: posterior mean of formula (7); sigma^2 = fixed_small (clamped at 1e-20) or fixed_large; the learned
    # variances scale a per-element f(v): learned cz = 1, learned_range cz = sqrt(var) and ck = log(beta / var) / 2
    inv_bt = _div(1.0 + 0.0 * beta_t, beta_t, ACC)
    sqrt_p = _sqrt(abar_p, ACC)
    ddpm_a = sqrt_p * beta_cur * inv_bt
    # sqrt(alpha_t) = sqrt(abar_t / abar_prev); 1 - beta_cur >= 0 but for rounding (abar_t = 0: beta_cur ~ 1)
    ddpm_x = _sqrt(tl.maximum(1.0 - beta_cur, 0.0, propagate_nan=tl.PropagateNan.ALL), ACC) * beta_p * inv_bt
    var = beta_p * inv_bt * beta_cur
    var_c = tl.maximum(var, 1e-20)
    ddpm_z = tl.where(variance_type == 2, 1.0, _sqrt(tl.where(variance_type == 1, beta_cur, var_c), ACC))
    ck = 0.5 * tl.log(_div(beta_cur, var_c, ACC))
    # DDIM (formula 12): std = eta * sqrt(beta_p / beta_t * beta_cur); direction weight sqrt(beta_p - std^2)
    # eta = 0 has no variance term at all: a step to a later timestep (inversion, var < 0) stays defined
    std = tl.where(eta == 0.0, 0.0, eta * _sqrt(var, ACC))
    direction = _sqrt(tl.maximum(beta_p - std * std, 0.0, propagate_nan=tl.PropagateNan.ALL), ACC)
    ddim_a = sqrt_p
    ddim_x = direction * d1
    ddim_e = direction * d2
    # use_clipped_model_output: eps re-derived from the clipped x0, eps = (x - sa * x0) / sb
    ddim_a = tl.where(use_clipped_model_output != 0, ddim_a - direction * sa * inv_sb, ddim_a)
    ddim_x = tl.where(use_clipped_model_output != 0, direction * inv_sb, ddim_x)
    ddim_e = tl.where(use_clipped_model_output != 0, 0.0, ddim_e)
    is_ddpm = sampler == 0
    ca = tl.where(is_ddpm, ddpm_a, ddim_a)
    cx = tl.where(is_ddpm, ddpm_x, ddim_x)
    ce = tl.where(is_ddpm, 0.0, ddim_e)
    cz = tl.where(t > 0, tl.where(is_ddpm, ddpm_z, std), 0.0)  # never noise where t == 0
    return p, q, k, ca, cx, ce, cz, ck


@device_function
@triton.jit
def _sincos_2pi(u):
    """(cos(2 pi u), sin(2 pi u)) for u in [0, 1) (float32) without libdevice's cosf/sinf, whose Payne-Hanek
    slow path for huge arguments is a local array: a stack frame in every kernel that calls them (STACK:32
    in the compile test). The argument needs no such reduction: u = q/4 + f with q = round(4u) and f in
    [-1/8, 1/8] exactly (u - q/4 is exact in float32), so both are +-cos or +-sin of x = 2 pi f in
    [-pi/4, pi/4], each a Cephes minimax polynomial (about 1 ulp, like cosf itself)."""
    q = tl.floor(4.0 * u + 0.5)
    x = (u - 0.25 * q) * 6.283185307179586
    z = x * x
    c = 1.0 - 0.5 * z + z * z * ((2.443315711809948e-05 * z - 1.388731625493765e-03) * z + 4.166664568298827e-02)
    s = x + x * z * ((-1.9515295891e-04 * z + 8.3321608736e-03) * z - 1.6666654611e-01)
    quadrant = q.to(tl.int32) & 3
    cos = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    sin = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    return cos, sin


@device_function
@triton.jit
def _box_muller(a, b, FAST: tl.constexpr):
    """Two standard normals (r cos(2 pi u2), r sin(2 pi u2)), r = sqrt(-2 ln u1), from two uint32 words.
    ``FAST``: the MUFU approximations (lg2, sin, cos: absolute error ~2**-21, far below the 16-bit dtypes'
    rounding) in place of the accurate log and ``_sincos_2pi``; the same values to within that error."""
    u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(a))
    u2 = tl.uint_to_uniform_float(b)
    if FAST:  # cos(2 pi u) = -cos(2 pi u - pi): MUFU's argument in [-pi, pi), its accurate range
        r = -tl.sqrt(-2.0 * LN2 * libdevice.fast_log2f(u1))
        theta = u2 * 6.283185307179586 - 3.141592653589793
        return r * libdevice.fast_cosf(theta), r * libdevice.fast_sinf(theta)
    else:
        r = tl.sqrt(-2.0 * tl.log(u1))
        cos, sin = _sincos_2pi(u2)
        return r * cos, r * sin


@device_function
@triton.jit
def _philox_normals(seed, row, col0, inner, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """The standard normal noise of the columns col0 .. col0 + BLOCK - 1 of sample ``row`` (float32).

    Four normals from each Philox4x32-10 call (``tl.randint4x``'s four words, two Box-Muller pairs): column
    j of sample b takes normal j % 4 of the call at counter b * ceil(inner / 4) + j // 4 (the flat element
    index's i // 4 and i % 4 when inner is a multiple of 4), so the noise depends on (seed, element) only,
    not on BLOCK or the grid. The MUFU approximations for 16-bit ``DTYPE`` outputs on the GPU
    (``_box_muller``)."""
    FAST: tl.constexpr = _MUFU and DTYPE.primitive_bitwidth == 16
    counter = row * tl.cdiv(inner, 4) + col0 // 4 + tl.arange(0, BLOCK // 4)
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    n0, n1 = _box_muller(w0, w1, FAST)
    n2, n3 = _box_muller(w2, w3, FAST)
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))  # n0 n1 n2 n3 of each call, in order


@autotune(STEP_CONFIGS, key=["n_bucket", "inner_bucket"])
@triton.jit
def _q_sample_kernel(x0_ptr, noise_ptr, t_ptr, q_ptr, out_ptr, v_ptr, inner, t_stride, num_t, return_v,
                     n_bucket, inner_bucket, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, _, mask, offs = _row_block(inner, BLOCK)
    a, b = _gather_q(q_ptr, tl.load(t_ptr + row * t_stride), num_t, ACC)
    x0 = tl.load(x0_ptr + offs, mask=mask).to(ACC)
    z = tl.load(noise_ptr + offs, mask=mask).to(ACC)
    tl.store(out_ptr + offs, (a * x0 + b * z).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, (a * z - b * x0).to(v_ptr.dtype.element_ty), mask=_gate(mask, return_v))


@autotune(STEP_CONFIGS, key=["n_bucket", "inner_bucket"])
@triton.jit
def _q_sample_backward_kernel(grad_ptr, grad_v_ptr, t_ptr, q_ptr, grad_x0_ptr, grad_noise_ptr, inner, t_stride,
                              num_t, has_grad_v, n_bucket, inner_bucket, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, _, mask, offs = _row_block(inner, BLOCK)
    a, b = _gather_q(q_ptr, tl.load(t_ptr + row * t_stride), num_t, ACC)
    g = tl.load(grad_ptr + offs, mask=mask).to(ACC)
    gv = tl.load(grad_v_ptr + offs, mask=_gate(mask, has_grad_v), other=0.0).to(ACC)
    tl.store(grad_x0_ptr + offs, (a * g - b * gv).to(grad_x0_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_noise_ptr + offs, (b * g + a * gv).to(grad_noise_ptr.dtype.element_ty), mask=mask)


@autotune(STEP_CONFIGS, key=["n_bucket", "inner_bucket"])
@triton.jit
def _diffusion_step_kernel(model_ptr, uncond_ptr, x_ptr, noise_ptr, seed_ptr, t_ptr, prev_t_ptr, guidance_ptr,
                           threshold_ptr, abar_ptr, out_ptr, pred_x0_ptr, inner, model_stride, t_stride, prev_t_stride,
                           prev_offset, guidance_stride, threshold_stride, num_t, sampler, variance_type,
                           prediction_type, has_uncond, clip_sample, thresholding, use_clipped_model_output,
                           diffusers_rounding, return_pred_x0, final_alpha_cumprod, final_alpha_cumprod_lo,
                           eta, eta_lo, clip_range, clip_range_lo, n_bucket, inner_bucket,
                           ACC: tl.constexpr, NOISE: tl.constexpr, LEARNED: tl.constexpr, BLOCK: tl.constexpr):
    row, col0, mask, offs = _row_block(inner, BLOCK)
    # model/uncond rows are model_stride apart: inner, or 2 * inner with a learned variance in the last C channels
    m_offs = row * model_stride + col0 + tl.arange(0, BLOCK)
    t = tl.load(t_ptr + row * t_stride)
    prev_t = tl.load(prev_t_ptr + row * prev_t_stride) + prev_offset
    p, q, k, ca, cx, ce, cz, ck = _step_coefficients(
        abar_ptr, t, prev_t, num_t, _scalar(final_alpha_cumprod, final_alpha_cumprod_lo, ACC), _scalar(eta, eta_lo, ACC),
        sampler, variance_type, prediction_type, use_clipped_model_output, diffusers_rounding, ACC)
    c1, c2 = p * q, p * k
    # use_clipped_model_output 2 (DDIM's, x0 unclamped: diffusion_step_forward): diffusers' eps = (x - sa * x0) / sb
    # is NaN where x0 is +-inf (an epsilon model at abar_t = 0, p = inf); 0 * p makes ca so (0 elsewhere)
    ca = tl.where(use_clipped_model_output == 2, ca + 0.0 * p, ca)
    w = tl.load(guidance_ptr + row * guidance_stride).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    e = tl.load(model_ptr + m_offs, mask=mask).to(ACC)
    u = tl.load(uncond_ptr + m_offs, mask=_gate(mask, has_uncond), other=0.0).to(ACC)
    e = tl.where(has_uncond != 0, e + w * (e - u), e)  # classifier-free guidance, fused
    x0 = (q * x + k * e) * p
    # clip_sample clamps to +-clip_range; thresholding to +-s (this sample's dynamic threshold), then divides by s
    s = tl.load(threshold_ptr + row * threshold_stride).to(ACC)
    r = tl.where(thresholding != 0, s, _scalar(clip_range, clip_range_lo, ACC))
    clamped = tl.minimum(tl.maximum(x0, -r, propagate_nan=tl.PropagateNan.ALL), r, propagate_nan=tl.PropagateNan.ALL)
    clamped = tl.where(thresholding != 0, clamped * _div(1.0 + 0.0 * r, r, ACC), clamped)
    x0 = tl.where((clip_sample != 0) | (thresholding != 0), clamped, x0)
    # the terms the step has (StepSpec.terms): an absent one is left out, not added as 0 * x (an inf there
    # stays what the literal formula makes of it). With x0 neither clamped nor returned the x0 stage folds
    # into the coefficients, out = (ca c1 + cx) x + (ca c2 + ce) e, as on the host: both backends compute
    # the same map, for non-finite inputs too. Not where p is infinite (an epsilon model at abar_t = 0): x0 is
    # +-inf there, and the folded map inf - inf
    has_x = (sampler == 0) | (prediction_type != 0) | (use_clipped_model_output != 0)
    has_e = (sampler == 1) & (use_clipped_model_output == 0)
    staged = ca * x0 + tl.where(has_x, cx * x, 0.0) + tl.where(has_e, ce * e, 0.0)
    folded = (ca * c1 + cx) * x + (ca * c2 + ce) * e
    out = tl.where((clip_sample == 0) & (thresholding == 0) & (return_pred_x0 == 0) & (p < float("inf")), folded,
                   staged)
    if NOISE != 0:
        if NOISE == 1:
            z = tl.load(noise_ptr + offs, mask=mask).to(ACC)
        else:
            z = _philox_normals(tl.load(seed_ptr), row, col0, inner, out_ptr.dtype.element_ty, BLOCK).to(ACC)
        noise = cz * z
        if LEARNED:  # a learned variance: sigma per element from the model's last C channels
            v = tl.load(model_ptr + m_offs + inner, mask=mask, other=0.0).to(ACC)
            noise = noise * tl.where(variance_type == 2, _sqrt(v, ACC), tl.exp((v + 1.0) * (0.5 * ck)))
        out = tl.where(t > 0, out + noise, out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(pred_x0_ptr + offs, x0.to(pred_x0_ptr.dtype.element_ty), mask=_gate(mask, return_pred_x0))


@autotune(STEP_CONFIGS, key=["n_bucket", "inner_bucket"])
@triton.jit
def _diffusion_step_backward_kernel(grad_ptr, grad_pred_x0_ptr, model_ptr, uncond_ptr, x_ptr, t_ptr, prev_t_ptr,
                                    guidance_ptr, abar_ptr, grad_model_ptr, grad_uncond_ptr, grad_x_ptr,
                                    grad_noise_ptr, inner, t_stride, prev_t_stride, prev_offset, guidance_stride,
                                    num_t, sampler, variance_type, prediction_type, has_uncond, clip_sample,
                                    use_clipped_model_output, diffusers_rounding, has_grad_pred_x0, want_grad_noise,
                                    final_alpha_cumprod,
                                    final_alpha_cumprod_lo, eta, eta_lo, clip_range, clip_range_lo, n_bucket,
                                    inner_bucket, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row, _, mask, offs = _row_block(inner, BLOCK)
    t = tl.load(t_ptr + row * t_stride)
    prev_t = tl.load(prev_t_ptr + row * prev_t_stride) + prev_offset
    p, q, k, ca, cx, ce, cz, _ = _step_coefficients(
        abar_ptr, t, prev_t, num_t, _scalar(final_alpha_cumprod, final_alpha_cumprod_lo, ACC), _scalar(eta, eta_lo, ACC),
        sampler, variance_type, prediction_type, use_clipped_model_output, diffusers_rounding, ACC)
    c1, c2 = p * q, p * k
    w = tl.load(guidance_ptr + row * guidance_stride).to(ACC)
    g = tl.load(grad_ptr + offs, mask=mask).to(ACC)
    g_x0 = ca * g + tl.load(grad_pred_x0_ptr + offs, mask=_gate(mask, has_grad_pred_x0), other=0.0).to(ACC)
    # clamp passes the gradient where -r <= x0 <= r: recompute x0 (x, m, u are read only when clipping)
    clipping = _gate(mask, clip_sample)
    x = tl.load(x_ptr + offs, mask=clipping, other=0.0).to(ACC)
    e = tl.load(model_ptr + offs, mask=clipping, other=0.0).to(ACC)
    u = tl.load(uncond_ptr + offs, mask=_gate(clipping, has_uncond), other=0.0).to(ACC)
    e = tl.where(has_uncond != 0, e + w * (e - u), e)
    x0 = (q * x + k * e) * p  # as the forward forms it
    r = _scalar(clip_range, clip_range_lo, ACC)
    g_x0 = tl.where((clip_sample == 0) | ((x0 >= -r) & (x0 <= r)), g_x0, 0.0)
    g_e = c2 * g_x0 + ce * g
    g_x = c1 * g_x0 + cx * g
    tl.store(grad_model_ptr + offs, tl.where(has_uncond != 0, (1.0 + w) * g_e, g_e).to(grad_model_ptr.dtype.element_ty),
             mask=mask)
    tl.store(grad_uncond_ptr + offs, (-w * g_e).to(grad_uncond_ptr.dtype.element_ty), mask=_gate(mask, has_uncond))
    tl.store(grad_x_ptr + offs, g_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_noise_ptr + offs, (cz * g).to(grad_noise_ptr.dtype.element_ty), mask=_gate(mask, want_grad_noise))


# The per-sample size and the buckets are multiples of 16 at the GPU's shapes; strides (0 or 1), num_t (1000),
# prev_offset and the flags are values, declared plain (a real launch folds a 1 into a constant and marks a
# 0 divisible: the plain variant is the general code both share).
_SIZES16 = ["inner", "n_bucket", "inner_bucket"]
_Q_INTS = ["t_stride", "num_t"]
register(_q_sample_kernel, configs=STEP_CONFIGS,
         variants=dtype_variants(["x0_ptr", "noise_ptr", "out_ptr", "v_ptr"], ints=_Q_INTS + ["return_v"],
                                 ints16=_SIZES16, tables=["q_ptr"], i64_tensors=["t_ptr"]))
register(_q_sample_backward_kernel, configs=STEP_CONFIGS,
         variants=dtype_variants(["grad_ptr", "grad_v_ptr", "grad_x0_ptr", "grad_noise_ptr"],
                                 ints=_Q_INTS + ["has_grad_v"], ints16=_SIZES16, tables=["q_ptr"],
                                 i64_tensors=["t_ptr"]))
_STEP_INTS = ["t_stride", "prev_t_stride", "prev_offset", "guidance_stride", "num_t", "sampler", "variance_type",
              "prediction_type", "has_uncond", "clip_sample", "use_clipped_model_output", "diffusers_rounding"]
_STEP_FLOATS = ["final_alpha_cumprod", "final_alpha_cumprod_lo", "eta", "eta_lo", "clip_range", "clip_range_lo"]
# LEARNED (a learned variance, compiled only where a step adds noise: the per-element sigma is code the other
# steps do not carry)
register(_diffusion_step_kernel, configs=STEP_CONFIGS,
         variants=[v for noise, learned in ((NOISE_NONE, False), (NOISE_READ, False), (NOISE_PHILOX, False),
                                            (NOISE_READ, True), (NOISE_PHILOX, True))
                   for v in dtype_variants(["model_ptr", "uncond_ptr", "x_ptr", "noise_ptr", "out_ptr", "pred_x0_ptr"],
                                           ["guidance_ptr", "threshold_ptr"],
                                           _STEP_INTS + ["return_pred_x0", "threshold_stride", "thresholding"],
                                           ints16=_SIZES16 + ["model_stride"],
                                           f32_tables=["abar_ptr"],
                                           i64_tensors=["seed_ptr", "t_ptr", "prev_t_ptr"], floats=_STEP_FLOATS,
                                           NOISE=noise, LEARNED=learned)])
register(_diffusion_step_backward_kernel, configs=STEP_CONFIGS,
         variants=dtype_variants(["grad_ptr", "grad_pred_x0_ptr", "model_ptr", "uncond_ptr", "x_ptr", "grad_model_ptr",
                                  "grad_uncond_ptr", "grad_x_ptr", "grad_noise_ptr"], ["guidance_ptr"],
                                 _STEP_INTS + ["has_grad_pred_x0", "want_grad_noise"], ints16=_SIZES16,
                                 f32_tables=["abar_ptr"], i64_tensors=["t_ptr", "prev_t_ptr"], floats=_STEP_FLOATS))


def _split(value: float) -> tuple:
    """(hi, lo) float32 parts of a Python float (see _scalar)."""
    with np.errstate(over="ignore"):
        hi = float(np.float32(value))
    return hi, (float(value - hi) if math.isfinite(hi) else 0.0)


def q_sample_forward(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, q_coefficients: torch.Tensor, *,
                     return_v: bool, block=None):
    """Launch ``_q_sample_kernel``: (x_t, v or an empty tensor). ``t`` int64 (1,) or (B,) on the device;
    ``q_coefficients`` the (2, T) table of sqrt(abar_t) and sqrt(1 - abar_t) in the math dtype. Inputs are made
    contiguous once (a copy only if they are not: one extra read and write each)."""
    x0, noise = x0.contiguous(), noise.contiguous()
    out = torch.empty_like(x0)
    v = torch.empty_like(x0) if return_v else torch.empty(0, dtype=x0.dtype, device=x0.device)
    n = x0.numel()
    if n == 0:
        return out, v
    inner = n // x0.shape[0]
    _launch(_q_sample_kernel, x0.shape[0], inner, block, x0_ptr=x0, noise_ptr=noise, t_ptr=t,
            q_ptr=q_coefficients.contiguous(), out_ptr=out, v_ptr=v if return_v else out, inner=inner,
            t_stride=_stride(t), num_t=q_coefficients.shape[1], return_v=int(return_v), n_bucket=bucket(n),
            inner_bucket=bucket(inner), ACC=acc_type(x0.dtype))
    return out, v


def q_sample_backward(grad: torch.Tensor, grad_v, t: torch.Tensor, q_coefficients: torch.Tensor, block=None):
    """Launch ``_q_sample_backward_kernel``: (grad_x0, grad_noise) = (a g - b gv, b g + a gv)."""
    grad = grad.contiguous()
    grad_v = grad_v.contiguous() if grad_v is not None else None
    grad_x0, grad_noise = torch.empty_like(grad), torch.empty_like(grad)
    n = grad.numel()
    if n == 0:
        return grad_x0, grad_noise
    inner = n // grad.shape[0]
    _launch(_q_sample_backward_kernel, grad.shape[0], inner, block, grad_ptr=grad,
            grad_v_ptr=grad if grad_v is None else grad_v, t_ptr=t, q_ptr=q_coefficients.contiguous(),
            grad_x0_ptr=grad_x0, grad_noise_ptr=grad_noise, inner=inner, t_stride=_stride(t),
            num_t=q_coefficients.shape[1], has_grad_v=int(grad_v is not None), n_bucket=bucket(n),
            inner_bucket=bucket(inner), ACC=acc_type(grad.dtype))
    return grad_x0, grad_noise


@functools.lru_cache(maxsize=None)
def _zero_weight(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One zero weight per device and dtype (the guidance table of unguided steps; never written)."""
    return torch.zeros(1, dtype=dtype, device=device)


def _step_arguments(like, t, prev_t, guidance, alphas_cumprod, has_uncond, *, sampler, prediction_type,
                    variance_type, clip_sample, clip_range, eta, final_alpha_cumprod, use_clipped_model_output,
                    prev_offset, diffusers_rounding):
    """The keyword arguments the forward and backward step kernels share, from the step's options."""
    n = like.numel()
    inner = n // like.shape[0]
    math_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if guidance is None:  # no uncond: the kernel reads one unused weight
        guidance = _zero_weight(like.device, math_dtype)
    table, guidance_stride = _guidance_table(guidance, like)
    final_hi, final_lo = _split(final_alpha_cumprod)
    eta_hi, eta_lo = _split(eta)
    range_hi, range_lo = _split(clip_range)
    return dict(t_ptr=t, prev_t_ptr=prev_t, guidance_ptr=table, abar_ptr=alphas_cumprod, inner=inner,
                t_stride=_stride(t), prev_t_stride=_stride(prev_t), prev_offset=int(prev_offset),
                guidance_stride=guidance_stride, num_t=alphas_cumprod.numel(), sampler=CHOICE_CODES[sampler],
                variance_type=CHOICE_CODES[variance_type], prediction_type=CHOICE_CODES[prediction_type],
                has_uncond=int(has_uncond), clip_sample=int(clip_sample),
                use_clipped_model_output=int(use_clipped_model_output),
                diffusers_rounding=int(diffusers_rounding), final_alpha_cumprod=final_hi,
                final_alpha_cumprod_lo=final_lo, eta=eta_hi, eta_lo=eta_lo, clip_range=range_hi,
                clip_range_lo=range_lo, n_bucket=bucket(n), inner_bucket=bucket(inner), ACC=acc_type(like.dtype))


def diffusion_step_forward(*, model_output, uncond_output, x_t, noise, seed, t, prev_t, guidance, alphas_cumprod,
                           return_pred_x0, threshold=None, thresholding=False, dynamic_thresholding_ratio=None,
                           sample_max_value=None, block=None, **options):
    """Launch ``_diffusion_step_kernel``: (x_prev, pred_x0 or an empty tensor).

    ``t``/``prev_t``: int64 (1,) or (B,) device tensors (prev_t is read as ``prev_t + prev_offset``);
    ``guidance``: one weight or one per sample (a tensor; None without ``uncond_output``); ``noise``: a
    tensor to read, else ``seed`` (int64 (1,) device tensor) for in-kernel Philox noise, else no noise;
    ``threshold``: with ``thresholding``, the (B,) dynamic thresholds s in the math dtype (computed by the
    caller: the quantile is theirs, the ratio and bound come along unused). ``model_output`` (and
    ``uncond_output``) have 2C channels for a learned variance_type. ``options``: the step's sampler,
    prediction_type, variance_type, clip_sample, clip_range, eta, final_alpha_cumprod,
    use_clipped_model_output, prev_offset and diffusers_rounding (fastssl.diffusion_step.StepSpec). Inputs are
    made contiguous once (a copy only when they are not)."""
    model_output, x_t = model_output.contiguous(), x_t.contiguous()
    uncond_output = uncond_output.contiguous() if uncond_output is not None else None
    noise = noise.contiguous() if noise is not None else None
    out = torch.empty_like(x_t)
    pred_x0 = torch.empty_like(x_t) if return_pred_x0 else torch.empty(0, dtype=x_t.dtype, device=x_t.device)
    if x_t.numel() == 0:
        return out, pred_x0
    mode = NOISE_READ if noise is not None else NOISE_PHILOX if seed is not None else NOISE_NONE
    shared = _step_arguments(x_t, t, prev_t, guidance, alphas_cumprod, uncond_output is not None, **options)
    table, stride = (threshold, _stride(threshold)) if thresholding else (shared["guidance_ptr"], 0)
    if shared["use_clipped_model_output"] and options["sampler"] == "ddim" and not (options["clip_sample"]
                                                                                   or thresholding):
        shared["use_clipped_model_output"] = 2  # eps re-derived from an unclamped x0 (the kernel's ca)
    _launch(_diffusion_step_kernel, x_t.shape[0], shared["inner"], block, **shared, threshold_ptr=table,
            threshold_stride=stride, thresholding=int(thresholding), model_stride=model_output.numel() // x_t.shape[0],
            model_ptr=model_output,
            uncond_ptr=model_output if uncond_output is None else uncond_output, x_ptr=x_t,
            noise_ptr=x_t if noise is None else noise, seed_ptr=t if seed is None else seed, out_ptr=out,
            pred_x0_ptr=pred_x0 if return_pred_x0 else out, return_pred_x0=int(return_pred_x0), NOISE=mode,
            LEARNED=mode != NOISE_NONE and options["variance_type"] in ("learned", "learned_range"))
    return out, pred_x0


def diffusion_step_backward(*, grad, grad_pred_x0, model_output, uncond_output, x_t, t, prev_t, guidance,
                            alphas_cumprod, want_grad_noise, block=None, **options):
    """Launch ``_diffusion_step_backward_kernel``: (grad_model, grad_uncond, grad_x, grad_noise); the
    entries for an absent uncond or an unwanted noise gradient are empty tensors, each its own (a custom op's
    outputs may not alias one another). With ``clip_sample`` the kernel re-reads model_output, uncond_output
    and x_t to rebuild the clamp's mask."""
    grad = grad.contiguous()
    grad_pred_x0 = grad_pred_x0.contiguous() if grad_pred_x0 is not None else None
    model_output, x_t = model_output.contiguous(), x_t.contiguous()
    uncond_output = uncond_output.contiguous() if uncond_output is not None else None
    grad_model, grad_x = torch.empty_like(grad), torch.empty_like(grad)
    grad_uncond = torch.empty_like(grad) if uncond_output is not None else grad.new_empty(0)
    grad_noise = torch.empty_like(grad) if want_grad_noise else grad.new_empty(0)
    if grad.numel() == 0:
        return grad_model, grad_uncond, grad_x, grad_noise
    shared = _step_arguments(grad, t, prev_t, guidance, alphas_cumprod, uncond_output is not None, **options)
    _launch(_diffusion_step_backward_kernel, grad.shape[0], shared["inner"], block, **shared, grad_ptr=grad,
            grad_pred_x0_ptr=grad if grad_pred_x0 is None else grad_pred_x0, model_ptr=model_output,
            uncond_ptr=model_output if uncond_output is None else uncond_output, x_ptr=x_t, grad_model_ptr=grad_model,
            grad_uncond_ptr=grad_uncond if uncond_output is not None else grad_model, grad_x_ptr=grad_x,
            grad_noise_ptr=grad_noise if want_grad_noise else grad_model, has_grad_pred_x0=int(grad_pred_x0 is not None),
            want_grad_noise=int(want_grad_noise))
    return grad_model, grad_uncond, grad_x, grad_noise
