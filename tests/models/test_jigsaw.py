"""Jigsaw: the patch grid, the maximal-Hamming permutation set and the shuffle that makes the labels."""
import pytest
import torch

from fastssl.models.encoders import ConvEncoder
from fastssl.models.jigsaw import Jigsaw, hamming_permutations
from fastssl.models.patches import patch_grid


def test_patch_grid_takes_each_tile_inside_its_cell():
    x = torch.rand(3, 2, 30, 30)
    tiles = patch_grid(x, grid=3, patch=7, generator=torch.Generator().manual_seed(0))
    assert tiles.shape == (3, 9, 2, 7, 7)
    for n in range(3):
        for k in range(9):
            r, c = divmod(k, 3)
            found = [(dy, dx) for dy in range(4) for dx in range(4)
                     if torch.equal(tiles[n, k], x[n, :, 10 * r + dy:10 * r + dy + 7, 10 * c + dx:10 * c + dx + 7])]
            assert found, f"tile {k} of image {n} is not inside its cell"


def test_patch_grid_jitters_with_the_generator_and_rejects_bad_sizes():
    x = torch.rand(4, 1, 30, 30)
    a, b = (patch_grid(x, patch=6, generator=torch.Generator().manual_seed(s)) for s in (0, 0))
    c = patch_grid(x, patch=6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="patch"):
        patch_grid(x, patch=11)
    with pytest.raises(ValueError, match="N, C, H, W"):
        patch_grid(x[0])


@pytest.mark.parametrize("grid", [0, -1])
def test_patch_grid_checks_grid_before_dividing_by_it(grid):
    with pytest.raises(ValueError, match="grid must be an int >= 1"):
        patch_grid(torch.rand(1, 1, 6, 6), grid=grid)
    with pytest.raises(TypeError, match="grid"):
        patch_grid(torch.rand(1, 1, 6, 6), grid=1.5)


def test_hamming_permutations_are_distinct_far_apart_and_deterministic():
    perms = hamming_permutations(30)
    assert perms.shape == (30, 9) and torch.equal(perms[0], torch.arange(9))
    assert torch.equal(perms.sort(1).values, torch.arange(9).expand(30, 9))  # each row permutes 0..8
    dist = (perms[:, None] != perms[None]).sum(-1) + torch.eye(30, dtype=torch.long) * 9
    assert dist.min() >= 7
    assert torch.equal(perms, hamming_permutations(30))
    with pytest.raises(ValueError):
        hamming_permutations(0)


def test_shuffle_puts_tile_perm_i_at_position_i():
    model = Jigsaw(ConvEncoder(1, 8, 16), permutations=10, patch=8, hidden=16)
    x = torch.rand(6, 1, 24, 24)  # cell 8 = patch: no jitter, tiles are deterministic
    shuffled, labels = model.shuffle(x, torch.Generator().manual_seed(0))
    tiles = patch_grid(x, 3, 8)
    for n in range(6):
        assert torch.equal(shuffled[n], tiles[n, model.permutations[labels[n]]])
    assert model(shuffled).shape == (6, 10)


def test_jigsaw_rejects_rows_that_are_not_permutations():
    with pytest.raises(ValueError, match="permute"):
        Jigsaw(ConvEncoder(1, 8, 16), permutations=torch.zeros(4, 9, dtype=torch.long))
