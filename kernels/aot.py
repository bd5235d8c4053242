"""Ahead-of-time compile of every registered kernel for a real chip, on a machine with no GPU.

For each kernel x launch variant x autotune config: ``triton.compile`` for ``GPUTarget("cuda", arch,
32)`` with the specialization Triton's launch binder gives example arguments of the variant's declared
types (``launch_specialization``: aligned tensors, ``"i32:16"`` ints as multiples of 16), then ``cuobjdump --dump-resource-usage`` on the cubin. A result is bad when it does not compile,
spills (``LOCAL`` or ``STACK`` > 0: ptxas spills into the stack frame), needs more shared memory than the chip has (static + dynamic > 227 KB on
sm_90, 163 KB on sm_80), or is a matmul kernel (``uses_dot``) whose sm_90 PTX lacks ``wgmma`` in a bf16/fp16 variant.

Each result also carries ``sass_profile`` of the cubin's SASS: the main loop's instruction and wgmma counts,
its async copies (cp.async, TMA) and global loads, and the kernel's global loads by width.

Run it as ``python -m fastssl.kernels.aot --arch 90`` (prints JSON lines, exits 1 on a bad result; ``--report``
prints the same as a table);
``--module FILE.py`` adds the kernels a file registers (the test of the test uses it). It must run
without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions).

>>> # python -m fastssl.kernels.aot --arch 90 --only _cfg_combine_kernel
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

from ..backend import interpreting

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def load_kernel_modules(extra: list[str] = ()) -> list:
    """Import every module of ``fastssl.kernels`` (and ``extra`` files); return their modules."""
    import fastssl.kernels as package

    modules = [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    for path in extra:
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


def jitted_functions(modules) -> dict:
    """``{qualified name: JITFunction}`` of every ``@triton.jit`` function defined in ``modules``."""
    from .registry import unwrap

    found = {}
    for module in modules:
        for value in vars(module).values():
            if hasattr(value, "fn") or hasattr(value, "arg_names"):
                fn = unwrap(value)
                inner = getattr(fn, "fn", None)
                if callable(inner) and getattr(inner, "__module__", None) == module.__name__:
                    found[f"{module.__name__}.{fn.__name__}"] = fn
    return found


def unregistered(modules) -> list[str]:
    """Names of jitted functions in ``modules`` that are neither a registered kernel nor a device function."""
    from .registry import DEVICE_FUNCTIONS, KERNELS, unwrap

    known = {id(spec.jit_fn) for spec in KERNELS} | {id(unwrap(f)) for f in DEVICE_FUNCTIONS}
    return sorted(name for name, fn in jitted_functions(modules).items() if id(fn) not in known)


def _run_on_cubin(command: list[str], cubin: bytes) -> str:
    """The standard output of ``command + [a file holding cubin]`` (cuobjdump, nvdisasm)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([*command, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    text = _run_on_cubin([cuobjdump(), "--dump-resource-usage"], cubin)
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        values = [int(v) for v in re.findall(rf"\b{key}:(\d+)", text)]
        usage[key.lower()] = max(values) if values else None
    return usage


# Triton's names of pointee types (the ``"*fp16"`` in a signature) as torch dtypes, for example tensors.
_POINTEE = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64", "i64": "int64",
            "i32": "int32", "i16": "int16", "i8": "int8", "u8": "uint8", "i1": "bool"}


def example_argument(declared: str):
    """A value a real launch passes for an argument declared as ``declared``: a 16-byte aligned tensor of
    the pointee dtype for a pointer (PyTorch's allocator aligns every fresh tensor; the launchers pass
    such tensors), a multiple of 16 for ``"i32:16"`` / ``"i64:16"``, an integer that is neither a
    multiple of 16 nor 1 for a plain ``"i32"`` (1 would make Triton fold it into a constant), a float
    for ``"fp32"``."""
    import torch
    from triton.runtime.jit import MockTensor  # data_ptr() 0: aligned, as Triton's own warmup assumes

    base, _, mod = declared.partition(":")
    if base.startswith("*"):
        return MockTensor(getattr(torch, _POINTEE[base[1:]]))
    if base in ("i32", "i64"):
        if mod not in ("", "16"):
            raise ValueError(f"integer declaration {declared!r}: only a plain type or ':16' is understood")
        return (16 if mod else 19) + (2**32 if base == "i64" else 0)
    if base == "fp32" and not mod:
        return 0.5
    raise ValueError(f"no example argument for the declared type {declared!r}")


def launch_specialization(fn, variant, config, arch: int) -> dict:
    """What a real launch of ``fn`` with this variant's arguments and this config compiles, computed by
    Triton itself: its launch binder (``create_function_from_signature``, the per-argument
    ``specialize_impl`` a ``kernel[grid](...)`` call runs) applied to example arguments
    (``example_argument``), then ``JITFunction._pack_args``, for a backend of ``sm_{arch}``. Returns the
    ``signature``, ``constexprs`` and ``attrs`` for ``ASTSource`` and the compile ``options``, and the
    names of the runtime arguments Triton marks ``tt.divisibility`` 16 (``divisible``). So pointers get
    the alignment, ``":16"`` integers the divisibility and everything else nothing, exactly as Triton
    specializes a launch with such values; a Triton that changes its rules changes the AOT with it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    fixed = {**variant.constexprs, **config.kwargs}
    missing = [a for a in fn.arg_names if a not in fixed and a not in variant.signature]
    if missing:
        raise ValueError(f"{fn.__name__}: variant declares no type for {missing}")
    kwargs = {a: (fixed[a] if a in fixed else example_argument(variant.signature[a])) for a in fn.arg_names}
    kwargs.update(num_warps=config.num_warps, num_stages=config.num_stages)
    if getattr(config, "maxnreg", None):  # what the autotuner passes a launch (Config.all_kwargs)
        kwargs.update(maxnreg=config.maxnreg)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    divisible = sorted(fn.arg_names[path[0]] for path, values in attrs.items()
                       if len(path) == 1 and ["tt.divisibility", 16] in [list(v) for v in values])
    return dict(signature=signature, constexprs=constexprs, attrs=attrs, options=options, divisible=divisible)


def declared_divisible(variant) -> list[str]:
    """The runtime arguments a variant declares 16-aligned or divisible by 16: pointers and ``":16"`` ints."""
    return sorted(a for a, t in variant.signature.items() if t.startswith("*") or t.endswith(":16"))


# One SASS instruction line (``/*0ab0*/  @!P0 BRA `(.L_x_0) ;``) and one label line (``.L_x_0:``) of
# ``nvdisasm -c``; a branch's target is a label or (cuobjdump's style) an address.
_SASS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_BRANCH_TARGET = re.compile(r"^\s*`\((\.L\w+)\)")
_ADDRESS = re.compile(r"^\s*(?:0x)?([0-9a-f]+)\b")


def nvdisasm() -> str:
    return os.path.join(os.path.dirname(cuobjdump()), "nvdisasm")


def sass(cubin: bytes) -> str:
    """The cubin's SASS text (``nvdisasm -c``, without the slower dataflow analysis)."""
    return _run_on_cubin([nvdisasm(), "-c", "-ndf"], cubin)


def sass_instructions(text: str) -> list[tuple]:
    """``(address, opcode, operands)`` of every SASS instruction, in order; a branch to a label has the
    label's address as its operand."""
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        found = _SASS.match(line)
        if found:
            address = int(found.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            instructions.append((address, found.group(2), found.group(3).strip()))

    def resolved(operands: str) -> str:  # a label's address, in hex like cuobjdump's operands
        target = _BRANCH_TARGET.match(operands)
        return f"{labels[target.group(1)]:x}" if target and target.group(1) in labels else operands

    return [(a, op, resolved(rest) if op.startswith("BRA") else rest) for a, op, rest in instructions]


def _global_load_bits(opcode: str) -> int:
    """The width of one global load or store (``LDG.E.128``: 128; ``LDG.E.U16``: 16; plain ``LDG.E``,
    ``STG.E``: 32)."""
    for bits in (128, 64, 16, 8):
        if re.search(rf"\.(?:U|S)?{bits}\b", opcode):
            return bits
    return 32


def _count(instructions, prefix: str) -> int:
    return sum(op.startswith(prefix) for _, op, _ in instructions)


def main_loop(instructions: list[tuple]) -> list[tuple]:
    """The kernel's hot loop: among the innermost loops (a backward ``BRA`` to an earlier address, spanning
    no other loop), the one with the most wgmma (``HGMMA``), then the fewest other instructions (a kernel
    that runs its edge tiles in a masked copy of the loop spends its time in the unmasked one); without
    wgmma, the longest loop; [] without a loop. The final ``BRA`` to itself that ends every kernel is not a
    loop."""
    loops = []
    for address, op, rest in instructions:
        target = _ADDRESS.match(rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    innermost = [(lo, hi) for lo, hi in loops if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops)]
    bodies = [[i for i in instructions if lo <= i[0] <= hi] for lo, hi in innermost]
    def rank(body):
        wgmma = _count(body, "HGMMA")
        return (wgmma, -len(body)) if wgmma else (0, len(body))

    return max(bodies, key=rank, default=[])


def sass_profile(text: str) -> dict:
    """What the SASS says about the hot loop and the memory path: the main loop's instruction count and its
    wgmma, async copies (``LDGSTS``: cp.async, and their widths), TMA loads (``UTMALDG``), global loads and
    barriers; the kernel's global loads and stores by width in bits (the widest load is the result's
    ``load_bits``)."""
    instructions = sass_instructions(text)
    loop = main_loop(instructions)

    def widths(prefix):  # "LDG.": global loads (LDGSTS, cp.async, and LDGDEPBAR are counted apart); "STG."
        found = {}
        for _, op, _ in instructions:
            if op.startswith(prefix):
                bits = _global_load_bits(op)
                found[bits] = found.get(bits, 0) + 1
        return dict(sorted(found.items()))

    loop_loads = [op for _, op, _ in loop if op.startswith("LDG.")]
    return {"instructions": len(instructions), "cp_async": _count(instructions, "LDGSTS"),
            "tma": _count(instructions, "UTMALDG"), "global_loads": widths("LDG."), "global_stores": widths("STG."),
            "loop": {"instructions": len(loop), "wgmma": _count(loop, "HGMMA"), "cp_async": _count(loop, "LDGSTS"),
                     "cp_async_bits": sorted({_global_load_bits(op) for _, op, _ in loop if op.startswith("LDGSTS")}),
                     "tma": _count(loop, "UTMALDG"), "global_loads": len(loop_loads),
                     "global_load_bits": sorted({_global_load_bits(op) for op in loop_loads}),
                     "barriers": _count(loop, "BAR.")}}


def compile_one(spec, variant, config, arch: int) -> dict:
    """Compile one (kernel, variant, config) for ``sm_{arch}``; return what was measured and any problems."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.jit_fn
    constexprs = {**variant.constexprs, **config.kwargs}
    result = {"kernel": spec.name, "arch": arch, "constexprs": {k: str(v) for k, v in constexprs.items()},
              "signature": variant.signature, "num_warps": config.num_warps, "num_stages": config.num_stages,
              "problems": []}
    start = time.perf_counter()
    try:
        launch = launch_specialization(fn, variant, config, arch)
        result["divisible"] = launch["divisible"]
        folded = sorted(set(launch["constexprs"]) - {(fn.arg_names.index(a),) for a in constexprs})
        if launch["divisible"] != declared_divisible(variant) or folded:
            result["problems"].append(f"Triton specializes the example launch differently from the declaration: "
                                      f"divisible {launch['divisible']}, folded {folded}")
        source = ASTSource(fn=fn, signature=launch["signature"], constexprs=launch["constexprs"], attrs=launch["attrs"])
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch["options"].__dict__)
    except Exception as exc:  # the compiler's own message is the diagnosis
        result["problems"].append(f"does not compile: {type(exc).__name__}: {str(exc).strip()[-600:]}")
        return result
    usage = resource_usage(compiled.asm["cubin"])
    dynamic_shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    profile = sass_profile(sass(compiled.asm["cubin"]))
    result.update(usage, dynamic_shared=dynamic_shared, load_bits=max(profile["global_loads"], default=None),
                  sass=profile, seconds=round(time.perf_counter() - start, 2))
    if "BLOCK" in constexprs and not profile["loop"]["instructions"]:  # an elementwise kernel: one pass
        result["per_thread"] = max(constexprs["BLOCK"] // (32 * config.num_warps), 1)
        result["instructions_per_element"] = round(profile["instructions"] / result["per_thread"], 1)
    total_shared = dynamic_shared + (usage["shared"] or 0)
    if usage["local"] is None:
        result["problems"].append("cuobjdump reported no LOCAL figure")
    elif usage["local"] > 0 or (usage["stack"] or 0) > 0:  # ptxas puts spilled registers in the stack frame
        result["problems"].append(f"spills: LOCAL:{usage['local']} STACK:{usage['stack']} bytes of local memory")
    if total_shared > SHARED_LIMIT[arch]:
        result["problems"].append(f"shared memory {total_shared} B over the sm_{arch} limit {SHARED_LIMIT[arch]} B")
    half = any(t in ("*bf16", "*fp16") for t in variant.signature.values())
    if spec.uses_dot and half and arch >= 90 and "wgmma" not in compiled.asm["ptx"]:
        result["problems"].append("matmul kernel without wgmma in its sm_90 PTX (not on Hopper's tensor-core path)")
    elif spec.uses_dot and half and arch >= 90 and result["sass"]["loop"]["wgmma"] == 0:
        result["problems"].append("matmul kernel whose main loop has no wgmma (HGMMA) in its sm_90 SASS")
    return result


def compile_all(arch: int, only: list[str] = ()) -> list[dict]:
    """Compile every registered kernel's variants and configs launches on ``sm_{arch}`` can run
    (``KernelSpec.compiled``; load the modules first)."""
    from .registry import KERNELS

    return [compile_one(spec, variant, config, arch)
            for spec in KERNELS if not only or spec.name in only for variant, config in spec.compiled(arch)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT))
    parser.add_argument("--only", nargs="*", default=[], help="kernel names to compile (default: all)")
    parser.add_argument("--module", action="append", default=[], help="an extra .py file that registers kernels")
    parser.add_argument("--report", action="store_true",
                        help="print a table (registers, spills, shared memory, the main loop's wgmma and other "
                             "instructions, async copies, stages, global load widths) instead of JSON lines")
    args = parser.parse_args(argv)
    if interpreting():
        parser.error("unset TRITON_INTERPRET: the ahead-of-time compile needs real @triton.jit functions")
    modules = load_kernel_modules(args.module)
    missing = unregistered(modules)
    if args.report:
        import triton

        print(f"# sm_{args.arch}, triton {triton.__version__}; unregistered kernels: {missing}", flush=True)
        print(REPORT_HEADER, flush=True)
    else:
        print(json.dumps({"unregistered": missing}), flush=True)
    bad = bool(missing)
    for result in compile_all(args.arch, args.only):
        print(report_line(result) if args.report else json.dumps(result), flush=True)
        bad |= bool(result["problems"])
    return 1 if bad else 0


REPORT_HEADER = (f"{'kernel':34s} {'dtype':5s} {'config':64s} {'w':>2s} {'st':>2s} {'reg':>4s} {'spill':>6s} "
                 f"{'smem KB':>7s} {'loop':>5s} {'wgmma':>5s} {'cp.async':>8s} {'tma':>3s} {'ld bits':>12s} "
                 f"{'loop ld':>8s} {'st bits':>9s} {'ins/el':>6s}  problems")


def report_line(result: dict) -> str:
    """One ``--report`` row: the kernel, its first pointer's dtype, the constexprs (and the sizes declared
    multiples of 16, ``H,W%16``), warps and stages, registers, spilled bytes (LOCAL + STACK), shared memory
    (static + dynamic), the main loop's instruction and wgmma counts, async copies (kernel/loop), TMA
    loads, the kernel's global loads by width (bits x count) and the main loop's (count @ widths), its global
    stores by width, and an elementwise kernel's SASS instructions per element (all of them over the
    elements a thread handles)."""
    dtype = next((t[1:] for t in result["signature"].values() if t.startswith("*")), "-")
    config = ",".join(f"{k}={v}" for k, v in result["constexprs"].items() if k.isupper() and k != "ACC")
    multiples = [a for a, t in result["signature"].items() if t.endswith(":16") and "bucket" not in a]
    config += f" {','.join(multiples)}%16" if multiples else ""
    profile = result.get("sass")
    if profile is None:
        return f"{result['kernel']:34s} {dtype:5s} {config:64s}  {'; '.join(result['problems'])}"
    loop = profile["loop"]
    spill = (result["local"] or 0) + (result["stack"] or 0)
    smem = ((result["shared"] or 0) + result["dynamic_shared"]) / 1024
    loads = " ".join(f"{b}x{n}" for b, n in profile["global_loads"].items()) or "-"
    loop_loads = f"{loop['global_loads']}@{'/'.join(map(str, loop['global_load_bits']))}" if loop["global_loads"] else "0"
    stores = " ".join(f"{b}x{n}" for b, n in profile["global_stores"].items()) or "-"
    per_element = result.get("instructions_per_element")
    return (f"{result['kernel']:34s} {dtype:5s} {config:64s} {result['num_warps']:>2d} {result['num_stages']:>2d} "
            f"{result['reg']:>4d} {spill:>6d} {smem:>7.1f} {loop['instructions']:>5d} {loop['wgmma']:>5d} "
            f"{profile['cp_async']:>4d}/{loop['cp_async']:<3d} {profile['tma']:>3d} {loads:>12s} {loop_loads:>8s} "
            f"{stores:>9s} {'-' if per_element is None else per_element:>6}  {'; '.join(result['problems'])}")


if __name__ == "__main__":
    sys.exit(main())
