"""Propagation slice: the kernels (interpreted) and the tiled PyTorch path against the dense float64
reference, gradients, top-k, the colorization loss against its one-hot form, video label propagation
on a synthetic moving texture, NaN, torch.compile and every validation error."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastssl
from conftest import assert_close, assert_close_lowp
from fastssl.propagation import (color_propagate_reference, colorization_loss_reference,
                                 propagate_labels_reference, propagate_step)


def inputs(device, dtype=torch.float64, B=2, R=2, C=5, V=3, H=5, W=7, grad=True):
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return make(B, C, H, W), make(B, R, C, H, W), make(B, R, V, H, W)


def grads_of(out, tensors, grad_out):
    return torch.autograd.grad(out, tensors, grad_out)


def grad_atol(reference, dtype):
    """Low-precision gradients: the kernels round dS (and P) to the input dtype for the tensor-core
    products, as FlashAttention does; dQ/dK sum such terms with cancellation, so their error scales with
    the largest gradient, not each element. Measured on 60 seeds x 3 dtypes x both backends: at most
    3.8 eps x max|grad| beyond 2x PyTorch's own error; allowed: 6 eps x max|grad|. A wrong gradient
    is off by O(max|grad|) = 1/eps (128 for bf16) times more."""
    return 6 * torch.finfo(dtype).eps * reference.abs().max().item()


# ----------------------------------------------------------------------------------------------------
# color_propagate: forward and gradients against the dense reference
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("R, V, radius", [
    (1, 1, None), (2, 3, None), (3, 2, 1.5), (2, 3, 0), (2, 17, 2.2),  # V=17: two chunks of 16 in the kernels
])
def test_color_propagate_matches_reference(backend, device, R, V, radius):
    tf, rf, rv = inputs(device, R=R, V=V)
    out = fastssl.color_propagate(tf, rf, rv, temperature=0.7, radius=radius)
    ref = color_propagate_reference(tf, rf, rv, temperature=0.7, radius=radius)
    assert out.shape == (2, V, 5, 7) and out.dtype == torch.float64
    assert_close(out, ref, scale=10)
    grad_out = torch.randn_like(out)  # not all ones
    for ours, theirs in zip(grads_of(out, (tf, rf, rv), grad_out), grads_of(ref, (tf, rf, rv), grad_out)):
        assert_close(ours, theirs, scale=100)


def test_color_propagate_radius_windows_span_tiles(backend, device):
    """A frame larger than the kernels' tiles (143 pixels > 64): several query tiles, each visiting only
    its window's key rows; every key tile of the dK/dV kernel sees only its window's queries."""
    tf, rf, rv = inputs(device, B=1, R=2, C=4, V=2, H=11, W=13)
    for radius in (2.2, None):
        out = fastssl.color_propagate(tf, rf, rv, temperature=0.5, radius=radius)
        ref = color_propagate_reference(tf, rf, rv, temperature=0.5, radius=radius)
        assert_close(out, ref, scale=10)
        grad_out = torch.randn_like(out)
        for ours, theirs in zip(grads_of(out, (tf, rf, rv), grad_out), grads_of(ref, (tf, rf, rv), grad_out)):
            assert_close(ours, theirs, scale=100)


@pytest.mark.parametrize("C", [5, 20])  # 20: over the interpreter's resident block of 16, chunked kernels
def test_kernels_pick_dense_and_windowed_variants(device, monkeypatch, C):
    """The launchers compile the window arithmetic in only where a frame is local (WINDOWED), keep the query
    tile resident where C fits (C_LOOP off), and each variant matches the reference, fwd and bwd."""
    from fastssl.kernels import propagation as kernels

    monkeypatch.setenv("FASTSSL_BACKEND", "triton")
    seen = []
    real = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda kernel, grid, **kw: (seen.append((kw["WINDOWED"], kw["C_LOOP"])),
                                                                       real(kernel, grid, **kw))[1])
    tf, rf, rv = inputs(device, B=1, C=C, H=4, W=6, dtype=torch.float32)
    for radius in (None, 1.5):
        seen.clear()
        out = fastssl.color_propagate(tf, rf, rv, temperature=0.5, radius=radius)
        ref = color_propagate_reference(tf, rf, rv, temperature=0.5, radius=radius)
        assert_close(out, ref, torch.float32, scale=10)
        grad_out = torch.randn_like(out)
        for ours, theirs in zip(grads_of(out, (tf, rf, rv), grad_out), grads_of(ref, (tf, rf, rv), grad_out)):
            assert_close(ours, theirs, torch.float32, scale=100)
        chunked = C > 16
        assert seen == [(radius is not None or chunked, chunked)] * 3  # forward, dQ, dK/dV


def test_radius_restricts_attention(backend, device):
    """radius=0 with one reference frame copies the co-located value exactly (the only key in reach)."""
    tf, rf, rv = inputs(device, R=1, grad=False)
    out = fastssl.color_propagate(tf, rf, rv, radius=0.5)
    assert_close(out, rv[:, 0])


@pytest.mark.parametrize("dtype, topk", [(torch.float64, None), (torch.float32, None), (torch.float32, 4)])
def test_radius_test_is_exact(backend, device, dtype, topk):
    """Equal logits on a 2x2 map: pixel (0, 0) averages the values of the keys within the radius, tested
    exactly (dy^2 + dx^2 <= radius^2 in integers): radii just under 1 and just under sqrt(2) leave out the
    keys at 1 and sqrt(2), which rounding radius^2 (to float32) let in."""
    tf = torch.zeros(1, 1, 2, 2, device=device, dtype=dtype)
    rv = torch.arange(4.0, device=device, dtype=dtype).reshape(1, 1, 1, 2, 2)  # (0, 0): 0, (0, 1): 1, (1, 0): 2
    for radius, mean in ((1 - 1e-9, 0.0), (1.0, 1.0), (math.nextafter(math.sqrt(2), 0), 1.0), (math.sqrt(2), 1.5)):
        out = fastssl.color_propagate(tf, tf[:, None], rv, radius=radius, topk=topk)
        ref = color_propagate_reference(tf, tf[:, None], rv, radius=radius, topk=topk)
        assert out[0, 0, 0, 0].item() == ref[0, 0, 0, 0].item() == mean, radius


@pytest.mark.parametrize("radius", [2147483646.0, 1e30])
def test_radius_covering_the_frame_equals_none(backend, device, radius):
    """A radius past int32 (the kernels' windows once wrapped: NaN, wrong values or an OverflowError)
    covers the frame: the same output and gradients as radius=None, also in top-k, the colorization loss and
    propagate_labels."""
    tf, rf, rv = inputs(device, torch.float32, H=3, W=4)
    grad_out = torch.randn(2, 3, 3, 4, device=device)
    out = fastssl.color_propagate(tf, rf, rv, radius=radius)
    assert_close(out, color_propagate_reference(tf, rf, rv))
    for ours, ref in zip(grads_of(out, (tf, rf, rv), grad_out),
                         grads_of(fastssl.color_propagate(tf, rf, rv), (tf, rf, rv), grad_out)):
        assert_close(ours, ref.double(), scale=10)
    assert_close(fastssl.color_propagate(tf, rf, rv, radius=radius, topk=3),
                 color_propagate_reference(tf, rf, rv, topk=3))
    ref_labels = torch.randint(0, 3, (2, 2, 3, 4), device=device)
    target_labels = torch.randint(0, 3, (2, 3, 4), device=device)
    assert_close(fastssl.colorization_loss(tf, rf, ref_labels, target_labels, 3, radius=radius),
                 colorization_loss_reference(tf, rf, ref_labels, target_labels, 3))
    feats, first = F.normalize(torch.randn(3, 4, 3, 4, device=device), dim=1), torch.rand(2, 3, 4, device=device)
    assert_close(fastssl.propagate_labels(feats, first, context=2, radius=radius, topk=3, temperature=0.2),
                 propagate_labels_reference(feats, first, context=2, radius=None, topk=3, temperature=0.2))


def test_kernel_radius_arguments():
    """What the launchers pass the kernels: rr = floor(radius) and rad2 = floor(radius^2) as exact ints,
    rad2 = int32 max where the disk covers the map (clamped distances: no int32 overflow), and a clear
    error for the one radius that int32 cannot test (>= 32767 pixels on a wider map it does not cover)."""
    from fastssl.kernels.propagation import I32_MAX, _geometry

    def geo(radius, H, W):
        q, k = torch.empty(1, 2, H, W, device="meta"), torch.empty(1, 1, 2, H, W, device="meta")
        g = _geometry(q, k, k[:, :0], radius)
        return g["rr"], g["rad2"]
    assert geo(1 - 1e-9, 5, 7) == (0, 0) and geo(2.5, 5, 7) == (2, 6) and geo(None, 5, 7) == (0, 0)
    assert geo(2147483646.0, 5, 7) == geo(1e30, 5, 7) == geo(7.3, 5, 7) == (7, I32_MAX)  # 4^2 + 6^2 = 52 < 7.3^2
    assert geo(7.2, 5, 7) == (7, 51)
    assert geo(5.0, 1, 40000) == (5, 25) and geo(1e9, 1, 40000) == (39999, I32_MAX)
    with pytest.raises(ValueError, match=r"radius 32767.0 on a 1 x 40000 map"):
        geo(32767.0, 1, 40000)


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0)])
def test_empty_batch_or_frame_gives_empty_result(backend, device, shape):
    """B, H or W = 0: the empty (B, V, H, W) output and empty gradients on both backends, with or without a
    radius or top-k (the PyTorch path once failed in a reshape or a range() of step 0)."""
    B, C, H, W = shape
    tf, rf, rv = inputs(device, torch.float32, B=B, C=C, H=H, W=W)
    for radius in (None, 1.0):
        out = fastssl.color_propagate(tf, rf, rv, radius=radius)
        assert out.shape == (B, 3, H, W)
        grads = torch.autograd.grad(out.sum(), (tf, rf, rv), allow_unused=True)
        assert [g.shape for g in grads] == [t.shape for t in (tf, rf, rv)]
        if B == 0:
            assert fastssl.color_propagate(tf, rf, rv, radius=radius, topk=2).shape == (0, 3, H, W)
    feats, first = torch.randn(3, C, H, W, device=device), torch.rand(2, H, W, device=device)
    assert fastssl.propagate_labels(feats, first, radius=1.0, topk=None).shape == (3, 2, H, W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_color_propagate_low_precision(backend, device, dtype):
    tf, rf, rv = inputs(device, dtype=dtype, C=8, V=3)
    out = fastssl.color_propagate(tf, rf, rv, temperature=2.0, radius=2.5)
    assert out.dtype == dtype
    grad_out = torch.randn_like(out)
    ref = color_propagate_reference(tf, rf, rv, temperature=2.0, radius=2.5)
    lowp = color_propagate_reference(tf, rf, rv, temperature=2.0, radius=2.5, upcast=False)
    assert_close_lowp(out, ref, lowp)
    ours, theirs, plain = (grads_of(o, (tf, rf, rv), grad_out) for o in (out, ref, lowp))
    for a, b, c in zip(ours, theirs, plain):
        assert_close_lowp(a, b, c, atol=grad_atol(b, dtype))


def test_color_propagate_gradcheck(backend, device):
    tf, rf, rv = inputs(device, B=1, R=2, C=3, V=2, H=3, W=4)
    for radius in (None, 1.0):
        fn = lambda a, b, c: fastssl.color_propagate(a, b, c, temperature=0.9, radius=radius)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (tf, rf, rv), fast_mode=True)


def test_color_propagate_non_contiguous(backend, device):
    tf, rf, rv = inputs(device, grad=False)
    tf_t = tf.transpose(2, 3).contiguous().transpose(2, 3)
    rv_t = rv.transpose(1, 2).contiguous().transpose(1, 2)
    assert not tf_t.is_contiguous() and not rv_t.is_contiguous()
    assert_close(fastssl.color_propagate(tf_t, rf, rv_t, radius=2), color_propagate_reference(tf, rf, rv, radius=2))


def test_color_propagate_nan_propagates(backend, device):
    tf, rf, rv = inputs(device, dtype=torch.float32, grad=False)
    tf[1, 2, 3, 4] = float("nan")
    out = fastssl.color_propagate(tf, rf, rv)
    assert out[1, :, 3, 4].isnan().all()
    assert not out[0].isnan().any() and out[1].isnan().sum() == out.shape[1]


# ----------------------------------------------------------------------------------------------------
# top-k
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("topk, radius, R", [(4, None, 2), (7, 1.5, 3), (3, 0, 2)])  # (3, 0): k > keys in reach
def test_topk_matches_dense_topk(backend, device, topk, radius, R):
    tf, rf, rv = inputs(device, R=R, grad=False)
    out = fastssl.color_propagate(tf, rf, rv, temperature=0.3, radius=radius, topk=topk)
    assert_close(out, color_propagate_reference(tf, rf, rv, temperature=0.3, radius=radius, topk=topk))
    full = fastssl.color_propagate(tf, rf, rv, temperature=0.3, radius=radius, topk=R * 35)  # every key: no top-k
    assert_close(full, color_propagate_reference(tf, rf, rv, temperature=0.3, radius=radius), scale=10)


@pytest.mark.parametrize("dtype, topk, radius", [(torch.float32, 4, 1.5), (torch.bfloat16, 7, None)])
def test_topk_kernel_matches_dense_topk(backend, device, dtype, topk, radius):
    """fp32/bf16 with k <= 32: the streaming top-k kernel on the triton backend (float64 and the CPU
    default run the PyTorch path, tested above)."""
    tf, rf, rv = inputs(device, dtype=dtype, B=1, grad=False)
    out = fastssl.color_propagate(tf, rf, rv, temperature=0.3, radius=radius, topk=topk)
    ref = color_propagate_reference(tf, rf, rv, temperature=0.3, radius=radius, topk=topk)
    lowp = color_propagate_reference(tf, rf, rv, temperature=0.3, radius=radius, topk=topk, upcast=False)
    assert out.dtype == dtype
    if dtype == torch.bfloat16:
        assert_close_lowp(out, ref, lowp)
    else:
        assert_close(out, ref, scale=10)


def ordered_topk_reference(tf, rf, rv, *, temperature, radius, topk, num_local=None, larger_id_wins=False):
    """The dense float64 top-k formula with the tie rule spelled out: per query the keys in (frame, raster
    pixel) order, sorted by logit with a stable sort (equal logits: the smaller key id first), the first k.
    ``larger_id_wins``: the opposite rule (the kernel's before 2026-12-07), to show that the rule matters."""
    from fastssl.propagation import propagation_logits_reference

    B, V, H, W = rv.shape[0], rv.shape[2], rv.shape[3], rv.shape[4]
    logits = propagation_logits_reference(tf, rf, temperature=temperature, radius=radius, num_local=num_local)
    if larger_id_wins:
        n = logits.shape[-1]
        idx = n - 1 - torch.sort(logits.flip(-1), dim=-1, descending=True, stable=True).indices[..., :topk]
    else:
        idx = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :topk]
    values = rv.double().permute(0, 1, 3, 4, 2).reshape(B, -1, V)
    picked = values.gather(1, idx.reshape(B, -1, 1).expand(-1, -1, V)).reshape(B, H * W, topk, V)
    out = (torch.softmax(logits.gather(-1, idx), -1)[..., None] * picked).sum(2)
    return out.transpose(1, 2).reshape(B, V, H, W)


def tied_inputs(device, dtype, B=1, R=2, C=4, V=2, H=5, W=7, patterns=2):
    """Features drawn from ``patterns`` fixed vectors of small integers: every logit is one of a few values,
    exact in any summation order and precision (tf32 included), so most top-k boundaries are exact ties;
    values distinct, so a different choice among tied keys changes the output."""
    basis = torch.tensor([[1, 0, 2, -1], [0, 1, -1, 2], [2, 1, 0, 0]], device=device, dtype=dtype)[:patterns, :C]
    pick = lambda *shape: basis[torch.randint(0, patterns, shape, device=device)].movedim(-1, -3)  # noqa: E731
    return pick(B, H, W), pick(B, R, H, W), torch.randn(B, R, V, H, W, device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("topk, radius", [(1, None), (5, 1.5), (17, None), (32, None), (10, 2.5)])
def test_topk_tie_rule(backend, device, dtype, topk, radius):
    """Equal logits: the smaller key id (frame * H * W + raster pixel) wins, on both backends (the kernel:
    float32 with k <= 32 under the triton backend; float64 the PyTorch path everywhere)."""
    tf, rf, rv = tied_inputs(device, dtype)
    out = fastssl.color_propagate(tf, rf, rv, temperature=0.5, radius=radius, topk=topk)
    ref = ordered_topk_reference(tf, rf, rv, temperature=0.5, radius=radius, topk=topk)
    assert_close(out, ref, scale=10)
    other = ordered_topk_reference(tf, rf, rv, temperature=0.5, radius=radius, topk=topk, larger_id_wins=True)
    assert (other - ref).abs().max() > 1e-3  # the test could fail: the other rule gives other outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_tie_rule_across_groups(backend, device, dtype):
    """A CRW step (local context frames within the radius, then a global memory frame): ties between the
    groups go to the local frames (their ids come first), within a group to the smaller id."""
    tf, rf, rv = tied_inputs(device, dtype, R=3, H=6, W=9)
    out = propagate_step(tf, rf[:, :2], rv[:, :2], rf[:, 2:], rv[:, 2:], temperature=0.5, radius=2, topk=6)
    ref = ordered_topk_reference(tf, rf, rv, temperature=0.5, radius=2, topk=6, num_local=2)
    assert_close(out, ref, scale=10)
    other = ordered_topk_reference(tf, rf, rv, temperature=0.5, radius=2, topk=6, num_local=2, larger_id_wins=True)
    assert (other - ref).abs().max() > 1e-3


@pytest.mark.parametrize("topk", [1, 3])
def test_topk_skipped_tiles_keep_the_result(backend, device, topk):
    """The first frame holds each query's best keys (its own features, scaled up), so nearly every later key
    tile has no key above its queries' k-th and is skipped by the kernel; the result is unchanged."""
    tf, rf, rv = inputs(device, dtype=torch.float32, B=1, R=3, C=6, H=9, W=11, grad=False)
    rf[:, 0] = 4 * tf
    for radius in (None, 2.0):
        out = fastssl.color_propagate(tf, rf, rv, temperature=0.3, radius=radius, topk=topk)
        assert_close(out, color_propagate_reference(tf, rf, rv, temperature=0.3, radius=radius, topk=topk), scale=10)


def test_topk_output_has_no_gradient(device):
    tf, rf, rv = inputs(device)
    assert not fastssl.color_propagate(tf, rf, rv, topk=2).requires_grad


# ----------------------------------------------------------------------------------------------------
# colorization_loss
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("radius, eps", [(None, 1e-8), (1.0, 1e-3), (1.5, 0.3)])  # small disks: absent classes
def test_colorization_loss_matches_one_hot(backend, device, radius, eps):
    tf, rf, _ = inputs(device, R=2)
    K = 4
    ref_labels = torch.randint(0, K, (2, 2, 5, 7), device=device)
    target_labels = torch.randint(0, K, (2, 5, 7), device=device)
    loss = fastssl.colorization_loss(tf, rf, ref_labels, target_labels, K, temperature=0.4, radius=radius, eps=eps)
    ref = colorization_loss_reference(tf, rf, ref_labels, target_labels, K, temperature=0.4, radius=radius, eps=eps)
    assert loss.dim() == 0 and loss.dtype == torch.float64
    assert_close(loss, ref, scale=10)
    scale = 2.5  # not 1: the upstream gradient must be used
    for ours, theirs in zip(grads_of(loss * scale, (tf, rf), None), grads_of(ref * scale, (tf, rf), None)):
        assert_close(ours, theirs, scale=100)


def test_colorization_loss_clamped_pixels_have_no_gradient(backend, device):
    """A target class that no reference pixel has: p_y = 0 < eps, the loss is -log(eps), no gradient."""
    tf, rf, _ = inputs(device, B=1, R=1)
    ref_labels = torch.zeros(1, 1, 5, 7, dtype=torch.long, device=device)
    target_labels = torch.ones(1, 5, 7, dtype=torch.long, device=device)
    loss = fastssl.colorization_loss(tf, rf, ref_labels, target_labels, 2, eps=1e-6)
    assert_close(loss, torch.tensor(-math.log(1e-6), dtype=torch.float64))
    g_tf, g_rf = grads_of(loss, (tf, rf), None)
    assert g_tf.abs().max() == 0 and g_rf.abs().max() == 0


def test_colorization_loss_low_precision(backend, device):
    tf, rf, _ = inputs(device, dtype=torch.bfloat16, C=8)
    ref_labels = torch.randint(0, 3, (2, 2, 5, 7), device=device, dtype=torch.int32)
    target_labels = torch.randint(0, 3, (2, 5, 7), device=device)
    loss = fastssl.colorization_loss(tf, rf, ref_labels, target_labels, 3, temperature=2.0, radius=2)
    assert loss.dtype == torch.float32
    ref = colorization_loss_reference(tf, rf, ref_labels, target_labels, 3, temperature=2.0, radius=2)
    lowp = colorization_loss_reference(tf, rf, ref_labels, target_labels, 3, temperature=2.0, radius=2, upcast=False)
    assert_close_lowp(loss, ref, lowp)
    for a, b, c in zip(*(grads_of(x, (tf, rf), None) for x in (loss, ref, lowp))):
        assert_close_lowp(a, b, c, atol=grad_atol(b, torch.bfloat16))


def test_colorization_loss_gradcheck(backend, device):
    tf, rf, _ = inputs(device, B=1, R=2, C=3, H=3, W=4)
    ref_labels = torch.randint(0, 3, (1, 2, 3, 4), device=device)
    target_labels = torch.randint(0, 3, (1, 3, 4), device=device)
    fn = lambda a, b: fastssl.colorization_loss(a, b, ref_labels, target_labels, 3, radius=1.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (tf, rf), fast_mode=True)


def test_colorization_loss_nan_propagates(backend, device):
    tf, rf, _ = inputs(device, dtype=torch.float32, grad=False)
    rf[0, 1, 0, 2, 2] = float("nan")
    labels = torch.randint(0, 3, (2, 2, 5, 7), device=device)
    assert fastssl.colorization_loss(tf, rf, labels, labels[:, 0], 3).isnan()


# ----------------------------------------------------------------------------------------------------
# propagate_labels
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(context=2, radius=1.5, topk=3),
                                    dict(context=3, radius=None, topk=None, long_memory=(0, 2)),
                                    dict(context=2, radius=2, topk=None, long_memory=())])
