"""The benchmark harness behind ``fastssl bench`` and ``pytest benchmarks/ --benchmark-only``.

Each slice's ``benchmarks/bench_<slice>.py`` defines ``cases(preset, device) -> list[Case]`` (only
providers that are installed) and a two-line pytest-benchmark test. This module times a case, measures
its peak memory and writes GUIDE §5's JSON, the plots and the table. Presets (``PRESETS``):

- ``quick``: every op's headline against eager PyTorch and the installed peers, sized for the CPU: the
  README's main job, within 90 s on 2 cores. All cases run in this one process.
- ``cpu``: the long CPU run (GUIDE §6's CPU target, torch.compile, more shapes): a fresh process per
  case, each case in ``CPU_PROCESSES`` processes (several minutes).
- ``targets``: exactly GUIDE §6's target cases, each for fastssl and its reference, first in
  ``benchmarks/gpu_check.sh``.
- ``full``: the GPU preset (sizes up to the targets', dtypes, torch.compile last).

Measurement:
- CUDA: ``triton.testing.do_bench`` (median, p20, p80 after warm-up); peak memory is
  ``max_memory_allocated`` during one call minus what was allocated before it (inputs excluded).
- CPU: peak memory, with glibc's mmap threshold pinned at 64 KB (so freed buffers leave the resident
  set) and free heap pages handed back (``malloc_trim``), is the rise of the peak resident set (VmHWM,
  reset through /proc/self/clear_refs) over the resident set before one call, inputs excluded. Times:
  ``perf_counter`` quantiles over repeated calls after a warm-up, with glibc's thresholds raised again (as
  a long training loop settles), so page faults do not swamp them. In one process (the quick preset) a
  case's providers are timed side by side, in three interleaved rounds, so a burst of load on the machine
  lands on all of them alike (``measure_cpu_together``). The ``cpu`` preset runs each case in
  ``CPU_PROCESSES`` fresh processes (``python -m fastssl.benchmarks.harness``) and keeps the row of the
  fastest median (every median is recorded in ``ms_median_runs``): a whole process can run slow (the same
  DDPM step measured 4.9, 5.3 and 7.0 ms in three processes on an idle 2-core machine), and noise only
  ever adds time.

The result JSON is rewritten after every case through a temporary file and a rename, so a run that is
killed (a time box) keeps every row measured before, and a run interrupted with SIGINT still writes its
plots.

>>> c = Case("cfg_combine", "torch", "fwd", "float32", {"numel": 4}, lambda device: (lambda: None), size=4)
>>> c.name
'cfg_combine/torch/fwd/float32/numel=4'
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fastssl.training import write_json

PROVIDERS_NOTE = "fastssl: Triton kernels on CUDA, the PyTorch path on CPU; torch: the eager formula; compile: torch.compile of it"


@dataclass
class Case:
    """One timed call. ``make(device)`` builds the inputs and returns the zero-argument callable to time
    (for ``fwd+bwd`` it runs the forward and the backward)."""

    op: str
    provider: str
    mode: str  # "fwd" | "fwd+bwd"
    dtype: str
    shape: dict
    make: Callable[[str], Callable[[], object]]
    size: int  # the x-axis of the plots
    flops: Optional[float] = None  # per call, for TFLOP/s
    bytes: Optional[float] = None  # memory traffic per call, for GB/s
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        shape = ",".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{self.op}/{self.provider}/{self.mode}/{self.dtype}/{shape}"

    def __str__(self) -> str:
        return self.name

    def run_with(self, benchmark, device: Optional[str] = None):
        """Time this case with pytest-benchmark's ``benchmark`` fixture."""
        fn = self.make(device or default_device())
        fn()  # warm-up (and compilation)
        if torch.cuda.is_available():
            benchmark(lambda: (fn(), torch.cuda.synchronize()))
        else:
            benchmark(fn)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def have(module: str) -> bool:
    """Whether an optional peer library is importable (providers are listed only where installed)."""
    return importlib.util.find_spec(module) is not None


def bench_modules() -> list:
    import fastssl.benchmarks as package

    return [importlib.import_module(f"{package.__name__}.{m.name}")
            for m in pkgutil.iter_modules(package.__path__) if m.name.startswith("bench_")]


PRESETS = ("quick", "cpu", "targets", "full")


