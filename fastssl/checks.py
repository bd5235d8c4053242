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

import numbers
from typing import Optional, Sequence

import numpy as np
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


def check_class_ids(name: str, value) -> torch.Tensor:
    """``value`` is a tensor of an integer dtype (class ids: not float, complex or bool)."""
    check_tensor(name, value)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class ids, got {value.dtype}")
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


def check_bool(name: str, value) -> bool:
    """``value`` is True or False (a bool or a numpy bool; an int is refused, so a mix-up fails loudly)."""
    if value is True or value is False:
        return value
    if not isinstance(value, np.bool_):
        raise TypeError(f"{name} must be True or False (a bool), got {value!r}")
    return bool(value)


def check_int(name: str, value, *, low: Optional[int] = None, high: Optional[int] = None,
              accepted: str = "a Python int") -> int:
    """``value`` is an integer (not a bool) in ``[low, high]``; returned as a Python int. ``accepted``
    names what the argument takes in the TypeError (``"None or an int"`` where None is also taken)."""
    if type(value) is not int and (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be {accepted}, got {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if low is not None and high is not None else (
            f">= {low}" if low is not None else f"<= {high}")
        raise ValueError(f"{name} must be an int {bounds}, got {value}")
    return value


def check_number(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, accepted: str = "a Python float") -> float:
    """``value`` is a finite real number (not a bool) within the bounds (``low_open``/``high_open``
    exclude them); returned as a Python float. ``accepted`` names what the argument takes in the TypeError."""
    if type(value) is not float and (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be {accepted}, got {type(value).__name__}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above or value != value or value in (float("inf"), float("-inf")):
        if low is not None and high is not None:
            bounds = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            bounds = f" {'>' if low_open else '>='} {low}"
        elif high is not None:
            bounds = f" {'<' if high_open else '<='} {high}"
        else:
            bounds = ""
        raise ValueError(f"{name} must be a finite number{bounds}, got {value}")
    return value


def check_positive(name: str, value, *, accepted: str = "a Python float") -> float:
    """A positive finite Python number (temperatures, scales)."""
    return check_number(name, value, low=0, low_open=True, accepted=accepted)


def check_guidance(name: str, guidance, like: torch.Tensor, like_name: str):
    """Classifier-free guidance ``w`` for the batch ``like`` (B, ...), named ``like_name``: a Python number
    (returned as a float) or a floating tensor on like's device, 0-dim or ``(B,)`` (one weight per sample;
    returned as is)."""
    if isinstance(guidance, torch.Tensor):
        check_float(name, guidance)
        check_same((like_name, name), (like, guidance), dtype=False)
        if guidance.dim() > 1 or (guidance.dim() == 1 and guidance.shape[0] != like.shape[0]):
            raise ValueError(f"{name} must be a float, a 0-dim tensor or a ({like.shape[0]},) tensor (one weight per "
                             f"sample), got shape {tuple(guidance.shape)}")
        return guidance
    if type(guidance) is not float and (isinstance(guidance, (bool, np.bool_)) or not isinstance(guidance, numbers.Real)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(guidance).__name__}")
    return float(guidance)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 math for float64 inputs, float32 for everything else (API.md's common rules)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
