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


def expected_count(arch: int) -> int:
    from fastssl.kernels.aot import load_kernel_modules
    from fastssl.kernels.registry import KERNELS

    load_kernel_modules()
    return sum(len(spec.compiled(arch)) for spec in KERNELS)


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
    assert len(results) == expected_count(arch) > 0, stderr
    bad = [f"{r['kernel']} {r['constexprs']} warps={r['num_warps']}: {r['problems']}" for r in results if r["problems"]]
    assert not bad, "\n".join(bad)
    assert rc == 0, stderr


def test_contrastive_kernels_are_pipelined_with_wide_loads(compiled):
    """Issue [3/7]: every LSE kernel config on sm_90 (but the exact FMA-unit backward) runs >= 2 stages with its key tiles streamed in by
    128-bit cp.async inside the main loop, and the resident query block (where there is one) loads
    128 bits wide; those on tensor cores (bf16, fp16, tf32) have wgmma in that loop."""
    rc, lines, stderr = compiled[90]
    rows = [r for r in lines[1:] if r["kernel"] in ("_lse_fwd_kernel", "_lse_bwd_kernel")]
    assert rows, stderr
    for r in rows:
        exact = r["signature"]["q_ptr"] == "*fp64" or r["constexprs"]["DOT_PREC"] == "ieee" and \
            r["signature"]["q_ptr"] == "*fp32"
        if exact and r["kernel"] == "_lse_bwd_kernel":
            continue  # the FMA-unit backward (gradient checks): one stage, two spill (kernels/contrastive.py)
        loop = r["sass"]["loop"]
        where = (r["kernel"], r["signature"]["q_ptr"], r["constexprs"], r["num_warps"], r["num_stages"])
        assert r["num_stages"] >= 2, where
        # the feature tiles by 128-bit copies; MoCo's per-key scale (KSCALE) and the keys' labels and weights
        # of the labelled positives (POSITIVES == POS_LABELS) may come by narrower ones
        narrow = set(loop["cp_async_bits"]) - {128}
        per_key = r["constexprs"]["KSCALE"] == "True" or r["constexprs"].get("POSITIVES") == "2"
        assert 128 in loop["cp_async_bits"] and (not narrow or per_key), (where, loop)
        resident = r["constexprs"]["D_LOOP"] == "False"  # the query block: plain loads before the loop
        assert r["load_bits"] == 128 or not resident, (where, r["sass"]["global_loads"])
        tensor_cores = r["signature"]["q_ptr"] in ("*bf16", "*fp16") or r["constexprs"]["DOT_PREC"] == "tf32"
        assert loop["wgmma"] > 0 or not tensor_cores, (where, loop)


def test_propagation_kernels_are_pipelined_on_the_tensor_cores(compiled):
    """Issue [4/7]: on sm_90 every propagation kernel (forward, dQ, dK/dV, top-k) runs >= 2 stages (float64,
    the gradient checks' dtype, one); in bf16/fp16 its main loop runs wgmma; on maps whose sizes are multiples
    of 16 their key tiles stream in by 128-bit cp.async inside the main loop (odd maps, the CRW step, cannot be
    vectorized along the raster; fp32's tf32x3 operands come by 32/64-bit copies), and a resident query
    tile loads 128 bits wide. The dense variants
    (WINDOWED False, no window arithmetic) exist for every dtype and mode but float64."""
    rc, lines, stderr = compiled[90]
    rows = [r for r in lines[1:] if r["kernel"].startswith("_propagate_")]
    assert {r["kernel"] for r in rows} == {"_propagate_fwd_kernel", "_propagate_bwd_dq_kernel",
                                           "_propagate_bwd_dkdv_kernel", "_propagate_topk_kernel"}, stderr
    dense = set()
    for r in rows:
        dtype, flags, loop = r["signature"]["q_ptr"], r["constexprs"], r["sass"]["loop"]
        where = (r["kernel"], dtype, flags, r["num_warps"], r["num_stages"], loop)
        assert r["num_stages"] >= 2 or dtype == "*fp64", where
        half = dtype in ("*bf16", "*fp16")
        assert loop["wgmma"] > 0 or not half, where
        if r["signature"]["H"].endswith(":16") and half:
            assert 128 in loop["cp_async_bits"], where
            if flags.get("C_LOOP") == "False":
                assert r["load_bits"] == 128, where
        if flags.get("WINDOWED") == "False":
            dense.add((r["kernel"], dtype, flags["LOSS"]))
    assert dense == {(k, d, loss) for k in ("_propagate_fwd_kernel", "_propagate_bwd_dq_kernel",
                                            "_propagate_bwd_dkdv_kernel")
                     for d in ("*fp32", "*fp16", "*bf16") for loss in ("False", "True")}


