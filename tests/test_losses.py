"""The nn.Module wrappers of fastssl.losses: values against float64 references (and pytorch-metric-learning
where installed), gradients, validation, MoCoQueue's ring buffer, CLIP's learnable clamped scale, CPC
against a brute-force loop, torch.compile(fullgraph=True)."""
from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastssl.losses import CLIPLoss, CPCLoss, InfoNCELoss, MoCoQueue, NTXentLoss

from conftest import assert_close, assert_same_float32

HAVE_PML = importlib.util.find_spec("pytorch_metric_learning") is not None
F64 = torch.float64


# ----------------------------------------------------------------------------------------------------
# float64 references: API.md's formulas, literally (materializing the logits)
# ----------------------------------------------------------------------------------------------------

def ref_info_nce(query, key, targets=None, temperature=0.1, normalize=True, reduction="mean"):
    q, k = query.double(), key.double()
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    if targets is None:
        targets = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(q @ k.T / temperature, targets, reduction=reduction)


def ref_nt_xent(z1, z2, temperature=0.5):
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = z1.shape[0]
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n) + n, torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def ref_moco(query, key, queue, temperature=0.07, normalize_queue=True):
    q = F.normalize(query.double(), dim=1)
    k = F.normalize(key.detach().double(), dim=1)
    m = queue.detach().double()
    m = F.normalize(m, dim=1) if normalize_queue else m
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ m.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def ref_clip(img, txt, scale):
    i, t = F.normalize(img.double(), dim=1), F.normalize(txt.double(), dim=1)
    logits = scale * i @ t.T
    targets = torch.arange(i.shape[0], device=i.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def ref_cpc(context, codes, weights):
    """Brute force: every (b, t) prediction scored against every (b', t') target of its k, by loops."""
    B, T, _ = context.shape
    per_k = []
    for k, W in enumerate(weights, start=1):
        pairs = [(b, t) for b in range(B) for t in range(T - k)]
        terms = []
        for b, t in pairs:
            pred = W.double() @ context[b, t].double()
            scores = torch.stack([codes[b2, t2 + k].double() @ pred for b2, t2 in pairs])
            positive = codes[b, t + k].double() @ pred
            terms.append(torch.logsumexp(scores, 0) - positive)
        per_k.append(torch.stack(terms).mean())
    return torch.stack(per_k).mean()


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def leaf(*shape, dtype=F64, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()


# ----------------------------------------------------------------------------------------------------
# NTXentLoss
# ----------------------------------------------------------------------------------------------------

def test_ntxent_matches_reference_value_and_gradient(backend, device):
    z1, z2 = leaf(7, 5, device=device), leaf(7, 5, device=device)
    loss = NTXentLoss(temperature=0.3)(z1, z2)
    ref = ref_nt_xent(z1, z2, 0.3)
    assert loss.dtype == F64 and loss.shape == ()
    assert_close(loss, ref)
    for g, r in zip(grads(loss, z1, z2), grads(ref, z1, z2)):
        assert_close(g, r)


@pytest.mark.parametrize("bank", [0, 6])
def test_ntxent_negative_temperature_as_lightly(bank):
    """lightly takes any |temperature| >= 1e-8 (its test_forward_pass_neg_temp): the logits' sign flips."""
    z1, z2 = leaf(5, 4), leaf(5, 4)
    loss = NTXentLoss(temperature=-0.7, memory_bank_size=(bank, 4) if bank else 0)
    if bank:
        queue = loss.memory_bank.negatives().clone()
        q, k = (F.normalize(t.double(), dim=1) for t in (z1, z2))
        m = queue.double()  # the bank's unit keys as they are (lightly's meaning)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ m.T], 1) / -0.7
        ref = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    else:
        ref = ref_nt_xent(z1, z2, -0.7)
    out = loss(z1, z2)
    assert_close(out, ref)
    assert_close(grads(out, z1)[0], grads(ref, z1)[0])


def test_ntxent_float32_returns_float32():
    z1, z2 = torch.randn(6, 9), torch.randn(6, 9)
    loss = NTXentLoss()(z1, z2)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_nt_xent(z1, z2, 0.5))


@pytest.mark.skipif(not HAVE_PML, reason="pytorch-metric-learning not installed")
def test_ntxent_matches_pytorch_metric_learning():
    from pytorch_metric_learning.losses import NTXentLoss as PMLNTXent

    n = 9
    z1, z2 = torch.randn(n, 12, dtype=F64), torch.randn(n, 12, dtype=F64)
    labels = torch.cat([torch.arange(n), torch.arange(n)])
    theirs = PMLNTXent(temperature=0.2)(torch.cat([z1, z2]), labels)
    assert_close(NTXentLoss(temperature=0.2)(z1, z2), theirs)


def test_ntxent_memory_bank_is_moco_against_the_bank_before_the_update(device):
    """lightly's meaning: out0 queries, out1 keys; loss against the bank as it was, then out1 enqueued."""
    size, dim, n = 10, 6, 4
    loss_fn = NTXentLoss(temperature=0.2, memory_bank_size=(size, dim)).double().to(device)
    bank = loss_fn.memory_bank
    assert isinstance(bank, MoCoQueue) and bank.negatives().shape == (size, dim)
    expected = bank.negatives().clone()
    for step in range(4):  # 16 keys through a bank of 10: wraps around
        q, k = leaf(n, dim, device=device), torch.randn(n, dim, dtype=F64, device=device)
        before = bank.negatives().clone()
        assert torch.equal(before, expected)
        loss = loss_fn(q, k)
        ref = ref_moco(q, k, before, 0.2, normalize_queue=False)  # the bank's unit keys as they are (lightly)
        assert_close(loss, ref)
        # The backward runs after the enqueue and still sees this step's negatives.
        assert_close(grads(loss, q)[0], grads(ref, q)[0])
        rows = (torch.arange(n, device=device) + step * n) % size
        expected[rows] = F.normalize(k, dim=1)
        assert torch.equal(bank.negatives(), expected)
        assert bank.ptr == ((step + 1) * n) % size


def test_ntxent_memory_bank_built_on_the_cpu_serves_features_on_any_device(device):
    """lightly's MoCo script builds ``NTXentLoss(memory_bank_size=(K, D))`` and never moves it to the GPU:
    the loss takes the bank's keys to the features' device and writes the new keys back to the bank's."""
    loss_fn = NTXentLoss(temperature=0.2, memory_bank_size=(6, 4)).double()
    bank = loss_fn.memory_bank
    assert bank.negatives().device.type == "cpu"
    q, k = leaf(3, 4, device=device), torch.randn(3, 4, dtype=F64, device=device)
    before = bank.negatives().clone()
    loss = loss_fn(q, k)
    assert loss.device == q.device
    assert_close(loss, ref_moco(q, k, before.to(device), 0.2, normalize_queue=False))
    assert bank.negatives().device.type == "cpu"
    assert torch.equal(bank.negatives()[:3], F.normalize(k, dim=1).cpu())


def test_ntxent_memory_bank_not_updated_without_grad():
    loss_fn = NTXentLoss(memory_bank_size=(8, 4))
    before = loss_fn.memory_bank.negatives().clone()
    with torch.no_grad():
        loss_fn(torch.randn(3, 4), torch.randn(3, 4))
    assert torch.equal(loss_fn.memory_bank.negatives(), before) and loss_fn.memory_bank.ptr == 0


def test_ntxent_memory_bank_bare_size_takes_shape_dtype_from_first_batch():
    loss_fn = NTXentLoss(temperature=0.1, memory_bank_size=12)
    assert loss_fn.memory_bank is None
    q, k = leaf(5, 3), torch.randn(5, 3, dtype=F64)
    loss_fn(q, k).backward()
    bank = loss_fn.memory_bank
    assert bank.negatives().shape == (12, 3) and bank.negatives().dtype == F64 and bank.ptr == 5
    assert torch.equal(bank.negatives()[:5], F.normalize(k, dim=1))
    assert "memory_bank.queue" in loss_fn.state_dict()
    with pytest.raises(ValueError, match=r"out1 must have shape \(batch, 3\)"):
        loss_fn(leaf(5, 4), torch.randn(5, 4, dtype=F64))


def test_ntxent_memory_bank_gradient_to_both_views_as_lightly():
    """lightly's meaning: the positive q.k is not detached, so out1 (the keys) gets its gradient too (it got
    none); the bank gets none."""
    loss_fn = NTXentLoss(temperature=0.2, memory_bank_size=(8, 4))
    q, k = leaf(3, 4, dtype=torch.float32), leaf(3, 4, dtype=torch.float32)
    bank = loss_fn.memory_bank.negatives().clone()
    loss = loss_fn(q, k)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    qn, kn = F.normalize(q64, dim=1), F.normalize(k64, dim=1)
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ bank.double().T], 1) / 0.2
    ref = F.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    ours = grads(loss, q, k)
    for g, r in zip(ours, grads(ref, q64, k64)):
        assert_close(g, r, torch.float32)
    assert not loss_fn.memory_bank.negatives().requires_grad
    if importlib.util.find_spec("lightly") is not None:
        from lightly.loss import NTXentLoss as LightlyNTXent

        theirs = LightlyNTXent(temperature=0.2, memory_bank_size=(8, 4))
        theirs.memory_bank.bank.copy_(bank)
        for g, r in zip(ours, grads(theirs(q, k), q, k)):
            torch.testing.assert_close(g, r)


