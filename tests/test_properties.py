"""Property-based tests (hypothesis) of the public ops on both backends (the contrastive losses, SigLIP and
the supervised ones included): drawn memory layouts (contiguous,
transposed, row-sliced, expanded with stride 0, channels_last, a storage offset), dtypes, small odd shapes
and extreme values, each checked against the float64 reference of the same input values: both backends
agree with it (non-finite outputs where it has them), or both raise the same error type.

Sized for CI (the interpreted kernels are slow): shapes of a few rows, a dozen examples an op, a fixed
seed (``derandomize``), forward values only (the gradients have their own tests in each slice).
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastssl
from conftest import BACKENDS, TOLERANCES
from fastssl.contrastive import (clip_loss_reference, info_nce_reference, moco_loss_reference, nt_xent_reference,
                                 siglip_loss_reference, supcon_loss_reference, supervised_nt_xent_reference)
from fastssl.diffusion import cfg_combine_reference, ddim_step_reference, ddpm_step_reference, q_sample_reference
from fastssl.propagation import color_propagate_reference

pytest.importorskip("triton")

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "offset", "channels_last"]
SCHEDULE = fastssl.NoiseSchedule.linear(100)


def relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x``'s values in another memory layout (``expanded``: row 0 repeated with stride 0, which changes
    the values; the references see the same ones). A layout the tensor's rank cannot take leaves it."""
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "sliced" and x.dim() >= 1:
        wide = torch.zeros(2 * x.shape[0], *x.shape[1:], dtype=x.dtype)
        wide[::2] = x
        return wide[::2]
    if layout == "expanded" and x.dim() >= 1 and x.shape[0] > 0:
        return x[:1].expand_as(x)
    if layout == "offset":
        storage = torch.zeros(x.numel() + 3, dtype=x.dtype)
        storage[3:] = x.reshape(-1)
        return storage[3:].view(x.shape)
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@st.composite
def tensors(draw, shape, dtype, *, low_scale=-3, high_scale=2):
    """A tensor of ``shape`` in ``dtype``: normal values times 10**k (k drawn), in a drawn layout."""
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.integers(low_scale, high_scale))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    return relayout(values.to(dtype), draw(st.sampled_from(LAYOUTS)))


@contextlib.contextmanager
def backend(name: str):
    old = os.environ.get("FASTSSL_BACKEND")
    os.environ["FASTSSL_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["FASTSSL_BACKEND"]
        else:
            os.environ["FASTSSL_BACKEND"] = old


def on_both_backends(call):
    """``call()`` on each backend: its result, or the type of the ValueError/TypeError it raised."""
    results = []
    for name in BACKENDS:
        with backend(name):
            try:
                results.append(call())
            except (ValueError, TypeError) as exc:
                results.append(type(exc))
    return results


def largest_logit(a: torch.Tensor, b: torch.Tensor, factor: float, normalize: bool) -> float:
    """max_ij |factor * a_i . b_j| in float64 (the rows normalized first with ``normalize``)."""
    a, b = a.double(), b.double()
    if normalize:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    return abs(factor) * (a @ b.t()).abs().max().item() if a.numel() and b.numel() else 0.0


def check(results, reference, dtype, *, scale=10.0, logits=0.0):
    """Every backend's result agrees with the float64 ``reference`` (a callable; an error type when it
    raises): the same non-finite positions, the finite values within the dtype's tolerance of the
    largest magnitude; or every backend raised the reference's error type. ``logits``: the largest
    |logit| of a loss; a loss that is a difference of logits (LSE minus the positive) is known to a few
    ulps of it in its math dtype, however small its value (logits of 3e4 agreeing to 0.7: eager fp32's
    cross-entropy and both backends are off by 1-1.4 ulps, 0.003), so 4 ulps of it are allowed besides."""
    try:
        expected = reference()
    except (ValueError, TypeError) as exc:
        expected = type(exc)
    for got in results:
        if isinstance(expected, type) or isinstance(got, type):
            assert got == expected, (got, expected)
            continue
        got, want = got.detach().double(), expected.detach().double()
        assert got.shape == want.shape
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), (got, want)
        assert torch.equal(got[got.isinf()], want[want.isinf()])
        finite = want.isfinite()
        if finite.any():
            tol = TOLERANCES[dtype]
            magnitude = max(want[finite].abs().max().item(), 1.0)
            ulp = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
            torch.testing.assert_close(got[finite], want[finite], rtol=tol["rtol"] * scale,
                                       atol=tol["atol"] * scale * magnitude + 4 * ulp * logits)


