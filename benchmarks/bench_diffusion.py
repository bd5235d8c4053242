"""Diffusion slice benchmarks: memory-bound elementwise steps, reported in GB/s.

cfg_combine reads cond and uncond and writes the result: 3 element accesses (eager does 5).
"""
import torch

from fastssl.benchmarks.harness import Case

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cfg_eager(cond, uncond, w):
    return (1 + w) * cond - w * uncond


def _cfg_case(provider: str, dtype: str, numel: int) -> Case:
    def make(device):
        import fastssl

        cond = torch.randn(numel // 4096 or 1, min(numel, 4096), device=device, dtype=DTYPES[dtype])
        uncond = torch.randn_like(cond)
        fn = {"fastssl": fastssl.cfg_combine, "torch": _cfg_eager, "compile": torch.compile(_cfg_eager)}[provider]
        return lambda: fn(cond, uncond, 7.5)

    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return Case("cfg_combine", provider, "fwd", dtype, {"numel": numel}, make, size=numel, bytes=3 * numel * elem)


def cases(preset: str, device: str) -> list[Case]:
    sizes = [2**14, 2**20] if preset == "quick" else [2**14, 2**20, 2**24, 2**26]
    dtypes = ["float32"] if preset == "quick" and device == "cpu" else list(DTYPES)
    return [_cfg_case(p, d, n) for d in dtypes for n in sizes for p in ("fastssl", "torch", "compile")]


def test_case(benchmark, case):
    case.run_with(benchmark)
