"""CPC: the patch grid runs top to bottom, the context is causal down the rows (in training too: no batch norm
in the patch encoder), the loss checks its rows."""
import pytest
import torch

from fastssl.models.cpc import CPC, pooled_patch_features
from fastssl.models.encoders import ConvEncoder


def small(**kw):
    torch.manual_seed(0)
    return CPC(ConvEncoder(1, 4, 8, norm="layer"), context_dim=8, **kw)


def test_patches_are_the_grid_rows_top_to_bottom():
    m = small(patch=4, stride=2)
    x = torch.arange(100.0).view(1, 1, 10, 10)
    p = m.patches(x)
    assert p.shape == (1, 4, 4, 1, 4, 4)
    assert torch.equal(p[0, 1, 2, 0], x[0, 0, 2:6, 4:8])  # row 1, column 2


def test_context_at_a_row_ignores_the_rows_below():
    m = small().eval()
    z = torch.randn(2, 6, 5, 8)
    changed = z.clone()
    changed[:, 3:] = torch.randn(2, 3, 5, 8)
    c, c2 = m.context(z), m.context(changed)  # (N, cols, rows, ctx)
    torch.testing.assert_close(c[:, :, :3], c2[:, :, :3])
    assert not torch.allclose(c[:, :, 3:], c2[:, :, 3:])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_codes_and_context_of_the_upper_rows_ignore_the_pixels_below(mode):
    """Patch rows 0-2 (8 x 8 patches, stride 4) cover pixels 0-15; changing pixels 16+ of every image must not
    move their codes or context, in training too (batch norm there pooled statistics over all patches)."""
    m = small(prediction_steps=2).train(mode == "train")
    x = torch.rand(4, 1, 32, 32)
    changed = x.clone()
    changed[:, :, 16:] = torch.rand(4, 1, 16, 32)
    with torch.no_grad():
        z, z2 = m.codes(x), m.codes(changed)
        c, c2 = m.context(z), m.context(z2)  # (N, cols, rows, ctx)
    torch.testing.assert_close(z[:, :3], z2[:, :3])
    torch.testing.assert_close(c[:, :, :3], c2[:, :, :3])
    assert not torch.allclose(z[:, 3:], z2[:, 3:])


def test_a_batch_norm_patch_encoder_is_refused():
    with pytest.raises(ValueError, match="batch norm"):
        CPC(ConvEncoder(1, 4, 8))
    with pytest.raises(ValueError, match="norm must be one of"):
        ConvEncoder(1, 4, 8, norm="instance")


def test_loss_and_pooled_features_shapes():
    m = small(prediction_steps=2)
    x = torch.rand(3, 1, 32, 32)
    loss = m.loss(x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert pooled_patch_features(m)(m.encoder, x).shape == (3, 8)
    torch.testing.assert_close(pooled_patch_features(m)(m.encoder, x), m(x))


def test_too_few_rows_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="rows"):
        small(prediction_steps=3).loss(torch.rand(2, 1, 16, 16))  # 3 rows of 8x8 patches
    with pytest.raises(ValueError):
        small(patch=0)
    with pytest.raises(ValueError):
        small(skip=-1)
    with pytest.raises(TypeError):
        CPC(torch.nn.Linear(2, 2))
