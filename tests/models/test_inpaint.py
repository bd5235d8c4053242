"""Context encoder: the hole, its fill, and a loss that only looks inside the hole."""
import pytest
import torch

from fastssl.models.encoders import ConvEncoder
from fastssl.models.inpaint import ContextEncoder, upsampler


def test_mask_blanks_one_square_with_the_fill_value():
    model = ContextEncoder(ConvEncoder(1, 8, 16), hole=6, fill=0.5, decoder_width=16)
    x = torch.rand(5, 1, 16, 16)
    holed, mask = model.mask(x, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 1, 16, 16) and (mask.sum((1, 2, 3)) == 36).all()
    rows, cols = mask.amax(3), mask.amax(2)  # the hole is one 6 x 6 square
    assert (rows.sum(2) == 6).all() and (cols.sum(2) == 6).all()
    assert (holed[mask.bool()] == 0.5).all() and torch.equal(holed[~mask.bool()], x[~mask.bool()])


def test_loss_is_the_squared_error_inside_the_hole_only():
    model = ContextEncoder(ConvEncoder(1, 8, 16), hole=6, decoder_width=16)
    x = torch.rand(4, 1, 16, 16)
    holed, mask = model.mask(x, torch.Generator().manual_seed(3))
    expected = ((model(holed) - x) ** 2)[mask.bool()].mean()
    assert torch.allclose(model.loss(x, torch.Generator().manual_seed(3)), expected)


def test_images_must_have_the_channels_the_model_reconstructs():
    """3-channel images into a 1-channel model were broadcast against the reconstruction without a word."""
    model = ContextEncoder(ConvEncoder(3, 8, 16), hole=8, decoder_width=16)
    with pytest.raises(ValueError, match=r"images must be \(N, 1, H, W\)"):
        model.loss(torch.rand(4, 3, 24, 24))
    with pytest.raises(ValueError, match="images must be"):
        model.mask(torch.rand(3, 24, 24))
    with pytest.raises(ValueError, match="channels"):
        ContextEncoder(ConvEncoder(1, 8, 16), channels=0)


def test_upsampler_returns_to_full_resolution_and_bad_holes_are_rejected():
    assert upsampler(32, 3, width=16)(torch.rand(2, 32, 4, 4)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="positive"):
        ContextEncoder(ConvEncoder(1, 8, 16), hole=0)
    with pytest.raises(ValueError, match="does not fit"):
        ContextEncoder(ConvEncoder(1, 8, 16), hole=20).mask(torch.rand(1, 1, 16, 16))
