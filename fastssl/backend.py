"""The one place that decides, for every op, whether the Triton kernels or the PyTorch path runs.

``FASTSSL_BACKEND`` (read at each call, so tests and users can switch at run time):

- ``auto`` (default): CUDA tensors run the Triton kernels, CPU tensors the memory-bounded PyTorch path.
- ``triton``: always the Triton kernels. On CPU tensors this needs ``TRITON_INTERPRET=1`` set before
  Triton is first imported (how the test suite runs the kernels without a GPU).
- ``torch``: always the PyTorch path.

>>> import torch
>>> from fastssl.backend import use_triton
>>> use_triton(torch.zeros(3))  # a CPU tensor under the default "auto"
False
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "torch")


def environment(name: str) -> Optional[str]:
    """``os.environ.get(name)``, at a fortieth of its cost for an unset name: ``os.environ.get`` raises and
    catches a KeyError then (~1 us, the bulk of a small CPU op's backend decision), so the live mapping
    behind ``os.environ`` (which its writes, monkeypatch's included, update) is read directly. Under
    torch.compile the public ``os.environ.get``, which dynamo guards on."""
    data = getattr(os.environ, "_data", None)
    if data is None or torch.compiler.is_compiling():
        return os.environ.get(name)
    key = _ENCODED_NAMES.get(name)
    if key is None:
        key = _ENCODED_NAMES[name] = os.environ.encodekey(name)
    raw = data.get(key)
    return None if raw is None else os.environ.decodevalue(raw)


_ENCODED_NAMES: dict = {}


def interpreting() -> bool:
    """True when Triton runs its kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return (environment("TRITON_INTERPRET") or "0").lower() in ("1", "true", "on", "yes")


def requested_backend() -> str:
    """The value of ``FASTSSL_BACKEND``, validated; ``auto`` when unset."""
    raw = environment("FASTSSL_BACKEND")
    if raw is None or raw in BACKENDS:  # the usual spellings need no parsing
        return raw or "auto"
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FASTSSL_BACKEND={value!r} is not one of {BACKENDS}")
    return value


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether Triton is installed: looked up once, at import (torch 2.11's dynamo refuses to trace
    ``importlib.util.find_spec``, so a lookup per call broke ``torch.compile(fullgraph=True)`` of the ops)."""
    return _TRITON_INSTALLED


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op over ``tensors`` should launch the Triton kernels (else the PyTorch path).

    Raises:
        RuntimeError: ``FASTSSL_BACKEND=triton`` where the kernels cannot run: Triton is not installed,
            or the tensors are on the CPU without ``TRITON_INTERPRET=1``.
    """
    choice = requested_backend()
    if choice == "torch":
        return False
    on_cuda = tensors[0].is_cuda if len(tensors) == 1 else all(t.is_cuda for t in tensors)
    if choice == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("FASTSSL_BACKEND=triton but Triton is not installed; pip install triton")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "FASTSSL_BACKEND=triton with CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before Triton is imported, move the tensors to CUDA, or use FASTSSL_BACKEND=auto|torch"
        )
    return True


def runs_on_host(*tensors) -> bool:
    """Whether an op over ``tensors`` runs its PyTorch path directly, here and now: eager mode, CPU tensors,
    nothing to differentiate, and ``FASTSSL_BACKEND`` not ``triton`` (what :func:`skip_dispatch` and
    :func:`use_triton` would decide together, in one pass: a small CPU op's Python is its cost).
    ``None`` entries are ignored."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (not t.is_cpu or (grad and t.requires_grad)):
            return False
    return requested_backend() != "triton"


def skip_dispatch(*tensors) -> bool:
    """Whether an op may run its body directly instead of through its custom op: in eager mode with nothing
    to differentiate (the dispatch costs ~40 us a call, which dominates small steps); compiled or
    differentiated calls go through the custom op. ``None`` entries are ignored."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def first_order(op_name: str):
    """An op's autograd backward, refusing double backward clearly: under ``create_graph=True`` the backward
    runs in grad mode, and the fused backward (a custom op with no derivative of its own) would fail with
    PyTorch's generic "no autograd formula" error; this names the op and what to do instead."""
    def wrap(backward):
        @functools.wraps(backward)
        def checked(ctx, *grads, **options):
            if torch.is_grad_enabled():
                raise RuntimeError(f"{op_name} has no double backward (create_graph=True): its fused backward is not "
                                   "itself differentiable; for second derivatives use the *_reference formula")
            return backward(ctx, *grads, **options)
        return checked
    return wrap
