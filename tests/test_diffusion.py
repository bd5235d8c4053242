"""Diffusion slice: parity against the float64 reference on both backends, gradients, validation."""
import pytest
import torch

import fastssl
from conftest import TOLERANCES, assert_close, assert_close_lowp
from fastssl.diffusion import cfg_combine_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guidance_kind", ["float", "per_sample", "zero_dim"])
def test_cfg_combine_matches_reference(backend, device, dtype, guidance_kind):
    cond = torch.randn(3, 37, 5, device=device, dtype=dtype)  # 555 elements: not a multiple of any block
    uncond = torch.randn_like(cond)
    guidance = {"float": 3.7,
                "per_sample": torch.rand(3, device=device, dtype=dtype) * 8,
                "zero_dim": torch.tensor(2.5, device=device, dtype=dtype)}[guidance_kind]
    out = fastssl.cfg_combine(cond, uncond, guidance)
    assert out.dtype == dtype and out.shape == cond.shape
    reference = cfg_combine_reference(cond, uncond, guidance)
    if dtype in (torch.float16, torch.bfloat16):
        assert_close_lowp(out, reference, cfg_combine_reference(cond, uncond, guidance, upcast=False))
    else:
        assert_close(out, reference, scale=10)


def test_cfg_combine_non_contiguous_and_empty(backend, device):
    cond = torch.randn(4, 6, 9, device=device).transpose(1, 2)
    uncond = torch.randn(4, 9, 6, device=device)
    assert_close(fastssl.cfg_combine(cond, uncond, 1.5), cfg_combine_reference(cond, uncond, 1.5), torch.float32)
    empty = torch.empty(0, 3, device=device)
    assert fastssl.cfg_combine(empty, empty, 1.0).shape == (0, 3)


def test_cfg_combine_gradcheck(backend, device):
    cond = torch.randn(3, 7, device=device, dtype=torch.float64, requires_grad=True)
    uncond = torch.randn(3, 7, device=device, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(3, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, u: fastssl.cfg_combine(c, u, 0.7), (cond, uncond))
    assert torch.autograd.gradcheck(fastssl.cfg_combine, (cond, uncond, weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cfg_combine_backward_with_uneven_grad(backend, device, dtype):
    cond = torch.randn(5, 41, device=device, dtype=dtype, requires_grad=True)
    uncond = torch.randn(5, 41, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(5, 41, device=device, dtype=dtype)
    fastssl.cfg_combine(cond, uncond, 1.25).backward(grad)
    assert_close(cond.grad, 2.25 * grad.double(), dtype)
    assert_close(uncond.grad, -1.25 * grad.double(), dtype)


def test_cfg_combine_nan_propagates(backend, device):
    cond = torch.randn(2, 5, device=device)
    cond[1, 3] = float("nan")
    out = fastssl.cfg_combine(cond, torch.randn_like(cond), 1.0)
    assert out[1, 3].isnan() and not out[0].isnan().any()


def test_cfg_combine_compiles_fullgraph(backend, device):
    cond, uncond = torch.randn(2, 8, device=device), torch.randn(2, 8, device=device)
    compiled = torch.compile(lambda c, u: fastssl.cfg_combine(c, u, 2.0) * 3, fullgraph=True)
    assert_close(compiled(cond, uncond), 3 * cfg_combine_reference(cond, uncond, 2.0), torch.float32)


@pytest.mark.parametrize("call, error, match", [
    (lambda d: fastssl.cfg_combine(torch.ones(2, 3, device=d), torch.ones(2, 4, device=d), 1.0), ValueError, r"uncond has shape \(2, 4\)"),
    (lambda d: fastssl.cfg_combine(torch.ones(2, 3, device=d), torch.ones(2, 3, device=d, dtype=torch.float16), 1.0), TypeError, "mixing dtypes"),
    (lambda d: fastssl.cfg_combine(torch.ones(2, 3, device=d, dtype=torch.long), torch.ones(2, 3, device=d), 1.0), TypeError, "cond must be a floating-point"),
    (lambda d: fastssl.cfg_combine(torch.ones(2, 3, device=d), [1.0], 1.0), TypeError, "uncond must be a torch.Tensor"),
    (lambda d: fastssl.cfg_combine(torch.ones(2, 3, device=d), torch.ones(2, 3, device=d), "7.5"), TypeError, "guidance must be a float"),
    (lambda d: fastssl.cfg_combine(torch.ones(2, 3, device=d), torch.ones(2, 3, device=d), torch.ones(3, device=d)), ValueError, r"guidance must be .* \(2,\) tensor"),
    (lambda d: fastssl.cfg_combine(torch.tensor(1.0, device=d), torch.tensor(1.0, device=d), 1.0), ValueError, "batch dimension"),
])
def test_cfg_combine_rejects_bad_input(device, call, error, match):
    with pytest.raises(error, match=match):
        call(device)
