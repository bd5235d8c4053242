"""The registry of every Triton kernel's compile specs, walked by the ahead-of-time compile check, and the
conventions every kernel module shares: one ``dot_precision`` rule (and the ``dot_acc`` device helper that
applies it), one ``launch`` helper, the in-register math type ``acc_type``.

A kernel module declares, next to each ``@triton.jit`` kernel, the argument types it is launched
with (one *variant* per dtype or flag combination) and its autotune configs::

    register(_cfg_combine_kernel, configs=CFG_CONFIGS,
             variants=[variant({"x_ptr": "*fp32", "n": "i32"}, HAS_W=False), ...])

Device helpers (``@triton.jit`` functions only called from kernels) are declared with
``@device_function`` so that nothing jitted escapes the registry: ``tests/test_compile_sm90.py``
fails when a ``@triton.jit`` function in ``kernels/`` is in neither list.

The interpreter flag is :func:`fastssl.backend.interpreting` (read there only).

>>> import triton
>>> configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (256, 1024) if keep(b, 4, max_block=512)]
>>> [c.kwargs["BLOCK"] for c in configs]
[256]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from ..backend import interpreting


# Triton's names of the dtypes the ops accept, for compile signatures ("*bf16").
TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def acc_type(dtype: torch.dtype):
    """The in-register math type: float64 for float64 tensors, float32 for every other dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype, *, exact: str = "ieee", tf32: bool = True) -> str:
    """The ``input_precision`` of a ``tl.dot`` over ``dtype`` operands: one rule for every kernel module.

    The rule: a kernel is never less precise than the PyTorch matmul it replaces under the user's setting.
    TF32's 10-bit mantissas only where PyTorch allows them for its own matmuls
    (``torch.backends.cuda.matmul.allow_tf32``, default False) and the kernel has TF32 variants (``tf32``);
    otherwise float32 products as accurate as fp32, which ``exact`` says how the kernel gets: ``"ieee"``
    (FMA units) or ``"tf32x3"`` (three TF32 products on the tensor cores). float64: IEEE fp64.
    float16/bfloat16: ``"ieee"`` (their products are exact in the tensor cores' fp32 accumulators; the
    knob applies to fp32 operands only). So the float32 parity tolerances hold on both backends, and
    :func:`dot_precisions` lists the compile variants a kernel needs.

    >>> dot_precision(torch.bfloat16), dot_precision(torch.float64), dot_precision(torch.float32, exact="tf32x3", tf32=False)
    ('ieee', 'ieee', 'tf32x3')
    """
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if tf32 and torch.backends.cuda.matmul.allow_tf32 else exact


def dot_precisions(dtype: torch.dtype, *, exact: str = "ieee", tf32: bool = True) -> tuple:
    """Every value :func:`dot_precision` can give ``dtype`` with these options (one compile variant each)."""
    if dtype != torch.float32:
        return ("ieee",)
    return (exact, "tf32") if tf32 else (exact,)


# Triton's interpreter (3.9) multiplies bfloat16 tl.dot operands as raw bits: under the interpreter bf16
# operands are widened to fp32 first (exact: bf16 products are exact in fp32, as on the tensor cores).
_WIDEN_BF16_DOT = tl.constexpr(interpreting())


