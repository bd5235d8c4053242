"""Diffusion ops: classifier-free guidance (and, in this slice, the schedules and sampler steps).

Each op is a ``torch.library.custom_op`` (so ``torch.compile(fullgraph=True)`` traces through it) whose
body asks :func:`fastssl.backend.use_triton` which path runs: the Triton kernels of
``fastssl.kernels.diffusion`` or the PyTorch path beside them. ``*_reference`` functions are the float64
formulas the tests compare against.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backend import use_triton
from .checks import accumulation_dtype, check_float, check_same, check_same_shape


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
