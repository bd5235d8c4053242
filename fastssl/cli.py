"""The ``fastssl`` command line:

- ``fastssl bench [--quick | --preset P] [--only OP ...] [--out DIR] [--device D] [--peaks FILE]
  [--skip-preset P] [--plan]``: benchmarks (fastssl.benchmarks; presets in fastssl.benchmarks.harness).
- ``fastssl train METHOD [--quick] [--epochs N] [--device cpu|cuda] [--out DIR] [--seed S]``, ``fastssl train
  --list``: a method of ``fastssl.models`` on embedded data, with its baseline from the same run; ``fastssl train
  clip --loss sigmoid`` trains CLIP with SigLIP's sigmoid loss.
- ``fastssl train --all [--quick] [--readme README.md]``: every method, a summary table (``DIR/table.md``,
  and the README's results table when ``--readme`` is given).

Arguments are checked before any work (one of METHOD, ``--list``, ``--all``; a positive ``--epochs``, a
writable ``--out`` folder, an available ``--device``, the extras ``train`` needs, a ``--readme`` file with the
train-table markers): a bad one exits 2 with one line. Result files are written
atomically (a temporary file, then a rename): an interrupted run leaves a complete file or none.

>>> main(["bench", "--only", "no_such_op", "--quiet"])  # stderr: usage, then "fastssl bench: error: ..."
Traceback (most recent call last):
    ...
SystemExit: 2
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

# What ``fastssl train`` imports to load its data and write its figures (the ``train`` extra).
TRAIN_EXTRAS = {"matplotlib": "matplotlib", "sklearn": "scikit-learn", "skimage": "scikit-image", "tqdm": "tqdm"}


def _positive_int(text: str) -> int:
    """argparse type of --epochs: an int >= 1 (0 or a negative count would train nothing and still report)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    """argparse type of --seed: an int in [0, 2**64), the range torch.manual_seed takes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**64), got {text!r}")
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**64), got {value}")
    return value


def check_before_work(parser: argparse.ArgumentParser, *, out=None, device=None, extras=None) -> None:
    """Everything a run needs, checked before any work (exits 2 with one line, as argparse does): ``out`` a
    folder that exists or can be made and is writable; ``device`` available; the ``extras`` modules
    installed (``{module: pip name}``)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda but no CUDA device is available (torch.cuda.is_available() is False); "
                         "use --device cpu")
    missing = [pip for module, pip in (extras or {}).items() if importlib.util.find_spec(module) is None]
    if missing:
        parser.error(f"needs {', '.join(missing)}, not installed: pip install \"fastssl[train]\"")
    if out is not None:
        if os.path.exists(out) and not os.path.isdir(out):
            parser.error(f"--out {out} is a file, not a folder")
        try:
            os.makedirs(out, exist_ok=True)
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as exc:
            parser.error(f"--out {out} is not a writable folder ({exc.strerror or exc})")


def _bench(args, parser) -> int:
    started = time.perf_counter()  # the preset's wall time counts its imports
    from fastssl.benchmarks import harness

    if args.quick and args.preset not in (None, "quick"):
        parser.error(f"--quick is --preset quick; it cannot go with --preset {args.preset}")
    preset = "quick" if args.quick else args.preset or "full"
    if not harness.all_cases(preset, args.device or harness.default_device(), args.only, args.skip_preset):
        what = f"--preset {preset}" + (f" less --skip-preset {args.skip_preset}" if args.skip_preset else "")
        parser.error(f"no benchmark case of {what} matches --only {' '.join(args.only)}" if args.only
                     else f"{what} leaves no benchmark case")
    check_before_work(parser, out=None if args.plan else args.out, device=None if args.plan else args.device)
    try:
        if args.plan:
            print(harness.plan(preset, args.device or harness.default_device(), args.only, args.skip_preset))
            return 0
        result = harness.run(preset, args.only, args.out, args.device, progress=not args.quiet,
                             peaks_path=args.peaks, skip_preset=args.skip_preset, started=started)
    except ValueError as exc:
        raise SystemExit(f"fastssl bench: {exc}")
    print(harness.format_table(result["rows"]))
    print("peaks: " + ", ".join(f"{k}={v:.1f}" for k, v in result["peaks"].items()))
    print(f"{harness.PROVIDERS_NOTE}\nwrote " + " ".join(result["files"]))
    print(f"fastssl bench --preset {preset}: {len(result['rows'])} cases in {result['wall_s']:.0f} s"
          + (" (interrupted)" if result.get("interrupted") else ""))
    return 1 if any(r.get("error") and r["provider"] == "fastssl" for r in result["rows"]) else 0