def test_propagate_labels_matches_reference(backend, device, kwargs):
    feats = F.normalize(torch.randn(5, 6, 4, 5, device=device, dtype=torch.float64), dim=1)
    first = torch.rand(2, 4, 5, device=device, dtype=torch.float64)
    out = fastssl.propagate_labels(feats, first, temperature=0.2, **kwargs)
    assert out.shape == (5, 2, 4, 5) and torch.equal(out[0], first)
    assert_close(out, propagate_labels_reference(feats, first, temperature=0.2, **kwargs), scale=10)


def moving_texture(T, H, W, side, device, channels=16):
    """A zero-mean white-noise texture translated one pixel a frame (circularly) and a square mask moving
    with it; features are 16 random 3x3 filter responses of the texture (circular padding), L2-normalized:
    each pixel's true correspondence in the previous frames has identical features, its neighbours
    distinct ones (a zero-mean texture: no shared DC component), so tracking is well posed."""
    texture = torch.randn(1, 1, H, W, device=device)
    filters = torch.randn(channels, 1, 3, 3, device=device)
    base = F.conv2d(F.pad(texture, (1, 1, 1, 1), mode="circular"), filters)[0]
    feats = F.normalize(torch.stack([base.roll(t, dims=2) for t in range(T)]), dim=1)
    mask = torch.zeros(T, 1, H, W, device=device)
    for t in range(T):
        mask[t, 0, 4:4 + side, 3 + t:3 + t + side] = 1
    return feats, mask


def iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


@pytest.mark.parametrize("topk", [10, None])
def test_propagate_labels_tracks_moving_square(backend, device, topk):
    """The 5x5 square moves T-1 = 4 pixels: a prediction that stays put has IoU 1/9 with the truth, one
    that keeps only half the square at most 0.5; on 80 random textures (40 seeds x both modes) the
    last frame's IoU was >= 0.96, mean 0.998. IoU >= 0.8 says the mask was carried frame by frame
    through the radius-limited context, with margin for unlucky textures."""
    T, H, W, side = 5, 12, 14, 5
    feats, mask = (t.double() for t in moving_texture(T, H, W, side, device))  # float64: the interpreter's
    # streaming top-k would take a minute here; that kernel is checked by test_topk_kernel_matches_dense_topk
    out = fastssl.propagate_labels(feats, mask[0], context=3, radius=3, topk=topk, temperature=0.05)
    assert iou(mask[0, 0] > 0.5, mask[-1, 0] > 0.5) < 0.15  # the test could fail
    assert iou(out[-1, 0] > 0.5, mask[-1, 0] > 0.5) >= 0.8


def test_propagate_labels_single_frame_and_nan(backend, device):
    feats = torch.randn(1, 4, 3, 3, device=device)
    first = torch.rand(2, 3, 3, device=device)
    assert torch.equal(fastssl.propagate_labels(feats, first)[0], first)
    feats = F.normalize(torch.randn(3, 4, 5, 5, device=device), dim=1)
    feats[2, :, 0, 0] = float("nan")
    out = fastssl.propagate_labels(feats, torch.rand(1, 5, 5, device=device), radius=2, topk=3)
    assert out[2, 0, 0, 0].isnan() and not out[1].isnan().any()


