"""Propagation slice benchmarks: the colorization training shape and a CRW-sized label-propagation step.

- ``color_propagate`` (training): B=32, R=3 reference frames, 32x32 maps, C=64, V=16, fwd and fwd+bwd.
  Providers: fastssl; torch (eager: materializes the (B, HW, R*HW) affinity and its softmax); compile
  (torch.compile of that); sdpa (``F.scaled_dot_product_attention`` with the frames as one key sequence,
  V zero-padded to C on CUDA where its fused kernels need equal dims). The full preset adds a
  full-resolution dense case (a 64x64 map, R=3). The CPU presets run B=4 (the per-sample work is the
  same; 32 samples would take the quick preset past a minute), without compile, sdpa for fwd+bwd only.
- ``propagate_labels`` (inference): one frame of CRW's evaluation: a 60x107 map attending to 20 context
  frames within radius 12 plus 1 long-memory frame (all of it), top-10, C=256 (C=64 in the CPU presets:
  the affinity, hence the dense reference's memory, does not depend on C; the quick preset halves the
  map and the radius). fastssl: on CUDA the
  streaming top-k kernel over each tile's radius window, on the CPU the chunked windowed PyTorch path;
  torch is the dense reference (the 6420 x 134820 affinity, masked, top-k). That
  reference alone costs the cpu preset a few minutes (the harness calls it several times, 6-25 s each
  on 2 cores), but only at this size does its memory (several GB) show what the windowed path saves.

FLOPs are the dense formula's (2 * queries * keys * (C + V) forward; the backward recomputes the logits and
adds dP, dQ, dK, dV); the windowed step's are not counted (a time and memory comparison).

natten is not a provider: its neighborhood attention is a square window over one frame's own grid, not a
joint softmax over other frames' disks, so it does not compute this op.
"""
import torch
import torch.nn.functional as F

from fastssl.benchmarks.harness import Case

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _eager(tf, rf, rv, temperature):
    from fastssl.propagation import color_propagate_reference

    return color_propagate_reference(tf, rf, rv, temperature=temperature, upcast=False)


def _sdpa(tf, rf, rv, temperature):
    B, C, H, W = tf.shape
    R, V = rv.shape[1], rv.shape[2]
    q = tf.reshape(B, 1, C, H * W).transpose(2, 3)
    k = rf.permute(0, 2, 1, 3, 4).reshape(B, 1, C, R * H * W).transpose(2, 3)
    v = rv.permute(0, 2, 1, 3, 4).reshape(B, 1, V, R * H * W).transpose(2, 3)
    if tf.is_cuda and V != C:
        v = F.pad(v, (0, C - V))
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / temperature)[..., :V]
    return out.transpose(2, 3).reshape(B, V, H, W)


def _training_case(provider: str, mode: str, dtype: str, B: int, R: int, H: int, W: int, C: int, V: int) -> Case:
    def make(device):
        import fastssl

        torch.manual_seed(0)
        dt = DTYPES[dtype]
        grad = mode == "fwd+bwd"
        tf = F.normalize(torch.randn(B, C, H, W, device=device, dtype=dt), dim=1).requires_grad_(grad)
        rf = F.normalize(torch.randn(B, R, C, H, W, device=device, dtype=dt), dim=2).requires_grad_(grad)
        rv = torch.randn(B, R, V, H, W, device=device, dtype=dt).requires_grad_(grad)
        fn = {"fastssl": lambda a, b, c, t: fastssl.color_propagate(a, b, c, temperature=t), "torch": _eager,
              "compile": torch.compile(_eager), "sdpa": _sdpa}[provider]
        if not grad:
            return lambda: fn(tf, rf, rv, 0.07)
        grad_out = torch.randn(B, V, H, W, device=device, dtype=dt)
        return lambda: torch.autograd.grad(fn(tf, rf, rv, 0.07), (tf, rf, rv), grad_out)

    M, N = H * W, R * H * W
    flops = 2 * B * M * N * (C + V) + (2 * B * M * N * (3 * C + 2 * V) if mode == "fwd+bwd" else 0)
    return Case("color_propagate", provider, mode, dtype, {"b": B, "r": R, "h": H, "w": W, "c": C, "v": V}, make,
                size=B * M * N, flops=flops)


def _crw_case(provider: str, dtype: str, H: int, W: int, C: int, context: int, radius: float, topk: int,
              V: int = 8) -> Case:
    def make(device):
        from fastssl.propagation import color_propagate_reference, propagate_step

        torch.manual_seed(0)
        dt = DTYPES[dtype]
        frames = F.normalize(torch.randn(context + 2, C, H, W, device=device, dtype=dt), dim=1)
        labels = torch.rand(context + 1, V, H, W, device=device, dtype=dt)
        query, ctx, mem = frames[-1][None], frames[1:context + 1][None], frames[:1][None]
        ctx_l, mem_l = labels[1:][None], labels[:1][None]
        if provider == "fastssl":
            return lambda: propagate_step(query, ctx, ctx_l, mem, mem_l, temperature=0.05, radius=radius, topk=topk)
        keys, values = torch.cat([ctx, mem], 1), torch.cat([ctx_l, mem_l], 1)  # inputs, built once
        return lambda: color_propagate_reference(query, keys, values, temperature=0.05, radius=radius, topk=topk,
                                                 num_local=context, upcast=False)

    return Case("propagate_labels", provider, "fwd", dtype,
                {"h": H, "w": W, "c": C, "context": context, "memory": 1, "radius": radius, "topk": topk}, make,
                size=H * W * (context + 1) * H * W)


def cases(preset: str, device: str) -> list:
    if preset == "targets":
        if device != "cuda":  # GUIDE §6's propagation targets are GPU targets
            return []
        # GUIDE §6: fwd+bwd at the training shape against eager; the CRW step against the dense reference
        return ([_training_case(p, "fwd+bwd", d, 32, 3, 32, 32, 64, 16) for d in DTYPES for p in ("fastssl", "torch")]
                + [_crw_case(p, "float32", 60, 107, 256, 20, 12.0, 10) for p in ("fastssl", "torch")])
    out = []
    cpu_small = preset in ("quick", "cpu") and device == "cpu"
    dtypes = ["float32"] if device == "cpu" else list(DTYPES)
    B = 4 if cpu_small else 32
    for dtype in dtypes:
        for mode in ("fwd", "fwd+bwd"):
            providers = ["fastssl", "torch", "sdpa", "compile"]
            if cpu_small:  # the fewest that tell the story
                providers = ["fastssl", "torch"] + (["sdpa"] if mode == "fwd+bwd" else [])
            out += [_training_case(p, mode, dtype, B, 3, 32, 32, 64, 16) for p in providers]
            if preset == "full":  # full resolution, dense
                out += [_training_case(p, mode, dtype, 8, 3, 64, 64, 64, 16) for p in ("fastssl", "torch", "sdpa")]
    if preset == "quick" and device == "cpu":
        # a half-resolution CRW step (30x54 map, radius 6: the same disks in image space): the dense
        # reference takes ~20x less than at 60x107, which the cpu preset measures
        return out + [_crw_case(p, "float32", 30, 54, 64, 20, 6.0, 10) for p in ("fastssl", "torch")]
    crw_c = 64 if cpu_small else 256
    for dtype in (["float32"] if device == "cpu" else ["float32", "bfloat16"]):
        out += [_crw_case(p, dtype, 60, 107, crw_c, 20, 12.0, 10) for p in ("fastssl", "torch")]
    return out


def test_case(benchmark, case):
    case.run_with(benchmark)