# The element tensors each diffusion kernel reads and writes (a run-time flag may gate one off; its access
# stays in the code); the kernels' other loads are per-program scalars (timesteps, seeds, weights, the
# schedule's coefficients). The step kernel reads a noise tensor too with NOISE=1, and the model output's variance
# half with LEARNED=True.
_ELEMENT_READS = {"_cfg_combine_kernel": 2, "_cfg_combine_backward_kernel": 1, "_q_sample_kernel": 2,
                  "_q_sample_backward_kernel": 2, "_diffusion_step_kernel": 3, "_diffusion_step_backward_kernel": 5}
_ELEMENT_WRITES = {"_cfg_combine_kernel": 1, "_cfg_combine_backward_kernel": 2, "_q_sample_kernel": 2,
                   "_q_sample_backward_kernel": 2, "_diffusion_step_kernel": 2, "_diffusion_step_backward_kernel": 4}
_ITEMSIZE = {"*fp16": 2, "*bf16": 2, "*fp32": 4, "*fp64": 8}


@pytest.mark.parametrize("arch", [90, 80])
def test_elementwise_kernels_move_every_element_128_bits_wide(compiled, arch):
    """Issue [4/7]: every config of the diffusion kernels reads each element tensor and writes each output
    by 128-bit accesses only (a thread's share of a tensor in 16-byte vectors), in every dtype."""
    rc, lines, stderr = compiled[arch]
    rows = [r for r in lines[1:] if r["kernel"] in _ELEMENT_READS]
    assert len(rows) >= 40, stderr
    for r in rows:
        element = next(t for t in r["signature"].values() if t.startswith("*"))
        vectors = r["per_thread"] * _ITEMSIZE[element] // 16
        reads = _ELEMENT_READS[r["kernel"]] + (r["constexprs"].get("NOISE") == "1") + \
            (r["constexprs"].get("LEARNED") == "True")
        where = (r["kernel"], element, r["constexprs"], r["num_warps"], r["sass"]["global_loads"])
        loads, stores = ({int(bits): n for bits, n in r["sass"][k].items()} for k in ("global_loads", "global_stores"))
        assert vectors >= 1 and loads.get(128, 0) == reads * vectors, where  # JSON keys are strings: as ints
        assert stores == {128: _ELEMENT_WRITES[r["kernel"]] * vectors}, where


# SASS instructions per element that in-kernel noise adds to the step (NOISE=2 against NOISE=0, same config):
# 113-130 with one Philox call and an accurate log and cosine per element (2026-12-06); four normals a call
# and, for 16-bit outputs, the MUFU transforms measure 34-38 (16-bit), 52-56 (fp32), 65-80 (fp64).
_NOISE_BUDGET = {"*fp16": 44, "*bf16": 44, "*fp32": 64, "*fp64": 96}


def test_in_kernel_noise_costs_few_instructions_per_element(compiled):
    """Issue [4/7]: the step's Philox noise (four normals a call, fast transforms where the dtype allows)
    within its budget of SASS instructions per element on sm_90, in every config."""
    rc, lines, stderr = compiled[90]
    per_element = _step_instructions_per_element(lines)
    noisy = [key for key in per_element if key[3] == "2" and key[4] == "False"]
    assert noisy, stderr
    for out, warps, block, _, _ in noisy:
        extra = per_element[out, warps, block, "2", "False"] - per_element[out, warps, block, "0", "False"]
        assert extra <= _NOISE_BUDGET[out], (out, warps, block, extra)


def _step_instructions_per_element(lines) -> dict:
    """The step kernel's SASS instructions per element by (out dtype, warps, BLOCK, NOISE, LEARNED)."""
    rows = [r for r in lines[1:] if r["kernel"] == "_diffusion_step_kernel"]
    return {(r["signature"]["out_ptr"], r["num_warps"], r["constexprs"]["BLOCK"], r["constexprs"]["NOISE"],
             r["constexprs"]["LEARNED"]): r["instructions_per_element"] for r in rows}


# What a learned variance's per-element sigma (the variance half's load, then sqrt or exp) adds to a noisy step
# (LEARNED=True against False, same NOISE and config), sm_90, triton 3.8 (2026-12): 16-22 (16-bit and fp32),
# 62-74 (fp64: libdevice's exp).
_LEARNED_BUDGET = {"*fp16": 24, "*bf16": 24, "*fp32": 24, "*fp64": 80}


def test_learned_variance_costs_few_instructions_per_element(compiled):
    per_element = _step_instructions_per_element(compiled[90][1])
    learned = [key for key in per_element if key[4] == "True"]
    assert {key[3] for key in learned} == {"1", "2"}, "LEARNED variants exist for the noisy steps only"
    for out, warps, block, noise, _ in learned:
        extra = per_element[out, warps, block, noise, "True"] - per_element[out, warps, block, noise, "False"]
        assert extra <= _LEARNED_BUDGET[out], (out, warps, block, noise, extra)


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
    names = ["_spilling_kernel", "_tiny_dot_kernel", "_fp32_fma_matmul_kernel", "_dot_outside_loop_kernel",
             "_shared_hog_kernel"]
    rc, lines, stderr = run_aot("--arch", "90", "--module", str(HERE / "aot_bad_kernels.py"), "--only", *names)
    assert rc == 1, stderr
    assert lines[0]["unregistered"] == ["aot_bad_kernels._forgotten_kernel"]
    problems = {r["kernel"]: " ".join(r["problems"]) for r in lines[1:]}
    assert "spills" in problems["_spilling_kernel"]
    assert "does not compile" in problems["_tiny_dot_kernel"]
    assert "without wgmma" in problems["_fp32_fma_matmul_kernel"]
    assert "over the sm_90 limit" in problems["_shared_hog_kernel"]
    assert "main loop has no wgmma" in problems["_dot_outside_loop_kernel"]


