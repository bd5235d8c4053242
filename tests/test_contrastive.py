"""Contrastive slice: parity against the float64 references on both backends (the Triton kernels under the
interpreter), gradients (gradcheck through the kernels, uneven grad_output), every reduction, low
precision, extreme logits, NaN, validation, torch.compile, and the peers where installed."""
import importlib.util
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import fastssl
import fastssl.kernels.contrastive as kc
from fastssl.kernels import registry
from conftest import assert_close, assert_close_lowp, assert_same_float32
from fastssl.contrastive import (clip_loss_reference, info_nce_reference, moco_loss_reference, nt_xent_reference,
                                 siglip_loss_reference, supcon_loss_reference, supervised_nt_xent_reference)

LOWP = [torch.float16, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]


def _grads(out, inputs, grad_out=None):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def _check(fn, ref_fn, inputs, dtype, *, reduction="mean", scale=10):
    """Loss and gradients of ``fn`` against the float64 ``ref_fn`` (an uneven grad_output for "none")."""
    out = fn(*inputs)
    ref = ref_fn(*inputs)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == ref.shape
    assert_close(out, ref, dtype, scale=scale)
    grad_out = torch.rand_like(ref) + 0.5 if reduction == "none" else None
    grads = _grads(out, inputs, None if grad_out is None else grad_out.to(out.dtype))
    ref_grads = _grads(ref, inputs, grad_out)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert g.dtype == dtype
            assert_close(g, r, dtype, scale=scale)


def _feats(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)