def all_cases(preset: str, device: str, only=(), skip_preset: Optional[str] = None) -> list[Case]:
    """The cases of ``preset`` in the order they run (``only``: op names; ``skip_preset``: leave out the
    cases that preset has, e.g. the rest of ``full`` after ``targets``). In ``full`` the torch.compile
    cases run last: each compiles per shape, and a time box should cut them, not the kernels'."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {PRESETS}")
    cases = [c for module in bench_modules() for c in module.cases(preset, device)]
    skip = {c.name for c in all_cases(skip_preset, device)} if skip_preset else set()
    cases = [c for c in cases if (not only or c.op in only) and c.name not in skip]
    if preset == "full":
        cases.sort(key=lambda c: c.provider == "compile")
    return cases


# -- measuring ---------------------------------------------------------------------------------------

def _quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(samples_ms, dtype=torch.float64)
    return tuple(torch.quantile(t, torch.tensor(q, dtype=torch.float64)).item() for q in (0.5, 0.2, 0.8))


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) / 1024


def _malloc_thresholds(mmap_bytes: int, trim_bytes: int, trim: bool = False) -> None:
    """glibc's ``mallopt(M_MMAP_THRESHOLD)`` and ``mallopt(M_TRIM_THRESHOLD)`` (and with ``trim``,
    ``malloc_trim(0)``: free heap pages back to the system); a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, mmap_bytes)
        libc.mallopt(-1, trim_bytes)
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _error(exc: Exception) -> dict:
    """A measurement's place when its call raised: one provider failing (out of memory, a peer's limit) must
    not end the run."""
    return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def _cpu_first_calls(fn) -> tuple[float, float]:
    """Warm-up call, then one memory-measuring call: (its peak extra MB, its seconds)."""
    _malloc_thresholds(64 << 10, 0, trim=True)
    fn()  # warm-up: first-call allocations, torch.compile's compilation
    gc.collect()
    _malloc_thresholds(64 << 10, 0, trim=True)  # what earlier cases left in the heap leaves the resident set
    before = _proc_status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    t0 = time.perf_counter()
    fn()
    one_call = time.perf_counter() - t0
    return max(_proc_status_mb("VmHWM") - before, 0.0), one_call


def measure_cpu_together(fns, *, min_time: float = 0.5, min_reps: int = 3, max_reps: int = 2000,
                         slow_call: float = 1.0, rounds: int = 3) -> list[dict]:
    """:func:`measure_cpu` for several calls of one case (its providers), their timed calls interleaved in
    ``rounds`` rounds of ``min_time / rounds`` seconds each: a burst of load on the machine then lands on
    every provider alike rather than on one, and the ratios between them (what the presets report) hold
    from run to run. One round where a call takes over ``slow_call`` seconds. A call that raises gives
    ``{"error": ...}`` in its place."""
    results: list[dict] = [{} for _ in fns]
    firsts: list = [None] * len(fns)
    for i, fn in enumerate(fns):
        try:
            firsts[i] = _cpu_first_calls(fn)
        except Exception as exc:  # one provider failing (out of memory, a peer's limit) must not end the run
            results[i] = _error(exc)
    live = [i for i in range(len(fns)) if firsts[i] is not None]
    _malloc_thresholds(32 << 20, 256 << 20)
    rounds = 1 if any(firsts[i][1] > slow_call for i in live) else rounds
    samples: dict = {i: [] for i in live}
    for r in range(1, rounds + 1):
        for i in list(live):
            reps = 2 if firsts[i][1] > slow_call else min_reps
            taken, start, cap = samples[i], time.perf_counter(), max_reps * r // rounds
            try:
                while len(taken) < cap and (len(taken) < reps or time.perf_counter() - start < min_time / rounds):
                    t0 = time.perf_counter()
                    fns[i]()
                    taken.append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:
                results[i] = _error(exc)
                live.remove(i)
    for i in live:
        median, p20, p80 = _quantiles(samples[i])
        results[i] = {"ms_median": median, "ms_p20": p20, "ms_p80": p80, "peak_mb": firsts[i][0]}
    return results


def measure_cpu(fn, *, min_time: float = 0.5, min_reps: int = 3, max_reps: int = 2000, slow_call: float = 1.0) -> dict:
    """Warm-up call, one memory-measuring call, then timed calls: at least ``min_reps`` (2 when a call
    takes over ``slow_call`` seconds, so the quick preset's heavy eager references stay affordable)
    and until ``min_time`` has passed (:func:`measure_cpu_together` of one call, in one round)."""
    return measure_cpu_together([fn], min_time=min_time, min_reps=min_reps, max_reps=max_reps, slow_call=slow_call,
                                rounds=1)[0]


