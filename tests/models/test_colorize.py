"""Colorization: Lab conversion, ab bins and their rebalancing weights, the annealed-mean readout."""
import pytest
import torch

from fastssl.models.colorize import Colorizer, ab_bins, lab_to_rgb, rgb_to_lab
from fastssl.models.encoders import ConvEncoder


def test_lab_round_trip_and_grey_has_no_colour():
    rgb = torch.rand(2, 3, 8, 8)
    lightness, ab = rgb_to_lab(rgb)
    assert lightness.shape == (2, 1, 8, 8) and 0 <= lightness.min() and lightness.max() <= 1
    assert torch.allclose(torch.from_numpy(lab_to_rgb(lightness, ab)).permute(0, 3, 1, 2).float(), rgb, atol=1e-3)
    _, grey_ab = rgb_to_lab(rgb[:, :1].expand(-1, 3, -1, -1))
    assert grey_ab.abs().max() < 0.01  # ab spans about +-100


def test_bins_index_the_nearest_centre_and_rebalance_rare_colours():
    common, rare = torch.full((2, 99), 3.0), torch.tensor([[40.0], [-40.0]])
    ab = torch.cat([common, rare], 1).view(1, 2, 10, 10)
    bins = ab_bins(ab, step=10, mix=0.1)
    assert bins.centres.tolist() == [[5.0, 5.0], [45.0, -35.0]]
    assert bins.index(ab).flatten().tolist() == [0] * 99 + [1]
    p = torch.tensor([0.99, 0.01])
    assert torch.isclose((p * bins.weights).sum(), torch.tensor(1.0)) and bins.weights[1] > 10 * bins.weights[0]
    with pytest.raises(ValueError, match="N, 2, H, W"):
        ab_bins(torch.rand(1, 3, 4, 4))


def test_colorize_reads_out_the_annealed_mean_of_the_bins():
    ab = torch.tensor([[-20.0, 30.0]]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    bins = ab_bins(torch.cat([ab, -ab], 3))  # two bins
    model = Colorizer(ConvEncoder(1, 8, 16), bins, decoder_width=8).eval()
    conv = model.decoder[-1]
    torch.nn.init.zeros_(conv.weight)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([0.0, 0.0]))
    out = model.colorize(torch.rand(3, 1, 8, 8))
    assert out.shape == (3, 2, 8, 8) and torch.allclose(out, bins.centres.mean(0).view(1, 2, 1, 1).expand_as(out))
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([10.0, 0.0]))  # logit gap 10 / T = 26: all mass on bin 0
    assert torch.allclose(model.colorize(torch.rand(1, 1, 8, 8)), bins.centres[0].view(1, 2, 1, 1).expand(1, 2, 8, 8), atol=1e-4)


def test_loss_needs_sizes_that_are_multiples_of_8_and_matching_ab():
    """20 x 20 images gave 6 x 6 logits against a 5 x 5 target: a size mismatch deep in cross_entropy."""
    from fastssl.models.colorize import example

    model, (lightness, ab) = example()
    with pytest.raises(ValueError, match="multiples of 8"):
        model.loss(torch.rand(2, 1, 20, 20), torch.randn(2, 2, 20, 20))
    with pytest.raises(ValueError, match="ab must be"):
        model.loss(lightness, ab[:, :, :8])
    with pytest.raises(TypeError, match="ab"):
        model.loss(lightness, ab.long())


def test_colorizer_rejects_bad_arguments():
    bins = ab_bins(torch.randn(1, 2, 4, 4) * 20)
    with pytest.raises(TypeError, match="ABBins"):
        Colorizer(ConvEncoder(1, 8, 16), bins.centres)
    with pytest.raises(ValueError, match="temperature"):
        Colorizer(ConvEncoder(1, 8, 16), bins, temperature=0)