def test_ntxent_memory_bank_compiles_once_fullgraph():
    """torch.compile(fullgraph=True) of the loss with a bank over 12 steps (the pointer wraps around) equals
    eager in loss, gradient, bank and pointer, from one compilation: the pointer is a tensor advanced in
    place (as a Python int each position recompiled and fullgraph failed at the recompile limit)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager = NTXentLoss(temperature=0.2, memory_bank_size=(10, 4))
    module = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    for _ in range(12):
        q, k = torch.randn(3, 4), torch.randn(3, 4)
        a, b = q.clone().requires_grad_(), q.clone().requires_grad_()
        ours, ref = compiled(b, k), eager(a, k)
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(grads(ours, b)[0], grads(ref, a)[0])
        assert torch.equal(module.memory_bank.negatives(), eager.memory_bank.negatives())
        assert module.memory_bank.ptr == eager.memory_bank.ptr
    assert eager.memory_bank.ptr == 36 % 10 and counter.frame_count == 1


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=0.0), ValueError, r"temperature must be a finite number with \|temperature\| >= 1e-8"),
    (dict(temperature=1e-9), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="0.5"), TypeError, "temperature"),
    (dict(memory_bank_size=-1), ValueError, "memory_bank_size"),
    (dict(memory_bank_size=1.5), TypeError, "memory_bank_size"),
    (dict(memory_bank_size=(4,)), TypeError, r"\(K, D\) pair"),
    (dict(memory_bank_size=(4, 0)), ValueError, "D >= 1"),
    (dict(gather_distributed=1), TypeError, "gather_distributed must be True or False"),
])
def test_ntxent_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        NTXentLoss(**kwargs)


# ----------------------------------------------------------------------------------------------------
# InfoNCELoss
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [True, False])
def test_infonce_matches_reference(reduction, normalize):
    q, k = leaf(5, 7), leaf(8, 7)
    targets = torch.tensor([7, 0, 3, 3, 5])
    loss = InfoNCELoss(temperature=0.25, normalize=normalize, reduction=reduction)(q, k, targets)
    ref = ref_info_nce(q, k, targets, 0.25, normalize, reduction)
    assert loss.shape == ref.shape
    assert_close(loss, ref)
    weight = torch.rand_like(ref)  # a grad_output that is not all ones
    for g, r in zip(torch.autograd.grad(loss, (q, k), weight), torch.autograd.grad(ref, (q, k), weight)):
        assert_close(g, r)


def test_infonce_default_targets_and_backends(backend, device):
    q, k = leaf(6, 5, device=device), leaf(6, 5, device=device)
    loss = InfoNCELoss()(q, k)
    ref = ref_info_nce(q, k)
    assert_close(loss, ref)
    for g, r in zip(grads(loss, q, k), grads(ref, q, k)):
        assert_close(g, r)


@pytest.mark.skipif(not HAVE_PML, reason="pytorch-metric-learning not installed")
def test_infonce_matches_pytorch_metric_learning():
    from pytorch_metric_learning.losses import NTXentLoss as PMLNTXent

    q, k = torch.randn(7, 10, dtype=F64), torch.randn(7, 10, dtype=F64)
    labels = torch.arange(7)
    # a separate ref_labels tensor: PML treats `ref_labels is labels` as self-comparison
    theirs = PMLNTXent(temperature=0.1)(q, labels, ref_emb=k, ref_labels=labels.clone())
    assert_close(InfoNCELoss(temperature=0.1)(q, k), theirs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(normalize="yes"), TypeError, "normalize must be True or False"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\)"),
])
def test_infonce_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        InfoNCELoss(**kwargs)


# ----------------------------------------------------------------------------------------------------
# MoCoQueue
# ----------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 13), batches=st.lists(st.integers(0, 30), min_size=1, max_size=8))
def test_moco_queue_keeps_every_key_across_wraparound(size, batches):
    """After any sequence of batches, the newest min(total, size) keys are all present, each at the row
    a key-by-key ring buffer would have put it; rows never written keep their initial values."""
    queue = MoCoQueue(size, 2, dtype=F64)
    initial = queue.negatives().clone()
    written, next_id = [], 0
    for b in batches:
        keys = torch.stack([torch.arange(next_id, next_id + b, dtype=F64), torch.full((b,), -1.0, dtype=F64)], 1)
        queue.enqueue(keys.reshape(b, 2))
        written += list(range(next_id, next_id + b))
        next_id += b
    total = len(written)
    expected = initial.clone()
    for key_id in written[max(0, total - size):]:
        expected[key_id % size] = torch.tensor([key_id, -1.0], dtype=F64)
    assert torch.equal(queue.negatives(), expected)
    assert queue.ptr == total % size
    kept = set(queue.negatives()[:, 0][queue.negatives()[:, 1] == -1].long().tolist())
    assert kept == set(written[max(0, total - size):])


def test_moco_queue_batch_larger_than_queue_keeps_newest():
    queue = MoCoQueue(4, 1, dtype=F64)
    queue.enqueue(torch.arange(2, dtype=F64).reshape(2, 1))  # ptr 2
    queue.enqueue(torch.arange(10, 17, dtype=F64).reshape(7, 1))  # 7 keys into 4 rows: 13..16 survive
    assert sorted(queue.negatives().flatten().tolist()) == [13.0, 14.0, 15.0, 16.0]
    assert queue.ptr == (2 + 7) % 4
    assert queue.negatives()[(2 + 6) % 4, 0] == 16.0  # the newest key sits just before the pointer


def test_moco_queue_buffer_no_copy_detached_device_and_state_dict():
    queue = MoCoQueue(6, 3)
    assert queue.negatives() is queue.queue
    assert queue.negatives().data_ptr() == queue.negatives().data_ptr()
    assert torch.allclose(queue.negatives().norm(dim=1), torch.ones(6))  # MoCo's init: random unit vectors
    keys = torch.randn(4, 3, requires_grad=True)
    ptr_before = queue.negatives().data_ptr()
    queue.enqueue(keys * 2)
    assert queue.negatives().data_ptr() == ptr_before and not queue.negatives().requires_grad
    assert torch.equal(queue.negatives()[:4], (keys * 2).detach())
    restored = MoCoQueue(6, 3)
    restored.load_state_dict(queue.state_dict())
    assert restored.ptr == 4 and torch.equal(restored.negatives(), queue.negatives())
    as_double = queue.to(F64)
    assert as_double.negatives().dtype == F64
    queue.enqueue(torch.randn(1, 3, dtype=torch.float16))  # cast to the buffer's dtype
    assert queue.ptr == 5


@pytest.mark.parametrize("keys, error, match", [
    (torch.zeros(3, 5), ValueError, r"keys must have shape \(batch, 4\)"),
    (torch.zeros(4), ValueError, "keys must be 2-D"),
    (torch.zeros(3, 4, dtype=torch.long), TypeError, "keys must be a floating-point tensor"),
    ([[0.0] * 4], TypeError, "keys must be a torch.Tensor"),
])
def test_moco_queue_enqueue_validation(keys, error, match):
    with pytest.raises(error, match=match):
        MoCoQueue(8, 4).enqueue(keys)


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((0, 4), {}, ValueError, "size must be an int >= 1"),
    ((8, 0), {}, ValueError, "dim must be an int >= 1"),
    ((8.0, 4), {}, TypeError, "size must be a Python int"),
    ((8, 4), dict(gather_distributed=None), TypeError, "gather_distributed"),
])
def test_moco_queue_init_validation(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        MoCoQueue(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# CLIPLoss
# ----------------------------------------------------------------------------------------------------

def test_clip_matches_reference_and_scale_is_learnable(backend, device):
    loss_fn = CLIPLoss(init_temperature=0.07).double().to(device)
    assert isinstance(loss_fn.logit_scale, torch.nn.Parameter)
    assert math.isclose(loss_fn.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-7)  # a float32 parameter
    img, txt = leaf(6, 5, device=device), leaf(6, 5, device=device)
    loss = loss_fn(img, txt)
    log_scale = loss_fn.logit_scale.detach().clone().requires_grad_()
    ref = ref_clip(img, txt, log_scale.exp())
    assert_close(loss, ref)
    ours = grads(loss, img, txt, loss_fn.logit_scale)
    theirs = grads(ref, img, txt, log_scale)
    for g, r in zip(ours, theirs):
        assert_close(g, r)
    assert ours[2].abs() > 0


def test_clip_float32_scale_with_float32_features():
    loss_fn = CLIPLoss()
    assert loss_fn.logit_scale.dtype == torch.float32
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    loss = loss_fn(img, txt)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_clip(img, txt, 1 / 0.07), scale=10)


def test_clip_scale_is_clamped_and_gets_no_gradient_past_the_clamp():
    loss_fn = CLIPLoss(init_temperature=0.07, max_logit_scale=50.0).double()
    with torch.no_grad():
        loss_fn.logit_scale.fill_(math.log(400.0))
    assert loss_fn.scale().item() == 50.0
    img, txt = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    loss = loss_fn(img, txt)
    assert_close(loss, ref_clip(img, txt, 50.0))
    loss.backward()
    assert loss_fn.logit_scale.grad.item() == 0.0


def test_clip_fixed_scale_is_a_buffer():
    loss_fn = CLIPLoss(init_temperature=0.1, learnable=False)
    assert list(loss_fn.parameters()) == [] and "logit_scale" in loss_fn.state_dict()
    img, txt = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    assert math.isclose(loss_fn.logit_scale.exp().item(), 10.0, rel_tol=1e-6)
    loss_fn = loss_fn.double()
    assert_close(loss_fn(img, txt), ref_clip(img, txt, loss_fn.logit_scale.exp()))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(init_temperature=0.0), ValueError, "init_temperature"),
    (dict(max_logit_scale=-1.0), ValueError, "max_logit_scale"),
    (dict(init_temperature=0.001), ValueError, "exceeds max_logit_scale = 100"),
    (dict(learnable=1), TypeError, "learnable must be True or False"),
    (dict(reduction="max"), ValueError, "reduction"),
])
def test_clip_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        CLIPLoss(**kwargs)


# ----------------------------------------------------------------------------------------------------
# CPCLoss
# ----------------------------------------------------------------------------------------------------

def test_cpc_matches_brute_force_and_gradients_flow(backend, device):
    B, T, cdim, zdim, K = 3, 6, 5, 4, 3
    loss_fn = CPCLoss(cdim, zdim, K).double().to(device)
    assert len(loss_fn.predictors) == K
    assert all(p.weight.shape == (zdim, cdim) and p.bias is None for p in loss_fn.predictors)
    context, codes = leaf(B, T, cdim, device=device), leaf(B, T, zdim, device=device)
    loss = loss_fn(context, codes)
    weights = [p.weight for p in loss_fn.predictors]
    ref = ref_cpc(context, codes, weights)
    assert loss.shape == () and loss.dtype == F64
    assert_close(loss, ref)
    for g, r in zip(grads(loss, context, codes, *weights), grads(ref, context, codes, *weights)):
        assert_close(g, r)
        assert g.abs().sum() > 0


@pytest.mark.parametrize("context, codes, error, match", [
    ((2, 4, 5), (2, 4, 3), ValueError, r"codes must have shape \(batch, time, 4\)"),
    ((2, 4, 6), (2, 4, 4), ValueError, r"context must have shape \(batch, time, 5\)"),
    ((2, 5), (2, 5, 4), ValueError, "context must be 3-D"),
    ((2, 4, 5), (3, 4, 4), ValueError, r"codes has \(batch, time\) = \(3, 4\)"),
    ((2, 2, 5), (2, 2, 4), ValueError, "prediction_steps=2 needs more than 2"),
])
def test_cpc_call_validation(context, codes, error, match):
    with pytest.raises(error, match=match):
        CPCLoss(5, 4, 2)(torch.randn(*context), torch.randn(*codes))


def test_cpc_under_autocast():
    """Under autocast the predictions come out in bf16 while the codes stay float32: the targets follow
    the predictions' dtype (the dtype check exempts autocast for this), as the loss of bf16 predictions."""
    torch.manual_seed(0)
    loss_fn = CPCLoss(6, 4, 2)
    context, codes = torch.randn(3, 5, 6), torch.randn(3, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(context, codes)
    weights = [p.weight.to(torch.bfloat16).double() for p in loss_fn.predictors]
    ref = ref_cpc(context.to(torch.bfloat16).double(), codes.to(torch.bfloat16).double(), weights)
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.05 * abs(ref.item())


# each module and its call on (x, y, log scale, bias); labels are x's rows mod 3
AUTOCAST_MODULES = {
    "NTXentLoss": (lambda: NTXentLoss(temperature=0.3), lambda m, x, y, s, b: m(x, y)),
    "NTXentLoss_bank": (lambda: NTXentLoss(temperature=0.3, memory_bank_size=(7, 6)), lambda m, x, y, s, b: m(x, y)),
    "InfoNCELoss": (InfoNCELoss, lambda m, x, y, s, b: m(x, y)),
    "CLIPLoss": (CLIPLoss, lambda m, x, y, s, b: m(x, y)),
    "ClipLoss": (lambda: ClipLoss(), lambda m, x, y, s, b: m(x, y, s.exp(), b)),
    "SigLipLoss": (lambda: SigLipLoss(), lambda m, x, y, s, b: m(x, y, s.exp(), b)),
    "SupervisedNTXentLoss": (lambda: SupervisedNTXentLoss(), lambda m, x, y, s, b: m(x, _classes(x))),
    "SupConLoss": (lambda: SupConLoss(), lambda m, x, y, s, b: m(torch.stack((x, y), 1), _classes(x))),
}


def _classes(x):
    return torch.arange(x.shape[0], device=x.device) % 3


@pytest.mark.parametrize("name", list(AUTOCAST_MODULES))
def test_modules_under_autocast_as_without(backend, device, name):
    """The drop-ins called inside torch.autocast (bf16) on float32 features (open_clip's and lightly's
    training loops do) return the float32 loss and gradients (parameters' too) of the call without autocast,
    with the backward inside the region or after it (ClipLoss and SigLipLoss crashed in backward)."""
    build, call = AUTOCAST_MODULES[name]
    x, y = leaf(9, 6, dtype=torch.float32, device=device), leaf(9, 6, dtype=torch.float32, device=device)
    s, b = (torch.tensor(v, device=device, requires_grad=True) for v in (1.5, -2.0))
    module = build()
    results = []
    for autocast, inside in ((False, False), (True, True), (True, False)):
        m = copy.deepcopy(module).to(device)  # the bank's state before the call, each time
        tensors = (x, y, s, b, *m.parameters())
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            loss = call(m, x, y, s, b)
            if inside:
                results.append((loss, torch.autograd.grad(loss, tensors, allow_unused=True)))
        if not inside:
            results.append((loss, torch.autograd.grad(loss, tensors, allow_unused=True)))
    (plain, plain_grads), *autocast_runs = results
    for loss, grads_ in autocast_runs:
        assert_same_float32(loss, grads_, plain, plain_grads)


def test_cpc_validation_types():
    with pytest.raises(TypeError, match="codes has dtype torch.float64 but context has torch.float32"):
        CPCLoss(5, 4, 1)(torch.randn(2, 3, 5), torch.randn(2, 3, 4, dtype=F64))
    with pytest.raises(TypeError, match=r"predictors' weights are torch.float32; cast the inputs or the module"):
        CPCLoss(5, 4, 1)(torch.randn(2, 3, 5, dtype=F64), torch.randn(2, 3, 4, dtype=F64))
    with pytest.raises(ValueError, match="prediction_steps must be an int >= 1"):
        CPCLoss(5, 4, 0)
    with pytest.raises(TypeError, match="code_dim must be a Python int"):
        CPCLoss(5, 4.0, 1)


# ----------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, compiler", [("ntxent", "aot_eager"), ("infonce", "aot_eager"), ("clip", "aot_eager"),
                                            ("cpc", "aot_eager"), ("clip", "inductor"), ("siglip", "aot_eager")])
