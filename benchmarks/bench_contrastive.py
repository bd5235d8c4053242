"""Contrastive slice benchmarks: NT-Xent, CLIP, MoCo, SigLIP and the supervised NT-Xent, forward and
forward+backward.

FLOPs are the similarity matmuls only (GUIDE §6): forward 2 * rows * keys * D, the backward three more of
the same (recompute, dq, dk). ``torch`` is the eager formula (``*_reference(..., upcast=False)``: it
materializes the logits), ``compile`` its torch.compile; peers where installed: pytorch-metric-learning and
lightly (NT-Xent), open_clip (CLIP, SigLIP), pytorch-metric-learning's NTXentLoss with labels (the supervised
NT-Xent), inf_cl (CLIP, CUDA only).
"""
import torch
import torch.nn.functional as F

from fastssl.benchmarks.harness import Case, have

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _step(loss_fn, inputs, backward):
    """The callable a case times: the loss, and its backward (gradients cleared first)."""
    def fn():
        for t in inputs:
            t.grad = None
        out = loss_fn()
        if backward:
            out.backward()
        return out
    return fn


def _features(n, d, dtype, device, *, grad):
    return torch.randn(n, d, device=device, dtype=DTYPES[dtype], requires_grad=grad)


# -- NT-Xent ------------------------------------------------------------------------------------------

def _nt_xent_loss(provider):
    import fastssl
    from fastssl.contrastive import nt_xent_reference

    if provider == "fastssl":
        return fastssl.nt_xent
    if provider == "torch":
        return lambda a, b: nt_xent_reference(a, b, upcast=False)
    if provider == "compile":
        return torch.compile(lambda a, b: nt_xent_reference(a, b, upcast=False))
    if provider == "pml":
        from pytorch_metric_learning.losses import NTXentLoss

        pml = NTXentLoss(temperature=0.5)
        return lambda a, b: pml(torch.cat((F.normalize(a, dim=1), F.normalize(b, dim=1))),
                                torch.arange(a.shape[0], device=a.device).repeat(2))
    if provider == "lightly":
        from lightly.loss import NTXentLoss

        return NTXentLoss(temperature=0.5)
    raise ValueError(provider)


def _nt_xent_case(provider, mode, dtype, n, d, *, tune_rows=None):
    """``tune_rows``: first run the loss once on that many rows per view (the autotuner's row buckets
    saturate, so a huge batch reuses the configs tuned there instead of timing each at its own size)."""
    backward = mode == "fwd+bwd"

    def make(device):
        z1, z2 = (_features(n, d, dtype, device, grad=backward) for _ in range(2))
        loss = _nt_xent_loss(provider)
        if tune_rows:
            _step(lambda: loss(z1[:tune_rows], z2[:tune_rows]), (z1, z2), backward)()
        return _step(lambda: loss(z1, z2), (z1, z2), backward)

    rows = 2 * n
    flops = 2 * rows * rows * d * (4 if backward else 1)
    return Case("nt_xent", provider, mode, dtype, {"n": n, "d": d}, make, size=rows, flops=flops)


# -- CLIP ---------------------------------------------------------------------------------------------

def _clip_loss(provider):
    import fastssl
    from fastssl.contrastive import clip_loss_reference

    if provider == "fastssl":
        return fastssl.clip_loss
    if provider == "torch":
        return lambda a, b, s: clip_loss_reference(a, b, s, upcast=False)
    if provider == "compile":
        return torch.compile(lambda a, b, s: clip_loss_reference(a, b, s, upcast=False))
    if provider == "open_clip":
        from open_clip.loss import ClipLoss

        loss = ClipLoss()
        return lambda a, b, s: loss(F.normalize(a, dim=1), F.normalize(b, dim=1), s)
    if provider == "inf_cl":
        from inf_cl import cal_inf_loss

        def two_calls(a, b, s):
            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            labels = torch.arange(a.shape[0], device=a.device)
            # the scale folded in here: inf_cl's own scale= gathers its gradient with dist.all_reduce, which
            # fails without a process group; head_dim is its name for the feature width (default 256)
            return (cal_inf_loss(s * a, b, labels=labels, head_dim=a.shape[1])
                    + cal_inf_loss(s * b, a, labels=labels, head_dim=a.shape[1])) / 2
        return two_calls
    raise ValueError(provider)


def _clip_case(provider, mode, dtype, n, d):
    backward = mode == "fwd+bwd"

    def make(device):
        img, txt = (_features(n, d, dtype, device, grad=backward) for _ in range(2))
        scale = torch.tensor(14.3, device=device, requires_grad=backward)
        loss = _clip_loss(provider)
        return _step(lambda: loss(img, txt, scale), (img, txt, scale), backward)

    flops = 2 * n * n * d * (4 if backward else 1) * 2  # two directions
    return Case("clip_loss", provider, mode, dtype, {"n": n, "d": d}, make, size=n, flops=flops)


