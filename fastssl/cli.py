"""The ``fastssl`` command line: ``fastssl bench [--quick] [--only OP ...] [--out DIR] [--device D]``.

>>> main(["bench", "--only", "no_such_op", "--quiet"])
Traceback (most recent call last):
    ...
SystemExit: fastssl bench: no benchmark case matches --only ['no_such_op']
"""
from __future__ import annotations

import argparse
import sys


def _bench(args) -> int:
    from fastssl.benchmarks import harness

    try:
        result = harness.run("quick" if args.quick else "full", args.only, args.out, args.device, progress=not args.quiet)
    except ValueError as exc:
        raise SystemExit(f"fastssl bench: {exc}")
    print(harness.format_table(result["rows"]))
    print("peaks: " + ", ".join(f"{k}={v:.1f}" for k, v in result["peaks"].items()))
    print(f"{harness.PROVIDERS_NOTE}\nwrote " + " ".join(result["files"]))
    return 1 if any(r.get("error") and r["provider"] == "fastssl" for r in result["rows"]) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastssl", description="fastssl: fused kernels for self-supervised and generative learning")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmark every op against eager PyTorch, torch.compile and installed peers")
    bench.add_argument("--quick", action="store_true", help="the small preset (a few minutes on a 2-core CPU)")
    bench.add_argument("--only", nargs="+", default=[], metavar="OP", help="op names, e.g. nt_xent ddpm_step")
    bench.add_argument("--out", default="bench-out", metavar="DIR", help="where the JSON and PNG plots go")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
