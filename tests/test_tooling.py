"""The command-line tools and scripts: fastssl bench's outputs, the GPU check's dry run, the README
commands that .ci/run executes, and the README's example."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
    assert {"device", "torch", "triton", "git", "date", "peaks", "rows"} <= result.keys()
    providers = {r["provider"] for r in result["rows"]}
    assert {"fastssl", "torch", "compile"} <= providers
    for r in result["rows"]:
        assert r["op"] == "cfg_combine" and r["mode"] == "fwd" and "error" not in r, r
        assert 0 < r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
        assert r["peak_mb"] >= 0 and r["gbps"] > 0
    assert (tmp_path / "cfg_combine.png").stat().st_size > 10_000


def test_bench_rejects_an_unknown_op():
    from fastssl.cli import main

    with pytest.raises(SystemExit, match="no benchmark case matches"):
        main(["bench", "--only", "nt_xnet", "--quiet"])


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
    monkeypatch.setattr(harness, "run_case_in_subprocess", lambda index, preset, only: {
        "ms_median": next(medians), "peak_mb": 1.0, "case_seconds": 2.0})
    best = harness.run_case_in_subprocesses(0, "quick", (), processes=3)
    assert best["ms_median"] == 3.0 and best["ms_median_runs"] == [5.0, 3.0, None] and best["case_seconds"] == 6.0
    monkeypatch.setattr(harness, "run_case_in_subprocess", lambda index, preset, only: {
        "error": "MemoryError", "ms_median": None, "case_seconds": 1.0})
    assert harness.run_case_in_subprocesses(0, "quick", (), processes=2)["error"] == "MemoryError"