def _check_readme(parser: argparse.ArgumentParser, path: str) -> None:
    """``--readme``: an existing, writable file with a train-table block to replace (checked before training)."""
    from fastssl.runner import replace_table

    if not os.path.isfile(path) or not os.access(path, os.W_OK):
        parser.error(f"--readme {path} is not a writable file")
    try:
        with open(path) as f:
            replace_table(f.read(), "")
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"--readme {path} cannot be read ({getattr(exc, 'strerror', None) or exc})")
    except ValueError as exc:
        parser.error(f"--readme {path}: {exc}")


def _train(args, parser) -> int:
    from fastssl.models import METHODS
    from fastssl.runner import results_table, run, run_all
    from fastssl.training import TrainConfig

    config = TrainConfig(quick=args.quick, epochs=args.epochs, device=args.device, out=args.out, seed=args.seed,
                         progress=not args.quiet, loss=args.loss)
    chosen = [what for what, given in ((f"METHOD {args.method!r}", args.method), ("--list", args.list),
                                       ("--all", args.all)) if given]
    if len(chosen) > 1:
        parser.error(f"{' and '.join(chosen)} do not go together: give one of METHOD, --list, --all")
    if args.loss and args.method != "clip":
        parser.error("--loss goes with the clip method (softmax or sigmoid)")
    if args.readme and not args.all:
        parser.error("--readme goes with --all")
    if not chosen:
        parser.error(f"a METHOD is needed, one of: {', '.join(sorted(METHODS))} (or --list, or --all)")
    if not args.list:
        if args.method and args.method not in METHODS:
            parser.error(f"unknown method {args.method!r}; fastssl train --list shows them")
        if args.readme:
            _check_readme(parser, args.readme)
        check_before_work(parser, out=args.out, device=args.device, extras=TRAIN_EXTRAS)
    if args.all:
        rows = run_all(list(METHODS), config, readme=args.readme)
        print(results_table(rows))
        return 0 if all(r["beats_baseline"] for r in rows) else 1
    if args.list:
        for name, (_, what) in sorted(METHODS.items()):
            print(f"{name:<10} {what}")
        return 0
    metrics = run(args.method, config)
    better = "beats" if metrics["beats_baseline"] else "does NOT beat"
    print(f"{metrics['method']}: {metrics['metric']} = {metrics['value']:.4f}, baseline {metrics['baseline']:.4f} "
          f"({better} it); outputs in {args.out}/{metrics['method']}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl", description="fastssl: fused kernels for self-supervised and generative learning")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark every op against eager PyTorch, torch.compile and installed peers")
    bench.add_argument("--quick", action="store_true", help="the quick preset: every op's headline, 90 s on a 2-core CPU")
    bench.add_argument("--preset", choices=["quick", "cpu", "targets", "full"], default=None,
                       help="quick; cpu (the long CPU run); targets (GUIDE's target cases); full (default, the GPU preset)")
    bench.add_argument("--plan", action="store_true", help="print the cases in run order and exit (no timing)")
    bench.add_argument("--peaks", metavar="FILE", help="reuse the device ceilings in FILE (measured and saved there if absent)")
    bench.add_argument("--skip-preset", choices=["quick", "cpu", "targets", "full"], default=None, metavar="P",
                       help="leave out the cases preset P has (gpu_check: the full preset after the targets)")
    bench.add_argument("--only", nargs="+", default=[], metavar="OP", help="op names, e.g. nt_xent ddpm_step")
    bench.add_argument("--out", default="bench-out", metavar="DIR", help="where the JSON and PNG plots go")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    train = sub.add_parser("train", help="train a self-supervised or generative method on embedded data")
    train.add_argument("method", nargs="?", help="a method name (fastssl train --list)")
    train.add_argument("--list", action="store_true", help="list the methods")
    train.add_argument("--all", action="store_true", help="train every method and write DIR/table.md")
    train.add_argument("--readme", metavar="FILE", help="with --all: replace FILE's results table (README.md)")
    train.add_argument("--quick", action="store_true", help="the short preset (minutes on 2 CPU cores)")
    train.add_argument("--epochs", type=_positive_int, default=None, help="override the preset's epochs (>= 1)")
    train.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    train.add_argument("--out", default="train-out", metavar="DIR", help="metrics.json and figures go to DIR/METHOD")
    train.add_argument("--seed", type=_seed, default=0)
    train.add_argument("--loss", choices=["softmax", "sigmoid"], default=None,
                       help="clip: CLIP's softmax loss (default) or SigLIP's sigmoid loss")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return _bench(args, bench) if args.command == "bench" else _train(args, train)


if __name__ == "__main__":
    sys.exit(main())
