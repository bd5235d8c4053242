"""Relative position: every (centre, neighbour) pair carries the label of the neighbour's cell."""
import torch
from torch import nn

from fastssl.models.relpos import CENTRE, NEIGHBOURS, RelativePosition


class TileMean(nn.Module):
    """A stand-in encoder whose code is the tile's mean: with a constant value per cell it names the cell."""

    out_dim = 1

    def forward(self, x):
        return x.mean(dim=(1, 2, 3)).unsqueeze(1)


def test_pairs_label_the_neighbours_cell():
    cells = torch.arange(9.0).view(1, 1, 3, 3)
    images = cells.repeat_interleave(10, 2).repeat_interleave(10, 3).repeat(5, 1, 1, 1)  # 30 x 30, cell value = index
    model = RelativePosition(TileMean(), patch=7)
    model.head = nn.Identity()  # logits are then the pair of codes (centre, neighbour)
    pair, labels = model.pairs(images, torch.Generator().manual_seed(0))
    assert pair.shape == (40, 2) and torch.equal(labels.bincount(), torch.full((8,), 5))
    assert (pair[:, 0] == CENTRE).all()
    assert torch.equal(pair[:, 1], torch.tensor(NEIGHBOURS, dtype=torch.float)[labels])


def test_loss_is_log8_for_an_uninformed_head():
    model = RelativePosition(TileMean(), patch=7)
    model.head = nn.Sequential(nn.Linear(2, 8))
    nn.init.zeros_(model.head[0].weight), nn.init.zeros_(model.head[0].bias)
    loss = model.loss(torch.rand(4, 1, 30, 30))
    assert torch.isclose(loss, torch.log(torch.tensor(8.0)))


def test_probe_layer_concatenates_the_codes_of_the_nine_cells_in_order():
    from fastssl.models.patches import tile_codes

    cells = torch.arange(9.0).view(1, 1, 3, 3)
    images = cells.repeat_interleave(8, 2).repeat_interleave(8, 3).repeat(2, 1, 1, 1)
    assert torch.equal(tile_codes(TileMean(), images), torch.arange(9.0).expand(2, 9))
