"""Every kernel in kernels/, with every autotune config and launch variant, compiled ahead of time for
sm_90 (H200) and sm_80 (A100) on this GPU-less machine: it compiles, does not spill, fits in shared
memory, and matmul kernels reach wgmma on sm_90. GUIDE §3.2; the work is done by fastssl.kernels.aot,
in subprocesses without TRITON_INTERPRET (which this test session sets)."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def run_aot(*args) -> tuple[int, list[dict], str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fastssl.kernels.aot", *args], env=env, cwd=HERE,
                         capture_output=True, text=True, timeout=1500)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return run.returncode, lines, run.stderr[-3000:]


@pytest.fixture(scope="module")
def compiled():
    with ThreadPoolExecutor(2) as pool:
        return dict(zip((90, 80), pool.map(lambda arch: run_aot("--arch", str(arch)), (90, 80))))


def expected_count() -> int:
    from fastssl.kernels.aot import load_kernel_modules
    from fastssl.kernels.registry import KERNELS

    load_kernel_modules()
    return sum(len(spec.variants) * len(spec.configs) for spec in KERNELS)


def test_every_jitted_function_is_registered(compiled):
    rc, lines, stderr = compiled[90]
    assert lines, stderr
    assert lines[0] == {"unregistered": []}


@pytest.mark.parametrize("arch", [90, 80])
def test_every_variant_is_specialized_as_declared(compiled, arch):
    """Each variant compiles with the specialization Triton gives a launch with such arguments: pointers
    16-byte aligned and ``":16"`` ints divisible by 16 (``tt.divisibility`` 16), nothing else."""
    rc, lines, stderr = compiled[arch]
    assert lines[1:], stderr
    for r in lines[1:]:
        declared = sorted(a for a, t in r["signature"].items() if t.startswith("*") or t.endswith(":16"))
        assert r.get("divisible") == declared, (r["kernel"], r["signature"], r["problems"])


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_config_compiles_cleanly(compiled, arch):
    rc, lines, stderr = compiled[arch]
    results = lines[1:]
    assert len(results) == expected_count() > 0, stderr
    bad = [f"{r['kernel']} {r['constexprs']} warps={r['num_warps']}: {r['problems']}" for r in results if r["problems"]]
    assert not bad, "\n".join(bad)
    assert rc == 0, stderr


def test_declared_multiples_of_16_reach_the_compiler():
    """The specialization is real: a stride declared ``"i32:16"`` gets ``tt.divisibility`` 16 and 128-bit
    loads; the same kernel with a plain stride gets neither (tests/aot_probe_kernels.py)."""
    rc, lines, stderr = run_aot("--arch", "90", "--module", str(HERE / "aot_probe_kernels.py"), "--only",
                                "_row_copy_kernel")
    assert rc == 0 and lines[0] == {"unregistered": []}, stderr
    aligned, plain = lines[1:]
    assert aligned["signature"]["stride"] == "i32:16" and plain["signature"]["stride"] == "i32"
    assert aligned["divisible"] == ["out_ptr", "stride", "x_ptr"] and plain["divisible"] == ["out_ptr", "x_ptr"]
    assert aligned["load_bits"] == 128 and plain["load_bits"] == 16


def test_target_shape_launches_match_registered_variants():
    """The launches GUIDE §6's shapes make (NT-Xent 2N=65536 D=256, the 64M-element CFG step, the colorization
    training shape, the CRW top-k step), specialized by Triton's own launch binder, each match a registered
    variant: what the compile test inspects is what those launches compile (tests/aot_target_launches.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(HERE / "aot_target_launches.py")], env=env, cwd=HERE,
                         capture_output=True, text=True, timeout=600)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and len(lines) >= 9, run.stderr[-3000:]
    assert {r["kernel"] for r in lines} >= {"_lse_fwd_kernel", "_diffusion_step_kernel", "_propagate_fwd_kernel",
                                            "_propagate_topk_kernel"}
    unmatched = [r for r in lines if r["matched_variant"] is None]
    assert not unmatched, unmatched


def test_the_check_catches_bad_kernels():
    """The test of the test: deliberately bad kernels in tests/aot_bad_kernels.py are each flagged."""
    names = ["_spilling_kernel", "_tiny_dot_kernel", "_fp32_fma_matmul_kernel", "_shared_hog_kernel"]
    rc, lines, stderr = run_aot("--arch", "90", "--module", str(HERE / "aot_bad_kernels.py"), "--only", *names)
    assert rc == 1, stderr
    assert lines[0]["unregistered"] == ["aot_bad_kernels._forgotten_kernel"]
    problems = {r["kernel"]: " ".join(r["problems"]) for r in lines[1:]}
    assert "spills" in problems["_spilling_kernel"]
    assert "does not compile" in problems["_tiny_dot_kernel"]
    assert "without wgmma" in problems["_fp32_fma_matmul_kernel"]
    assert "over the sm_90 limit" in problems["_shared_hog_kernel"]
