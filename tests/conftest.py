"""Shared test harness.

- Without a GPU the Triton kernels run on Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set here,
  before anything imports Triton, so one plain ``pytest`` runs every kernel test on both backends.
- ``backend`` parametrizes a test over the Triton kernels and the PyTorch path (``FASTSSL_BACKEND``);
  ``FASTSSL_TEST_BACKENDS=triton`` keeps only the kernels (the GPU check's parity run).
- Every output a kernel launcher allocates is poisoned with NaN, so an element a kernel forgets to write
  fails the parity tests instead of passing on leftover memory.
- Seeds: each test is seeded from the session seed (printed in the header; set ``FASTSSL_TEST_SEED`` to
  replay a run) and its own name, so inputs are fresh each run and reproducible on demand.
- ``TOLERANCES`` and :func:`assert_close_lowp` hold the precision rules.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import random
import sys
import zlib

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") is None:
    raise RuntimeError("Triton was imported before tests/conftest.py could set TRITON_INTERPRET")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SESSION_SEED = int(os.environ.get("FASTSSL_TEST_SEED", random.SystemRandom().randrange(2**31)))

# Absolute and relative tolerances against a float64 reference, for well-conditioned O(1) outputs.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0")
    return f"fastssl: device={DEVICE} TRITON_INTERPRET={interp} FASTSSL_TEST_SEED={SESSION_SEED}"


@pytest.fixture(autouse=True)
def _seed(request):
    seed = (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    yield


@pytest.fixture
def device() -> str:
    return DEVICE


# FASTSSL_TEST_BACKENDS=triton (benchmarks/gpu_check.sh) runs only the kernels' side of each backend test.
BACKENDS = [b for b in os.environ.get("FASTSSL_TEST_BACKENDS", "torch,triton").split(",") if b] or ["torch", "triton"]
if not set(BACKENDS) <= {"torch", "triton"}:
    raise RuntimeError(f"FASTSSL_TEST_BACKENDS must list torch and/or triton, got {BACKENDS}")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch) -> str:
    """Run the test on the PyTorch path and on the Triton kernels (interpreted on the CPU)."""
    monkeypatch.setenv("FASTSSL_BACKEND", request.param)
    return request.param


@pytest.fixture
def tensor_core_dot(monkeypatch):
    """Under Triton's interpreter, ``tl.dot`` as a tensor core rounds it: the products exact (bf16, fp16 and
    tf32 products fit fp32), their sum rounded once per output, whatever the operands' order and the tile's
    shape. The interpreter's ``np.matmul`` rounds by BLAS's blocking instead: the same scores differ in their
    last bit between a (16, D) @ (D, 16) tile and its transpose, or a tile of 8 rows (numpy 2, OpenBLAS).
    Tests whose answer rests on the forward and the backward rounding a score alike (extreme temperatures)
    take this; on a GPU it changes nothing and the hardware is what they check."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    from triton.runtime import interpreter

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        exact = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64))
        return interpreter.TensorHandle(exact.astype(d.data.dtype) + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


class _PoisonedTorch:
    """``torch`` as a kernel module sees it in tests: ``empty``/``empty_like`` return NaN-filled tensors."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def _poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty(self, *args, **kwargs):
        return self._poison(self._real.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(self._real.empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    import fastssl.kernels as package

    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if getattr(module, "torch", None) is torch:
            monkeypatch.setattr(module, "torch", _PoisonedTorch(torch))
    yield


def max_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64; NaN where either side is NaN."""
    return (x.detach().double() - reference.detach().double()).abs().max().item() if x.numel() else 0.0


def assert_close(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0):
    """``actual`` matches the float64 ``reference`` within ``TOLERANCES[dtype]`` (times ``scale``)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.detach().double(), reference.detach().double().to(actual.device),
                               atol=tol["atol"] * scale, rtol=tol["rtol"] * scale)


def assert_close_lowp(ours: torch.Tensor, reference: torch.Tensor, torch_lowp: torch.Tensor, *, atol: float = 1e-5,
                      factor: float = 2.0):
    """flash-attention's rule for low precision: our error against the float64 reference is at most
    ``factor`` times PyTorch's own error in that dtype (``torch_lowp``: the plain formula run in it),
    plus ``atol``."""
    ours_err, torch_err = max_error(ours, reference), max_error(torch_lowp, reference)
    assert ours_err <= factor * torch_err + atol, (
        f"error {ours_err:.3g} against the float64 reference exceeds {factor} x PyTorch's own {torch_err:.3g} + {atol}"
    )


def assert_same_float32(out: torch.Tensor, grads, plain: torch.Tensor, plain_grads) -> None:
    """A call under autocast against the same call without it: ``out`` and ``grads`` (None where a tensor
    gets no gradient) float32 and equal to ``plain`` and ``plain_grads``."""
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, plain)
    for g, r in zip(grads, plain_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, r)