# -- MoCo ---------------------------------------------------------------------------------------------

def _moco_case(provider, mode, dtype, n, k, d):
    backward = mode == "fwd+bwd"

    def make(device):
        import fastssl
        from fastssl.contrastive import moco_loss_reference

        q = _features(n, d, dtype, device, grad=backward)
        key = _features(n, d, dtype, device, grad=False)
        queue = F.normalize(_features(k, d, dtype, device, grad=False), dim=1)
        fn = {"fastssl": fastssl.moco_loss,
              "torch": lambda a, b, c: moco_loss_reference(a, b, c, upcast=False),
              "compile": torch.compile(lambda a, b, c: moco_loss_reference(a, b, c, upcast=False))}[provider]
        return _step(lambda: fn(q, key, queue), (q,), backward)

    flops = 2 * n * k * d * (3 if backward else 1)  # no key gradient
    return Case("moco_loss", provider, mode, dtype, {"n": n, "k": k, "d": d}, make, size=k, flops=flops)


# -- SigLIP ---------------------------------------------------------------------------------------------

def _siglip_loss(provider):
    import fastssl
    from fastssl.contrastive import siglip_loss_reference

    if provider == "fastssl":
        return fastssl.siglip_loss
    if provider == "torch":
        return lambda a, b, s, c: siglip_loss_reference(a, b, s, c, upcast=False)
    if provider == "compile":
        return torch.compile(lambda a, b, s, c: siglip_loss_reference(a, b, s, c, upcast=False))
    if provider == "open_clip":
        from open_clip.loss import SigLipLoss

        return SigLipLoss()
    raise ValueError(provider)


def _siglip_case(provider, mode, dtype, n, d):
    backward = mode == "fwd+bwd"

    def make(device):
        img, txt = (F.normalize(_features(n, d, dtype, device, grad=False), dim=1).requires_grad_(backward)
                    for _ in range(2))
        scale = torch.tensor(10.0, device=device, requires_grad=backward)
        bias = torch.tensor(-10.0, device=device, requires_grad=backward)
        loss = _siglip_loss(provider)
        return _step(lambda: loss(img, txt, scale, bias), (img, txt, scale, bias), backward)

    flops = 2 * n * n * d * (4 if backward else 1)  # recompute, dx, dy
    return Case("siglip_loss", provider, mode, dtype, {"n": n, "d": d}, make, size=n, flops=flops)


# -- supervised NT-Xent (pytorch-metric-learning's NTXentLoss with labels) ------------------------------

def _supervised_case(provider, mode, dtype, n, d, classes):
    backward = mode == "fwd+bwd"

    def make(device):
        import fastssl
        from fastssl.contrastive import supervised_nt_xent_reference

        x = _features(n, d, dtype, device, grad=backward)
        labels = torch.randint(0, classes, (n,), device=device)
        if provider == "pml":
            from pytorch_metric_learning.losses import NTXentLoss

            fn = NTXentLoss(temperature=0.1)
        else:
            fn = {"fastssl": lambda a, b: fastssl.supervised_nt_xent(a, b, temperature=0.1),
                  "torch": lambda a, b: supervised_nt_xent_reference(a, b, temperature=0.1, upcast=False)}[provider]
        return _step(lambda: fn(x, labels), (x,), backward)

    flops = 2 * n * n * d * (3 if backward else 1)  # one symmetric gradient pass
    return Case("supervised_nt_xent", provider, mode, dtype, {"n": n, "d": d, "classes": classes}, make, size=n,
                flops=flops)