# ----------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------

def test_compiles_fullgraph(backend, device):
    tf, rf, rv = inputs(device, dtype=torch.float32)
    labels = torch.randint(0, 3, (2, 2, 5, 7), device=device)

    def step(tf, rf, rv):
        out = fastssl.color_propagate(tf, rf, rv, temperature=0.5, radius=2)
        loss = fastssl.colorization_loss(tf, rf, labels, labels[:, 0], 3, temperature=0.5)
        top = fastssl.color_propagate(tf.double(), rf.double(), rv.double(), topk=3)  # the op, not the kernel
        return out, loss, top

    compiled = torch.compile(step, fullgraph=True)
    out, loss, top = compiled(tf, rf, rv)
    assert_close(out, color_propagate_reference(tf, rf, rv, temperature=0.5, radius=2), torch.float32)
    assert_close(loss, colorization_loss_reference(tf, rf, labels, labels[:, 0], 3, temperature=0.5), torch.float32)
    assert_close(top, color_propagate_reference(tf, rf, rv, topk=3), torch.float32)
    (out.sum() + loss).backward()
    assert tf.grad is not None and rf.grad is not None and rv.grad is not None


# ----------------------------------------------------------------------------------------------------
# validation (API.md): every error names the argument and what was expected
# ----------------------------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