def measure_cuda(fn, *, slow_call_ms: float = 1000.0) -> dict:
    """Warm-up call, one memory-measuring call (timed by CUDA events), then ``triton.testing.do_bench``; a
    call slower than ``slow_call_ms`` (the 1M-row NT-Xent: seconds a call) is reported from the timed
    memory call alone instead of do_bench's dozen."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    one_call = start.elapsed_time(end)
    if one_call > slow_call_ms:
        return {"ms_median": one_call, "ms_p20": one_call, "ms_p80": one_call, "peak_mb": peak_mb}
    median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return {"ms_median": median, "ms_p20": p20, "ms_p80": p80, "peak_mb": peak_mb}


def row(case: Case, measured: dict) -> dict:
    ms = measured.get("ms_median")
    return {"op": case.op, "provider": case.provider, "mode": case.mode, "dtype": case.dtype, "shape": case.shape,
            **{k: measured.get(k) for k in ("ms_median", "ms_p20", "ms_p80", "peak_mb")},
            "tflops": case.flops / ms * 1e-9 if case.flops and ms else None,
            "gbps": case.bytes / ms * 1e-6 if case.bytes and ms else None,
            "size": case.size, **({"error": measured["error"]} if "error" in measured else {}), **case.extra}


# Seconds of timed calls per CPU case: the quick preset samples less (its 50-odd cases share 90 s; at 0.25 s
# a slow 2-core machine took 91 s on 2026-12-03);
# calls over twice that get 2 timed repetitions.
MIN_TIME = {"quick": 0.15}


def run_case(case: Case, device: str, preset: str = "full") -> dict:
    """Measure ``case`` in this process; an exception becomes a row with ``error`` (and no times)."""
    start = time.perf_counter()
    try:
        fn = case.make(device)
        measured = measure_cuda(fn) if device == "cuda" else measure_cpu(fn, min_time=MIN_TIME.get(preset, 0.5),
                                                                       slow_call=MIN_TIME.get(preset, 0.5) * 2)
    except Exception as exc:
        measured = _error(exc)
    finally:
        fn = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return {**row(case, measured), "case_seconds": round(time.perf_counter() - start, 2)}


def run_cases(cases: list[Case], device: str, preset: str = "full") -> list[dict]:
    """Measure the providers of one case (same op, mode, dtype and shape) in this process: on the CPU
    side by side (:func:`measure_cpu_together`), elsewhere one after another (:func:`run_case`)."""
    if device != "cpu" or len(cases) == 1:
        return [run_case(case, device, preset) for case in cases]
    start = time.perf_counter()
    fns, errors = [], {}
    for i, case in enumerate(cases):
        try:
            fns.append(case.make(device))
        except Exception as exc:
            fns.append(None)
            errors[i] = _error(exc)
    live = [i for i in range(len(cases)) if fns[i] is not None]
    min_time = MIN_TIME.get(preset, 0.5)
    measured = dict(zip(live, measure_cpu_together([fns[i] for i in live], min_time=min_time, slow_call=min_time * 2)))
    fns = None
    gc.collect()
    seconds = round((time.perf_counter() - start) / len(cases), 2)
    return [{**row(case, measured.get(i, errors.get(i, {}))), "case_seconds": seconds} for i, case in enumerate(cases)]


def _same_case_runs(cases: list[Case]) -> list[list[Case]]:
    """Consecutive cases of one op, mode, dtype and shape (its providers), in run order."""
    runs: list[list[Case]] = []
    for case in cases:
        if runs and _group_key(vars(runs[-1][0])) == _group_key(vars(case)):
            runs[-1].append(case)
        else:
            runs.append([case])
    return runs


CPU_PROCESSES = 2


def run_case_in_subprocesses(index: int, preset: str, only, processes: int = CPU_PROCESSES,
                             skip_preset: Optional[str] = None) -> dict:
    """The case in ``processes`` fresh processes, one after another: the row with the fastest median."""
    rows = [run_case_in_subprocess(index, preset, only, skip_preset=skip_preset) for _ in range(processes)]
    timed = [r for r in rows if r.get("ms_median") is not None]
    best = min(timed, key=lambda r: r["ms_median"]) if timed else rows[-1]
    return {**best, "ms_median_runs": [r.get("ms_median") for r in rows],
            "case_seconds": round(sum(r["case_seconds"] for r in rows), 1)}


def child_command(index: int, preset: str, only, skip_preset: Optional[str] = None) -> list[str]:
    """The command of the fresh process that measures case ``index`` of ``all_cases(preset, "cpu", only,
    skip_preset)``: it passes every argument of that selection, so the child (:func:`child_case`) counts
    the same list."""
    return [sys.executable, "-m", "fastssl.benchmarks.harness", "--preset", preset, "--index", str(index),
            *sum((["--only", o] for o in only), []), *(["--skip-preset", skip_preset] if skip_preset else [])]


def run_case_in_subprocess(index: int, preset: str, only, timeout: float = 600,
                           skip_preset: Optional[str] = None) -> dict:
    """CPU: a fresh process per case, so one case's allocations cannot hide another's peak."""
    cmd = child_command(index, preset, only, skip_preset)
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode or not lines:
        raise RuntimeError(f"benchmark subprocess for case {index} failed:\n{run.stderr[-2000:]}")
    return {**json.loads(lines[-1]), "case_seconds": round(time.perf_counter() - start, 1)}


def load_or_measure_peaks(path: Optional[str], device: str) -> dict:
    """The device's ceilings from ``path`` when it exists (measured once per GPU check), else measured
    now (and saved to ``path`` when given)."""
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    peaks = measure_peaks(device)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json(path, peaks)
    return peaks


# -- the device's own ceilings -----------------------------------------------------------------------

def measure_peaks(device: str) -> dict:
    """A large matmul's TFLOP/s (bf16 on CUDA, fp32 on CPU) and a large copy's GB/s (read + write)."""
    if device == "cuda":
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        src = torch.randn(2**28, device="cuda")  # 1 GiB
        dst = torch.empty_like(src)
        mm = measure_cuda(lambda: a @ a)["ms_median"]
        cp = measure_cuda(lambda: dst.copy_(src))["ms_median"]
        return {"matmul_bf16_tflops": 2 * 8192**3 / mm * 1e-9, "copy_gbps": 2 * src.numel() * 4 / cp * 1e-6}
    a = torch.randn(2048, 2048)
    src = torch.randn(2**25)  # 128 MiB
    dst = torch.empty_like(src)
    mm = measure_cpu(lambda: a @ a, min_time=0.5)["ms_median"]
    cp = measure_cpu(lambda: dst.copy_(src), min_time=0.5)["ms_median"]
    return {"matmul_fp32_tflops": 2 * 2048**3 / mm * 1e-9, "copy_gbps": 2 * src.numel() * 4 / cp * 1e-6}


def git_sha() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def result_header(device: str) -> dict:
    import triton

    return {"device": device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "git": git_sha(), "date": datetime.date.today().isoformat()}


# -- reporting ---------------------------------------------------------------------------------------

def _group_key(r: dict) -> tuple:
    return r["op"], r["mode"], r["dtype"], json.dumps(r["shape"], sort_keys=True)


def format_table(rows: list[dict]) -> str:
    """One line a row; ``x torch`` is eager PyTorch's time (and peak memory) over this row's, same case."""
    baseline = {_group_key(r): r for r in rows if r["provider"] == "torch" and r.get("ms_median")}
    header = f"{'op':<18}{'provider':<10}{'mode':<9}{'dtype':<10}{'shape':<34}{'ms':>10}{'peak MB':>10}{'TFLOP/s':>9}{'GB/s':>9}{'x torch':>9}{'mem x':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        if r.get("error"):
            lines.append(f"{r['op']:<18}{r['provider']:<10}{r['mode']:<9}{r['dtype']:<10}{shape:<34}  error: {r['error'][:60]}")
            continue
        base = baseline.get(_group_key(r))
        speed = f"{base['ms_median'] / r['ms_median']:.2f}" if base else "-"
        mem = f"{r['peak_mb'] / base['peak_mb']:.3f}" if base and base["peak_mb"] else "-"
        fmt = lambda v, spec: format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))  # noqa: E731
        lines.append(f"{r['op']:<18}{r['provider']:<10}{r['mode']:<9}{r['dtype']:<10}{shape:<34}"
                     f"{fmt(r['ms_median'], '10.3f')}{fmt(r['peak_mb'], '10.1f')}{fmt(r['tflops'], '9.2f')}"
                     f"{fmt(r['gbps'], '9.1f')}{speed:>9}{mem:>8}")
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: str) -> list[str]:
    """One PNG per op: time and peak memory against size, one line per provider (and mode, dtype)."""
    try:
        import matplotlib
    except ImportError:  # matplotlib comes with the bench extra; the JSON is written regardless
        print("matplotlib is not installed: no plots (pip install fastssl[bench])")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op in sorted({r["op"] for r in rows}):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
        lines = {}
        for r in rows:
            if r["op"] == op and r.get("ms_median") is not None:
                lines.setdefault((r["provider"], r["mode"], r["dtype"]), []).append((r["size"], r["ms_median"], r["peak_mb"]))
        for (provider, mode, dtype), points in sorted(lines.items()):
            points.sort()
            xs = [p[0] for p in points]
            label = f"{provider} {mode} {dtype}"
            ax_t.plot(xs, [p[1] for p in points], marker="o", label=label)
            ax_m.plot(xs, [max(p[2], 1e-3) for p in points], marker="o", label=label)
        for ax, title in ((ax_t, "time (ms, median)"), (ax_m, "peak extra memory (MB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("size")
            ax.set_title(f"{op}: {title}")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def run(preset: str, only=(), out_dir: str = "bench-out", device: Optional[str] = None, progress: bool = True,
        peaks_path: Optional[str] = None, skip_preset: Optional[str] = None, started: Optional[float] = None) -> dict:
    """Run every case of ``preset`` (``only``: op names; ``skip_preset``: see :func:`all_cases`), write
    ``<device>_<date>.json`` after each case and the plots at the end (also after a SIGINT, which ends the
    run early with ``"interrupted": true``). ``wall_s`` counts from ``started`` (``time.perf_counter()``;
    default: now; the CLI passes its own start, so imports count) to the last file written."""
    started = time.perf_counter() if started is None else started
    device = device or default_device()
    cases = all_cases(preset, device, only, skip_preset)
    if not cases:
        raise ValueError(f"no benchmark case matches --only {list(only)}")
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with the bench extra; without it, no bar
        tqdm = None
    bar = tqdm(total=len(cases), desc="fastssl bench", disable=not progress) if tqdm else None
    result = {**result_header(device), "preset": preset, "peaks": load_or_measure_peaks(peaks_path, device), "rows": []}
    os.makedirs(out_dir, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", result["device"]).strip("-")
    path = os.path.join(out_dir, f"{slug}_{result['date']}.json")
    isolate = device == "cpu" and preset == "cpu"  # the long CPU run: a fresh process per case
    # in this process, a case's providers are measured side by side (run_cases); the cpu preset's fresh
    # processes take one provider each
    batches = [[c] for c in cases] if isolate else _same_case_runs(cases)
    try:
        for batch in batches:
            if bar:
                bar.set_postfix_str(batch[0].name[:60])
            if isolate:
                measured = [run_case_in_subprocesses(len(result["rows"]), preset, only,  # the case's index
                                                     skip_preset=skip_preset)]
            else:
                measured = run_cases(batch, device, preset)
            result["rows"].extend(measured)
            result["wall_s"] = round(time.perf_counter() - started, 1)
            write_json(path, result)  # after every case, so a run cut short still leaves its rows
            if bar:
                bar.update(len(batch))
    except KeyboardInterrupt:  # a time box (timeout -s INT): keep what was measured
        result["interrupted"] = True
        write_json(path, result)
    if bar:
        bar.close()
    result["files"] = [path, *plot(result["rows"], out_dir)]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(path, {k: v for k, v in result.items() if k != "files"})
    return result


def plan(preset: str, device: str, only=(), skip_preset: Optional[str] = None) -> str:
    """The cases of ``preset`` on ``device``, one a line in run order (no GPU needed)."""
    cases = all_cases(preset, device, only, skip_preset)
    return "\n".join(f"{i + 1:4d} {c.name}" for i, c in enumerate(cases))


def _child_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="run one CPU benchmark case (used by fastssl bench), or "
                                                 "measure the device's ceilings into a JSON file")
    parser.add_argument("--preset")
    parser.add_argument("--index", type=int)
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--skip-preset", default=None)
    parser.add_argument("--ceilings", metavar="FILE", help="measure the ceilings (default device) into FILE")
    return parser


def child_case(argv) -> Case:
    """The case a child started with :func:`child_command`'s arguments ``argv`` measures."""
    parser = _child_parser()
    args = parser.parse_args(argv)
    if args.preset is None or args.index is None:
        parser.error("--preset and --index go together (or --ceilings FILE)")
    return all_cases(args.preset, "cpu", args.only, args.skip_preset)[args.index]


def _child(argv=None) -> None:
    args = _child_parser().parse_args(argv)
    if args.ceilings:
        peaks = load_or_measure_peaks(args.ceilings, default_device())
        print(json.dumps(peaks), flush=True)
        return
    case = child_case(argv)
    print(json.dumps(run_case(case, "cpu", args.preset)), flush=True)


if __name__ == "__main__":
    _child()