# ----------------------------------------------------------------------------------------------------
# parity: float64 and float32, odd shapes, every reduction
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nt_xent_matches_reference(backend, device, dtype, reduction):
    z1, z2 = _feats(37, 20, dtype=dtype, device=device), _feats(37, 20, dtype=dtype, device=device)
    _check(lambda a, b: fastssl.nt_xent(a, b, temperature=0.3, reduction=reduction),
           lambda a, b: nt_xent_reference(a, b, temperature=0.3, reduction=reduction), (z1, z2), dtype,
           reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_targets", [False, True])
def test_info_nce_matches_reference(backend, device, dtype, reduction, with_targets):
    q, k = _feats(37, 20, dtype=dtype, device=device), _feats(45, 20, dtype=dtype, device=device)
    targets = torch.randint(0, 45, (37,), device=device) if with_targets else None
    _check(lambda a, b: fastssl.info_nce(a, b, targets, temperature=0.2, reduction=reduction),
           lambda a, b: info_nce_reference(a, b, targets, temperature=0.2, reduction=reduction), (q, k), dtype,
           reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scale_kind", ["float", "tensor", "fp32_tensor"])
def test_clip_loss_matches_reference(backend, device, dtype, reduction, scale_kind):
    img, txt = _feats(37, 20, dtype=dtype, device=device), _feats(37, 20, dtype=dtype, device=device)
    inputs = [img, txt]
    if scale_kind == "float":
        scale = 7.5
    else:
        scale = torch.tensor(2.1, dtype=dtype if scale_kind == "tensor" else torch.float32, device=device,
                             requires_grad=True)
        inputs.append(scale)

    def ours(a, b, s=scale):
        return fastssl.clip_loss(a, b, s.exp() if isinstance(s, torch.Tensor) else s, reduction=reduction)

    def ref(a, b, s=scale):  # the same multiplier value (a float32 one stays float32-rounded)
        return clip_loss_reference(a, b, s.exp().double() if isinstance(s, torch.Tensor) else s, reduction=reduction)

    out, expected = ours(*inputs), ref(*inputs)
    assert_close(out, expected, dtype, scale=10)
    grad_out = torch.rand_like(expected) + 0.5 if reduction == "none" else None
    for g, r in zip(_grads(out, inputs, None if grad_out is None else grad_out.to(out.dtype)),
                    _grads(expected, inputs, grad_out)):
        assert_close(g, r, g.dtype, scale=10)  # a float32 logit_scale gets a float32 gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False])
def test_moco_loss_matches_reference(backend, device, dtype, reduction, normalize):
    q, k = _feats(37, 20, dtype=dtype, device=device), _feats(37, 20, dtype=dtype, device=device)
    queue = (torch.randn(53, 20, dtype=dtype, device=device) * (1.0 if normalize else 0.3)).requires_grad_()
    t = 0.5 if not normalize else 0.07
    out = fastssl.moco_loss(q, k, queue, temperature=t, normalize=normalize, reduction=reduction)
    ref = moco_loss_reference(q, k, queue, temperature=t, normalize=normalize, reduction=reduction)
    assert_close(out, ref, dtype, scale=10)
    grad_out = torch.rand_like(ref) + 0.5 if reduction == "none" else None
    (gq,) = _grads(out, (q,), None if grad_out is None else grad_out.to(out.dtype))
    (rq,) = _grads(ref, (q,), grad_out)
    assert_close(gq, rq, dtype, scale=10)
    # no gradient into the key (momentum encoder) nor into the queue
    fastssl.moco_loss(q, k, queue, temperature=t, normalize=normalize).backward()
    assert k.grad is None and queue.grad is None and q.grad is not None


def test_info_nce_and_nt_xent_without_normalize(backend, device):
    q, k = _feats(19, 24, device=device), _feats(23, 24, device=device)
    _check(lambda a, b: fastssl.info_nce(a, b, temperature=2.0, normalize=False),
           lambda a, b: info_nce_reference(a, b, temperature=2.0, normalize=False), (q, k), torch.float32)
    z1, z2 = _feats(11, 24, device=device), _feats(11, 24, device=device)
    _check(lambda a, b: fastssl.nt_xent(a, b, temperature=3.0, normalize=False),
           lambda a, b: nt_xent_reference(a, b, temperature=3.0, normalize=False), (z1, z2), torch.float32)


def test_wide_features_loop_over_d(backend, device, monkeypatch):
    """D wider than the resident block: the kernels loop over D chunks (and split dq's columns)."""
    monkeypatch.setattr(kc, "MAX_BLOCK_D", 16)
    img, txt = _feats(21, 41, device=device), _feats(21, 41, device=device)
    scale = torch.tensor(3.0, device=device, requires_grad=True)
    out, ref = fastssl.clip_loss(img, txt, scale), clip_loss_reference(img, txt, scale)
    assert_close(out, ref, torch.float32, scale=10)
    for g, r in zip(_grads(out, (img, txt, scale)), _grads(ref, (img, txt, scale))):
        assert_close(g, r, torch.float32, scale=10)
    z1, z2 = _feats(9, 41, device=device), _feats(9, 41, device=device)
    _check(fastssl.nt_xent, nt_xent_reference, (z1, z2), torch.float32)


def test_resident_block_up_to_256_features(backend, device):
    """D in (128, 256]: the 256-wide resident query block (the backward's on sm_90 for bf16/fp16), its
    zero-padded columns included, against the float64 formula by flash-attention's low-precision rule."""
    z1, z2 = (_unit_rows(19, 160, torch.bfloat16, device).requires_grad_() for _ in range(2))
    if backend == "triton" and kc.interpreting():
        assert kc._pick_backward(z1.detach())[:2] == (256, 256)
    opts = dict(temperature=0.2, normalize=False)
    out = fastssl.nt_xent(z1, z2, **opts)
    z64 = [z.detach().double().requires_grad_() for z in (z1, z2)]
    ref = nt_xent_reference(*z64, **opts)
    zlp = [z.detach().requires_grad_() for z in (z1, z2)]
    lowp = nt_xent_reference(*zlp, **opts, upcast=False)
    assert_close_lowp(out, ref, lowp)
    for g, r, lp in zip(_grads(out, (z1, z2)), _grads(ref, z64), _grads(lowp, zlp)):
        assert_close_lowp(g, r, lp)


def _lse_formulas(q, k, scale, kscale, diag_off, g_r, g_c, positives=None, labels=None):
    """float64 row and column LSE of S = scale * c_j * q_i . k_j without the columns j = i + diag_off, and
    the kernels' gradient dq = scale * (g_r P_row + g_c P_col [+ w_i at (i, t_i)]) c @ k and dscale, with
    ``positives`` = (w, rbase, period, shift, cbase): t_i = cbase + (i - rbase + shift) mod period for the
    rows rbase .. rbase + period; ``labels`` = (row labels, key labels, row weights, key weights): w_i + w'_j
    wherever the labels match off the excluded columns."""
    q, k = q.double(), k.double()
    c = torch.ones(k.shape[0], dtype=torch.float64) if kscale is None else kscale.double()
    raw = q @ k.t() * c[None, :]
    s = scale * raw
    i = torch.arange(q.shape[0])
    j = i + diag_off
    inside = (j >= 0) & (j < k.shape[0])
    s[i[inside], j[inside]] = float("-inf")
    lse_r, lse_c = s.logsumexp(1), s.logsumexp(0)
    ds = g_r[:, None] * (s - lse_r[:, None]).exp() + g_c[None, :] * (s - lse_c[None, :]).exp()
    if positives is not None:
        w, rbase, period, shift, cbase = positives
        rows = torch.arange(rbase, rbase + period)
        ds[rows, cbase + (rows - rbase + shift) % period] += w[rows]
    if labels is not None:
        lr, lc, wr, wc = labels
        mate = (lr[:, None] == lc[None, :]) & (s > float("-inf"))
        ds += mate * (wr.double()[:, None] + wc.double()[None, :])
    return lse_r, lse_c, scale * (ds * c[None, :]) @ k, (ds * raw).sum()


def _positives_case(kind, n, m, gen):
    """(weights, rbase, period, shift, cbase) of lse_backward_rows' positives: a plain diagonal (InfoNCE,
    CLIP), one that wraps halfway (NT-Xent's i + N mod 2N) ending at the last key, and a keys' launch's
    inverse map (only rows rbase .. rbase + period have one); None: no positives."""
    if kind is None:
        return None
    p = min(n, m)
    even = p - p % 2
    rbase, period, shift, cbase = {"diagonal": (0, p, 0, 0), "wrapped": (0, even, even // 2, m - even),
                                   "inverse": (n // 4, min(n - n // 4, m - 1), 5, 1)}[kind]
    return -0.5 - torch.rand(n, generator=gen, dtype=torch.float64), rbase, period, shift % period, cbase


def _as_split(lse: torch.Tensor) -> torch.Tensor:
    """A natural-log LSE as lse_forward's (max, log-sum) pairs in base 2: (log2(e) lse, 0)."""
    return torch.stack((lse / math.log(2), torch.zeros_like(lse)), 1)


# (rows, keys, diag_off): the excluded band inside, across two tiles, starting before key 0, past the last
# key, none at all (diag_off = keys), whole tiles only (multiples of 16) and a partial last tile
MASK_CASES = [(37, 37, 0), (48, 48, 0), (32, 80, 16), (40, 64, -24), (64, 48, 30), (33, 50, 50), (30, 45, 7)]


@pytest.mark.parametrize("n,m,diag_off", MASK_CASES)
@pytest.mark.parametrize("kind,positives", [(kind, None) for kind in ("float32", "bfloat16", "bfloat16-chunked",
                                                                         "kscale")]
                         + [(kind, positives) for kind in ("float32", "bfloat16", "bfloat16-chunked")
                            for positives in ("diagonal", "wrapped", "inverse")])  # MoCo's key scale: no positives
def test_lse_kernels_mask_only_band_and_edge_tiles(device, monkeypatch, n, m, diag_off, kind, positives):
    """The kernels run whole key tiles off the excluded diagonal and the positives' unmasked and only the
    two bands' and the last partial tile masked (interpreter tiles of 16): the row LSE and the backward (row
    and column terms, the positives' weights, the scale's gradient) equal the float64 formulas wherever the
    bands fall, apart, overlapping or wrapping."""
    if device != "cpu" or not kc.interpreting():
        pytest.skip("calls the launchers on CPU tensors: the interpreter's tiles")
    dtype = torch.float32 if kind in ("float32", "kscale") else torch.bfloat16
    if kind == "bfloat16-chunked":  # the backward's chunked path: scores summed over 16-wide chunks
        monkeypatch.setattr(kc, "MAX_BLOCK_D", 16)
    gen = torch.Generator().manual_seed(n * 1000 + m + diag_off)
    q = torch.randn(n, 20, generator=gen).to(dtype)
    k = torch.randn(m, 20, generator=gen).to(dtype)
    kscale = torch.rand(m, generator=gen) + 0.5 if kind == "kscale" else None
    g_r, g_c = torch.rand(n, generator=gen, dtype=torch.float64), torch.rand(m, generator=gen, dtype=torch.float64)
    scale = torch.tensor([0.7])
    pos = _positives_case(positives, n, m, gen)
    lse_r, lse_c, dq, dscale = _lse_formulas(q, k, 0.7, kscale, diag_off, g_r, g_c, pos)
    got, split = kc.lse_forward(q, k, scale, kscale=kscale, diag_off=diag_off)
    torch.testing.assert_close(got.double(), lse_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((split.sum(1) * math.log(2)).double(), lse_r, rtol=1e-5, atol=1e-5)
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: dS is rounded to bf16 for the dq product
    split_c = _as_split(lse_c.float())
    for split_r in (_as_split(lse_r.float()), split):  # the formula's LSE, and the forward's own pairs
        got_dq, got_dscale = kc.lse_backward_rows(q, k, scale, split_r, g_r.float(), split_c, g_c.float(),
                                                  kscale=kscale, diag_off=diag_off, need_dscale=True,
                                                  positives=pos and (pos[0].float(), *pos[1:]))
        torch.testing.assert_close(got_dq.double(), dq, rtol=tol, atol=tol)
        torch.testing.assert_close(got_dscale.double(), dscale, rtol=tol, atol=tol)


@pytest.mark.parametrize("n,m,diag_off", MASK_CASES)
@pytest.mark.parametrize("kind", ["bfloat16", "bfloat16-chunked", "float64-forced"])
def test_lse_kernels_labelled_positives(device, monkeypatch, n, m, diag_off, kind):
    """Labelled positives (InfoNCE's explicit targets, SupCon's label-mates) in the backward's dS: every
    key whose label is the row's, in whole and masked tiles alike, but the excluded column, gains the
    row's weight plus its own; equal to the float64 formula with few labels (many matches in every tile),
    with the excluded diagonal's own match left out, for the resident and the chunked kernels, and for the
    exact fp64 kernel with the labels forced inside (its launcher otherwise refuses them)."""
    if device != "cpu" or not kc.interpreting():
        pytest.skip("calls the launchers on CPU tensors: the interpreter's tiles")
    dtype = torch.float64 if kind == "float64-forced" else torch.bfloat16
    if kind == "bfloat16-chunked":
        monkeypatch.setattr(kc, "MAX_BLOCK_D", 16)
    if kind == "float64-forced":
        monkeypatch.setattr(kc, "_positives_in_kernel", lambda *kind: True)
    gen = torch.Generator().manual_seed(n * 1000 + m + diag_off)
    q = torch.randn(n, 20, generator=gen).to(dtype)
    k = torch.randn(m, 20, generator=gen).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g_r, g_c = torch.rand(n, generator=gen, dtype=torch.float64), torch.rand(m, generator=gen, dtype=torch.float64)
    lr, lc = torch.randint(0, 3, (n,), generator=gen), torch.randint(0, 3, (m,), generator=gen)
    wr, wc = -torch.rand(n, generator=gen, dtype=torch.float64), -torch.rand(m, generator=gen, dtype=torch.float64)
    scale = torch.tensor([0.7], dtype=acc)
    lse_r, lse_c, dq, dscale = _lse_formulas(q, k, 0.7, None, diag_off, g_r, g_c, labels=(lr, lc, wr, wc))
    got_dq, got_dscale = kc.lse_backward_rows(q, k, scale, _as_split(lse_r.to(acc)), g_r.to(acc),
                                              _as_split(lse_c.to(acc)), g_c.to(acc), diag_off=diag_off,
                                              need_dscale=True, labels=(lr.int(), lc.int(), wr.to(acc), wc.to(acc)))
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(got_dq.double(), dq, rtol=tol, atol=tol)
    torch.testing.assert_close(got_dscale.double(), dscale, rtol=tol, atol=tol)


def test_tf32_path_resident_query_block(backend, device):
    """float32 with TF32 allowed takes the resident-query-block forward and the wide backward chunks (float32
    by default, like float64, takes the chunked exact kernels); the interpreter multiplies exactly."""
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        z1, z2 = _feats(37, 20, device=device), _feats(37, 20, device=device)
        _check(fastssl.nt_xent, nt_xent_reference, (z1, z2), torch.float32)
        scale = torch.tensor(3.0, device=device, requires_grad=True)
        _check(fastssl.clip_loss, clip_loss_reference, (z1, z2, scale), torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_single_row_and_tiny_batches(backend, device):
    _check(fastssl.nt_xent, nt_xent_reference, (_feats(1, 3, device=device), _feats(1, 3, device=device)),
           torch.float32)
    _check(fastssl.info_nce, info_nce_reference, (_feats(1, 3, device=device), _feats(1, 3, device=device)),
           torch.float32)


def test_non_contiguous_inputs(backend, device):
    q = torch.randn(20, 30, device=device)[:, ::2].detach().requires_grad_()  # stride 2 along D
    k = torch.randn(15, 26, device=device).t().detach().requires_grad_()  # column-major (26, 15)
    assert not q.is_contiguous() and not k.is_contiguous()
    _check(lambda a, b: fastssl.info_nce(a, b, normalize=False), lambda a, b: info_nce_reference(a, b, normalize=False),
           (q, k), torch.float32)


def test_references_stay_on_the_inputs_device():
    """The *_reference formulas (the benchmarks' eager baseline) build every tensor on the inputs' device and
    read nothing on the host: on the meta device no op returns a tensor elsewhere (nt_xent's targets were
    built on the CPU and copied, a host-to-device copy a call on CUDA; the supervised mean read its count)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Devices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen.update(t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    x, y = torch.empty(6, 4, device="meta"), torch.empty(6, 4, device="meta")
    labels, scale = torch.empty(6, dtype=torch.long, device="meta"), torch.empty((), device="meta")
    with Devices() as mode:
        info_nce_reference(x, y)
        nt_xent_reference(x, y)
        moco_loss_reference(x, y, y)
        clip_loss_reference(x, y, scale)
        siglip_loss_reference(x, y, scale, scale)
        supervised_nt_xent_reference(x, labels)
        supervised_nt_xent_reference(x, labels, ref_embeddings=y, ref_labels=labels)
        supcon_loss_reference(x, labels)
    assert mode.seen == {"meta"}


# ----------------------------------------------------------------------------------------------------
# gradients through the kernels
# ----------------------------------------------------------------------------------------------------

def test_gradcheck(backend, device):
    d = dict(dtype=torch.float64, device=device)
    z1, z2 = torch.randn(5, 6, **d, requires_grad=True), torch.randn(5, 6, **d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fastssl.nt_xent(a, b, temperature=0.4, reduction="none"), (z1, z2))
    k = torch.randn(7, 6, **d, requires_grad=True)
    targets = torch.tensor([6, 0, 3, 3, 1], device=device)
    assert torch.autograd.gradcheck(lambda a, b: fastssl.info_nce(a, b, targets, temperature=0.5), (z1, k))
    scale = torch.tensor(1.7, **d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: fastssl.clip_loss(a, b, s, reduction="none"), (z1, z2, scale))
    queue = torch.randn(9, 6, **d)
    assert torch.autograd.gradcheck(lambda a: fastssl.moco_loss(a, z2, queue, temperature=0.3), (z1,))


@pytest.mark.parametrize("dtype, d, kscale, chip, expected", [
    (torch.bfloat16, 128, True, 90, 128), (torch.float16, 100, False, 90, 128),
    (torch.bfloat16, 256, False, 90, 256), (torch.float16, 129, False, 90, 256),
    (torch.bfloat16, 256, True, 90, "loop"), (torch.bfloat16, 257, False, 90, "loop"),
    (torch.float32, 128, False, 90, "loop"), (torch.bfloat16, 128, False, 80, "loop"),
    (torch.bfloat16, 256, False, 80, "loop")])
def test_backward_kernel_choice_on_a_gpu(monkeypatch, dtype, d, kscale, chip, expected):
    """The launcher's backward on a GPU (as on an H200 or an A100): the resident query block on sm_90 for
    bf16/fp16 up to D=128, and up to D=256 without MoCo's key scale (the configs the compile test proves
    spill-free); everything else the chunked kernel."""
    monkeypatch.setattr(kc, "interpreting", lambda: False)
    monkeypatch.setattr(kc, "_exact", lambda dt: False)
    monkeypatch.setattr(kc, "_chip", lambda x: chip)
    key, bd, loop = kc._pick_backward(torch.zeros(2, d, dtype=dtype), kscale)
    assert key == expected and loop == (expected == "loop")
    if not loop:
        assert bd == key and kc.BWD_CONFIGS[key]


@pytest.mark.parametrize("d, expected", [(128, 128), (129, "loop"), (256, "loop")])
def test_labelled_positives_keep_the_resident_block_up_to_128(monkeypatch, d, expected):
    """Labelled positives (per-key labels and weights in every tile) take the resident query block on
    sm_90 up to D = 128 only: at 256 their variant had 8 B of stack under triton 3.6, so it is not compiled
    and those launches take the chunked kernel, whose labelled variants are."""
    monkeypatch.setattr(kc, "interpreting", lambda: False)
    monkeypatch.setattr(kc, "_chip", lambda x: 90)
    key, _, loop = kc._pick_backward(torch.zeros(2, d, dtype=torch.bfloat16), labels=True)
    assert key == expected and loop == (expected == "loop")
    specs = {id(spec.kernel): spec for spec in registry.KERNELS}
    modes = {key: {v.constexprs["POSITIVES"] for v in specs[id(kernel)].variants}
             for key, kernel in kc._bwd_kernels.items()}
    assert modes[128] == modes["loop"] == {kc.POS_NONE.value, kc.POS_DIAGONAL.value, kc.POS_LABELS.value}
    assert modes[256] == {kc.POS_DIAGONAL.value}  # its variants are half precision without a key scale


def _fast_backward(device, monkeypatch, path):
    """float64 through the tensor-core kernels' code path (``path``: the resident query block or the chunked
    scores) on the interpreter, which float64 otherwise never takes (it runs the exact kernels), the
    positives inside the kernels' dS as bf16/fp16 take them."""
    if device != "cpu" or not kc.interpreting():
        pytest.skip("forces the launchers' path choice on the interpreter")
    monkeypatch.setenv("FASTSSL_BACKEND", "triton")
    monkeypatch.setattr(kc, "_exact", lambda dtype: False)
    monkeypatch.setattr(kc, "_positives_in_kernel", lambda dtype, prec, kscale: not kscale)
    if path == "chunked":
        monkeypatch.setattr(kc, "MAX_BLOCK_D", 16)


@pytest.mark.parametrize("path", ["resident", "chunked"])
def test_gradcheck_through_the_fast_backward(device, monkeypatch, path):
    """gradcheck (float64) through the tensor-core kernels' code: the forward's D loop and the backward's
    resident query block or its chunked scores; masked and unmasked tiles, the column term (CLIP), the
    positives in dS (NT-Xent's wrapped diagonal, CLIP's rows and keys; InfoNCE's explicit targets, repeated,
    on the rows' and the keys' launches, and SupCon's label-mates, symmetric), the key scale (MoCo), dscale."""
    _fast_backward(device, monkeypatch, path)
    assert kc._pick_backward(torch.zeros(3, 18, dtype=torch.float64))[2] == (path == "chunked")
    d = dict(dtype=torch.float64, device=device)
    z1, z2 = torch.randn(5, 18, **d, requires_grad=True), torch.randn(5, 18, **d, requires_grad=True)
    scale = torch.tensor(1.3, **d, requires_grad=True)
    check = dict(fast_mode=True)  # random projections: each check a few passes, not one per element
    assert torch.autograd.gradcheck(lambda a, b: fastssl.nt_xent(a, b, temperature=0.4, reduction="none"), (z1, z2),
                                    **check)
    assert torch.autograd.gradcheck(lambda a, b, s: fastssl.clip_loss(a, b, s, reduction="none"), (z1, z2, scale),
                                    **check)
    queue = torch.randn(21, 18, **d)  # 21 keys: a whole 16-key tile and a partial one
    assert torch.autograd.gradcheck(lambda a: fastssl.moco_loss(a, z2, queue, temperature=0.3), (z1,), **check)
    keys = torch.randn(21, 18, **d, requires_grad=True)
    targets = torch.tensor([20, 3, 3, 17, 0], device=device)
    assert torch.autograd.gradcheck(lambda a, b: fastssl.info_nce(a, b, targets, temperature=0.5, reduction="none"),
                                    (z1, keys), **check)
    rows = torch.randn(19, 18, **d, requires_grad=True)
    labels = torch.tensor([4, 0, 4, 2, 9, 0, 0, 4, 2, 7, 0, 4, 2, 2, 0, 4, 1, 0, 4], device=device)
    assert torch.autograd.gradcheck(lambda a: fastssl.supcon_loss(a, labels, temperature=0.3, reduction="none"),
                                    (rows,), **check)


# ----------------------------------------------------------------------------------------------------
# low precision, extreme logits, NaN
# ----------------------------------------------------------------------------------------------------

def _unit_rows(n, d, dtype, device):
    """Unit rows rounded to ``dtype``: the op's own error, not F.normalize's rounding in low precision."""
    return F.normalize(torch.randn(n, d, dtype=torch.float64, device=device), dim=1).to(dtype)


@pytest.mark.parametrize("dtype", LOWP)
def test_low_precision_within_twice_pytorch_error(backend, device, dtype):
    z1, z2 = _unit_rows(37, 20, dtype, device), _unit_rows(37, 20, dtype, device)
    z1.requires_grad_()
    opts = dict(temperature=0.2, normalize=False)
    out = fastssl.nt_xent(z1, z2, **opts)
    assert out.dtype == torch.float32
    (grad,) = _grads(out, (z1,))
    assert grad.dtype == dtype
    z1_64 = z1.detach().double().requires_grad_()
    ref = nt_xent_reference(z1_64, z2, **opts)
    (ref_grad,) = _grads(ref, (z1_64,))
    z1_lp = z1.detach().requires_grad_()
    lowp = nt_xent_reference(z1_lp, z2, **opts, upcast=False)
    (lowp_grad,) = _grads(lowp, (z1_lp,))
    assert_close_lowp(out, ref, lowp)
    assert_close_lowp(grad, ref_grad, lowp_grad)
    img, txt = _unit_rows(29, 20, dtype, device), _unit_rows(29, 20, dtype, device)
    scale = torch.tensor(20.0, device=device)  # a float32 logit_scale with half features is allowed
    assert_close_lowp(fastssl.clip_loss(img, txt, scale, normalize=False),
                      clip_loss_reference(img, txt, scale, normalize=False),
                      clip_loss_reference(img, txt, scale.to(dtype), normalize=False, upcast=False))
    q, k, queue = (_unit_rows(n, 20, dtype, device) for n in (13, 13, 40))
    assert_close_lowp(fastssl.moco_loss(q, k, queue, normalize=False), moco_loss_reference(q, k, queue, normalize=False),
                      moco_loss_reference(q, k, queue, normalize=False, upcast=False))
    # with normalize=True the inputs are normalized in their own dtype, as PyTorch code would: still close
    out = fastssl.nt_xent(z1 * 3, z2, temperature=0.2)
    torch.testing.assert_close(out.double(), nt_xent_reference(z1 * 3, z2, temperature=0.2), rtol=0.02, atol=0.02)


def test_extreme_logits_stay_finite(backend, device):
    z1, z2 = _feats(17, 20, device=device), _feats(17, 20, device=device)
    with torch.no_grad():
        z1.mul_(30)
        z2.mul_(30)
    for normalize in (True, False):
        out = fastssl.nt_xent(z1, z2, temperature=1e-3, normalize=normalize)
        ref = nt_xent_reference(z1, z2, temperature=1e-3, normalize=normalize)
        grads = _grads(out, (z1, z2))
        assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in grads)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-2)
    out = fastssl.clip_loss(z1, z2, 1000.0, normalize=False)
    assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in _grads(out, (z1, z2)))


def test_nan_propagates(backend, device):
    z1, z2 = torch.randn(9, 20, device=device), torch.randn(9, 20, device=device)
    z1[4, 3] = float("nan")
    per_row = fastssl.nt_xent(z1, z2, reduction="none")
    assert per_row.isnan().all()  # every row's softmax includes row 4
    q, k = torch.randn(6, 20, device=device), torch.randn(8, 20, device=device)
    q[2, 0] = float("nan")
    per_row = fastssl.info_nce(q, k, reduction="none")
    assert per_row[2].isnan() and not per_row[[0, 1, 3, 4, 5]].isnan().any()
    assert fastssl.clip_loss(q, k[:6], 10.0).isnan()
    assert fastssl.moco_loss(q, k[:6], k).isnan()


def _classes(x):
    return torch.arange(x.shape[0], device=x.device) % 3


# each loss of (x, y, log scale, bias), all with a matmul on the PyTorch path
AUTOCAST_LOSSES = {
    "info_nce": lambda x, y, s, b: fastssl.info_nce(x, y),
    "info_nce_targets": lambda x, y, s, b: fastssl.info_nce(x, y, _classes(x)),
    "nt_xent": lambda x, y, s, b: fastssl.nt_xent(x, y, temperature=0.2),
    "moco_loss": lambda x, y, s, b: fastssl.moco_loss(x, y, y.flip(0)),
    "clip_loss": lambda x, y, s, b: fastssl.clip_loss(x, y, s.exp()),
    "siglip_loss": lambda x, y, s, b: fastssl.siglip_loss(x, y, s.exp(), b),
    "supervised_nt_xent": lambda x, y, s, b: fastssl.supervised_nt_xent(x, _classes(x), temperature=0.2),
    "supervised_nt_xent_refs": lambda x, y, s, b: fastssl.supervised_nt_xent(
        x, _classes(x), temperature=0.2, ref_embeddings=y, ref_labels=_classes(y)),
    "supcon_loss": lambda x, y, s, b: fastssl.supcon_loss(torch.stack((x, y), 1), _classes(x), temperature=0.2),
}


@pytest.mark.parametrize("scheme", ["kept", "blocks"])
@pytest.mark.parametrize("name", list(AUTOCAST_LOSSES))
def test_autocast_leaves_float32_losses_in_float32(backend, device, monkeypatch, name, scheme):
    """Under torch.autocast (bf16) float32 inputs give the loss and gradients of the same call without
    autocast, in float32, with the backward inside the region or after it: the PyTorch path's matmuls are
    not rounded to bf16 (nt_xent was off by 3e-2) and its blocks' dtypes still meet (clip_loss and
    siglip_loss crashed in backward)."""
    import fastssl.contrastive as fc

    if scheme == "blocks":
        if backend == "triton":
            pytest.skip("blocks of rows are the PyTorch path's")
        monkeypatch.setattr(fc, "KEEP_ELEMENTS", 0)
        monkeypatch.setattr(fc, "CHUNK_ELEMENTS", 4 * 22)  # 4 to 8 rows a block
    fn = AUTOCAST_LOSSES[name]
    inputs = (_feats(11, 8, device=device), _feats(11, 8, device=device),
              *(torch.tensor(v, device=device, requires_grad=True) for v in (1.5, -2.0)))  # log scale, bias
    plain = fn(*inputs)
    plain_grads = _grads(plain, inputs)
    for inside in (True, False):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            out = fn(*inputs)
            if inside:
                grads = _grads(out, inputs)
        if not inside:
            grads = _grads(out, inputs)
        assert_same_float32(out, grads, plain, plain_grads)


# ----------------------------------------------------------------------------------------------------
# torch.compile, peers
# ----------------------------------------------------------------------------------------------------

def test_compiles_fullgraph(backend, device):
    z1, z2 = _feats(13, 20, device=device), _feats(13, 20, device=device)
    labels = torch.randint(0, 3, (13,), device=device)
    scale = torch.tensor(2.0, device=device, requires_grad=True)

    targets = torch.tensor([3, 0, 0, 12, 5, 1, 2, 7, 7, 9, 4, 11, 6], device=device)

    def losses(a, b, s):
        return (fastssl.nt_xent(a, b) + fastssl.info_nce(a, b) + fastssl.info_nce(a, b, targets)
                + fastssl.clip_loss(a, b, s.exp())
                + fastssl.moco_loss(a, b, b) + fastssl.siglip_loss(a, b, s.exp(), -s)
                + fastssl.supervised_nt_xent(a, labels, ref_embeddings=b, ref_labels=labels)
                + fastssl.supcon_loss(torch.stack((a, b), 1), labels))

    compiled = torch.compile(losses, fullgraph=True)
    out = compiled(z1, z2, scale)
    ref = (nt_xent_reference(z1, z2) + info_nce_reference(z1, z2) + info_nce_reference(z1, z2, targets)
           + clip_loss_reference(z1, z2, scale.double().exp())
           + moco_loss_reference(z1, z2, z2) + siglip_loss_reference(z1, z2, scale.double().exp(), -scale.double())
           + supervised_nt_xent_reference(z1, labels, ref_embeddings=z2, ref_labels=labels)
           + supcon_loss_reference(torch.stack((z1, z2), 1), labels))
    assert_close(out, ref, torch.float32, scale=10)
    for g, r in zip(_grads(out, (z1, z2, scale)), _grads(ref, (z1, z2, scale))):
        assert_close(g, r, torch.float32, scale=10)


@pytest.mark.skipif(importlib.util.find_spec("pytorch_metric_learning") is None,
                    reason="pytorch-metric-learning is not installed")
def test_nt_xent_equals_pytorch_metric_learning(device):
    from pytorch_metric_learning.losses import NTXentLoss

    z1, z2 = _feats(23, 16, device=device), _feats(23, 16, device=device)
    ours = fastssl.nt_xent(z1, z2, temperature=0.3)
    labels = torch.arange(23, device=device).repeat(2)
    theirs = NTXentLoss(temperature=0.3)(torch.cat((F.normalize(z1, dim=1), F.normalize(z2, dim=1))), labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for g, r in zip(_grads(ours, (z1, z2)), _grads(theirs, (z1, z2))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("lightly") is None, reason="lightly is not installed")
def test_nt_xent_equals_lightly(device):
    from lightly.loss import NTXentLoss

    z1, z2 = torch.randn(23, 16, device=device), torch.randn(23, 16, device=device)
    torch.testing.assert_close(fastssl.nt_xent(z1, z2, temperature=0.3), NTXentLoss(temperature=0.3)(z1, z2))


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip is not installed")
def test_clip_loss_equals_open_clip(device):
    from open_clip.loss import ClipLoss

    img, txt = F.normalize(torch.randn(23, 16, device=device), dim=1), F.normalize(torch.randn(23, 16, device=device), dim=1)
    scale = torch.tensor(14.3, device=device)
    torch.testing.assert_close(fastssl.clip_loss(img, txt, scale), ClipLoss()(img, txt, scale))


# ----------------------------------------------------------------------------------------------------
# validation (API.md's common rules)
# ----------------------------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


BAD = [
    (lambda d: fastssl.nt_xent(_t(4, 3, device=d), _t(4, 3, 1, device=d)), ValueError, r"z2 must be 2-D .* got shape \(4, 3, 1\)"),
    (lambda d: fastssl.nt_xent(_t(4, 3, device=d), _t(5, 3, device=d)), ValueError, r"z2 has shape \(5, 3\) but z1 has \(4, 3\)"),
    (lambda d: fastssl.nt_xent(_t(4, 3, device=d), _t(4, 3, dtype=torch.float16, device=d)), TypeError, "mixing dtypes"),
    (lambda d: fastssl.nt_xent(_t(4, 3, dtype=torch.long, device=d), _t(4, 3, device=d)), TypeError, "z1 must be a floating-point"),
    (lambda d: fastssl.nt_xent(_t(4, 3, device=d), _t(4, 3, device=d), temperature=0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
    (lambda d: fastssl.nt_xent(_t(4, 3, device=d), _t(4, 3, device=d), temperature=-1.0), ValueError, "temperature must be"),
    (lambda d: fastssl.nt_xent(_t(4, 3, device=d), _t(4, 3, device=d), temperature="0.5"), TypeError, "temperature must be a Python float"),
    (lambda d: fastssl.nt_xent(_t(0, 3, device=d), _t(0, 3, device=d)), ValueError, r"z1 is an empty batch \(shape \(0, 3\)\)"),
    (lambda d: fastssl.nt_xent(_t(4, 3, device=d), _t(4, 3, device=d), reduction="avg"), ValueError, "reduction must be one of"),
    (lambda d: fastssl.nt_xent(_t(4, 3, device=d), _t(4, 3, device=d), normalize=1), TypeError, "normalize must be True or False"),
    (lambda d: fastssl.nt_xent(_t(4, 3, device=d), _t(4, 3, device="meta")), ValueError, "z2 is on meta"),
    (lambda d: fastssl.nt_xent([[1.0]], _t(1, 1, device=d)), TypeError, "z1 must be a torch.Tensor"),
    (lambda d: fastssl.info_nce(_t(4, 3, device=d), _t(4, 5, device=d)), ValueError, r"key has feature size 5 but query has 3"),
    (lambda d: fastssl.info_nce(_t(4, 3, device=d), _t(3, 3, device=d)), ValueError, r"default targets arange\(N\) need key to have at least N=4 rows"),
    (lambda d: fastssl.info_nce(_t(4, 3, device=d), _t(6, 3, device=d), torch.tensor([0, 1, 2, 6])), ValueError, r"targets must be in \[0, 6\)"),
    (lambda d: fastssl.info_nce(_t(4, 3, device=d), _t(6, 3, device=d), torch.tensor([0, 1, -1, 2])), ValueError, r"targets must be in \[0, 6\)"),
    (lambda d: fastssl.info_nce(_t(4, 3, device=d), _t(6, 3, device=d), torch.tensor([0.0, 1, 2, 3])), TypeError, "targets must be a LongTensor"),
    (lambda d: fastssl.info_nce(_t(4, 3, device=d), _t(6, 3, device=d), torch.tensor([0, 1, 2])), ValueError, r"targets must have shape \(4,\)"),
    (lambda d: fastssl.info_nce(_t(4, 3, device=d), _t(6, 3, device=d), [0, 1, 2, 3]), TypeError, "targets must be a LongTensor"),
    (lambda d: fastssl.info_nce(_t(4, 0, device=d), _t(6, 0, device=d)), ValueError, "query has no features"),
    (lambda d: fastssl.info_nce(_t(4, 3, device=d), _t(0, 3, device=d)), ValueError, "key is an empty batch"),
    (lambda d: fastssl.info_nce(_t(4, 3, device=d), _t(6, 3, device=d), gather_distributed=1), TypeError, "gather_distributed must be True or False"),
    (lambda d: fastssl.moco_loss(_t(4, 3, device=d), _t(5, 3, device=d), _t(9, 3, device=d)), ValueError, r"key has shape \(5, 3\) but query has \(4, 3\)"),
    (lambda d: fastssl.moco_loss(_t(4, 3, device=d), _t(4, 3, device=d), _t(9, 4, device=d)), ValueError, "queue has feature size 4"),
    (lambda d: fastssl.moco_loss(_t(4, 3, device=d), _t(4, 3, device=d), _t(0, 3, device=d)), ValueError, "queue is an empty batch"),
    (lambda d: fastssl.moco_loss(_t(4, 3, device=d), _t(4, 3, device=d), _t(9, 3, dtype=torch.float64, device=d)), TypeError, "mixing dtypes"),
    (lambda d: fastssl.clip_loss(_t(4, 3, device=d), _t(4, 3, device=d), 0.0), ValueError, "logit_scale must be a finite number > 0"),
    (lambda d: fastssl.clip_loss(_t(4, 3, device=d), _t(4, 3, device=d), "10"), TypeError, "logit_scale must be a float or a 0-dim tensor"),
    (lambda d: fastssl.clip_loss(_t(4, 3, device=d), _t(4, 3, device=d), torch.ones(2, device=d)), ValueError, r"logit_scale must be a float or a 0-dim tensor, got shape \(2,\)"),
    (lambda d: fastssl.clip_loss(_t(4, 3, dtype=torch.bfloat16, device=d), _t(4, 3, dtype=torch.bfloat16, device=d), torch.tensor(1.0, dtype=torch.float16)), TypeError, "logit_scale has dtype torch.float16"),
    (lambda d: fastssl.clip_loss(_t(4, 3, device=d), _t(4, 3, device=d), torch.tensor(1, device=d)), TypeError, "logit_scale must be a floating-point"),
    (lambda d: fastssl.clip_loss(_t(4, 3, device=d), _t(3, 3, device=d), 1.0), ValueError, r"text_features has shape \(3, 3\)"),
    (lambda d: fastssl.siglip_loss(_t(4, 3, device=d), _t(3, 3, device=d), 1.0, 0.0), ValueError, r"text_features has shape \(3, 3\)"),
    (lambda d: fastssl.siglip_loss(_t(4, 3, device=d), _t(4, 3, device=d), -1.0, 0.0), ValueError, "logit_scale must be a finite number > 0"),
    (lambda d: fastssl.siglip_loss(_t(4, 3, device=d), _t(4, 3, device=d), 1.0, "0"), TypeError, "logit_bias must be a float or a 0-dim tensor"),
    (lambda d: fastssl.siglip_loss(_t(4, 3, device=d), _t(4, 3, device=d), 1.0, float("inf")), ValueError, "logit_bias must be a finite number"),
    (lambda d: fastssl.siglip_loss(_t(4, 3, device=d), _t(4, 3, device=d), 1.0, torch.zeros(1, device=d)), ValueError, r"logit_bias must be a float or a 0-dim tensor, got shape \(1,\)"),
    (lambda d: fastssl.siglip_loss(_t(4, 3, dtype=torch.bfloat16, device=d), _t(4, 3, dtype=torch.bfloat16, device=d), 1.0, torch.tensor(0.0, dtype=torch.float64)), TypeError, "logit_bias has dtype torch.float64"),
    (lambda d: fastssl.siglip_loss(_t(4, 3, device=d), _t(4, 3, device=d), 1.0, 0.0, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda d: fastssl.siglip_loss(_t(4, 3, device=d), _t(4, 3, device=d), 1.0, 0.0, gather_distributed=1), TypeError, "gather_distributed must be True or False"),
    (lambda d: fastssl.supervised_nt_xent(_t(4, 3, device=d), torch.zeros(4, device=d)), TypeError, r"labels must be a LongTensor \(torch.int64\)"),
    (lambda d: fastssl.supervised_nt_xent(_t(4, 3, device=d), torch.zeros(3, dtype=torch.long, device=d)), ValueError, r"labels must have shape \(4,\)"),
    (lambda d: fastssl.supervised_nt_xent(_t(4, 3, device=d), torch.zeros(4, dtype=torch.long, device=d), ref_embeddings=_t(5, 3, device=d)), ValueError, "ref_embeddings and ref_labels go together"),
    (lambda d: fastssl.supervised_nt_xent(_t(4, 3, device=d), torch.zeros(4, dtype=torch.long, device=d), ref_embeddings=_t(5, 2, device=d), ref_labels=torch.zeros(5, dtype=torch.long, device=d)), ValueError, "ref_embeddings has feature size 2"),
    (lambda d: fastssl.supervised_nt_xent(_t(4, 3, device=d), torch.zeros(4, dtype=torch.long, device=d), ref_embeddings=_t(5, 3, device=d), ref_labels=torch.zeros(4, dtype=torch.long, device=d)), ValueError, r"ref_labels must have shape \(5,\)"),
    (lambda d: fastssl.supervised_nt_xent(_t(4, 3, device=d), torch.zeros(4, dtype=torch.long, device=d), temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (lambda d: fastssl.supervised_nt_xent(_t(0, 3, device=d), torch.zeros(0, dtype=torch.long, device=d)), ValueError, "embeddings is an empty batch"),
    (lambda d: fastssl.supcon_loss(_t(4, device=d), torch.zeros(4, dtype=torch.long, device=d)), ValueError, r"features must be 2-D \(N, D\) or 3-D"),
    (lambda d: fastssl.supcon_loss(_t(4, 2, 3, device=d), torch.zeros(2, dtype=torch.long, device=d)), ValueError, r"labels must have shape \(4,\)"),
    (lambda d: fastssl.supcon_loss(_t(4, 3, device=d), [0, 1, 2, 3]), TypeError, "labels must be a LongTensor"),
    (lambda d: fastssl.supcon_loss(_t(4, 3, device=d), torch.zeros(4, dtype=torch.long, device=d), reduction="avg"), ValueError, "reduction must be one of"),
]


@pytest.mark.parametrize("call, error, match", BAD)
def test_rejects_bad_input(device, call, error, match):
    with pytest.raises(error, match=match):
        call(device)


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "clip_loss", "siglip_loss"])
def test_gather_distributed_without_process_group_is_the_single_process_loss(backend, device, loss):
    """API.md (lightly's meaning): without an initialized process group gather_distributed=True is the
    single-process loss, value and gradients, so code written for DDP runs unchanged on one device."""
    import fastssl.distributed

    assert not fastssl.distributed.is_initialized()
    fn = {"nt_xent": fastssl.nt_xent, "info_nce": fastssl.info_nce,
          "clip_loss": lambda a, b, **kw: fastssl.clip_loss(a, b, 3.0, **kw),
          "siglip_loss": lambda a, b, **kw: fastssl.siglip_loss(a, b, 3.0, -1.0, **kw)}[loss]
    a, b = _feats(6, 5, device=device), _feats(6, 5, device=device)
    gathered, single = fn(a, b, gather_distributed=True), fn(a, b)
    assert torch.equal(gathered, single)
    for g, r in zip(_grads(gathered, (a, b)), _grads(single, (a, b))):
        assert torch.equal(g, r)


def test_nt_xent_positive_read_like_the_lse(device, monkeypatch):
    """lightly's test_with_correlated_embedding (one pair, both views pointing the same way: its cross-entropy
    over a single logit is exactly 0): our positive agrees with its LSE entry to the bit on the PyTorch path,
    with and without a gradient to compute and at sizes past the kept budget (positive folded like the
    scores)."""
    import fastssl.contrastive as fc

    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    for keep in (True, False):
        monkeypatch.setattr(fc, "KEEP_ELEMENTS", 4 if keep else 3)
        for t in (0.1, 1.0, 7.0):
            for _ in range(20):
                x, y = torch.rand(1, 1, device=device), torch.rand(1, 1, device=device)
                z1, z2 = torch.cat((x, 2 * x), 1), torch.cat((y, 2 * y), 1)
                assert fastssl.nt_xent(z1, z2, temperature=t).item() == 0.0
                assert fastssl.nt_xent(z1.requires_grad_(), z2, temperature=t).item() == 0.0


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "clip_loss", "siglip_loss"])
def test_gather_distributed_convention(backend, device, monkeypatch, loss):
    """API.md's convention with two ranks simulated in one process: the gather is a cat of every rank's
    tensor in rank order with gradient to each, so the gradient of the sum of the ranks' losses for a
    rank's rows is what all_gather_with_grad's backward (the local slice of the summed gradient) gives
    it. The mean of the ranks' losses equals the single-process loss on the global batch; each rank's
    gradient is world_size times the single-process gradient of its rows. (The real two-process gloo test
    is in the distributed module's tests.)"""
    import fastssl.contrastive as fc

    world, n = 2, 7
    g1, g2 = _feats(world * n, 20, device=device), _feats(world * n, 20, device=device)
    fn = {"nt_xent": lambda a, b, **kw: fastssl.nt_xent(a, b, temperature=0.3, **kw),
          "info_nce": lambda a, b, **kw: fastssl.info_nce(a, b, temperature=0.2, **kw),
          "clip_loss": lambda a, b, **kw: fastssl.clip_loss(a, b, 9.0, **kw),
          "siglip_loss": lambda a, b, **kw: fastssl.siglip_loss(a, b, 4.0, -2.0, normalize=True, **kw)}[loss]
    single = fn(g1, g2)
    single_grads = _grads(single, (g1, g2))
    local = [(g1[r * n:(r + 1) * n], g2[r * n:(r + 1) * n]) for r in range(world)]
    recorded = []  # recorded[r]: the tensors rank r gathers, in call order

    def recording(x):
        recorded[-1].append(x)
        return x, 0

    monkeypatch.setattr(fc, "_gathers", lambda gather_distributed: gather_distributed)  # as with 2 ranks
    monkeypatch.setattr(fc, "_gather", recording)
    for r in range(world):
        recorded.append([])
        fn(*local[r], gather_distributed=True)
    losses = []
    for r in range(world):
        calls = iter(range(len(recorded[r])))

        def gathering(x, r=r, calls=calls):
            i = next(calls)
            parts = [recorded[w][i] for w in range(world)]
            parts[r] = x
            return torch.cat(parts), r

        monkeypatch.setattr(fc, "_gather", gathering)
        losses.append(fn(*local[r], gather_distributed=True))
    assert_close(sum(losses) / world, single.detach().double(), torch.float32)
    for g, r in zip(_grads(sum(losses), (g1, g2)), single_grads):
        assert_close(g, world * r.double(), torch.float32)


def test_tf32_only_where_pytorch_allows():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert kc.dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert kc.dot_precision(torch.float32) == "tf32"
        assert kc.dot_precision(torch.bfloat16) == kc.dot_precision(torch.float64) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_torch_path_blocks_of_rows(device, monkeypatch):
    """The PyTorch path over several blocks of rows (7 at a time): diagonal offsets and the dk accumulation
    across block boundaries."""
    import fastssl.contrastive as fc

    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    monkeypatch.setattr(fc, "CHUNK_ELEMENTS", 7 * 74)
    z1, z2 = _feats(37, 20, device=device), _feats(37, 20, device=device)
    _check(lambda a, b: fastssl.nt_xent(a, b, reduction="none"),
           lambda a, b: nt_xent_reference(a, b, reduction="none"), (z1, z2), torch.float32, reduction="none")
    scale = torch.tensor(3.0, device=device, requires_grad=True)
    _check(lambda a, b, s: fastssl.clip_loss(a, b, s), clip_loss_reference, (z1, z2, scale), torch.float32)
    _check(lambda a, b: fastssl.info_nce(a, b), info_nce_reference, (z1, z2), torch.float32)


# ----------------------------------------------------------------------------------------------------
# the PyTorch path's schemes: the forward's scores kept for the backward (N * M <= KEEP_ELEMENTS), or
# recomputed in one block or in several
# ----------------------------------------------------------------------------------------------------

def _scheme_case(loss, dtype, device):
    """(inputs with gradient, ours, the float64 reference, the op's (N, M)) at odd sizes."""
    f = dict(dtype=dtype, device=device)
    if loss == "nt_xent":
        return ((_feats(19, 12, **f), _feats(19, 12, **f)), lambda a, b: fastssl.nt_xent(a, b, temperature=0.3),
                lambda a, b: nt_xent_reference(a, b, temperature=0.3), (38, 38))
    if loss.startswith("info_nce"):
        targets = torch.randint(0, 23, (17,), device=device) if loss.endswith("targets") else None
        return ((_feats(17, 12, **f), _feats(23, 12, **f)), lambda a, b: fastssl.info_nce(a, b, targets),
                lambda a, b: info_nce_reference(a, b, targets), (17, 23))
    if loss.startswith("moco"):
        normalize = loss.endswith("normalize")
        k, queue = torch.randn(17, 12, **f), torch.randn(29, 12, **f) * (1.0 if normalize else 0.3)
        return ((_feats(17, 12, **f),), lambda a: fastssl.moco_loss(a, k, queue, temperature=0.2, normalize=normalize),
                lambda a: moco_loss_reference(a, k, queue, temperature=0.2, normalize=normalize), (17, 29))
    scale = torch.tensor(2.3, **f, requires_grad=True)  # clip_loss: a learnable logit_scale
    return ((_feats(21, 12, **f), _feats(21, 12, **f), scale), lambda a, b, s: fastssl.clip_loss(a, b, s.exp()),
            lambda a, b, s: clip_loss_reference(a, b, s.double().exp()), (21, 21))


def _spy_kept(monkeypatch):
    """The shapes of the block (scores, or a one-sided LSE's softmax) each backward of the PyTorch path
    receives from its forward ((0,): none, the scores are recomputed)."""
    import fastssl.contrastive as fc

    kept, real = [], fc._lse_backward_torch
    signature = inspect.signature(real)

    def spy(*args, **kwargs):
        kept.append(tuple(signature.bind(*args, **kwargs).arguments["scores"].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(fc, "_lse_backward_torch", spy)
    return kept


def _spy_forward_kept(monkeypatch):
    """The shapes of what each forward of the PyTorch path's LSE hands to the backward ((0,): nothing)."""
    import fastssl.contrastive as fc

    kept, real = [], fc._lse_torch

    def spy(*args):
        out = real(*args)
        kept.append(tuple(out[2].shape))
        return out

    monkeypatch.setattr(fc, "_lse_torch", spy)
    return kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scheme", ["kept", "one_block", "blocks"])
@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "info_nce_targets", "moco_normalize", "moco_raw", "clip_loss"])
def test_torch_path_schemes_match_reference(device, monkeypatch, loss, scheme, dtype):
    """Loss and gradients (features, logit_scale) on each scheme, with KEEP_ELEMENTS at N * M (kept) and one
    below (recomputed: one block, or blocks of 5 rows); the spy proves which scheme ran."""
    import fastssl.contrastive as fc

    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    inputs, ours, ref, (n, m) = _scheme_case(loss, dtype, device)
    monkeypatch.setattr(fc, "KEEP_ELEMENTS", n * m - (scheme != "kept"))
    if scheme == "blocks":
        monkeypatch.setattr(fc, "CHUNK_ELEMENTS", 5 * max(n, m))
    kept = _spy_kept(monkeypatch)
    _check(ours, ref, inputs, dtype)
    assert kept == [(n, m) if scheme == "kept" else (0,)]


def _lse_saved(loss: torch.Tensor) -> list:
    """The tensors the LSE's autograd node (eager mode's _LseFunction or _KeptNTXent, or the custom op's) saved
    for the backward."""
    nodes = [loss.grad_fn]
    while nodes:
        node = nodes.pop()
        if any(name in node.name() for name in ("_LseFunction", "_KeptNTXent", "contrastive_lse")):
            return [t for t in node.saved_tensors if t is not None]
        nodes += [f for f, _ in node.next_functions if f is not None]
    raise AssertionError("no contrastive_lse node in the graph")


def test_kept_scores_only_within_budget(device, monkeypatch):
    """At the default KEEP_ELEMENTS (2**22): nt_xent at 2N = 2048 keeps its (2N, 2N) scores, at 2N = 2050 the
    backward holds nothing larger than the features (the recompute scheme); without a gradient to compute
    nothing is kept."""
    import fastssl.contrastive as fc

    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    assert fc.KEEP_ELEMENTS == 2048 * 2048
    for n, keeps in ((1024, True), (1025, False)):
        z1, z2 = _feats(n, 4, device=device), _feats(n, 4, device=device)
        biggest = max(t.numel() for t in _lse_saved(fastssl.nt_xent(z1, z2)))
        assert biggest == (4 * n * n if keeps else 2 * n * 4)
    kept = _spy_forward_kept(monkeypatch)
    with torch.no_grad():
        fastssl.info_nce(z1[:4], z2[:4])
    fastssl.clip_loss(z1[:4].detach(), z2[:4].detach(), 2.0)
    assert kept == [(0,), (0,)]
    out = fastssl.nt_xent(z1[:4].detach(), z2[:4].detach())  # one matmul, nothing saved: no graph
    assert out.grad_fn is None


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_kept_nt_xent_is_one_node_with_the_graphs_gradients(device, monkeypatch, normalize, dtype):
    """Eager nt_xent on the kept path is one autograd node (_KeptNTXent: normalize, LSE, positives) whose
    hand-written backward equals autograd through the literal formula, in the features' dtype, including a
    zero row and a row shorter than F.normalize's eps (their gradient is dU / eps, no radial term); gradcheck."""
    from fastssl.contrastive import _KeptNTXent

    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    z1, z2 = (torch.randn(6, 5, dtype=torch.float64, device=device) for _ in range(2))
    z1[2], z2[4] = 0, 1e-13
    z1, z2 = z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()
    loss = fastssl.nt_xent(z1, z2, temperature=0.3, normalize=normalize, reduction="none")
    assert loss.grad_fn.name() == "_KeptNTXentBackward" and loss.dtype == (dtype if dtype == torch.float64 else torch.float32)
    weights = torch.rand_like(loss) + 0.5
    ref = nt_xent_reference(z1, z2, temperature=0.3, normalize=normalize, reduction="none")
    assert_close(loss, ref, dtype)
    for g, r in zip(_grads(loss, (z1, z2), weights), _grads(ref, (z1, z2), weights.double())):
        assert g.dtype == dtype
        assert_close(g, r, dtype)
    if dtype == torch.float64:
        a, b = (torch.randn(5, 3, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
        assert torch.autograd.gradcheck(lambda x, y: _KeptNTXent.apply(x, y, torch.tensor([2.0], dtype=dtype,
                                                                                            device=device), normalize), (a, b))


@pytest.mark.parametrize("keep", [True, False])
def test_torch_path_symmetric_scale_gradient(device, monkeypatch, keep):
    """The symmetric op (k is q, one gradient dq + dk) with a scale that needs a gradient, which no public
    loss asks for: gradcheck in float64, kept scores and recomputed."""
    import fastssl.contrastive as fc

    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    monkeypatch.setattr(fc, "KEEP_ELEMENTS", 64 if keep else 63)
    z = torch.randn(8, 5, dtype=torch.float64, device=device, requires_grad=True)
    scale = torch.tensor([1.3], dtype=torch.float64, device=device, requires_grad=True)
    assert fc._keeps_scores(8, 8, z, scale) == keep
    assert torch.autograd.gradcheck(lambda a, s: fc._lse(a, a, s, diag_off=0, symmetric=True)[0], (z, scale))


# ----------------------------------------------------------------------------------------------------
# SigLIP's sigmoid loss
# ----------------------------------------------------------------------------------------------------

def _sig_params(kind, dtype, device):
    """(logit_scale, logit_bias, the tensors among them): Python floats, or 0-dim tensors (a learnable
    log-scale's exp, as open_clip passes it) in the features' dtype or float32."""
    if kind == "float":
        return 3.5, -1.5, []
    pdtype = dtype if kind == "tensor" else torch.float32
    log_scale = torch.tensor(1.2, dtype=pdtype, device=device, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=pdtype, device=device, requires_grad=True)
    return log_scale, bias, [log_scale, bias]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["float", "tensor", "fp32_tensor"])
def test_siglip_loss_matches_reference(backend, device, dtype, reduction, kind):
    img, txt = _feats(37, 20, dtype=dtype, device=device), _feats(37, 20, dtype=dtype, device=device)
    log_scale, bias, params = _sig_params(kind, dtype, device)
    exp = (lambda s: s.exp()) if params else (lambda s: s)
    inputs = [img, txt, *params]

    def ours(a, b, *p):
        return fastssl.siglip_loss(a, b, exp(p[0]) if p else log_scale, p[1] if p else bias, normalize=True,
                                   reduction=reduction)

    def ref(a, b, *p):  # the same multiplier value (a float32 one stays float32-rounded)
        return siglip_loss_reference(a, b, exp(p[0]).double() if p else log_scale, p[1].double() if p else bias,
                                     normalize=True, reduction=reduction)

    out, expected = ours(*inputs), ref(*inputs)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == expected.shape
    assert_close(out, expected, dtype, scale=10)
    grad_out = torch.rand_like(expected) + 0.5 if reduction == "none" else None
    for g, r in zip(_grads(out, inputs, None if grad_out is None else grad_out.to(out.dtype)),
                    _grads(expected, inputs, grad_out)):
        assert_close(g, r, g.dtype, scale=10)  # a float32 parameter gets a float32 gradient


def _sig_formulas(q, k, scale, bias, diag_off, w, col_weights):
    """float64 row sums of softplus(-z l) and the kernels' gradient: dS = -z sigmoid(-z l) w (w per row of q,
    or per row of k), dq = scale dS @ k, dscale = sum dS * (q . k), dbias = sum dS."""
    q, k = q.double(), k.double()
    raw = q @ k.t()
    l = scale * raw + bias
    z = -torch.ones_like(l)
    i = torch.arange(q.shape[0])
    inside = (i + diag_off >= 0) & (i + diag_off < k.shape[0])
    z[i[inside], (i + diag_off)[inside]] = 1.0
    rows = F.softplus(-z * l).sum(1)
    ds = -z * torch.sigmoid(-z * l) * (w[None, :] if col_weights else w[:, None])
    return rows, scale * ds @ k, (ds * raw).sum(), ds.sum()


@pytest.mark.parametrize("n,m,diag_off", MASK_CASES)
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "bfloat16-chunked", "columns"])
def test_sig_kernels_mask_only_band_and_edge_tiles(device, monkeypatch, n, m, diag_off, kind):
    """The sigmoid kernels flip the positive's sign and drop the keys past M only in the band's and the
    last partial tile (interpreter tiles of 16): row sums, dq, dscale and dbias (weights per row, or per key
    as the column pass that gives the texts' gradient) equal the float64 formulas wherever the band falls."""
    if device != "cpu" or not kc.interpreting():
        pytest.skip("calls the launchers on CPU tensors: the interpreter's tiles")
    dtype = torch.bfloat16 if kind.startswith("bfloat16") else torch.float32
    if kind == "bfloat16-chunked":
        monkeypatch.setattr(kc, "MAX_BLOCK_D", 16)
    gen = torch.Generator().manual_seed(n * 1000 + m + diag_off)
    q = (torch.randn(n, 20, generator=gen) / 3).to(dtype)
    k = (torch.randn(m, 20, generator=gen) / 3).to(dtype)
    cols = kind == "columns"
    w = torch.rand(m if cols else n, generator=gen, dtype=torch.float64) + 0.5
    scale, bias = torch.tensor([1.7]), torch.tensor([-0.6])
    rows, dq, dscale, dbias = _sig_formulas(q, k, 1.7, -0.6, diag_off, w, cols)
    torch.testing.assert_close(kc.sigmoid_forward(q, k, scale, bias, diag_off).double(), rows, rtol=1e-5, atol=1e-5)
    got_dq, got_ds, got_db = kc.sigmoid_backward_rows(q, k, scale, bias, w.float(), diag_off=diag_off,
                                                      col_weights=cols, need_dparams=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_dq.double(), dq, rtol=tol, atol=tol)
    if not cols:  # the column pass' parameter sums are the row pass' (not used)
        torch.testing.assert_close(got_ds.double(), dscale, rtol=tol, atol=tol)
        torch.testing.assert_close(got_db.double(), dbias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["kept", "one_block", "blocks"])
def test_siglip_torch_path_schemes(device, monkeypatch, scheme):
    """The PyTorch path: the gradient matrix kept from the forward, or recomputed in one block or in blocks
    of 5 rows; float64 against the reference, gradients to both features and both parameters."""
    import fastssl.contrastive as fc

    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    n = 21
    monkeypatch.setattr(fc, "KEEP_ELEMENTS", n * n - (scheme != "kept"))
    if scheme == "blocks":
        monkeypatch.setattr(fc, "CHUNK_ELEMENTS", 5 * n)
    d = dict(dtype=torch.float64, device=device)
    inputs = (_feats(n, 12, **d), _feats(n, 12, **d), torch.tensor(0.8, **d, requires_grad=True),
              torch.tensor(-2.0, **d, requires_grad=True))
    _check(lambda a, b, s, c: fastssl.siglip_loss(a, b, s.exp(), c),
           lambda a, b, s, c: siglip_loss_reference(a, b, s.exp(), c), inputs, torch.float64)


def test_siglip_gradcheck(backend, device):
    d = dict(dtype=torch.float64, device=device)
    x, y = torch.randn(5, 6, **d, requires_grad=True), torch.randn(5, 6, **d, requires_grad=True)
    scale, bias = torch.tensor(1.7, **d, requires_grad=True), torch.tensor(-0.4, **d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s, c: fastssl.siglip_loss(a, b, s, c, reduction="none"),
                                    (x, y, scale, bias))
    assert torch.autograd.gradcheck(lambda a, b: fastssl.siglip_loss(a, b, 2.0, 1.0, normalize=True), (x, y))


@pytest.mark.parametrize("path", ["resident", "chunked"])
def test_siglip_gradcheck_through_the_fast_backward(device, monkeypatch, path):
    """gradcheck (float64) through the tensor-core kernels' code (as the LSE's): resident or chunked."""
    _fast_backward(device, monkeypatch, path)
    d = dict(dtype=torch.float64, device=device)
    x, y = torch.randn(21, 18, **d, requires_grad=True), torch.randn(21, 18, **d, requires_grad=True)
    scale, bias = torch.tensor(1.3, **d, requires_grad=True), torch.tensor(-0.5, **d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s, c: fastssl.siglip_loss(a, b, s, c, reduction="none"),
                                    (x, y, scale, bias), fast_mode=True)


@pytest.mark.parametrize("dtype", LOWP)
def test_siglip_low_precision_against_pytorch_error(backend, device, dtype):
    img, txt = _unit_rows(37, 20, dtype, device).requires_grad_(), _unit_rows(37, 20, dtype, device).requires_grad_()
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-5.0, device=device)
    out = fastssl.siglip_loss(img, txt, scale, bias)
    assert out.dtype == torch.float32
    f64 = [t.detach().double().requires_grad_() for t in (img, txt)]
    ref = siglip_loss_reference(*f64, scale, bias)
    lp = [t.detach().requires_grad_() for t in (img, txt)]
    lowp = siglip_loss_reference(*lp, scale.to(dtype), bias.to(dtype), upcast=False)
    assert_close_lowp(out, ref, lowp)
    # the gradients: dS rounded to bf16 for the tensor-core products (8 bits) against PyTorch's bf16 formula
    # measured up to 2.23x its error over 40 seeds on the interpreted kernels (fp16: at most 0.97x): 3x
    # for bf16; a wrong gradient is off by orders more
    for g, r, p in zip(_grads(out, (img, txt)), _grads(ref, f64), _grads(lowp, lp)):
        assert g.dtype == dtype
        assert_close_lowp(g, r, p, factor=3.0 if dtype == torch.bfloat16 else 2.0)


def test_siglip_extreme_logits_and_nan(backend, device):
    x, y = _feats(17, 20, device=device), _feats(17, 20, device=device)
    out = fastssl.siglip_loss(x, y, 1000.0, -50.0)  # logits in the thousands: softplus stays finite
    ref = siglip_loss_reference(x, y, 1000.0, -50.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)
    assert all(torch.isfinite(g).all() for g in _grads(out, (x, y)))
    bad = x.detach().clone()
    bad[3, 1] = float("nan")
    per_row = fastssl.siglip_loss(bad, y.detach(), 2.0, 0.0, reduction="none")
    assert per_row[3].isnan() and not per_row[[0, 1, 2, 4]].isnan().any()


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip is not installed")
def test_siglip_loss_equals_open_clip(device):
    from open_clip.loss import SigLipLoss

    img, txt = (F.normalize(torch.randn(23, 16, device=device), dim=1).requires_grad_() for _ in range(2))
    scale = torch.tensor(2.3, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    ours = fastssl.siglip_loss(img, txt, scale.exp(), bias)
    theirs = SigLipLoss()(img, txt, scale.exp(), bias)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for g, r in zip(_grads(ours, (img, txt, scale, bias)), _grads(theirs, (img, txt, scale, bias))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# supervised NT-Xent (pytorch-metric-learning's NTXentLoss) and SupCon
# ----------------------------------------------------------------------------------------------------

HAVE_PML = importlib.util.find_spec("pytorch_metric_learning") is not None


def _labels(n, classes, device):
    return torch.randint(0, classes, (n,), device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("refs", [False, True])
@pytest.mark.parametrize("classes", [3, 30])
def test_supervised_nt_xent_matches_reference(backend, device, dtype, refs, classes):
    x = _feats(37, 20, dtype=dtype, device=device)
    labels = _labels(37, classes, device)
    inputs, kw = (x,), {}
    if refs:
        r = _feats(29, 20, dtype=dtype, device=device)
        kw = dict(ref_embeddings=r, ref_labels=_labels(29, classes, device))
        inputs = (x, r)

    def ours(*t):
        return fastssl.supervised_nt_xent(t[0], labels, temperature=0.2, **dict(kw, **({"ref_embeddings": t[1]} if refs else {})))

    def ref(*t):
        return supervised_nt_xent_reference(t[0], labels, temperature=0.2, **dict(kw, **({"ref_embeddings": t[1]} if refs else {})))

    _check(ours, ref, inputs, dtype)


def test_supervised_nt_xent_without_normalize_and_edge_cases(backend, device):
    x = _feats(11, 24, device=device)
    labels = _labels(11, 3, device)
    _check(lambda a: fastssl.supervised_nt_xent(a, labels, temperature=2.0, normalize=False),
           lambda a: supervised_nt_xent_reference(a, labels, temperature=2.0, normalize=False), (x,), torch.float32)
    # pml's test_with_no_valid_pairs: one row, one class (no negatives: every pair's loss is exactly 0), all
    # different (no positive pair): 0 with a zero gradient
    for n, labels in ((1, [0]), (3, [0, 0, 0]), (3, [1, 2, 3])):
        x = _feats(n, 2, device=device)
        out = fastssl.supervised_nt_xent(x, torch.tensor(labels, device=device), temperature=0.1)
        (grad,) = _grads(out, (x,))
        assert out.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    bad = torch.randn(6, 4, device=device)
    bad[2, 1] = float("nan")
    assert fastssl.supervised_nt_xent(bad, torch.tensor([0, 0, 1, 1, 2, 2], device=device)).isnan()


def _sup_formulas(q, k, lq, lk, scale, symmetric, g_rows):
    """float64 per-row (loss sum, negatives' LSE, sigmoid sum) and the gradient of sum_a g_a loss_a for q
    (with the column side too when symmetric) and for k."""
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    kk = q64 if symmetric else k64
    s = scale * q64 @ kk.t()
    same = lq[:, None] == lk[None, :]
    pos = same.clone()
    if symmetric:
        pos.fill_diagonal_(False)
    neg = torch.logsumexp(s.masked_fill(same, float("-inf")), 1)
    x = neg[:, None] - s
    loss = torch.where(pos, F.softplus(x), 0.0).sum(1)
    wsum = torch.where(pos, torch.sigmoid(x), 0.0).sum(1)
    grads = torch.autograd.grad((loss * g_rows).sum(), (q64, k64), allow_unused=True)
    return loss.detach(), neg.detach(), wsum.detach(), grads


@pytest.mark.parametrize("n,m", [(37, 37), (48, 48), (33, 50), (20, 61)])
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "bfloat16-chunked", "refs"])
def test_sup_kernels_against_float64(device, monkeypatch, n, m, kind):
    """The label-masked kernels on the interpreter's 16 x 16 tiles (whole, band and partial tiles; the
    positives' pass over the sorted runs of keys): per-row loss sums, the negatives' LSE and sigmoid sums,
    and dq (anchors on the rows and on the columns: the symmetric one-pass gradient, or the references')."""
    if device != "cpu" or not kc.interpreting():
        pytest.skip("calls the launchers on CPU tensors: the interpreter's tiles")
    dtype = torch.bfloat16 if kind.startswith("bfloat16") else torch.float32
    if kind == "bfloat16-chunked":
        monkeypatch.setattr(kc, "MAX_BLOCK_D", 16)
    symmetric = kind != "refs"
    m = n if symmetric else m
    gen = torch.Generator().manual_seed(n * 1000 + m)
    q = (torch.randn(n, 20, generator=gen) / 3).to(dtype)
    k = q if symmetric else (torch.randn(m, 20, generator=gen) / 3).to(dtype)
    lq = torch.randint(0, 4, (n,), generator=gen)
    lk = lq if symmetric else torch.randint(0, 4, (m,), generator=gen)
    g = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    scale = torch.tensor([2.5])
    loss, neg, wsum, (dq, dk) = _sup_formulas(q, k, lq, lk, 2.5, symmetric, g)
    got = kc.supervised_forward(q, k, lq, lk, scale, symmetric)
    for a, b in zip(got, (loss, neg, wsum)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    stats = (neg.float(), wsum.float(), g.float())

    def close(got, ref):  # bf16: dS is rounded to bf16 for the product (2^-8 of the largest term)
        tol = 1e-4 if dtype == torch.float32 else 2e-2 * ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)

    close(kc.supervised_backward_rows(q, k, lq, lk, scale, stats, stats if symmetric else None,
                                      self_excluded=symmetric), dq)
    if not symmetric:
        close(kc.supervised_backward_rows(k, q, lk, lq, scale, None, stats, self_excluded=False), dk)


@pytest.mark.parametrize("scheme", ["kept", "one_block", "blocks"])
@pytest.mark.parametrize("refs", [False, True])
def test_supervised_torch_path_schemes(device, monkeypatch, scheme, refs):
    import fastssl.contrastive as fc

    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    n, m = 19, (23 if refs else 19)
    monkeypatch.setattr(fc, "KEEP_ELEMENTS", n * m - (scheme != "kept"))
    if scheme == "blocks":
        monkeypatch.setattr(fc, "CHUNK_ELEMENTS", 5 * m)
    d = dict(dtype=torch.float64, device=device)
    labels, ref_labels = _labels(n, 4, device), _labels(m, 4, device)
    if refs:
        inputs = (_feats(n, 12, **d), _feats(m, 12, **d))
        _check(lambda a, b: fastssl.supervised_nt_xent(a, labels, ref_embeddings=b, ref_labels=ref_labels),
               lambda a, b: supervised_nt_xent_reference(a, labels, ref_embeddings=b, ref_labels=ref_labels), inputs,
               torch.float64)
    else:
        _check(lambda a: fastssl.supervised_nt_xent(a, labels), lambda a: supervised_nt_xent_reference(a, labels),
               (_feats(n, 12, **d),), torch.float64)


def test_supervised_gradcheck(backend, device):
    d = dict(dtype=torch.float64, device=device)
    x, r = torch.randn(7, 6, **d, requires_grad=True), torch.randn(5, 6, **d, requires_grad=True)
    labels, ref_labels = torch.tensor([0, 1, 0, 2, 1, 1, 0], device=device), torch.tensor([1, 0, 0, 2, 1], device=device)
    assert torch.autograd.gradcheck(lambda a: fastssl.supervised_nt_xent(a, labels, temperature=0.5), (x,))
    assert torch.autograd.gradcheck(lambda a, b: fastssl.supervised_nt_xent(
        a, labels, temperature=0.5, ref_embeddings=b, ref_labels=ref_labels), (x, r))
    assert torch.autograd.gradcheck(lambda a: fastssl.supcon_loss(a, labels, temperature=0.5, reduction="none"), (x,))


@pytest.mark.parametrize("path", ["resident", "chunked"])
def test_supervised_gradcheck_through_the_fast_backward(device, monkeypatch, path):
    _fast_backward(device, monkeypatch, path)
    d = dict(dtype=torch.float64, device=device)
    x, r = torch.randn(21, 18, **d, requires_grad=True), torch.randn(19, 18, **d, requires_grad=True)
    labels, ref_labels = _labels(21, 3, device), _labels(19, 3, device)
    assert torch.autograd.gradcheck(lambda a: fastssl.supervised_nt_xent(a, labels, temperature=0.5), (x,),
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: fastssl.supervised_nt_xent(
        a, labels, temperature=0.5, ref_embeddings=b, ref_labels=ref_labels), (x, r), fast_mode=True)


@pytest.mark.parametrize("dtype", LOWP)
def test_supervised_low_precision_within_twice_pytorch_error(backend, device, dtype):
    x = _unit_rows(37, 20, dtype, device).requires_grad_()
    labels = _labels(37, 4, device)
    out = fastssl.supervised_nt_xent(x, labels, temperature=0.2, normalize=False)
    x64 = x.detach().double().requires_grad_()
    ref = supervised_nt_xent_reference(x64, labels, temperature=0.2, normalize=False)
    xlp = x.detach().requires_grad_()
    lowp = supervised_nt_xent_reference(xlp, labels, temperature=0.2, normalize=False, upcast=False)
    assert_close_lowp(out, ref, lowp)
    assert_close_lowp(_grads(out, (x,))[0], _grads(ref, (x64,))[0], _grads(lowp, (xlp,))[0])
    out = fastssl.supcon_loss(x, labels, temperature=0.2, normalize=False)
    ref = supcon_loss_reference(x64, labels, temperature=0.2, normalize=False)
    lowp = supcon_loss_reference(xlp, labels, temperature=0.2, normalize=False, upcast=False)
    assert_close_lowp(out, ref, lowp)
    assert_close_lowp(_grads(out, (x,))[0], _grads(ref, (x64,))[0], _grads(lowp, (xlp,))[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("views", [0, 2])
def test_supcon_loss_matches_reference(backend, device, dtype, reduction, views):
    shape = (19, views, 20) if views else (37, 20)
    x = _feats(*shape, dtype=dtype, device=device)
    labels = _labels(shape[0], 6, device)  # some rows without a positive when views == 0
    _check(lambda a: fastssl.supcon_loss(a, labels, temperature=0.3, reduction=reduction),
           lambda a: supcon_loss_reference(a, labels, temperature=0.3, reduction=reduction), (x,), dtype,
           reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [5, 1])
def test_supcon_without_positives_is_zero(backend, device, n, dtype):
    """Loss 0 and a zero gradient, as the reference; with one row its softmax has no entries at all (LSE
    -inf), whose gradient was exp(-inf - (-inf)) = NaN times 0 on both backends."""
    x = _feats(n, 3, dtype=dtype, device=device)
    out = fastssl.supcon_loss(x, torch.arange(n, device=device))
    assert out.item() == 0.0 and torch.equal(_grads(out, (x,))[0], torch.zeros_like(x))


@pytest.mark.skipif(not HAVE_PML, reason="pytorch-metric-learning is not installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("refs", [False, True])
def test_supervised_nt_xent_equals_pytorch_metric_learning(device, dtype, refs):
    """pml's NTXentLoss (default CosineSimilarity, MeanReducer) with labels, and with ref_emb / ref_labels,
    through our module in pml's call; its SupConLoss against supcon_loss (float32 and float64)."""
    from pytorch_metric_learning.losses import NTXentLoss, SupConLoss

    from fastssl.losses import SupervisedNTXentLoss

    x = torch.randn(23, 16, device=device).to(dtype).requires_grad_()
    labels = _labels(23, 5, device)
    kw = {}
    if refs:
        kw = dict(ref_emb=torch.randn(17, 16, device=device).to(dtype), ref_labels=_labels(17, 5, device))
    ours = SupervisedNTXentLoss(temperature=0.1)(x, labels, **kw)
    theirs = NTXentLoss(temperature=0.1)(x, labels, **kw)
    assert ours.dtype == theirs.dtype == dtype
    if dtype == torch.float16:  # pml computes in float16: both against float64, ours within twice its error
        x64 = x.detach().double().requires_grad_()
        ref = supervised_nt_xent_reference(x64, labels, temperature=0.1, ref_embeddings=kw.get("ref_emb"),
                                           ref_labels=kw.get("ref_labels"))
        assert_close_lowp(ours, ref, theirs, atol=1e-3)
        assert_close_lowp(_grads(ours, (x,))[0], _grads(ref, (x64,))[0], _grads(theirs, (x,))[0], atol=1e-3)
        return
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grads(ours, (x,))[0], _grads(theirs, (x,))[0], rtol=1e-4, atol=1e-6)
    if dtype != torch.float16 and not refs:
        ours, theirs = fastssl.supcon_loss(x, labels, temperature=0.1), SupConLoss(temperature=0.1)(x, labels)
        torch.testing.assert_close(ours.to(dtype), theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_grads(ours, (x,))[0], _grads(theirs, (x,))[0], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# grad_cache
# ----------------------------------------------------------------------------------------------------

def _encoder(dropout=0.2, width=64):
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(12, width), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(width, width), torch.nn.Dropout(dropout), torch.nn.Linear(width, 8))


def _param_grads(module):
    out = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return out


def _clip_with_scale(scale):
    return lambda a, b: fastssl.clip_loss(a, b, scale.exp())


def test_grad_cache_equals_the_plain_backward_with_dropout():
    """Dropout inside the encoder: grad_cache's parameter (and loss-parameter) gradients equal the plain
    backward through the same chunks in the same order (the RNG state of each chunk replayed in the second
    pass); the global RNG state afterwards is the plain forward's; the loss is the plain loss, detached."""
    x1, x2 = torch.randn(37, 12), torch.randn(37, 12)
    encoder = _encoder()
    scale = torch.tensor(2.0, requires_grad=True)
    torch.manual_seed(7)
    plain = _clip_with_scale(scale)(*(torch.cat([encoder(c) for c in x.split(5)]) for x in (x1, x2)))
    plain.backward()
    expected, expected_scale, state = _param_grads(encoder), scale.grad.clone(), torch.get_rng_state()
    scale.grad = None
    torch.manual_seed(7)
    loss = fastssl.grad_cache(encoder, (x1, x2), _clip_with_scale(scale), chunk_size=5)
    assert not loss.requires_grad and torch.equal(loss, plain.detach())
    assert torch.equal(torch.get_rng_state(), state)
    for g, r in zip(_param_grads(encoder), expected):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scale.grad, expected_scale)


def test_grad_cache_with_a_view_the_loss_does_not_use():
    """A loss that detaches one view (a stop-gradient target) gives that view no gradient: grad_cache
    re-runs only the views that have one, and equals the plain backward."""
    gen = torch.Generator().manual_seed(11)
    x1, x2 = torch.randn(12, 12, generator=gen), torch.randn(12, 12, generator=gen)
    encoder = _encoder(dropout=0.0)
    loss_fn = lambda a, b: fastssl.info_nce(a, b.detach())  # noqa: E731
    loss_fn(*(torch.cat([encoder(c) for c in x.split(5)]) for x in (x1, x2))).backward()  # grad_cache's chunks
    expected = _param_grads(encoder)
    fastssl.grad_cache(encoder, (x1, x2), loss_fn, chunk_size=5)
    for g, r in zip(_param_grads(encoder), expected):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk", [10, 4])
def test_grad_cache_inputs_with_a_graph(chunk):
    """Inputs that carry a graph (a learnable transform before the encoder; one tensor as both views) get
    the plain backward's gradients, also split into several chunks (the second chunk's backward through
    the input's freed graph raised)."""
    x = torch.randn(10, 8, dtype=torch.float64)
    encoder = torch.nn.Linear(8, 4).double()
    loss_fn = lambda a, b, c: fastssl.nt_xent(a, b, temperature=0.3) + fastssl.info_nce(c, a)  # noqa: E731
    w = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    y = x @ w
    loss_fn(encoder(y), encoder(x), encoder(y)).backward()
    expected = (w.grad.clone(), *_param_grads(encoder))
    w.grad = None
    y = x @ w
    fastssl.grad_cache(encoder, (y, x, y), loss_fn, chunk_size=chunk)
    for g, r in zip((w.grad, *_param_grads(encoder)), expected):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dropout, chunk", [(0.0, 5), (0.3, 64)])
def test_grad_cache_equals_the_full_batch_backward(dropout, chunk):
    """Against loss_fn(*map(encoder, inputs)).backward() on the whole batch: exact where the encoder draws
    no random numbers, or one chunk holds the batch (its draws are the whole batch's)."""
    x1, x2 = torch.randn(37, 12), torch.randn(37, 12)
    encoder = _encoder(dropout)
    torch.manual_seed(3)
    fastssl.nt_xent(encoder(x1), encoder(x2), temperature=0.3).backward()
    expected = _param_grads(encoder)
    torch.manual_seed(3)
    fastssl.grad_cache(encoder, (x1, x2), lambda a, b: fastssl.nt_xent(a, b, temperature=0.3), chunk_size=chunk)
    for g, r in zip(_param_grads(encoder), expected):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def _peak_saved_bytes(fn):
    """The most bytes autograd held saved for backward at once while ``fn`` ran (every saved tensor counted
    from its pack until its graph is freed): the encoder's activation memory."""
    import weakref

    live, peak = [0], [0]

    class Saved:
        def __init__(self, t):
            self.t, self.size = t, t.numel() * t.element_size()
            live[0] += self.size
            peak[0] = max(peak[0], live[0])
            weakref.finalize(self, lambda n=self.size: live.__setitem__(0, live[0] - n))

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t):
        fn()
    return peak[0]


def test_grad_cache_peak_activation_memory_is_one_chunks():
    """Measured: the bytes autograd saves at once with grad_cache in chunks of 64 rows of a 1536-row batch
    (two views) are a small fraction of the plain backward's, which holds the whole batch's activations (the
    fused loss itself saves O(N * D) at 2N = 3072, past the PyTorch path's kept-scores budget)."""
    x = torch.randn(1536, 12)
    encoder = _encoder(0.1, width=256)
    loss_fn = lambda a, b: fastssl.nt_xent(a, b, temperature=0.2)  # noqa: E731
    plain = _peak_saved_bytes(lambda: loss_fn(encoder(x), encoder(x + 0.1)).backward())
    cached = _peak_saved_bytes(lambda: fastssl.grad_cache(encoder, (x, x + 0.1), loss_fn, chunk_size=64))
    print(f"peak saved activations: plain {plain / 2**20:.2f} MiB, grad_cache(chunk 64) {cached / 2**20:.2f} MiB")
    assert cached <= plain / 8


@pytest.mark.parametrize("call, error, match", [
    (lambda: fastssl.grad_cache(None, torch.randn(4, 3), fastssl.nt_xent, chunk_size=2), TypeError, "encoder must be callable"),
    (lambda: fastssl.grad_cache(torch.nn.Linear(3, 2), torch.randn(4, 3), fastssl.nt_xent, chunk_size=0), ValueError, "chunk_size must be an int >= 1"),
    (lambda: fastssl.grad_cache(torch.nn.Linear(3, 2), [torch.randn(4, 3), [1.0]], fastssl.nt_xent, chunk_size=2), TypeError, r"inputs\[1\] must be a torch.Tensor"),
    (lambda: fastssl.grad_cache(torch.nn.Linear(3, 2), (), fastssl.nt_xent, chunk_size=2), ValueError, "inputs is empty"),
    (lambda: fastssl.grad_cache(torch.nn.Linear(3, 2), torch.randn(4, 3), lambda a: a, chunk_size=2), ValueError, "loss_fn must return a scalar tensor"),
])
def test_grad_cache_rejects_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_double_backward_is_refused_naming_the_op(backend, device):
    """create_graph=True through a contrastive loss's fused backward: a RuntimeError naming the op (the
    kernels' backward is not differentiable, and the small NT-Xent's hand-written backward would give a
    silently wrong second derivative); the first derivative as before."""
    x, y = (_feats(6, 8, dtype=torch.float64, device=device).requires_grad_() for _ in range(2))
    labels = torch.tensor([0, 1, 0, 2, 1, 0], device=device)
    scale, bias = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    for call, name in ((lambda: fastssl.nt_xent(x, y), "fastssl.nt_xent|contrastive LSE"),
                       (lambda: fastssl.info_nce(x, y), "contrastive LSE"),
                       (lambda: fastssl.clip_loss(x, y, scale), "contrastive LSE"),
                       (lambda: fastssl.moco_loss(x, y, y.detach()), "contrastive LSE"),
                       (lambda: fastssl.siglip_loss(x, y, scale, bias), "fastssl.siglip_loss"),
                       (lambda: fastssl.supervised_nt_xent(x, labels), "fastssl.supervised_nt_xent"),
                       (lambda: fastssl.supcon_loss(x, labels), "contrastive LSE")):
        with pytest.raises(RuntimeError, match=f"({name}).* has no double backward"):
            torch.autograd.grad(call(), x, create_graph=True)
        (grad,) = torch.autograd.grad(call(), x)
        assert grad.isfinite().all() and grad.abs().sum() > 0



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradients_at_a_tiny_temperature(backend, device, dtype, tensor_core_dot):
    """InfoNCE, NT-Xent, CLIP and MoCo at T = 1e-6 (scores ~1e6, P one-hot): every input's gradient within 4
    eps (fp16 0.4%, bf16 3.1%) of its largest entry of the float64 reference on both backends (the PyTorch
    path is 0.03-0.2% off in fp16). At that scale one fp32 rounding of a score (ulp 0.06) moves P's winner
    by 6%, so the backward must recompute exp(s - lse) exactly as the forward summed it: the kernels keep
    each row's (max, log-sum) pair, not one rounded LSE (that LSE gave 1.5-3%, issue 16 item 8), and a
    gradient through the transposed scores (the keys', NT-Xent's and CLIP's column terms) recomputes s_ji
    with the operands swapped, which a tensor core rounds as s_ij (``tensor_core_dot``; under the
    interpreter's BLAS the swap alone cost 2-5%)."""
    gen = torch.Generator().manual_seed(3)
    t = 1e-6
    cases = ((fastssl.info_nce, info_nce_reference, {"temperature": t}, 2),
             (fastssl.nt_xent, nt_xent_reference, {"temperature": t}, 2),
             (lambda a, b: fastssl.clip_loss(a, b, 1 / t), lambda a, b: clip_loss_reference(a, b, 1 / t), {}, 2),
             (fastssl.moco_loss, moco_loss_reference, {"temperature": t}, 1))  # key and queue: no gradient
    for _ in range(3):
        q, k = (torch.randn(32, 16, generator=gen).to(dtype).to(device) for _ in range(2))
        queue = torch.randn(40, 16, generator=gen).to(dtype).to(device)
        for loss, ref, opts, n_grad in cases:
            extra = (queue,) if loss is fastssl.moco_loss else ()
            ours = [x.clone().requires_grad_(i < n_grad) for i, x in enumerate((q, k, *extra))]
            wide = [x.double().requires_grad_(i < n_grad) for i, x in enumerate((q, k, *extra))]
            grads = torch.autograd.grad(loss(*ours, **opts), ours[:n_grad])
            refs = torch.autograd.grad(ref(*wide, **opts), wide[:n_grad])
            for g, r in zip(grads, refs):
                err = (g.double() - r).abs().max() / r.abs().max()
                assert err <= 4 * torch.finfo(dtype).eps, (loss, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["info_nce", "info_nce_targets", "nt_xent", "clip_loss", "moco_loss",
                                  "supcon_loss"])
def test_gradient_of_a_nearly_converged_loss(backend, device, dtype, name, tensor_core_dot):
    """Each positive close to its anchor (loss ~1e-3, P_ii ~ 0.999): the gradient (P_ij - [j = i]) k_j / T
    is the small difference of the LSE's term and the positive's, each ~|k| / T. Every input's gradient
    within 2x eager PyTorch's error (flash-attention's rule; norm-wise against float64), and within 0.5%
    (fp16) and 1% (bf16) on the PyTorch path, twice that on the Triton path: InfoNCE, NT-Xent and CLIP put
    each positive's weight into the kernels' dS before its bf16/fp16 rounding for the tensor-core product
    (``_lse_and_positives``), InfoNCE's explicit targets (here a permutation) and SupCon's label-mates too,
    by comparing labels (``_lse_and_mates``); MoCo's positive is outside the LSE. Measured 0.02-0.5%
    (torch), 0.2-0.7% (Triton) where eager is 1.4-22%. Rounded first and added after, the Triton bf16
    gradients were 12-31% off (a P_ii of 0.999 moves by up to 1 - P_ii in bf16), and before that (autograd
    summing an input's gradients in its dtype) both paths 16% in fp16 and 90-140% in bf16."""
    gen = torch.Generator().manual_seed(5)
    n, d = 48, 32
    anchor = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    close = F.normalize(anchor + 0.03 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(40, d, generator=gen, dtype=torch.float64), dim=1).to(dtype).to(device)
    labels = torch.arange(n, device=device) % (n // 2)  # supcon: the rows i and i + n/2 share a label
    order = torch.randperm(n, generator=gen)
    targets = torch.argsort(order).to(device)  # key order[t] is row t's positive
    losses = {"info_nce": lambda a, b, ref, up: (info_nce_reference(a, b, temperature=0.07, upcast=up) if ref
                                                 else fastssl.info_nce(a, b, temperature=0.07)),
              "info_nce_targets": lambda a, b, ref, up: (
                  info_nce_reference(a, b[order], targets, temperature=0.07, upcast=up) if ref
                  else fastssl.info_nce(a, b[order], targets, temperature=0.07)),
              "nt_xent": lambda a, b, ref, up: (nt_xent_reference(a, b, temperature=0.07, upcast=up) if ref
                                                else fastssl.nt_xent(a, b, temperature=0.07)),
              "clip_loss": lambda a, b, ref, up: (clip_loss_reference(a, b, 1 / 0.07, upcast=up) if ref
                                                  else fastssl.clip_loss(a, b, 1 / 0.07)),
              "moco_loss": lambda a, b, ref, up: (moco_loss_reference(a, b, queue.to(a.dtype), temperature=0.07,
                                                                      upcast=up) if ref
                                                  else fastssl.moco_loss(a, b, queue, temperature=0.07)),
              "supcon_loss": lambda a, b, ref, up: (supcon_loss_reference(torch.cat((a, b)), labels,
                                                                          temperature=0.07, upcast=up) if ref
                                                    else fastssl.supcon_loss(torch.cat((a, b)), labels,
                                                                             temperature=0.07))}
    loss = losses[name]
    n_grad = 1 if name == "moco_loss" else 2  # MoCo's key: no gradient
    if name == "supcon_loss":
        anchor, close = anchor[: n // 2], close[: n // 2]
    inputs = [x.to(dtype).to(device) for x in (anchor, close)]

    def grads(xs, ref, up=False):
        xs = [x.clone().requires_grad_(i < n_grad) for i, x in enumerate(xs)]
        return torch.autograd.grad(loss(*xs, ref, up), xs[:n_grad])

    exact = grads([x.double() for x in inputs], True, True)
    for g, r, e in zip(grads(inputs, False), exact, grads(inputs, True)):
        err, eager_err = ((t.double() - r).norm() / r.norm() for t in (g, e))
        assert err <= 2 * eager_err, (err, eager_err)
        assert err <= (0.005 if dtype == torch.float16 else 0.01) * (1 if backend == "torch" else 2), err
