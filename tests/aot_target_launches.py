"""The launches GUIDE §6's GPU shapes make, specialized as Triton specializes them, against the registered
AOT variants (tests/test_compile_sm90.py runs this file in a subprocess without TRITON_INTERPRET).

Each launcher runs on meta tensors (shapes without data; a meta tensor's data_ptr is 0, aligned like a fresh
CUDA allocation) with ``JITFunction.run`` / ``Autotuner.run`` replaced by a recorder; each recorded launch goes
through Triton's own launch binder (``fastssl.kernels.aot.launch_specialization``'s path) and must match a
registered variant of its kernel: the same constexpr flags, the same argument types, and the same arguments
marked divisible by 16, except those the launch passes as 0 or 1 (flags and strides: a real launch marks a 0
divisible and folds a 1 into a constant; the variants declare them plain, the general code). Prints one
JSON line per launch."""
import json

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from fastssl.kernels.aot import launch_specialization, load_kernel_modules
from fastssl.kernels.registry import KERNELS, unwrap

load_kernel_modules()
from fastssl.kernels import contrastive as C  # noqa: E402
from fastssl.kernels import diffusion as D  # noqa: E402
from fastssl.kernels import propagation as P  # noqa: E402

LAUNCHES = []


def _record(self, *args, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    LAUNCHES.append((self, args, kwargs))


JITFunction.run = _record
Autotuner.run = _record


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def target_launches():
    C._chip = lambda x: 90  # the launchers' choices for an H200 (meta tensors have no CUDA device)
    # contrastive: NT-Xent at 2N = 65536, D = 256, bf16 (diag_off 0: each row leaves itself out)
    z, scale = meta(65536, 256, dtype=torch.bfloat16), meta(1)
    lse = C.lse_forward(z, z, scale, None, 0)
    C.lse_backward_rows(z, z, scale, lse, meta(65536), lse, meta(65536), None, 0, need_dscale=False)
    # diffusion: the CFG DDPM step at 64M elements (the benchmark's 16384 x 4096), Philox noise; q_sample
    x, t = meta(16384, 4096), meta(16384, dtype=torch.long)
    abar = meta(1000)
    D.diffusion_step_forward(model_output=x, uncond_output=x, x_t=x, noise=None, seed=meta(1, dtype=torch.long), t=t,
                             prev_t=t, guidance=meta(1), alphas_cumprod=abar, sampler="ddpm", prediction_type="epsilon",
                             variance_type="fixed_small", clip_sample=True, clip_range=1.0, eta=0.0,
                             final_alpha_cumprod=1.0, use_clipped_model_output=False, prev_offset=-1,
                             return_pred_x0=False, diffusers_rounding=False)
    D.q_sample_forward(x, x, t, meta(2, 1000), return_v=False)  # the table in the math dtype (float32)
    D.cfg_combine_forward(x, x, meta(1))
    # propagation: colorization training shape B=32, R=3, 32x32, C=64, V=16 (radius: local frames), bf16
    q, k, v = (meta(32, 64, 32, 32, dtype=torch.bfloat16), meta(32, 3, 64, 32, 32, dtype=torch.bfloat16),
               meta(32, 3, 16, 32, 32, dtype=torch.bfloat16))
    none_k, none_v = k[:, :0], v[:, :0]
    out, lse = P.propagate_forward(q, k, v, none_k, none_v, meta(1), 4.0)
    P.propagate_backward(out, q, k, v, none_k, none_v, out, lse, meta(1), 4.0)
    # the CRW step: 60x107 map, C=256, 20 context frames (radius 12) + 1 long-memory frame, V=8, top-k 10
    q = meta(1, 256, 60, 107)
    P.propagate_topk_forward(q, meta(1, 20, 256, 60, 107), meta(1, 20, 8, 60, 107), meta(1, 1, 256, 60, 107),
                             meta(1, 1, 8, 60, 107), meta(1), 12.0, 10)


def specialization(fn, args, kwargs, config):
    backend = make_backend(GPUTarget("cuda", 90, 32))
    kwargs = {**kwargs, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    bound, spec, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    divisible = {fn.arg_names[p[0]] for p, vals in attrs.items() if ["tt.divisibility", 16] in [list(x) for x in vals]}
    return bound, signature, divisible


def main():
    target_launches()
    for kernel, args, kwargs in LAUNCHES:
        fn = unwrap(kernel)
        specs = [s for s in KERNELS if s.jit_fn is fn]
        config = specs[0].configs[0] if isinstance(kernel, Autotuner) else triton.Config({})
        if not isinstance(kernel, Autotuner):  # a direct launch passes its own blocks and warps
            kwargs = dict(kwargs)
        bound, real_sig, real_div = specialization(fn, args, kwargs, config)
        values = dict(bound)
        value01 = {a for a, x in values.items() if isinstance(x, int) and not isinstance(x, bool) and x in (0, 1)}
        flags = {a: x for a, x in kwargs.items() if a in fn.arg_names and a not in config.kwargs}
        matched = None
        for s in specs:
            for i, var in enumerate(s.variants):
                if any(str(var.constexprs.get(a)) != str(x) for a, x in flags.items() if a in var.constexprs):
                    continue
                launch = launch_specialization(fn, var, s.configs[0], 90)
                same_types = all(launch["signature"][a] == real_sig[a] for a in fn.arg_names
                                 if real_sig[a] != "constexpr" and a not in var.constexprs and a not in value01)
                if same_types and set(launch["divisible"]) - value01 == real_div - value01:
                    matched = i
        print(json.dumps({"kernel": fn.__name__, "matched_variant": matched,
                          "divisible": sorted(real_div - value01),
                          "plain": sorted(a for a, t in real_sig.items() if t in ("i32", "i64") and a not in real_div
                                          and a not in value01)}), flush=True)


if __name__ == "__main__":
    main()