# ----------------------------------------------------------------------------------------------------
# contrastive losses
# ----------------------------------------------------------------------------------------------------

@st.composite
def contrastive_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n, d = draw(st.integers(1, 9)), draw(st.integers(1, 12))
    return dict(dtype=dtype, n=n, d=d, temperature=draw(st.sampled_from([0.05, 0.5, 3.0])),
                normalize=draw(st.booleans()), reduction=draw(st.sampled_from(["mean", "sum", "none"])))


@SETTINGS
@given(case=contrastive_case(), data=st.data())
def test_nt_xent_and_info_nce_properties(case, data):
    dtype, n, d = case["dtype"], case["n"], case["d"]
    z1, z2 = data.draw(tensors((n, d), dtype)), data.draw(tensors((n, d), dtype))
    keys = data.draw(tensors((n + data.draw(st.integers(0, 4)), d), dtype))
    opts = {k: case[k] for k in ("temperature", "normalize", "reduction")}
    inv_t, normalize = 1 / case["temperature"], case["normalize"]
    both = torch.cat((z1, z2))
    check(on_both_backends(lambda: fastssl.nt_xent(z1, z2, **opts)), lambda: nt_xent_reference(z1, z2, **opts), dtype,
          logits=largest_logit(both, both, inv_t, normalize))
    check(on_both_backends(lambda: fastssl.info_nce(z1, keys, **opts)),
          lambda: info_nce_reference(z1, keys, **opts), dtype, logits=largest_logit(z1, keys, inv_t, normalize))


@SETTINGS
@given(case=contrastive_case(), data=st.data())
def test_moco_and_clip_properties(case, data):
    dtype, n, d = case["dtype"], case["n"], case["d"]
    q, k = data.draw(tensors((n, d), dtype)), data.draw(tensors((n, d), dtype))
    queue = data.draw(tensors((data.draw(st.integers(1, 11)), d), dtype))
    opts = {k_: case[k_] for k_ in ("temperature", "normalize", "reduction")}
    normalize = case["normalize"]
    check(on_both_backends(lambda: fastssl.moco_loss(q, k, queue, **opts)),
          lambda: moco_loss_reference(q, k, queue, **opts), dtype,
          logits=largest_logit(q, torch.cat((k, queue)), 1 / case["temperature"], normalize))
    scale = data.draw(st.sampled_from([1.0, 14.3, 100.0]))
    opts = {k_: case[k_] for k_ in ("normalize", "reduction")}
    check(on_both_backends(lambda: fastssl.clip_loss(q, k, scale, **opts)),
          lambda: clip_loss_reference(q, k, scale, **opts), dtype, logits=largest_logit(q, k, scale, normalize))


@SETTINGS
@given(case=contrastive_case(), data=st.data())
def test_siglip_properties(case, data):
    dtype, n, d = case["dtype"], case["n"], case["d"]
    x, y = data.draw(tensors((n, d), dtype)), data.draw(tensors((n, d), dtype))
    scale, bias = data.draw(st.sampled_from([1.0, 10.0, 100.0])), data.draw(st.sampled_from([-10.0, 0.0, 2.5]))
    opts = {k: case[k] for k in ("normalize", "reduction")}
    check(on_both_backends(lambda: fastssl.siglip_loss(x, y, scale, bias, **opts)),
          lambda: siglip_loss_reference(x, y, scale, bias, **opts), dtype)


@SETTINGS
@given(case=contrastive_case(), data=st.data())
def test_supervised_nt_xent_and_supcon_properties(case, data):
    """Labels drawn from few classes (rows without a positive, or without a negative, occur)."""
    dtype, n, d = case["dtype"], case["n"], case["d"]
    x = data.draw(tensors((n, d), dtype))
    labels = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    opts = {k: case[k] for k in ("temperature", "normalize")}
    logits = largest_logit(x, x, 1 / case["temperature"], case["normalize"])
    check(on_both_backends(lambda: fastssl.supervised_nt_xent(x, labels, **opts)),
          lambda: supervised_nt_xent_reference(x, labels, **opts), dtype, logits=logits)
    check(on_both_backends(lambda: fastssl.supcon_loss(x, labels, reduction=case["reduction"], **opts)),
          lambda: supcon_loss_reference(x, labels, reduction=case["reduction"], **opts), dtype, logits=logits)