def test_modules_compile_fullgraph(name, compiler):
    """fullgraph=True: no graph break through the custom ops; aot_eager checks the fake kernels and the
    autograd registration at little cost, one inductor case (~13 s on 2 cores) the whole compiler."""
    torch._dynamo.reset()
    if name == "ntxent":
        module, inputs, ref = NTXentLoss(0.4), (leaf(5, 6, dtype=torch.float32), leaf(5, 6, dtype=torch.float32)), None
        ref = ref_nt_xent(*inputs, 0.4)
    elif name == "infonce":
        module, inputs = InfoNCELoss(0.2), (leaf(5, 6, dtype=torch.float32), leaf(7, 6, dtype=torch.float32))
        ref = ref_info_nce(*inputs, temperature=0.2)
    elif name == "clip":
        module, inputs = CLIPLoss(), (leaf(5, 6, dtype=torch.float32), leaf(5, 6, dtype=torch.float32))
        ref = ref_clip(*inputs, module.logit_scale.detach().double().exp())
    elif name == "siglip":
        sig = SigLipLoss()
        module = lambda a, b: sig(a, b, torch.tensor(3.0), torch.tensor(-2.0))  # noqa: E731
        inputs = (leaf(5, 6, dtype=torch.float32), leaf(5, 6, dtype=torch.float32))
        ref = ref_siglip(*inputs, 3.0, -2.0)
    else:
        module, inputs = CPCLoss(4, 3, 2), (leaf(2, 5, 4, dtype=torch.float32), leaf(2, 5, 3, dtype=torch.float32))
        ref = ref_cpc(*inputs, [p.weight for p in module.predictors])
    compiled = torch.compile(module, fullgraph=True, backend=compiler)
    loss = compiled(*inputs)
    assert_close(loss, ref, scale=10)
    for g, r in zip(grads(loss, *inputs), grads(ref, *inputs)):
        assert_close(g, r, dtype=torch.float32, scale=10)
    if name == "clip":  # the learnable scale's gradient through the compiled exp/clamp
        log_scale = module.logit_scale.detach().double().requires_grad_()
        expected = grads(ref_clip(*[t.detach() for t in inputs], log_scale.exp()), log_scale)[0]
        assert_close(grads(compiled(*inputs), module.logit_scale)[0], expected, dtype=torch.float32, scale=10)