CP = fastssl.color_propagate
CL = fastssl.colorization_loss
PL = fastssl.propagate_labels
LBL = dict(ref_labels=_t(2, 2, 5, 7, dtype=torch.long), target_labels=_t(2, 5, 7, dtype=torch.long))


@pytest.mark.parametrize("call, error, match", [
    (lambda: CP(_t(2, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 2, 3, 5, 7)), ValueError, r"target_feats must be 4-D"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 5, 5, 7), _t(2, 2, 3, 5, 7)), ValueError, r"ref_feats must be 5-D"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 3, 5, 7)), ValueError, r"ref_values must be 5-D"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 4, 5, 7), _t(2, 2, 3, 5, 7)), ValueError, r"ref_feats must be \(B, R, C, H, W\)"),
    (lambda: CP(_t(2, 5, 5, 7), _t(3, 2, 5, 5, 7), _t(2, 2, 3, 5, 7)), ValueError, r"ref_feats must be"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 0, 5, 5, 7), _t(2, 0, 3, 5, 7)), ValueError, r"at least one reference frame"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 3, 3, 5, 7)), ValueError, r"ref_values must be \(B, R, V, H, W\)"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 2, 3, 5, 6)), ValueError, r"ref_values must be"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7, dtype=torch.float64), _t(2, 2, 3, 5, 7)), TypeError, "mixing dtypes"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 2, 3, 5, 7, dtype=torch.float16)), TypeError, "mixing dtypes"),
    (lambda: CP(_t(2, 5, 5, 7, dtype=torch.long), _t(2, 2, 5, 5, 7), _t(2, 2, 3, 5, 7)), TypeError,
     "target_feats must be a floating-point"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), [1.0]), TypeError, "ref_values must be a torch.Tensor"),
    (lambda: CP(_t(2, 0, 5, 7), _t(2, 2, 0, 5, 7), _t(2, 2, 3, 5, 7)), ValueError,
     r"target_feats needs at least one feature channel \(C >= 1\)"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 2, 3, 5, 7), temperature=0.0), ValueError, "temperature must be"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 2, 3, 5, 7), temperature=-1.0), ValueError, "temperature"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 2, 3, 5, 7), radius=-1), ValueError, "radius must be"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 2, 3, 5, 7), radius="12"), TypeError, "radius must be"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 2, 3, 5, 7), topk=0), ValueError, r"topk must be between 1"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 2, 3, 5, 7), topk=71), ValueError, r"\(70\), got 71"),
    (lambda: CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 2, 3, 5, 7), topk=2.0), TypeError, "topk must be None or an int"),
    (lambda: CL(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 2, 5, 7), LBL["target_labels"], 3), TypeError,
     "ref_labels must be an integer tensor"),
    (lambda: CL(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), LBL["ref_labels"], _t(2, 5, 6, dtype=torch.long), 3), ValueError,
     r"target_labels must be \(B, H, W\)"),
    (lambda: CL(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), LBL["ref_labels"][:, 0], LBL["target_labels"], 3), ValueError,
     "ref_labels must be 4-D"),
    (lambda: CL(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), LBL["ref_labels"] + 3, LBL["target_labels"], 3), ValueError,
     r"ref_labels must hold class ids in \[0, 3\)"),
    (lambda: CL(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), LBL["ref_labels"], LBL["target_labels"] - 1, 3), ValueError,
     "target_labels must hold class ids"),
    (lambda: CL(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), LBL["ref_labels"], LBL["target_labels"], 0), ValueError,
     "num_classes must be an int >= 1"),
    (lambda: CL(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), LBL["ref_labels"], LBL["target_labels"], 3.0), TypeError,
     "num_classes must be a Python int"),
    (lambda: CL(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), LBL["ref_labels"], LBL["target_labels"], 3, eps=0.0), ValueError,
     "eps must be"),
    (lambda: CL(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), LBL["ref_labels"], LBL["target_labels"], 3, temperature=0), ValueError,
     "temperature"),
    (lambda: CL(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), LBL["ref_labels"], LBL["target_labels"], 3, radius=-0.5), ValueError,
     "radius must be"),
    (lambda: CL(_t(0, 5, 5, 7), _t(0, 2, 5, 5, 7), _t(0, 2, 5, 7, dtype=torch.long), _t(0, 5, 7, dtype=torch.long), 3),
     ValueError, "at least one target pixel"),
    (lambda: PL(_t(4, 5, 6), _t(2, 5, 6)), ValueError, r"feats must be 4-D"),
    (lambda: PL(_t(4, 3, 5, 6), _t(2, 5, 7)), ValueError, r"first_labels must be \(V >= 1, 5, 6\)"),
    (lambda: PL(_t(4, 3, 5, 6), _t(2, 5, 6, dtype=torch.float64)), TypeError, "mixing dtypes"),
    (lambda: PL(_t(4, 0, 5, 6), _t(2, 5, 6)), ValueError, r"feats needs at least one feature channel"),
    (lambda: PL(_t(4, 3, 5, 6), _t(2, 5, 6), context=0), ValueError, "context must be an int >= 1"),
    (lambda: PL(_t(4, 3, 5, 6), _t(2, 5, 6), long_memory=(4,)), ValueError, r"long_memory indices must be in \[0, 4\)"),
    (lambda: PL(_t(4, 3, 5, 6), _t(2, 5, 6), long_memory=("a",)), TypeError, "long_memory must be"),
    (lambda: PL(_t(4, 3, 5, 6), _t(2, 5, 6), long_memory=(0.7,)), TypeError, "long_memory must be"),
    (lambda: PL(_t(4, 3, 5, 6), _t(2, 5, 6), long_memory=(True,)), TypeError, "long_memory must be"),
    (lambda: PL(_t(4, 3, 5, 6), _t(2, 5, 6), temperature=0.0), ValueError, "temperature"),
    (lambda: PL(_t(4, 3, 5, 6), _t(2, 5, 6), radius=-2), ValueError, "radius must be"),
    (lambda: PL(_t(4, 3, 5, 6), _t(2, 5, 6), topk=61), ValueError, r"topk must be between 1 .*\(60\), got 61"),
    (lambda: PL(_t(4, 3, 5, 6), _t(2, 5, 6), topk=0), ValueError, "topk must be between 1"),
])
def test_rejects_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_rejects_mixed_devices():
    with pytest.raises(ValueError, match="ref_feats is on"):
        CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7, device="cuda"), _t(2, 2, 3, 5, 7))