def launch(kernel, grid, *, config: Optional[dict] = None, **kwargs) -> None:
    """Launch ``kernel`` with every argument by keyword.

    Args:
        kernel: a ``@triton.jit`` kernel, or one wrapped by :func:`autotune`.
        grid: a tuple, or a function of the launch's meta-parameters (a dict with ``config``'s entries or
            the autotuner's choice) returning one.
        config: None: the autotuner picks the meta-parameters (a plain kernel runs with ``kwargs`` alone).
            A dict (``{"BLOCK": 256, "num_warps": 4}``): these meta-parameters and launch options replace
            the autotuner's choice; the tests use it to show results do not depend on a block size, and
            the interpreter to run small tiles.
        **kwargs: the kernel's arguments and constexprs, by name.

    A row-blocked launcher (diffusion's ``rows * cdiv(inner, BLOCK)`` programs, ``block`` to bypass the
    autotuner) is ``launch(kernel, lambda meta: (rows * triton.cdiv(inner, meta["BLOCK"]),), config=None if
    block is None else {"BLOCK": block, "num_warps": 4}, x_ptr=x, ...)``:

    >>> class Shown:  # stands in for a kernel: shows the grid and the argument names of a launch
    ...     def __getitem__(self, grid):
    ...         return lambda **kwargs: print(grid, sorted(kwargs))
    >>> row_blocks = lambda meta: (3 * triton.cdiv(1000, meta["BLOCK"]),)  # 3 rows of 1000, in blocks
    >>> launch(Shown(), row_blocks, config={"BLOCK": 256, "num_warps": 4}, x_ptr=None, n=1000)
    (12,) ['BLOCK', 'n', 'num_warps', 'x_ptr']
    """
    if config is None:
        kernel[grid](**kwargs)
        return
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    fn[grid(config) if callable(grid) else grid](**kwargs, **config)


def arch_family(arch: int) -> int:
    """The chip family a config or variant is written for: 90 (Hopper and later: wgmma, 227 KB of shared
    memory) or 80 (Ampere and Ada: mma.sync with register operands). A config for a family whose chip has
    less shared memory (sm_86/89, sm_120) fails to launch and the autotuner skips it."""
    return 90 if arch >= 90 else 80


def device_arch(t: torch.Tensor) -> int:
    """``major * 10 + minor`` of the CUDA device holding ``t`` (PyTorch caches the properties: no sync)."""
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


def for_archs(configs, archs) -> list:
    """Mark autotune ``configs`` as written for the chip families ``archs`` (:func:`arch_family`): the
    autotuner offers them only on such a chip, and the ahead-of-time check compiles them only for it.
    Triton's autotuner prunes only when it holds more than one config: a kernel whose single config is
    for one family must not be launched on another."""
    configs = list(configs)
    for config in configs:
        config.archs = frozenset(archs)
    return configs


def runs_on(item, arch: int) -> bool:
    """Whether a config (:func:`for_archs`) or a :class:`Variant` is meant for ``sm_{arch}``."""
    archs = getattr(item, "archs", None)
    return not archs or arch_family(arch) in archs


def offered(config, dtype: Optional[torch.dtype], arch: int, keep=None) -> bool:
    """Whether the autotuner offers ``config`` to a launch over ``dtype`` tensors on ``sm_{arch}``: written
    for the chip family (:func:`for_archs`) and kept by the kernel's ``keep(config, dtype, arch)`` filter
    (None: every config). The ahead-of-time check compiles exactly these."""
    return runs_on(config, arch) and (keep is None or keep(config, dtype, arch))


def _offered_to_launch(keep):
    """The autotuner's ``early_config_prune``: the configs :func:`offered` to this launch's first tensor.
    Triton passes the positional arguments as ``named_args`` and the keyword ones as ``kwargs``; a
    :func:`launch` passes all by keyword, so ``named_args`` is empty there."""
    def prune(configs, named_args, **kwargs):
        tensor = next(v for v in (*named_args.values(), *kwargs.values()) if isinstance(v, torch.Tensor))
        arch = device_arch(tensor) if tensor.is_cuda else 90
        return [c for c in configs if offered(c, tensor.dtype, arch, keep)]
    return prune