# ----------------------------------------------------------------------------------------------------
# NaN in, NaN out
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ntxent", "moco", "infonce", "clip", "cpc"])
def test_nan_propagates(name):
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    a[0, 2] = float("nan")  # row 0: for CPC context[0, 0], which predicts codes[0, 1]
    if name == "ntxent":
        loss = NTXentLoss()(a, b)
    elif name == "moco":
        loss = NTXentLoss(memory_bank_size=(6, 3))(a, b)
    elif name == "infonce":
        loss = InfoNCELoss()(a, b)
    elif name == "clip":
        loss = CLIPLoss()(a, b)
    else:
        loss = CPCLoss(3, 3, 1)(a.reshape(2, 2, 3), b.reshape(2, 2, 3))
    assert torch.isnan(loss)


# ----------------------------------------------------------------------------------------------------
# open_clip's ClipLoss and SigLipLoss
# ----------------------------------------------------------------------------------------------------

from fastssl.losses import ClipLoss, SigLipLoss  # noqa: E402

HAVE_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


def ref_siglip(img, txt, scale, bias):
    logits = scale * img.double() @ txt.double().T + bias
    z = 2 * torch.eye(img.shape[0], dtype=F64, device=img.device) - 1
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


def test_cliploss_open_clip_call_and_meaning(backend, device):
    """open_clip's call: features used as given (no normalization), a 0-dim logit_scale with a gradient,
    output_dict; logit_bias shifts every logit (no change to the loss) and gets a zero gradient."""
    img, txt = leaf(7, 5, device=device), leaf(7, 5, device=device)
    log_scale = torch.tensor(1.1, dtype=F64, device=device, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=F64, device=device, requires_grad=True)
    loss_fn = ClipLoss()
    out = loss_fn(img, txt, log_scale.exp(), output_dict=True)
    logits = log_scale.exp() * img @ txt.T
    targets = torch.arange(7, device=device)
    ref = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    assert list(out) == ["contrastive_loss"]
    assert_close(out["contrastive_loss"], ref)
    for g, r in zip(grads(out["contrastive_loss"], img, txt, log_scale), grads(ref, img, txt, log_scale)):
        assert_close(g, r)
    with_bias = loss_fn(img, txt, log_scale.exp(), bias)
    assert_close(with_bias, ref)
    assert grads(with_bias, bias)[0].item() == 0.0
    assert torch.isnan(loss_fn(img, txt, log_scale.exp(), torch.tensor(float("nan"), dtype=F64, device=device)))