# A hand-written stand-in for ``cuobjdump -sass`` output: a prologue load, a loop (0x0040-0x00c0) with two
# wgmma, an async copy and a 32-bit gather, and the final branch to itself that ends every kernel.
_SASS_SAMPLE = """
        /*0000*/                   LDG.E.128 R4, desc[UR16][R20.64] ;   /* 0x000000101404e981 */
        /*0010*/              @!P6 LDG.E.U16 R8, desc[UR16][R22.64] ;   /* 0x000000101404e981 */
        /*0040*/                   LDGSTS.E.BYPASS.128 [R43], desc[UR16][R22.64], !P1 ;   /* 0x00 */
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;   /* 0x00 */
        /*0060*/              @!P1 LDG.E R58, desc[UR16][R50.64] ;   /* 0x00 */
        /*0070*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24 ;   /* 0x00 */
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;   /* 0x00 */
        /*00c0*/              @!P0 BRA 0x40 ;   /* 0x00 */
        /*00d0*/                   STG.E [R2.64], R3 ;   /* 0x00 */
        /*00e0*/                   EXIT ;   /* 0x00 */
        /*00f0*/                   BRA 0xf0;   /* 0x00 */
"""


def test_sass_profile_reads_the_main_loop():
    """The report's reading of SASS, on a known sample: the loop between a backward branch and its
    target, its wgmma, async copy, gather and barrier; the kernel's loads by width; no loop for the end."""
    from fastssl.kernels.aot import sass_profile

    profile = sass_profile(_SASS_SAMPLE)
    assert profile["instructions"] == 11
    assert profile["global_loads"] == {16: 1, 32: 1, 128: 1} and profile["global_stores"] == {32: 1}
    assert (profile["cp_async"], profile["tma"]) == (1, 0)
    assert profile["loop"] == {"instructions": 6, "wgmma": 2, "cp_async": 1, "cp_async_bits": [128], "tma": 0,
                               "global_loads": 1,
                               "global_load_bits": [32], "barriers": 1}
    no_loop = sass_profile(_SASS_SAMPLE.replace("@!P0 BRA 0x40", "@!P0 BRA 0xd0"))  # a forward branch
    assert no_loop["loop"]["instructions"] == 0 and no_loop["loop"]["wgmma"] == 0
    # nvdisasm's style: branch targets are labels on the line before their instruction
    labelled = (_SASS_SAMPLE.replace("        /*0040*/", ".L_x_1:\n        /*0040*/")
                .replace("@!P0 BRA 0x40", "@!P0 BRA `(.L_x_1)"))
    assert sass_profile(labelled) == profile


def test_main_loop_is_the_unmasked_copy():
    """Of two loops with the same wgmma (a kernel's unmasked tiles and its masked copy for the edge and
    diagonal tiles), the main loop is the one with fewer other instructions, wherever it sits."""
    from fastssl.kernels.aot import main_loop, sass_instructions

    def loop(start, extra):
        lines = [f"/*{start:04x}*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;",
                 f"/*{start + 0x10:04x}*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24 ;"]
        lines += [f"/*{start + 0x20 + 0x10 * i:04x}*/ FSEL R4, R4, -INF, P1 ;" for i in range(extra)]
        end = start + 0x20 + 0x10 * extra
        return lines + [f"/*{end:04x}*/ @!P0 BRA 0x{start:x} ;"]

    for masked_first in (True, False):
        parts = [loop(0x100, 5), loop(0x400, 1)] if masked_first else [loop(0x100, 1), loop(0x400, 5)]
        text = "\n".join(line for part in parts for line in part) + "\n/*0900*/ EXIT ;"
        body = main_loop(sass_instructions(text))
        assert len(body) == 4 and sum(op.startswith("HGMMA") for _, op, _ in body) == 2  # 2 wgmma, 1 select, the branch


def test_the_committed_report_covers_every_kernel():
    """benchmarks/results/aot-sm90-report.txt (``python -m fastssl.kernels.aot --report``) lists every
    registered kernel."""
    from fastssl.kernels.aot import load_kernel_modules
    from fastssl.kernels.registry import KERNELS

    load_kernel_modules()
    report = (HERE.parent / "benchmarks" / "results" / "aot-sm90-report.txt").read_text()
    rows = {line.split()[0] for line in report.splitlines()[2:] if line.strip()}
    assert {spec.name for spec in KERNELS} <= rows
