"""The registry of every Triton kernel's compile specs, walked by the ahead-of-time compile check.

A kernel module declares, next to each ``@triton.jit`` kernel, the argument types it is launched
with (one *variant* per dtype or flag combination) and its autotune configs::

    register(_cfg_combine_kernel, configs=CFG_CONFIGS,
             variants=[variant({"x_ptr": "*fp32", "n": "i32"}, HAS_W=False), ...])

Device helpers (``@triton.jit`` functions only called from kernels) are declared with
``@device_function`` so that nothing jitted escapes the registry: ``tests/test_compile_sm90.py``
fails when a ``@triton.jit`` function in ``kernels/`` is in neither list.

>>> import triton
>>> configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (256, 1024) if keep(b, 4, max_block=512)]
>>> [c.kwargs["BLOCK"] for c in configs]
[256]
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Triton's names of the dtypes the ops accept, for compile signatures ("*bf16").
TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def acc_type(dtype: torch.dtype):
    """The in-register math type: float64 for float64 tensors, float32 for every other dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@dataclass(frozen=True)
class Variant:
    """One way a kernel is launched: runtime argument types (``"*bf16"``, ``"i32"``, ``"fp32"``; an
    integer that launches always pass as a multiple of 16 may say so, ``"i32:16"``) and the values of
    constexpr flags that are not autotuned. Pointers are compiled as 16-byte aligned (see ``aot.py``)."""

    signature: dict
    constexprs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class KernelSpec:
    kernel: object  # the JITFunction (or the Autotuner / Heuristics wrapping it)
    variants: tuple
    configs: tuple  # triton.Config: autotuned constexprs, num_warps, num_stages
    uses_dot: bool = False  # matmul kernels must reach Hopper's wgmma path on sm_90

    @property
    def jit_fn(self):
        return unwrap(self.kernel)

    @property
    def name(self) -> str:
        return self.jit_fn.__name__


KERNELS: list[KernelSpec] = []
DEVICE_FUNCTIONS: list = []


def unwrap(fn):
    """The JITFunction under any number of ``triton.autotune`` / ``triton.heuristics`` wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def variant(signature: dict, **constexprs) -> Variant:
    return Variant(dict(signature), dict(constexprs))


def register(kernel, *, variants, configs=None, uses_dot: bool = False):
    """Declare ``kernel``'s launch variants and autotune configs; returns ``kernel`` unchanged."""
    configs = tuple(configs) if configs else (triton.Config({}, num_warps=4, num_stages=3),)
    KERNELS.append(KernelSpec(kernel, tuple(variants), configs, uses_dot))
    return kernel


def device_function(fn):
    """Decorator: mark a ``@triton.jit`` function as a device helper (compiled inside its callers)."""
    DEVICE_FUNCTIONS.append(fn)
    return fn


def autotune(configs, key, **kwargs):
    """``triton.autotune`` over ``configs``; under the interpreter only the first config runs (timing
    CPU emulation says nothing about the GPU, and every config is proven by the compile test)."""
    configs = list(configs)
    return triton.autotune(configs[:1] if INTERPRET else configs, key=key, **kwargs)


def keep(block: int, num_warps: int, *, max_block: int = 1 << 16, min_per_thread: int = 1,
         max_per_thread: int = 1 << 16) -> bool:
    """The autotune filter: drop configs with blocks over ``max_block`` or with too few or too many
    elements per thread (too many spill: the compile test catches them)."""
    per_thread = block // (num_warps * 32)
    return block <= max_block and min_per_thread <= per_thread <= max_per_thread


def bucket(n: int) -> int:
    """Autotune key bucketing: the next power of two, so sizes in one octave share a tuned config."""
    return 1 << max(int(n) - 1, 0).bit_length()