def test_sigliploss_open_clip_call_and_meaning(backend, device):
    img, txt = leaf(9, 6, device=device), leaf(9, 6, device=device)
    scale = torch.tensor(2.0, dtype=F64, device=device, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=F64, device=device, requires_grad=True)
    out = SigLipLoss(dist_impl="gather", chunk_size=4)(img, txt, scale.exp(), bias, output_dict=True)
    ref = ref_siglip(img, txt, scale.exp(), bias)
    assert list(out) == ["contrastive_loss"]
    assert_close(out["contrastive_loss"], ref)
    for g, r in zip(grads(out["contrastive_loss"], img, txt, scale, bias), grads(ref, img, txt, scale, bias)):
        assert_close(g, r)
    assert_close(SigLipLoss()(img, txt, scale.exp(), None), ref_siglip(img, txt, scale.exp(), 0.0))


@pytest.mark.parametrize("cls, kwargs, error, match", [
    (ClipLoss, dict(use_horovod=True), NotImplementedError, "Horovod is not supported"),
    (ClipLoss, dict(local_loss=1), TypeError, "local_loss must be True or False"),
    (ClipLoss, dict(rank=2, world_size=2), ValueError, r"rank must be in \[0, world_size=2\)"),
    (ClipLoss, dict(world_size=0), ValueError, "world_size must be an int >= 1"),
    (SigLipLoss, dict(dist_impl="ring"), ValueError, "dist_impl must be one of"),
    (SigLipLoss, dict(chunk_size=-1), ValueError, "chunk_size must be an int >= 0"),
    (SigLipLoss, dict(rank=-1), ValueError, "rank must be an int >= 0"),
])
def test_open_clip_modules_validation(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [ClipLoss, SigLipLoss])
def test_open_clip_modules_world_size_without_process_group(cls):
    args = (torch.randn(4, 3), torch.randn(4, 3), torch.tensor(2.0), torch.tensor(0.0))
    with pytest.raises(RuntimeError, match=r"\(world_size=2\) needs an initialized torch.distributed process group"):
        cls(rank=1, world_size=2)(*args)