def cases(preset: str, device: str) -> list[Case]:
    providers = ["fastssl", "torch", "compile"]
    # pytorch-metric-learning's NT-Xent holds a (positive pairs x negative pairs) matrix, O(N^3): at
    # 2N=2048 it asks for 34 GB, so it only runs at the smallest size
    pml = ["pml"] if have("pytorch_metric_learning") else []
    lightly = ["lightly"] if have("lightly") else []
    clip_peers = [p for p, mod in (("open_clip", "open_clip"),) if have(mod)]
    inf_cl = ["inf_cl"] if device == "cuda" and have("inf_cl") else []
    out = []
    if preset == "quick":
        # each op's headline in a few seconds of CPU: fwd+bwd, float32, no torch.compile (its compilation
        # alone takes longer than the preset); 2N=8192 shows the memory ratio (the cpu preset has GUIDE
        # §6's 2N=16384)
        out += [_nt_xent_case(p, "fwd+bwd", "float32", 1024, 128) for p in ["fastssl", "torch"] + lightly]
        out += [_nt_xent_case(p, "fwd+bwd", "float32", 128, 128) for p in ["fastssl", "torch"] + pml]
        out += [_nt_xent_case(p, "fwd+bwd", "float32", 4096, 128) for p in ("fastssl", "torch")]
        out += [_clip_case(p, "fwd+bwd", "float32", 2048, 128) for p in ["fastssl", "torch"] + clip_peers]
        out += [_moco_case(p, "fwd+bwd", "float32", 256, 16384, 128) for p in ("fastssl", "torch")]
        # the sigmoid and the label-masked losses (pml's NTXentLoss with labels holds a (positive pairs x
        # negative pairs) matrix: 6 s a call at n=128 on 2 cores, so it runs in the cpu preset only)
        out += [_siglip_case(p, "fwd+bwd", "float32", 1024, 128) for p in ["fastssl", "torch"] + clip_peers]
        out += [_supervised_case(p, "fwd+bwd", "float32", 1024, 128, 64) for p in ("fastssl", "torch")]
        return out
    if preset == "targets":
        if device != "cuda":  # GUIDE §6's CPU target: N=8192 per view, D=128, fwd+bwd
            return [_nt_xent_case(p, "fwd+bwd", "float32", 8192, 128) for p in ("fastssl", "torch")]
        # GUIDE §6: 2N=65536, D=256, bf16 against eager; the symmetric CLIP loss against two inf_cl calls
        out += [_nt_xent_case(p, "fwd+bwd", "bfloat16", 32768, 256) for p in ("fastssl", "torch")]
        out += [_clip_case(p, "fwd+bwd", "bfloat16", 32768, 256) for p in ["fastssl"] + inf_cl]
        return out
    if preset == "cpu":
        # the long CPU run: fwd and fwd+bwd, torch.compile at one shape (its compilation is slow on the
        # CPU), and GUIDE §6's CPU target (N=8192 per view, D=128, fwd+bwd)
        for mode in ("fwd", "fwd+bwd"):
            out += [_nt_xent_case(p, mode, "float32", 1024, 128) for p in ["fastssl", "torch"] + lightly]
        out += [_nt_xent_case("compile", "fwd+bwd", "float32", 1024, 128)]
        out += [_nt_xent_case(p, "fwd+bwd", "float32", 128, 128) for p in ["fastssl", "torch"] + pml]
        out += [_clip_case(p, "fwd+bwd", "float32", 2048, 128) for p in ["fastssl", "torch"] + clip_peers]
        out += [_moco_case(p, "fwd+bwd", "float32", 256, 16384, 128) for p in ("fastssl", "torch")]
        out += [_siglip_case(p, "fwd+bwd", "float32", 2048, 128) for p in ["fastssl", "torch"] + clip_peers]
        out += [_supervised_case(p, "fwd+bwd", "float32", 128, 128, 8) for p in ["fastssl", "torch"] + pml]
        out += [_supervised_case(p, "fwd+bwd", "float32", 2048, 128, 64) for p in ("fastssl", "torch")]
        out += [_nt_xent_case(p, "fwd+bwd", "float32", 8192, 128) for p in ("fastssl", "torch")]
        return out
    # full: GUIDE §6's GPU sizes in bf16 (2N from 1024 to 65536, D 128 and 256), float32 at one size; on
    # the GPU last the 1M-row NT-Xent (2N = 2^21, D = 256, bf16): memory O(N * D) where the logits alone
    # would take 8 TiB (no eager reference can run it). Last: at ~9e15 FLOPs a call it takes a minute,
    # which would leave gpu_check's short part e no other row
    dtype = "bfloat16" if device == "cuda" else "float32"
    sizes = [512, 2048, 8192, 32768] if device == "cuda" else [512, 2048, 8192]
    for d in (128, 256):
        for n in sizes:
            for mode in ("fwd", "fwd+bwd"):
                out += [_nt_xent_case(p, mode, dtype, n, d) for p in providers + lightly]
                out += [_clip_case(p, mode, dtype, 2 * n, d) for p in providers + clip_peers + inf_cl]
    if device == "cuda":
        out += [_nt_xent_case(p, "fwd+bwd", "float32", 8192, 128) for p in providers]
    out += [_moco_case(p, mode, dtype, 256, 65536, 128) for p in providers for mode in ("fwd", "fwd+bwd")]
    # SigLIP against eager, its compile and open_clip's SigLipLoss; pml's NTXentLoss with labels at 2N=128 only
    for n in sizes:
        for mode in ("fwd", "fwd+bwd"):
            out += [_siglip_case(p, mode, dtype, 2 * n, 256) for p in providers + clip_peers]
            out += [_supervised_case(p, mode, dtype, 2 * n, 256, 1000) for p in ("fastssl", "torch")]
    out += [_supervised_case(p, "fwd+bwd", dtype, 128, 256, 8) for p in ["fastssl", "torch"] + pml]
    if device == "cuda":
        out.append(_nt_xent_case("fastssl", "fwd+bwd", "bfloat16", 1 << 20, 256, tune_rows=1 << 15))
    return out


def test_case(benchmark, case):
    case.run_with(benchmark)
