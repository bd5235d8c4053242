"""The command-line tools and scripts: fastssl bench's outputs, the GPU check's dry run, the README
commands that .ci/run executes, and the README's example."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_bench_writes_table_json_and_plot(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fastssl.cli", "bench", "--quick", "--only", "cfg_combine",
                          "--out", str(tmp_path), "--quiet"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"cfg_combine\s+fastssl\s+fwd", run.stdout)
    (result_file,) = tmp_path.glob("*.json")
    result = json.loads(result_file.read_text())
    assert {"device", "torch", "triton", "git", "date", "peaks", "rows", "wall_s"} <= result.keys()
    assert {r["provider"] for r in result["rows"]} == {"fastssl", "torch"}
    for r in result["rows"]:
        assert r["op"] == "cfg_combine" and r["mode"] == "fwd" and "error" not in r, r
        assert 0 < r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
        assert r["peak_mb"] >= 0 and r["gbps"] > 0
    assert (tmp_path / "cfg_combine.png").stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file, then renamed


def test_quick_preset_has_every_op_against_eager():
    """The main job shows each op's headline: every op of the full preset, each fastssl row with an eager
    row of the same shape, and each CPU case cheap enough for 90 s in all."""
    from fastssl.benchmarks.harness import all_cases

    quick = all_cases("quick", "cpu")
    assert {c.op for c in quick} == {c.op for c in all_cases("full", "cpu")}
    keys = lambda provider: {(c.op, c.mode, c.dtype, str(c.shape)) for c in quick if c.provider == provider}  # noqa: E731
    assert keys("fastssl") and keys("fastssl") <= keys("torch")
    assert not [c.name for c in quick if c.provider == "compile"]  # compilation alone would take the budget


def test_targets_preset_is_exactly_the_guide_targets():
    from fastssl.benchmarks import targets
    from fastssl.benchmarks.harness import all_cases

    cases = all_cases("targets", "cuda")
    specs = [targets.NT_XENT_GPU, targets.CFG_LATENT, targets.CRW, dict(targets.CFG_BIG, dtype="bfloat16"),
             dict(targets.CFG_BIG, dtype="float32"), dict(targets.PROP_TRAIN, dtype="float32"),
             dict(targets.PROP_TRAIN, dtype="bfloat16")]
    for spec in specs:
        found = [c.provider for c in cases if c.op == spec["op"] and c.mode == spec["mode"] and c.dtype == spec["dtype"]
                 and c.shape == spec["shape"]]
        assert "fastssl" in found and len(found) == 2, (spec, found)
    assert len(cases) == 2 * len(specs) + 1 + ("inf_cl" in {c.provider for c in cases})  # + clip_loss
    full = all_cases("full", "cuda", skip_preset="targets")
    assert not {c.name for c in cases} & {c.name for c in full}
    assert [c.provider for c in full][-1] == "compile"  # torch.compile cases run last


def test_gpu_check_plan_runs_without_a_gpu():
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--plan"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    parts = [out.index(f"\n{p}. ") for p in "abcdef"]
    assert parts == sorted(parts), out[:2000]
    targets_part = out[parts[1]:parts[2]]
    assert "nt_xent/fastssl/fwd+bwd/bfloat16/n=32768,d=256" in targets_part
    assert "ddpm_step_cfg/fastssl/fwd/bfloat16/numel=67108864" in targets_part
    assert "propagate_labels/torch/fwd/float32/h=60,w=107,c=256" in targets_part
    assert "nt_xent/fastssl/fwd+bwd/bfloat16/n=32768,d=256" not in out[parts[4]:]


def test_target_table_reads_only_measured_rows():
    from fastssl.benchmarks.targets import CRW, NT_XENT_GPU, evaluate, format_targets

    def r(provider, ms, spec, **kw):
        return {"provider": provider, "ms_median": ms, "peak_mb": 10.0, "tflops": None, **spec, **kw}
    rows = [r("fastssl", 1.0, NT_XENT_GPU, tflops=400.0), r("torch", 2.0, NT_XENT_GPU),
            r("fastssl", 1.0, CRW, peak_mb=2000.0), r("torch", 30.0, CRW)]
    table = {t["target"]: t for t in evaluate(rows, {"matmul_bf16_tflops": 800.0}, None)}
    assert table["nt_xent fwd+bwd 2N=65536 D=256 bf16: % of bf16 matmul peak"]["measured"] == "50.0%"
    assert table["nt_xent fwd+bwd 2N=65536 D=256 bf16: % of bf16 matmul peak"]["met"] is True
    assert table["nt_xent fwd+bwd 2N=65536 D=256 bf16: x eager"]["met"] is False  # 2x < 3x
    assert table["CRW step 60x107, 20+1 frames, r=12, top-10: x dense eager"]["met"] is True
    assert table["CRW step: peak memory (MB)"]["met"] is False
    missing = [t for t in table.values() if t["measured"] == "not measured"]
    assert missing and all(t["met"] is None for t in missing)  # never "met" without a row
    assert "NO" in format_targets(list(table.values()))


def test_interrupted_run_keeps_its_rows_and_plots(tmp_path, monkeypatch):
    from fastssl.benchmarks import harness

    calls = []

    def fake_run_cases(cases, device, preset="full"):  # one case's providers, measured side by side
        if calls:
            raise KeyboardInterrupt  # what `timeout -s INT` delivers
        calls.append(cases)
        return [{**harness.row(c, {"ms_median": 1.0, "ms_p20": 1.0, "ms_p80": 1.0, "peak_mb": 1.0}), "case_seconds": 0.1}
                for c in cases]
    monkeypatch.setattr(harness, "run_cases", fake_run_cases)
    monkeypatch.setattr(harness, "measure_peaks", lambda device: {"copy_gbps": 1.0})
    result = harness.run("quick", ["cfg_combine"], str(tmp_path), "cpu", progress=False)
    assert [c.provider for c in calls[0]] == ["fastssl", "torch"]  # the first shape's two providers
    assert result["interrupted"] and len(result["rows"]) == 2
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["interrupted"] and len(saved["rows"]) == 2
    assert (tmp_path / "cfg_combine.png").exists()


def test_ceilings_are_measured_once_and_reused(tmp_path, monkeypatch):
    from fastssl.benchmarks import harness

    measured = []
    monkeypatch.setattr(harness, "measure_peaks", lambda device: measured.append(device) or {"copy_gbps": 7.0})
    path = str(tmp_path / "peaks.json")
    assert harness.load_or_measure_peaks(path, "cpu") == harness.load_or_measure_peaks(path, "cpu") == {"copy_gbps": 7.0}
    assert measured == ["cpu"]


def test_sync_check_runs_its_loops():
    """The GPU check's no-sync proof is code the CPU runs too (on CUDA it also turns syncs into errors).
    The default backend: at these sizes the interpreter would take many minutes, and the slice tests run
    the same ops through the kernels."""
    from fastssl.benchmarks import sync_check

    results = [sync_check.run_check(name, "cpu") for name in sync_check.CHECKS] + [sync_check.graph_check("cpu")]
    assert all(r["ok"] for r in results), results
    assert "max |diff| 0 " in results[-1]["detail"]


@pytest.mark.parametrize("argv, says", [
    (["--only", "nt_xnet", "--quiet"], "no benchmark case of --preset full matches --only nt_xnet"),
    (["--only", "nt_xnet", "--plan"], "no benchmark case of --preset full matches --only nt_xnet"),  # was exit 0
    (["--quick", "--preset", "cpu"], "--quick is --preset quick; it cannot go with --preset cpu"),  # was exit 1
    (["--preset", "quick", "--skip-preset", "quick", "--plan"], "--preset quick less --skip-preset quick leaves no"),
])
def test_bench_rejects_bad_arguments_with_exit_2(argv, says, capsys, tmp_path):
    """Like every bad argument: exit 2 before any work, the usage and one error line on stderr."""
    from fastssl.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv, "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and not captured.out and not (tmp_path / "o").exists()
    assert captured.err.strip().splitlines()[-1].startswith(f"fastssl bench: error: {says}")


def test_cpu_preset_child_process_measures_the_parents_case(tmp_path, monkeypatch):
    """fastssl bench --preset cpu runs each case in fresh processes that find it by its index: the child's
    command carries every argument of the parent's selection (--only, --skip-preset), so case i is the
    same case in both (with --skip-preset quick the child once counted the unskipped list)."""
    from fastssl.benchmarks import harness

    cases = harness.all_cases("cpu", "cpu", ["nt_xent"], "quick")
    assert 0 < len(cases) < len(harness.all_cases("cpu", "cpu", ["nt_xent"]))  # the skip moves indices
    seen = []

    def fake_subprocess(index, preset, only, skip_preset=None):  # the child's selection, in this process
        cmd = harness.child_command(index, preset, only, skip_preset)
        assert cmd[1:3] == ["-m", "fastssl.benchmarks.harness"]
        case = harness.child_case(cmd[3:])
        seen.append(case.name)
        measured = {"ms_median": 1.0, "ms_p20": 1.0, "ms_p80": 1.0, "peak_mb": 1.0}
        return {**harness.row(case, measured), "case_seconds": 0.1}
    monkeypatch.setattr(harness, "run_case_in_subprocess", fake_subprocess)
    monkeypatch.setattr(harness, "measure_peaks", lambda device: {"copy_gbps": 1.0})
    monkeypatch.setattr(harness, "plot", lambda rows, out_dir: [])
    result = harness.run("cpu", ["nt_xent"], str(tmp_path), "cpu", progress=False, skip_preset="quick")
    assert seen == [c.name for c in cases for _ in range(harness.CPU_PROCESSES)]
    assert [(r["provider"], r["mode"], r["shape"]) for r in result["rows"]] == [(c.provider, c.mode, c.shape)
                                                                                 for c in cases]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs for real")
def test_gpu_check_fails_fast_without_a_gpu(tmp_path):
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}  # and without nvidia-smi on PATH
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "no NVIDIA GPU here" in run.stderr


def test_ci_runs_the_readme_quickstart_commands():
    script = (ROOT / ".ci" / "run").read_text()
    readme_command = script[script.index("readme_command() {"):script.index("main_job=")]
    commands = subprocess.run(["bash", "-c", readme_command + "readme_command main; readme_command tests"], cwd=ROOT,
                              capture_output=True, text=True).stdout.splitlines()
    assert commands == ['pip install -e ".[bench]" && fastssl bench --quick --out bench-out',
                        'pip install -e ".[test]" && pytest']


def test_readme_example_runs_and_learns():
    """The README's drop-in example is real code: it runs, and its loss goes down."""
    readme = (ROOT / "README.md").read_text()
    example = readme[readme.index("```python\n") + len("```python\n"):]
    example = example[:example.index("```")]
    losses = []
    code = example.replace("optimizer.step()", "optimizer.step(); losses.append(loss.item())")
    exec(compile(code, "README.md", "exec"), {"losses": losses})
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_cpu_case_keeps_the_fastest_of_its_processes(monkeypatch):
    from fastssl.benchmarks import harness

    medians = iter([5.0, 3.0, None])
    monkeypatch.setattr(harness, "run_case_in_subprocess", lambda index, preset, only, skip_preset=None: {
        "ms_median": next(medians), "peak_mb": 1.0, "case_seconds": 2.0})
    best = harness.run_case_in_subprocesses(0, "quick", (), processes=3)
    assert best["ms_median"] == 3.0 and best["ms_median_runs"] == [5.0, 3.0, None] and best["case_seconds"] == 6.0
    monkeypatch.setattr(harness, "run_case_in_subprocess", lambda index, preset, only, skip_preset=None: {
        "error": "MemoryError", "ms_median": None, "case_seconds": 1.0})
    assert harness.run_case_in_subprocesses(0, "quick", (), processes=2)["error"] == "MemoryError"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs for real")