@pytest.mark.skipif(not HAVE_OPEN_CLIP, reason="open_clip is not installed")
@pytest.mark.parametrize("name", ["ClipLoss", "SigLipLoss"])
def test_open_clip_modules_equal_open_clip(name):
    import open_clip.loss as oc

    img, txt = (F.normalize(torch.randn(19, 12), dim=1).requires_grad_() for _ in range(2))
    scale = torch.tensor(2.6, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    ours = {"ClipLoss": ClipLoss, "SigLipLoss": SigLipLoss}[name]()(img, txt, scale.exp(), bias, output_dict=True)
    theirs = getattr(oc, name)()(img, txt, scale.exp(), bias, output_dict=True)
    torch.testing.assert_close(ours["contrastive_loss"], theirs["contrastive_loss"], rtol=1e-5, atol=1e-5)
    for g, r in zip(grads(ours["contrastive_loss"], img, txt, scale), grads(theirs["contrastive_loss"], img, txt, scale)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not HAVE_OPEN_CLIP, reason="open_clip is not installed")
@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
@pytest.mark.parametrize("siglip", [False, True])
def test_open_clip_training_loop_runs_with_our_losses(monkeypatch, siglip, precision):
    """open_clip's own training code (open_clip_train.train.train_one_epoch, the loss built by
    open_clip.factory.create_loss) with our ClipLoss / SigLipLoss in place of its own: three steps of a tiny
    CLIP (or SigLIP, with its logit bias) end at the parameters its own loss reaches. With amp_bf16 (the loss
    called under autocast, its backward after) open_clip's logits are bf16 and ours float32: near, not equal."""
    import argparse

    import open_clip
    import open_clip.factory as factory
    from open_clip_train import train as oc_train

    import fastssl.losses as ours

    def run(loss_classes):
        monkeypatch.setattr(factory, "ClipLoss", loss_classes[0])
        monkeypatch.setattr(factory, "SigLipLoss", loss_classes[1])
        torch.manual_seed(0)
        model = open_clip.model.CLIP(
            embed_dim=16, vision_cfg=dict(image_size=16, patch_size=8, width=64, layers=1, head_width=32),
            text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1),
            init_logit_bias=-10.0 if siglip else None, output_dict=True)
        args = argparse.Namespace(device="cpu", precision=precision, distill=False, accum_freq=1, skip_scheduler=True,
                                  horovod=False, grad_clip_norm=None, log_every_n_steps=1, batch_size=8,
                                  world_size=1, rank=0, local_rank=0, wandb=False, siglip=siglip, local_loss=False,
                                  gather_with_grad=False, loss_dist_impl=None, model="tiny", save_logs=False,
                                  cache_labels=False)
        loss = factory.create_loss(args)

        class Loader(list):
            num_batches, num_samples = 3, 24

        batches = Loader([(torch.randn(8, 3, 16, 16), torch.randint(0, 50, (8, 8))) for _ in range(3)])
        data = {"train": argparse.Namespace(dataloader=batches, set_epoch=lambda epoch: None)}
        oc_train.train_one_epoch(model, data, loss, 0, torch.optim.SGD(model.parameters(), lr=0.1), None, None,
                                 None, args)
        return loss, [p.detach() for p in model.parameters()]

    theirs_loss, theirs = run((factory.ClipLoss, factory.SigLipLoss))
    our_loss, mine = run((ours.ClipLoss, ours.SigLipLoss))
    assert type(our_loss) is (ours.SigLipLoss if siglip else ours.ClipLoss)
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=0.0, atol=0.05)  # amp: 0.015 apart
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, **tol)


