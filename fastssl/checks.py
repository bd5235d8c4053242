"""Argument validation shared by every public op (API.md: bad input raises ``ValueError`` or
``TypeError`` naming the argument, its value or shape, and what was expected).

Checks only read metadata (dtype, shape, device), never tensor values, so they cost no host sync.

>>> import torch
>>> check_float("query", torch.zeros(2, 3, dtype=torch.long))
Traceback (most recent call last):
    ...
TypeError: query must be a floating-point tensor (float32, float16, bfloat16 or float64), got torch.int64
"""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float(name: str, value) -> torch.Tensor:
    """``value`` is a tensor of one of the supported floating dtypes."""
    check_tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {value.dtype}"
        )
    return value


def check_ndim(name: str, value: torch.Tensor, ndim: int, layout: str = "") -> torch.Tensor:
    if value.dim() != ndim:
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{name} must be {ndim}-D{hint}, got shape {tuple(value.shape)}")
    return value


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor], *, dtype: bool = True) -> None:
    """All ``tensors`` share one device (and one dtype unless ``dtype=False``)."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; mixing dtypes is not allowed")


def check_same_shape(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}; they must match")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive(name: str, value) -> float:
    """A positive finite Python number (temperatures, scales)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 math for float64 inputs, float32 for everything else (API.md's common rules)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