@dataclass(frozen=True)
class Variant:
    """One way a kernel is launched: runtime argument types (``"*bf16"``, ``"i32"``, ``"fp32"``; an
    integer that launches always pass as a multiple of 16 may say so, ``"i32:16"``), the values of
    constexpr flags that are not autotuned, and the chip families it launches on (``archs``, empty: all).
    Pointers are compiled as 16-byte aligned (see ``aot.py``)."""

    signature: dict
    constexprs: dict = field(default_factory=dict)
    archs: frozenset = frozenset()

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The dtype of the first pointer argument (the tensors a launch's autotuner sees first)."""
        first = next((t[1:] for t in self.signature.values() if t.startswith("*")), None)
        return {name: dtype for dtype, name in TL_DTYPE.items()}.get(first)


@dataclass(frozen=True)
class KernelSpec:
    kernel: object  # the JITFunction (or the Autotuner / Heuristics wrapping it)
    variants: tuple
    configs: tuple  # triton.Config: autotuned constexprs, num_warps, num_stages
    uses_dot: bool = False  # matmul kernels must reach Hopper's wgmma path on sm_90
    keep: Optional[Callable] = None  # keep(config, dtype, arch): the kernel's autotune filter

    def compiled(self, arch: int) -> list:
        """The (variant, config) pairs launches on ``sm_{arch}`` can run: what the AOT check compiles."""
        return [(v, c) for v in self.variants if runs_on(v, arch)
                for c in self.configs if offered(c, v.dtype, arch, self.keep)]

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


def variant(signature: dict, *, archs=(), **constexprs) -> Variant:
    return Variant(dict(signature), dict(constexprs), frozenset(archs))


def register(kernel, *, variants, configs=None, uses_dot: bool = False, keep=None):
    """Declare ``kernel``'s launch variants and autotune configs (and the ``keep`` filter its autotuner
    was given, see :func:`autotune`); returns ``kernel`` unchanged."""
    configs = tuple(configs) if configs else (triton.Config({}, num_warps=4, num_stages=3),)
    KERNELS.append(KernelSpec(kernel, tuple(variants), configs, uses_dot, keep))
    return kernel


def device_function(fn):
    """Decorator: mark a ``@triton.jit`` function as a device helper (compiled inside its callers)."""
    DEVICE_FUNCTIONS.append(fn)
    return fn


def autotune(configs, key, keep=None, **kwargs):
    """``triton.autotune`` over ``configs``, each launch choosing among those :func:`offered` to it (its
    chip family's, kept by ``keep(config, dtype, arch)``); under the interpreter only the first config runs
    (timing CPU emulation says nothing about the GPU, and every config is proven by the compile test)."""
    configs = list(configs)
    if interpreting():
        return triton.autotune(configs[:1], key=key, **kwargs)
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": _offered_to_launch(keep)},
                           **kwargs)


def keep(block: int, num_warps: int, *, max_block: int = 1 << 16, min_per_thread: int = 1,
         max_per_thread: int = 1 << 16) -> bool:
    """The autotune filter: drop configs with blocks over ``max_block`` or with too few or too many
    elements per thread (too many spill: the compile test catches them)."""
    per_thread = block // (num_warps * 32)
    return block <= max_block and min_per_thread <= per_thread <= max_per_thread


def bucket(n: int, cap: Optional[int] = None) -> int:
    """Autotune key bucketing: the next power of two, so sizes in one octave share a tuned config; sizes over
    ``cap`` (a power of two) share its bucket (past the size that fills the chip the best tile stops
    changing, and tuning at 2^21 rows would time each config for seconds).

    >>> bucket(1000), bucket(1 << 21, cap=1 << 16)
    (1024, 65536)
    """
    n = int(n) if cap is None else min(int(n), cap)
    return 1 << max(n - 1, 0).bit_length()


@device_function
@triton.jit
def dot_acc(a, b, ACC: tl.constexpr, PREC: tl.constexpr):
    """a @ b accumulated in ``ACC`` with input precision ``PREC`` (:func:`dot_precision`); bf16 operands are
    widened under the interpreter only (see ``_WIDEN_BF16_DOT``)."""
    if _WIDEN_BF16_DOT:
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=ACC)
    return tl.dot(a, b, input_precision=PREC, out_dtype=ACC)
