"""Ahead-of-time compile of every registered kernel for a real chip, on a machine with no GPU.

For each kernel x launch variant x autotune config: ``triton.compile`` for ``GPUTarget("cuda", arch,
32)``, then ``cuobjdump --dump-resource-usage`` on the cubin. A result is bad when it does not compile,
spills (``LOCAL`` or ``STACK`` > 0: ptxas spills into the stack frame), needs more shared memory than the chip has (static + dynamic > 227 KB on
sm_90, 163 KB on sm_80), or is a matmul kernel (``uses_dot``) whose sm_90 PTX lacks ``wgmma`` in a bf16/fp16 variant.

Run it as ``python -m fastssl.kernels.aot --arch 90`` (prints JSON lines, exits 1 on a bad result);
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


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        values = [int(v) for v in re.findall(rf"\b{key}:(\d+)", text)]
        usage[key.lower()] = max(values) if values else None
    return usage


def divisibility(arg_names, declared: dict) -> dict:
    """The alignment facts a real launch hands the compiler: every pointer 16-byte aligned (PyTorch's
    allocator guarantees it for fresh tensors; launchers pass such tensors), and integers a variant
    declares as multiples of 16 (``"i32:16"``). Without them every load compiles scalar, which is not
    what runs on the GPU (and spills where the real kernel does not)."""
    return {(i,): [["tt.divisibility", 16]] for i, a in enumerate(arg_names)
            if declared[a].startswith("*") or declared[a].endswith(":16")}


def compile_one(spec, variant, config, arch: int) -> dict:
    """Compile one (kernel, variant, config) for ``sm_{arch}``; return what was measured and any problems."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.jit_fn
    constexprs = {**variant.constexprs, **config.kwargs}
    result = {"kernel": spec.name, "arch": arch, "constexprs": {k: str(v) for k, v in constexprs.items()},
              "signature": variant.signature, "num_warps": config.num_warps, "num_stages": config.num_stages,
              "problems": []}
    try:
        declared = {a: ("constexpr" if a in constexprs else variant.signature[a]) for a in fn.arg_names}
        signature = {a: t.split(":")[0] for a, t in declared.items()}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=divisibility(fn.arg_names, declared))
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as exc:  # the compiler's own message is the diagnosis
        result["problems"].append(f"does not compile: {type(exc).__name__}: {str(exc).strip()[-600:]}")
        return result
    usage = resource_usage(compiled.asm["cubin"])
    dynamic_shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    result.update(usage, dynamic_shared=dynamic_shared)
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
    return result


def compile_all(arch: int, only: list[str] = ()) -> list[dict]:
    """Compile every registered kernel (load the modules first) for ``sm_{arch}``."""
    from .registry import KERNELS

    return [compile_one(spec, variant, config, arch)
            for spec in KERNELS if not only or spec.name in only
            for variant in spec.variants for config in spec.configs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT))
    parser.add_argument("--only", nargs="*", default=[], help="kernel names to compile (default: all)")
    parser.add_argument("--module", action="append", default=[], help="an extra .py file that registers kernels")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the ahead-of-time compile needs real @triton.jit functions")
    modules = load_kernel_modules(args.module)
    missing = unregistered(modules)
    print(json.dumps({"unregistered": missing}), flush=True)
    bad = bool(missing)
    for result in compile_all(args.arch, args.only):
        print(json.dumps(result), flush=True)
        bad |= bool(result["problems"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
