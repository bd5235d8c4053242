"""Dense Object Nets: the warped pairs' correspondences are exact, the descriptor net keeps full
resolution, the loss is info_nce over matched descriptors, and the match metric sees a perfect matcher."""
import pytest
import torch
import torch.nn.functional as F

from fastssl.contrastive import info_nce
from fastssl.models.don import DenseObjectNet, PixelEncoder, example, match_accuracy, sample_descriptors, warped_pairs


def ramp_image(size=64):
    """A source whose pixel values are (an affine function of) their own coordinates."""
    yy, xx = torch.meshgrid(torch.linspace(0.1, 0.9, size), torch.linspace(0.1, 0.9, size), indexing="ij")
    return torch.stack([xx, yy, torch.full_like(xx, 0.5)])[None]


def test_warped_pairs_correspondences_point_at_the_same_source_pixel():
    va, vb, pa, pb = warped_pairs(ramp_image(), 4, 24, 50, generator=torch.Generator().manual_seed(0))
    ca, cb = sample_descriptors(va, pa), sample_descriptors(vb, pb)
    assert ca[..., :2].std() > 0.05  # the points spread over the view
    for i in range(4):  # view b = gain * view a + offset (brightness/contrast): exact up to that affine map
        x = torch.stack([ca[i, :, 0], torch.ones(50)], 1)
        fit = torch.linalg.lstsq(x, cb[i, :, :1]).solution
        assert (x @ fit - cb[i, :, :1]).abs().max() < 1e-4
    assert ((pa >= 0) & (pa <= 23) & (pb >= 0) & (pb <= 23)).all()


def test_warped_pairs_are_reproducible_and_different_across_seeds():
    imgs = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = warped_pairs(imgs, 3, 16, 8, generator=torch.Generator().manual_seed(1))
    b = warped_pairs(imgs, 3, 16, 8, generator=torch.Generator().manual_seed(1))
    c = warped_pairs(imgs, 3, 16, 8, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="images must be"):
        warped_pairs(imgs[0], 3, 16, 8)


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_pixel_encoder_shapes_and_bad_arguments(stride):
    out = PixelEncoder(3, width=4, out_dim=6, levels=2, stride=stride)(torch.rand(2, 3, 16, 20))
    assert out.shape == (2, 6, 16 // stride, 20 // stride)
    with pytest.raises(ValueError, match="stride"):
        PixelEncoder(3, stride=3)
    with pytest.raises(TypeError, match="width"):
        PixelEncoder(3, width=2.0)
    with pytest.raises(ValueError, match="temperature"):
        DenseObjectNet(PixelEncoder(3), temperature=0)


def test_loss_is_info_nce_over_matched_descriptors_without_negatives():
    torch.manual_seed(0)
    model = DenseObjectNet(PixelEncoder(3, width=4, out_dim=8, levels=1), num_negatives=0).eval()
    va, vb, pa, pb = warped_pairs(torch.rand(2, 3, 48, 48), 2, 16, 10, generator=torch.Generator().manual_seed(0))
    da, db = F.normalize(model.encoder(torch.cat([va, vb])), dim=1).chunk(2)
    expected = info_nce(sample_descriptors(da, pa).flatten(0, 1), sample_descriptors(db, pb).flatten(0, 1),
                        temperature=0.1, normalize=False)
    torch.testing.assert_close(model.loss(va, vb, pa, pb), expected)


def test_loss_and_match_accuracy_refuse_misaligned_pairs():
    """points_b with one point more than points_a paired queries and keys row for row, off by one."""
    model, (va, vb, pa, pb) = example()
    for call in (model.loss, lambda *args: match_accuracy(model.encoder, *args)):
        with pytest.raises(ValueError, match="points_b has shape"):
            call(va, vb, pa, torch.cat([pb, pb[:, :1]], 1))
        with pytest.raises(ValueError, match="view_b has shape"):
            call(va, vb[..., :12, :12], pa, pb)
        with pytest.raises(ValueError, match="points_a must be"):
            call(va, vb, pa[..., :1], pb[..., :1])


class Coordinates(torch.nn.Module):
    """A 'descriptor' that is the pixel's source coordinate: a perfect matcher on the ramp image."""

    def forward(self, x):
        return torch.cat([x[:, :2] - 0.5, torch.full_like(x[:, :1], 0.02)], 1) * 10


class Constant(torch.nn.Module):
    def forward(self, x):
        return torch.ones_like(x[:, :1])  # every pixel ties: argmax picks pixel 0


def test_match_accuracy_of_a_perfect_and_of_a_constant_descriptor():
    va, vb, pa, pb = warped_pairs(ramp_image(), 4, 24, 30, generator=torch.Generator().manual_seed(0))
    ca, cb = sample_descriptors(va, pa), sample_descriptors(vb, pb)
    for i in range(4):  # undo view b's brightness/contrast change: its values are coordinates again
        x = torch.stack([cb[i, :, 0], torch.ones(30)], 1)
        gain, offset = torch.linalg.lstsq(x, ca[i, :, :1]).solution[:, 0]
        vb[i] = vb[i] * gain + offset
    assert match_accuracy(Coordinates(), va, vb, pa, pb)[0] > 0.95
    assert match_accuracy(Constant(), va, vb, pa, pb)[0] < 0.2