# ----------------------------------------------------------------------------------------------------
# SupervisedNTXentLoss, SupConLoss
# ----------------------------------------------------------------------------------------------------

from fastssl.contrastive import supcon_loss_reference, supervised_nt_xent_reference  # noqa: E402
from fastssl.losses import SupConLoss, SupervisedNTXentLoss  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_supervised_ntxent_module_pml_call(backend, device, dtype):
    """pml's call (embeddings, labels, ref_emb, ref_labels); the loss in the embeddings' dtype, as pml's."""
    x = torch.randn(9, 5, device=device).to(dtype).requires_grad_()
    refs = torch.randn(6, 5, device=device).to(dtype)
    labels, ref_labels = torch.randint(0, 3, (9,), device=device), torch.randint(0, 3, (6,), device=device)
    loss_fn = SupervisedNTXentLoss(temperature=0.2)
    for kw in ({}, dict(ref_emb=refs, ref_labels=ref_labels)):
        out = loss_fn(x, labels, **kw)
        assert out.dtype == dtype
        ref = supervised_nt_xent_reference(x, labels, temperature=0.2, ref_embeddings=kw.get("ref_emb"),
                                           ref_labels=kw.get("ref_labels"))
        assert_close(out, ref, dtype=dtype, scale=2)


def test_supervised_ntxent_module_self_references_as_pml():
    """pml leaves a == p out when ``ref_labels`` is the labels object itself: passing the embeddings as
    their own references is the call without references there and here; a miner's pairs in the third
    positional place (pml's ``indices_tuple``) get a TypeError that says so."""
    x = torch.randn(6, 5, dtype=F64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss_fn = SupervisedNTXentLoss(temperature=0.2)
    alone = loss_fn(x, labels)
    assert_close(loss_fn(x, labels, ref_emb=x, ref_labels=labels), alone)
    assert_close(loss_fn(x, labels, ref_labels=labels), alone)
    assert_close(alone, supervised_nt_xent_reference(x, labels, temperature=0.2))
    copied = loss_fn(x, labels, ref_emb=x.clone(), ref_labels=labels.clone())  # other objects: a == p allowed
    assert_close(copied, supervised_nt_xent_reference(x, labels, temperature=0.2, ref_embeddings=x,
                                                       ref_labels=labels))
    with pytest.raises(TypeError, match="indices_tuple"):
        loss_fn(x, labels, (torch.tensor([0]), torch.tensor([1])))


def test_supcon_module(backend, device):
    x = leaf(6, 2, 5, device=device)
    labels = torch.tensor([0, 1, 0, 2, 1, 2], device=device)
    out = SupConLoss(temperature=0.3)(x, labels)
    ref = supcon_loss_reference(x, labels, temperature=0.3)
    assert_close(out, ref)
    assert_close(grads(out, x)[0], grads(ref, x)[0])


@pytest.mark.parametrize("cls", [SupervisedNTXentLoss, SupConLoss])
def test_supervised_modules_validation(cls):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        cls(temperature=0.0)


def test_supervised_modules_compile_fullgraph():
    torch._dynamo.reset()
    x = leaf(7, 4, dtype=torch.float32)
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 0])
    sup, con = SupervisedNTXentLoss(0.3), SupConLoss(0.3)
    compiled = torch.compile(lambda a, l: sup(a, l) + con(a, l), fullgraph=True, backend="aot_eager")
    out = compiled(x, labels)
    ref = supervised_nt_xent_reference(x, labels, temperature=0.3) + supcon_loss_reference(x, labels, temperature=0.3)
    assert_close(out, ref, scale=10)
    assert_close(grads(out, x)[0], grads(ref, x)[0], dtype=torch.float32, scale=10)
