"""GUIDE §6's performance targets as one table: each target, what was measured, the goal, met or not.

``benchmarks/gpu_check.sh`` prints it last, from the result files of its parts:
``python -m fastssl.benchmarks.targets RESULT.json ... [--syncs syncs.json] [--markdown]``. Every number
is read from rows measured in the same run (ratios are fastssl against the reference row of the same
op, mode, dtype and shape); a target whose rows are missing reads "not measured", never "met".

>>> rows = [{"op": "nt_xent", "provider": p, "mode": "fwd+bwd", "dtype": "float32", "ms_median": ms,
...          "peak_mb": mb, "shape": {"n": 8192, "d": 128}} for p, ms, mb in (("fastssl", 3.0, 160.0), ("torch", 4.0, 3328.0))]
>>> [(t["target"][:24], t["met"]) for t in evaluate(rows, {}, None) if t["measured"] != "not measured"]
[('CPU nt_xent fwd+bwd N=81', True), ('CPU nt_xent fwd+bwd N=81', True)]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

NT_XENT_GPU = dict(op="nt_xent", mode="fwd+bwd", dtype="bfloat16", shape={"n": 32768, "d": 256})
CLIP_GPU = dict(op="clip_loss", mode="fwd+bwd", dtype="bfloat16", shape={"n": 32768, "d": 256})
CFG_BIG = dict(op="ddpm_step_cfg", mode="fwd", shape={"numel": 2**26})
CFG_LATENT = dict(op="ddpm_step_cfg", mode="fwd", dtype="bfloat16", shape={"numel": 2**20})
PROP_TRAIN = dict(op="color_propagate", mode="fwd+bwd", shape={"b": 32, "r": 3, "h": 32, "w": 32, "c": 64, "v": 16})
CRW = dict(op="propagate_labels", mode="fwd", dtype="float32",
           shape={"h": 60, "w": 107, "c": 256, "context": 20, "memory": 1, "radius": 12.0, "topk": 10})
NT_XENT_CPU = dict(op="nt_xent", mode="fwd+bwd", dtype="float32", shape={"n": 8192, "d": 128})


def find(rows: list[dict], provider: str, *, op: str, mode: str, shape: dict, dtype: Optional[str] = None) -> Optional[dict]:
    """The last timed row of ``provider`` for that op, mode, dtype and shape (None if there is none)."""
    hits = [r for r in rows if r["op"] == op and r["provider"] == provider and r["mode"] == mode
            and (dtype is None or r["dtype"] == dtype) and r.get("ms_median") and r["shape"] == shape]
    return hits[-1] if hits else None


def _target(name: str, measured: Optional[float], goal: float, fmt: str, *, at_most: bool = False) -> dict:
    if measured is None:
        return {"target": name, "measured": "not measured", "goal": _goal(goal, fmt, at_most), "met": None}
    met = measured <= goal if at_most else measured >= goal
    return {"target": name, "measured": fmt.format(measured), "goal": _goal(goal, fmt, at_most), "met": met}


def _goal(goal: float, fmt: str, at_most: bool) -> str:
    return ("<= " if at_most else ">= ") + fmt.format(goal)


def _ratio(rows, reference: str, spec: dict, value=lambda r: r["ms_median"]) -> Optional[float]:
    ours, ref = find(rows, "fastssl", **spec), find(rows, reference, **spec)
    return value(ref) / value(ours) if ours and ref and value(ours) else None


def _inverse(value: Optional[float]) -> Optional[float]:
    return 1 / value if value else None


def evaluate(rows: list[dict], peaks: dict, syncs: Optional[list[dict]]) -> list[dict]:
    """Every GUIDE §6 target against ``rows`` (result rows), ``peaks`` (the device's ceilings) and
    ``syncs`` (``sync_check``'s results; None when it did not run)."""
    out = []
    nt = find(rows, "fastssl", **NT_XENT_GPU)
    peak = peaks.get("matmul_bf16_tflops")
    out.append(_target("nt_xent fwd+bwd 2N=65536 D=256 bf16: % of bf16 matmul peak",
                       100 * nt["tflops"] / peak if nt and nt.get("tflops") and peak else None, 50, "{:.1f}%"))
    out.append(_target("nt_xent fwd+bwd 2N=65536 D=256 bf16: x eager", _ratio(rows, "torch", NT_XENT_GPU), 3, "{:.2f}x"))
    features_mb = 2 * 32768 * 256 * 2 / 2**20  # both views in bf16
    out.append(_target("nt_xent 2N=65536 D=256: extra memory / features (O(N*D))",
                       nt["peak_mb"] / features_mb if nt else None, 16, "{:.1f}x", at_most=True))
    out.append(_target("clip_loss fwd+bwd N=32768 D=256 bf16: x two inf_cl calls", _ratio(rows, "inf_cl", CLIP_GPU), 1, "{:.2f}x"))
    copy = peaks.get("copy_gbps")
    for dtype in ("bfloat16", "float32"):
        r = find(rows, "fastssl", dtype=dtype, **CFG_BIG)
        out.append(_target(f"ddpm_step_cfg 64M {dtype}: % of copy bandwidth",
                           100 * r["gbps"] / copy if r and r.get("gbps") and copy else None, 80, "{:.1f}%"))
    out.append(_target("ddpm_step_cfg 1M bf16 (latents): x diffusers step + eager CFG",
                       _ratio(rows, "diffusers", CFG_LATENT), 5, "{:.2f}x"))
    for dtype in ("float32", "bfloat16"):
        out.append(_target(f"color_propagate fwd+bwd B=32 R=3 32x32 C=64 V=16 {dtype}: x eager",
                           _ratio(rows, "torch", dict(PROP_TRAIN, dtype=dtype)), 2, "{:.2f}x"))
    out.append(_target("CRW step 60x107, 20+1 frames, r=12, top-10: x dense eager", _ratio(rows, "torch", CRW), 10, "{:.1f}x"))
    crw = find(rows, "fastssl", **CRW)
    out.append(_target("CRW step: peak memory (MB)", crw["peak_mb"] if crw else None, 1024, "{:.0f}", at_most=True))
    cpu = find(rows, "fastssl", **NT_XENT_CPU)
    if cpu:  # GUIDE §6's CPU target, when a CPU run is among the results
        out.append(_target("CPU nt_xent fwd+bwd N=8192 D=128: peak memory / eager's",
                           _inverse(_ratio(rows, "torch", NT_XENT_CPU, lambda r: r["peak_mb"])), 0.10, "{:.3f}", at_most=True))
        out.append(_target("CPU nt_xent fwd+bwd N=8192 D=128: time / eager's",
                           _inverse(_ratio(rows, "torch", NT_XENT_CPU)), 1.5, "{:.2f}", at_most=True))
    if syncs is None:
        out.append({"target": "no host syncs; CUDA graph replay == eager", "measured": "not measured",
                    "goal": "all checks pass", "met": None})
    elif any(s["device"] != "cuda" for s in syncs):
        out.append({"target": "no host syncs; CUDA graph replay == eager", "measured": "CPU run, no proof",
                    "goal": "all checks pass", "met": None})
    else:
        failed = [s["check"] for s in syncs if not s["ok"]]
        out.append({"target": "no host syncs; CUDA graph replay == eager",
                    "measured": "all pass" if not failed else "failed: " + ", ".join(failed),
                    "goal": "all checks pass", "met": not failed})
    return out


def format_targets(targets: list[dict], markdown: bool = False) -> str:
    mark = {True: "yes", False: "NO", None: "-"}
    if markdown:
        lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {t['goal']} | {mark[t['met']]} |" for t in targets]
        return "\n".join(lines)
    width = max(len(t["target"]) for t in targets)
    lines = [f"{'target':<{width}}  {'measured':>14}  {'goal':>10}  met", "-" * (width + 34)]
    lines += [f"{t['target']:<{width}}  {t['measured']:>14}  {t['goal']:>10}  {mark[t['met']]}" for t in targets]
    return "\n".join(lines)


def load(paths: list[str]) -> tuple[list[dict], dict]:
    """Rows and ceilings of result files (the first file's ceilings win; missing files are skipped)."""
    rows, peaks = [], {}
    for path in paths:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError):
            continue
        rows += result.get("rows", [])
        peaks = peaks or result.get("peaks", {})
    return rows, peaks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", help="result JSON files (fastssl bench --out DIR writes them)")
    parser.add_argument("--syncs", metavar="FILE", help="sync_check's JSON")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    rows, peaks = load(args.results)
    syncs = None
    if args.syncs:
        try:
            with open(args.syncs) as f:
                syncs = json.load(f)
        except (OSError, ValueError):
            syncs = None
    print(format_targets(evaluate(rows, peaks, syncs), args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
