"""Triton kernels of the diffusion slice: elementwise, memory-bound, fp32 math in registers.

``cfg_combine``: out = cond + w * (cond - uncond) = (1 + w) * cond - w * uncond, w a scalar or one per
sample (row of the leading dimension). One read of each input and one write: 3 element accesses
(eager PyTorch does 5 and two launches).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import autotune, bucket, keep, register, variant

# Elementwise configs: 4-16 elements a thread (16-byte vectors for fp32 and bf16), 4 or 8 warps.
# 32 a thread (4096 x 4 warps) spills in the fp64 variants (ptxas, sm_90, tests/test_compile_sm90.py).
ELEMENTWISE_CONFIGS = [
    triton.Config({"BLOCK": block}, num_warps=warps)
    for block in (1024, 2048, 4096)
    for warps in (4, 8)
    if keep(block, warps, min_per_thread=4, max_per_thread=16)
]

TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def acc_type(dtype: torch.dtype):
    """The in-register math type: float64 for float64 tensors, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


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


def dtype_variants(tensors, tables=(), ints=()):
    """One compile variant per input dtype: ``tensors`` in that dtype, ``tables`` (per-sample weights,
    schedule tables) in the math dtype, ``ints`` as i32."""
    out = []
    for dtype, ty in TL_DTYPE.items():
        table_ty = "fp64" if dtype == torch.float64 else "fp32"
        signature = {**{a: f"*{ty}" for a in tensors}, **{a: f"*{table_ty}" for a in tables}, **{a: "i32" for a in ints}}
        out.append(variant(signature, ACC=acc_type(dtype)))
    return out


register(_cfg_combine_kernel, configs=ELEMENTWISE_CONFIGS,
         variants=dtype_variants(["cond_ptr", "uncond_ptr", "out_ptr"], ["w_ptr"], ["n", "inner", "w_stride", "n_bucket"]))
register(_cfg_combine_backward_kernel, configs=ELEMENTWISE_CONFIGS,
         variants=dtype_variants(["grad_ptr", "grad_cond_ptr", "grad_uncond_ptr"], ["w_ptr"],
                                 ["n", "inner", "w_stride", "n_bucket"]))


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