def test_gpu_check_rehearsal_leaves_every_file_and_the_table_last(tmp_path):
    """The whole script on the CPU with short time boxes: every part runs or is cut by its box, what was
    measured survives in parseable files, and the target table comes last. A GPU lease is too short
    to find a typo in it."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--rehearse", str(out)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "rehearsal on the CPU" in run.stdout, run.stderr[-3000:]
    for name in ("versions.txt", "peaks.json", "syncs.json", "tests.xml", "target-table.txt"):
        assert (out / name).exists(), (name, run.stdout[-3000:], run.stderr[-3000:])
    from fastssl.benchmarks import sync_check

    syncs = json.loads((out / "syncs.json").read_text())
    assert [s["check"] for s in syncs] == sync_check.RUN_ORDER
    assert all(s["ok"] for s in syncs), syncs
    first = ElementTree.parse(out / "tests-first.xml").getroot().find("testsuite")  # T = 1e-6, near convergence
    assert (first.get("tests"), first.get("failures"), first.get("errors")) == ("14", "0", "0")
    for part in ("targets", "full"):  # the rehearsal's stand-ins: quick cfg_combine, quick ddim_step
        (result,) = (out / part).glob("*.json")
        assert json.loads(result.read_text())["rows"], part
    table = (out / "target-table.txt").read_text()
    assert run.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])
    assert "CUDA graph" in table


def test_providers_of_a_case_are_timed_side_by_side():
    """measure_cpu_together interleaves its calls in rounds (each provider's samples come from every round)
    and turns a provider's failure into an error row without ending the others."""
    from fastssl.benchmarks import harness

    order = []

    def failing():
        raise RuntimeError("out of memory")
    fns = [lambda: order.append("a"), lambda: order.append("b"), failing]
    results = harness.measure_cpu_together(fns, min_time=0.03, rounds=3)
    assert results[2]["error"].startswith("RuntimeError") and all(r["ms_median"] > 0 for r in results[:2])
    timed = order[4:]  # after two warm-up/memory calls each
    switches = sum(1 for x, y in zip(timed, timed[1:]) if x != y)
    assert switches >= 5  # a, b, a, b, a, b at least: three rounds of both