def test_rejects_mixed_devices_meta():
    """Device checks read metadata only: a meta tensor beside a CPU one is rejected the same way."""
    with pytest.raises(ValueError, match="ref_values is on meta"):
        CP(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), _t(2, 2, 3, 5, 7, device="meta"))
    with pytest.raises(ValueError, match="target_labels is on meta"):
        CL(_t(2, 5, 5, 7), _t(2, 2, 5, 5, 7), LBL["ref_labels"], _t(2, 5, 7, dtype=torch.long, device="meta"), 3)
    with pytest.raises(ValueError, match="first_labels is on meta"):
        PL(_t(4, 3, 5, 6), _t(2, 5, 6, device="meta"))


def test_double_backward_is_refused_naming_the_op(backend, device):
    """create_graph=True through color propagation's fused backward: a RuntimeError naming the op, where
    PyTorch said only that the backward op has no autograd formula; the first derivative as before."""
    t, r, v = inputs(device)
    labels = torch.randint(0, 3, (2, 2, 5, 7), device=device)
    target = torch.randint(0, 3, (2, 5, 7), device=device)
    for call, name in ((lambda: fastssl.color_propagate(t, r, v).square().sum(), "fastssl.color_propagate"),
                       (lambda: fastssl.colorization_loss(t, r, labels, target, 3), "fastssl.colorization_loss")):
        with pytest.raises(RuntimeError, match=f"{name} has no double backward"):
            torch.autograd.grad(call(), t, create_graph=True)
        (grad,) = torch.autograd.grad(call(), t)
        assert grad.isfinite().all() and grad.abs().sum() > 0