# ----------------------------------------------------------------------------------------------------
# diffusion
# ----------------------------------------------------------------------------------------------------

@st.composite
def diffusion_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(1, 5), (3, 7), (2, 3, 4, 5), (3, 2, 3, 3)]))
    t = draw(st.sampled_from([0, 1, 57, 99, "per-sample"]))
    if t == "per-sample":
        t = torch.tensor(draw(st.lists(st.integers(0, 99), min_size=shape[0], max_size=shape[0])))
    return dict(dtype=dtype, shape=shape, t=t, guidance=draw(st.sampled_from([0.0, 1.0, 7.5, 100.0])),
                clip_sample=draw(st.booleans()),
                prediction_type=draw(st.sampled_from(["epsilon", "sample", "v_prediction"])))


@SETTINGS
@given(case=diffusion_case(), data=st.data())
def test_cfg_combine_and_q_sample_properties(case, data):
    dtype, shape = case["dtype"], case["shape"]
    a, b = data.draw(tensors(shape, dtype, high_scale=1)), data.draw(tensors(shape, dtype, high_scale=1))
    w = case["guidance"]
    check(on_both_backends(lambda: fastssl.cfg_combine(a, b, w)), lambda: cfg_combine_reference(a, b, w), dtype)
    t = case["t"]
    check(on_both_backends(lambda: fastssl.q_sample(a, t, b, SCHEDULE)), lambda: q_sample_reference(a, t, b, SCHEDULE),
          dtype)


@SETTINGS
@given(case=diffusion_case(), data=st.data())
def test_sampler_step_properties(case, data):
    dtype, shape, t = case["dtype"], case["shape"], case["t"]
    m, u, x, z = (data.draw(tensors(shape, dtype, high_scale=1)) for _ in range(4))
    guided = dict(uncond_output=u, guidance=case["guidance"]) if case["guidance"] else {}
    opts = dict(clip_sample=case["clip_sample"], prediction_type=case["prediction_type"], **guided)
    check(on_both_backends(lambda: fastssl.ddpm_step(m, t, x, SCHEDULE, noise=z, **opts)),
          lambda: ddpm_step_reference(m, t, x, SCHEDULE, noise=z, **opts)[0], dtype, scale=20)
    prev = t - 9 if isinstance(t, torch.Tensor) else t - 9
    eta = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    check(on_both_backends(lambda: fastssl.ddim_step(m, t, prev, x, SCHEDULE, eta=eta, noise=z, **opts)),
          lambda: ddim_step_reference(m, t, prev, x, SCHEDULE, eta=eta, noise=z, **opts)[0], dtype, scale=20)


# ----------------------------------------------------------------------------------------------------
# propagation
# ----------------------------------------------------------------------------------------------------

@SETTINGS
@given(data=st.data())
def test_color_propagate_properties(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    b, r, c, h, w, v = (data.draw(st.integers(lo, hi)) for lo, hi in ((1, 2), (1, 2), (1, 8), (1, 5), (1, 5), (1, 3)))
    target = data.draw(tensors((b, c, h, w), dtype, high_scale=0))
    refs = data.draw(tensors((b, r, c, h, w), dtype, high_scale=0))
    values = data.draw(tensors((b, r, v, h, w), dtype, high_scale=1))
    radius = data.draw(st.sampled_from([None, 0.0, 1.5, 3.0]))
    temperature = data.draw(st.sampled_from([0.1, 1.0, 5.0]))
    topk = data.draw(st.sampled_from([None, None, 1, 3]))
    if topk is not None and (topk > r * h * w or refs.stride(0) == 0 or radius is not None):
        topk = None  # top-k ties (stride-0 keys) have their own test; radius 0 can leave fewer than k keys
    opts = dict(temperature=temperature, radius=radius, topk=topk)
    check(on_both_backends(lambda: fastssl.color_propagate(target, refs, values, **opts)),
          lambda: color_propagate_reference(target, refs, values, **opts), dtype, scale=20)
